"""Backups: hard link where the kernel allows it, a verified copy where it does not."""

from __future__ import annotations

import os
import sqlite3
import subprocess
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
    bk = backup.take(db, bdir, 10, None)
    assert bk.linked and os.stat(bk.path).st_ino == os.stat(db).st_ino
    assert backup.read_checksum(bk.path) == fsutil.sha256_file(db)
    assert fsutil.can_hardlink(db.parent, bdir)


def test_other_mount_of_the_same_filesystem_gets_a_verified_copy(db: Path,
                                                                  other_mount: Path) -> None:
    assert os.stat(db).st_dev == os.stat(other_mount).st_dev  # st_dev cannot tell
    assert not fsutil.can_hardlink(db.parent, other_mount)
    bk = backup.take(db, other_mount, 10, None)
    assert not bk.linked
    assert os.stat(bk.path).st_ino != os.stat(db).st_ino
    assert bk.sha256 == fsutil.sha256_file(db) == backup.read_checksum(bk.path)
    assert sorted(p.name for p in other_mount.iterdir()) == [bk.path.name,
                                                             bk.path.name + ".sha256"]


def test_restore_refuses_a_corrupted_backup_and_overwrites_nothing(db: Path,
                                                                  tmp_path: Path) -> None:
    bk = backup.take(db, tmp_path / "copies", 10, None)  # same mount: make it a copy
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
