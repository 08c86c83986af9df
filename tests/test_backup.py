"""Backups: hard link where the kernel allows it, a verified copy where it does not."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from zmonitor_migrated import backup, fsutil


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "zmonitor.db"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE vitals (id INTEGER PRIMARY KEY, hr INTEGER)")
    conn.executemany("INSERT INTO vitals (hr) VALUES (?)", [(i,) for i in range(500)])
    conn.commit()
    conn.close()
    return path


@pytest.fixture
def other_mount(tmp_path: Path) -> Iterator[Path]:
    """A directory on the same filesystem but another mount, as systemd's
    ReadWritePaths= makes them: link(2) into it fails with EXDEV."""
    d = tmp_path / "backups"
    d.mkdir()
    proc = subprocess.run(["mount", "--bind", str(d), str(d)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root): {proc.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_same_mount_backup_is_a_hard_link(db: Path, tmp_path: Path) -> None:
    bdir = tmp_path / "data" / "backups"
    bk = backup.take(db, bdir, 10)
    assert bk.linked and os.stat(bk.path).st_ino == os.stat(db).st_ino
    assert backup.read_checksum(bk.path) == fsutil.sha256_file(db)
    assert fsutil.can_hardlink(db.parent, bdir)


def test_other_mount_of_the_same_filesystem_gets_a_verified_copy(db: Path,
                                                                  other_mount: Path) -> None:
    assert os.stat(db).st_dev == os.stat(other_mount).st_dev  # st_dev cannot tell
    assert not fsutil.can_hardlink(db.parent, other_mount)
    bk = backup.take(db, other_mount, 10)
    assert not bk.linked
    assert os.stat(bk.path).st_ino != os.stat(db).st_ino
    assert bk.sha256 == fsutil.sha256_file(db) == backup.read_checksum(bk.path)
    assert sorted(p.name for p in other_mount.iterdir()) == [bk.path.name,
                                                             bk.path.name + ".sha256"]


def test_restore_refuses_a_corrupted_backup_and_overwrites_nothing(db: Path,
                                                                  tmp_path: Path) -> None:
    bk = backup.take(db, tmp_path / "copies", 10)  # same mount: make it a copy
    os.unlink(bk.path)
    fsutil.copy_durable(db, bk.path)
    with open(bk.path, "r+b") as f:
        f.seek(1024)
        f.write(b"\xab" * 16)
    live_before = db.read_bytes()
    with pytest.raises(backup.RestoreFailed, match="corrupted"):
        backup.restore(bk.path, db)
    assert db.read_bytes() == live_before
    assert not db.with_name(db.name + ".restoring").exists()


def test_deferred_hash_leaves_the_backup_unsealed_until_sealed(db: Path,
                                                               tmp_path: Path) -> None:
    bdir = tmp_path / "data" / "backups"
    bk = backup.take(db, bdir, 10, defer_hash=True)
    assert bk.linked and bk.sha256 == ""
    assert backup.read_checksum(bk.path) is None
    with pytest.raises(backup.RestoreFailed, match="no recorded checksum"):
        backup.verify(bk.path)
    sealed = backup.seal(bk, fsutil.InBackground(fsutil.sha256_file, bk.path).result())
    assert sealed.sha256 == fsutil.sha256_file(db) == backup.read_checksum(bk.path)
    assert backup.verify(bk.path) == sealed.sha256


def test_in_background_hands_its_error_to_the_caller(tmp_path: Path) -> None:
    job = fsutil.InBackground(fsutil.sha256_file, tmp_path / "missing.db")
    with pytest.raises(FileNotFoundError):
        job.result()


def test_copy_fast_is_byte_identical_and_keeps_the_mode(db: Path, tmp_path: Path) -> None:
    os.chmod(db, 0o640)
    dst = tmp_path / "copy.db"
    fsutil.copy_fast(db, dst)
    assert dst.read_bytes() == db.read_bytes()
    assert os.stat(dst).st_mode & 0o777 == 0o640
    with pytest.raises(FileExistsError):
        fsutil.copy_fast(db, dst)  # never overwrites


@pytest.mark.parametrize("err", [errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP])
def test_copy_fast_streams_where_the_kernel_refuses(db: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    err: int) -> None:
    def refuse(*_a: object) -> int:
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(os, "copy_file_range", refuse)
    dst = tmp_path / "copy.db"
    fsutil.copy_fast(db, dst)
    assert dst.read_bytes() == db.read_bytes()


def test_copy_fast_removes_a_partial_copy_when_the_disk_is_full(
        db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.copy_file_range
    calls: list[int] = []

    def fill_up(src: int, dst: int, count: int) -> int:
        calls.append(count)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, 4096)
    monkeypatch.setattr(os, "copy_file_range", fill_up)
    dst = tmp_path / "copy.db"
    with pytest.raises(OSError) as info:
        fsutil.copy_fast(db, dst)
    assert info.value.errno == errno.ENOSPC
    assert not dst.exists()


_WRITER = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA wal_autocheckpoint=0")
for i in range(200):
    conn.execute("INSERT INTO vitals (hr) VALUES (?)", (1000 + i,))
os._exit(0)  # killed, in effect: no checkpoint, the rows live in the -wal only
"""


def _live_with_rows_in_its_wal(db: Path, tmp_path: Path) -> backup.Backup:
    bk = backup.take(db, tmp_path / "backups", 10)
    os.unlink(db)  # the migrated database that went live: another inode
    fsutil.copy_durable(bk.path, db)
    subprocess.run([sys.executable, "-c", _WRITER, str(db)], check=True)
    assert db.with_name(db.name + "-wal").stat().st_size > 0
    return bk


def _rows(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT COUNT(*), MAX(hr) FROM vitals").fetchone()
    finally:
        conn.close()


def test_the_replaced_database_is_kept_with_rows_still_in_its_wal(db: Path,
                                                                  tmp_path: Path) -> None:
    bk = _live_with_rows_in_its_wal(db, tmp_path)
    bdir = bk.path.parent

    kept = backup.keep_replaced(db, bdir)
    backup.restore(bk.path, db)

    assert kept.parent == bdir and kept.name.endswith("-replaced.db")
    assert db.read_bytes() == bk.path.read_bytes()
    assert not db.with_name(db.name + "-wal").exists()
    assert _rows(kept) == (700, 1199)
    assert backup.list_backups(db, bdir) == [bk.path]  # never mistaken for a backup
    # Keeping the same inode again (a restore re-run after a kill) keeps it once.
    again = backup.keep_replaced(db, bdir)
    assert again != kept and backup.keep_replaced(db, bdir) == again
    assert backup.list_replaced(db, bdir) == [kept, again]


def test_a_keep_killed_between_its_links_is_completed_by_the_next(db: Path,
                                                                  tmp_path: Path) -> None:
    bk = _live_with_rows_in_its_wal(db, tmp_path)
    half = bk.path.parent / "zmonitor-20260101T000000Z-replaced.db"
    os.link(db, half)  # killed here: the -wal, holding the app's rows, not linked yet

    assert backup.keep_replaced(db, bk.path.parent) == half
    backup.restore(bk.path, db)
    assert _rows(half) == (700, 1199)


def test_keeping_falls_back_to_the_database_directory(db: Path, other_mount: Path) -> None:
    kept = backup.keep_replaced(db, other_mount)  # link(2) across mounts: EXDEV
    assert kept.parent == db.parent and os.stat(kept).st_ino == os.stat(db).st_ino


def test_prune_keeps_the_newest_replaced_databases(db: Path, tmp_path: Path) -> None:
    bdir = tmp_path / "backups"
    bdir.mkdir()
    kept = []
    for i in range(4):
        p = bdir / f"zmonitor-2026010{i + 1}T000000Z-replaced.db"
        p.write_bytes(b"x")
        os.utime(p, (1_700_000_000 - i, 1_700_000_000 - i))  # the name's stamp counts
        kept.append(p)
    (bdir / (kept[0].name + "-wal")).write_bytes(b"w")
    beside = db.parent / "zmonitor-20260103T120000Z-replaced.db"  # EXDEV fallback
    beside.write_bytes(b"x")
    backup.prune(db, bdir, 2, set())
    assert backup.list_replaced(db, bdir, db.parent) == [beside, kept[3]]
    assert not (bdir / (kept[0].name + "-wal")).exists()
