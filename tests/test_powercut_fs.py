"""The crash-simulating file system itself: what a power cut keeps and what it drops.

The model (``powercut.model``) is checked on op logs written by hand; the FUSE layer
(``powercut.fs``) on a real mount, where the same rules must hold for real syscalls.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from powercut import model
from powercut.fs import Mount, fuse_unavailable
from powercut.model import Op, State


def base() -> State:
    """A root with one directory ``d`` (inode 2) holding ``old`` (inode 3, b"old")."""
    return State(names={"d": 2, "d/old": 3}, kind={2: "d", 3: "f"}, data={3: b"old"},
                 mode={2: 0o755, 3: 0o644})


def files(st: State) -> dict[str, bytes]:
    live = st.live()
    return {p: live.data[i] for p, i in live.names.items() if live.kind[i] == "f"}


def atomic_replace(dir_sync: bool = True, file_sync: bool = True) -> list[Op]:
    ops = [Op("create", 4, path="d/.tmp", dirs=(2,), offset=0o644),
           Op("write", 4, offset=0, data=b"new")]
    if file_sync:
        ops.append(Op("fsync", 4))
    ops.append(Op("rename", 4, path="d/old", src="d/.tmp", dirs=(2,)))
    if dir_sync:
        ops.append(Op("fsync", 2))
    return ops


def test_an_unsynced_write_is_lost_and_a_synced_one_kept() -> None:
    ops = [Op("write", 3, offset=0, data=b"NEW"), Op("write", 3, offset=3, data=b"+")]
    assert files(model.crash_state(base(), ops, 2))["d/old"] == b"old"
    synced = [*ops[:1], Op("fsync", 3), ops[1]]
    assert files(model.crash_state(base(), synced, 3))["d/old"] == b"NEW"
    assert files(model.crash_state(base(), synced, 3, "all"))["d/old"] == b"NEW+"


def test_a_rename_without_the_directory_fsync_is_undone() -> None:
    ops = atomic_replace(dir_sync=False)
    st = model.crash_state(base(), ops, len(ops))
    assert files(st) == {"d/old": b"old"}
    ops = atomic_replace()
    assert files(model.crash_state(base(), ops, len(ops))) == {"d/old": b"new"}


def test_a_file_fsync_does_not_make_its_name_durable() -> None:
    ops = [Op("create", 4, path="d/new", dirs=(2,), offset=0o644),
           Op("write", 4, offset=0, data=b"x"), Op("fsync", 4)]
    assert "d/new" not in files(model.crash_state(base(), ops, 3))
    assert files(model.crash_state(base(), [*ops, Op("fsync", 2)], 4))["d/new"] == b"x"


def test_a_renamed_file_whose_data_was_never_synced_is_empty() -> None:
    """The classic: rename durable, data not: the new name holds an empty file."""
    ops = atomic_replace(file_sync=False)
    assert files(model.crash_state(base(), ops, len(ops))) == {"d/old": b""}


def test_unlink_truncate_link_and_mkdir_are_durable_only_with_their_directory() -> None:
    ops = [Op("unlink", 3, path="d/old", dirs=(2,)), Op("trunc", 3, offset=1),
           Op("mkdir", 5, path="e", dirs=(1,), offset=0o755),
           Op("create", 6, path="e/f", dirs=(5,), offset=0o644), Op("fsync", 5)]
    st = model.crash_state(base(), ops, len(ops))
    assert files(st) == {"d/old": b"old"}  # e/f's directory e itself is not durable
    ops += [Op("fsync", 1), Op("fsync", 2), Op("fsync", 3)]
    assert files(model.crash_state(base(), ops, len(ops))) == {"e/f": b""}
    link = [Op("link", 3, path="d/again", dirs=(2,))]
    assert "d/again" not in files(model.crash_state(base(), link, 1))
    both = model.crash_state(base(), [*link, Op("fsync", 2)], 2).live()
    assert both.names["d/again"] == both.names["d/old"] == 3


def test_subset_mode_keeps_an_arbitrary_seeded_part_of_the_unsynced_ops() -> None:
    ops = [Op("write", 3, offset=i, data=b"X") for i in range(3)]
    seen = {files(model.crash_state(base(), ops, 3, "subset", s))["d/old"]
            for s in range(64)}
    assert {b"old", b"XXX", b"Xld", b"oXd"} <= seen
    again = {files(model.crash_state(base(), ops, 3, "subset", s))["d/old"]
             for s in range(64)}
    assert again == seen  # seeded: the same subsets every time


def test_torn_mode_keeps_an_unsynced_write_sector_by_sector() -> None:
    """A 3-sector write the cut caught half-way: any sector may be on disk without the
    others (past a lost one, a hole of zeros); a synced write is never torn."""
    n = model.SECTOR
    ops = [Op("write", 3, offset=0, data=b"A" * n + b"B" * n + b"C" * n)]
    seen = {files(model.crash_state(base(), ops, 1, "torn", s))["d/old"]
            for s in range(64)}
    assert b"old" in seen and b"A" * n + b"B" * n + b"C" * n in seen
    assert b"A" * n + b"\0" * n + b"C" * n in seen  # the middle sector lost
    assert b"old" + b"\0" * (n - 3) + b"B" * n in seen  # only the middle one kept
    assert all(len(v) in (3, n, 2 * n, 3 * n) for v in seen)
    synced = [*ops, Op("fsync", 3)]
    assert {files(model.crash_state(base(), synced, 2, "torn", s))["d/old"]
            for s in range(16)} == {b"A" * n + b"B" * n + b"C" * n}


def test_sectors_split_a_write_at_the_file_s_sector_boundaries() -> None:
    n = model.SECTOR
    pieces = model.sectors(Op("write", 3, offset=n - 2, data=b"x" * (n + 4)))
    assert [(p.offset, len(p.data)) for p in pieces] == [(n - 2, 2), (n, n), (2 * n, 2)]


def test_the_digest_tells_states_apart_and_sees_hard_links() -> None:
    a = model.crash_state(base(), [Op("link", 3, path="d/l", dirs=(2,)), Op("fsync", 2)], 2)
    b = base()
    b.names["d/l"], b.kind[9], b.data[9], b.mode[9] = 9, "f", b"old", 0o644
    assert a.digest() != b.digest() != base().digest()
    assert model.crash_state(base(), [], 0).digest() == base().digest()


# -- the FUSE layer --------------------------------------------------------------------

needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None,
                                reason=fuse_unavailable() or "")


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    (tmp_path / "backing").mkdir()
    (tmp_path / "backing" / "old").write_bytes(b"old")
    with Mount(tmp_path / "backing", tmp_path / "mnt") as m:
        yield m


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, *, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


@needs_fuse
def test_power_cut_on_the_mount_drops_what_was_not_durable(mount: Mount) -> None:
    mp = mount.mountpoint
    ino = os.stat(mp / "old").st_ino
    _write(mp / "synced", b"kept", sync=True)
    _write(mp / "unsynced", b"lost", sync=False)
    _fsync_dir(mp)
    _write(mp / ".tmp", b"new", sync=True)
    os.replace(mp / ".tmp", mp / "old")  # no directory fsync after it
    (mp / "gone").write_bytes(b"x")
    mount.fs.power_cut(mp)
    assert sorted(os.listdir(mp)) == ["old", "synced", "unsynced"]
    assert (mp / "old").read_bytes() == b"old"
    assert os.stat(mp / "old").st_ino == ino  # inodes survive a cut, as on a disk
    assert (mp / "synced").read_bytes() == b"kept"
    assert (mp / "unsynced").read_bytes() == b""


@needs_fuse
def test_power_cut_kills_every_process_using_the_mount(mount: Mount) -> None:
    mp = mount.mountpoint
    proc = subprocess.Popen([sys.executable, "-c", "import time; f = open('held', 'w'); "
                             "f.write('x'); f.flush(); time.sleep(600)"], cwd=mp)
    while not (mp / "held").exists():
        time.sleep(0.01)
    killed = mount.fs.power_cut(mp)
    assert proc.wait(timeout=30) == -9
    assert proc.pid in killed
    assert not (mp / "held").exists()


@needs_fuse
def test_sqlite_commits_survive_only_as_far_as_sqlite_synced_them(mount: Mount) -> None:
    """SQLite (rollback journal, synchronous=FULL) on the mount: a committed row
    survives the cut once the database's own name is durable, and a cut mid-transaction
    never shows half of it."""
    mp = mount.mountpoint
    conn = sqlite3.connect(mp / "t.db", isolation_level=None)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    _fsync_dir(mp)
    mount.fs.load(mount.fs.crash_state())
    conn = sqlite3.connect(mp / "t.db", isolation_level=None)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(100)])
    conn.execute("COMMIT")
    conn.close()
    ops = list(mount.fs.ops)
    seen = set()
    plain = mount.backing.parent / "plain"
    plain.mkdir()
    for k in range(len(ops) + 1):
        for mode in ("sync", "all"):
            model.materialize(mount.fs.crash_state(k, mode), plain)
            c = sqlite3.connect(plain / "t.db")
            seen.add(c.execute("SELECT COUNT(*) FROM t").fetchone()[0])
            c.close()
    assert seen == {0, 100}


@needs_fuse
def test_a_directory_the_tool_creates_survives_a_power_cut(mount: Mount) -> None:
    """Found by the sweep: a first run created the state and backup dirs with a plain
    mkdir, so a power cut could take the journal (fsynced inside a directory whose own
    entry was not) and the backup with them. ``make_dirs`` fsyncs each new entry."""
    from zmonitor_migrated import fsutil

    mp = mount.mountpoint
    fsutil.make_dirs(mp / "state" / "deep")
    fsutil.atomic_write(mp / "state" / "deep" / "journal.json", b"{}")
    (mp / "plain").mkdir()
    fsutil.atomic_write(mp / "plain" / "journal.json", b"{}")
    mount.fs.power_cut(mp)
    assert (mp / "state" / "deep" / "journal.json").read_bytes() == b"{}"
    assert not (mp / "plain").exists()  # what a plain mkdir risks


_WRITER = ("import sqlite3, time; c = sqlite3.connect('wal.db');"
           " c.execute('PRAGMA journal_mode=WAL'); c.execute('CREATE TABLE t (x)');"
           " c.execute('INSERT INTO t VALUES (1)'); c.commit();"
           " print('committed', flush=True); time.sleep(600)")
_WAL_ON_THE_MOUNT = f"""
import sqlite3, subprocess, sys
from pathlib import Path
from powercut.fs import Mount

tmp = Path(sys.argv[1])
with Mount(tmp / "backing", tmp / "mnt") as m:
    w = subprocess.Popen([sys.executable, "-c", {_WRITER!r}], cwd=m.mountpoint,
                         stdout=subprocess.PIPE, text=True)
    assert w.stdout.readline() == "committed\\n"
    m.fs.power_cut(m.mountpoint, mode="all")  # the -wal and -shm stay behind
    uri = (m.mountpoint / "wal.db").as_uri() + "?mode=ro"
    reader = sqlite3.connect(uri, uri=True)  # maps the -shm
    print(reader.execute("SELECT COUNT(*) FROM t").fetchone()[0], flush=True)
    reader.close()
print("unmounted", flush=True)
"""


def _abort_fuse_under(path: Path) -> None:
    """Free a hung mount: abort its FUSE connection (found by the mount's device)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == str(path):
                minor = parts[2].split(":")[1]
                with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as a:
                    a.write("1")
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@needs_fuse
def test_the_caller_may_map_a_wal_database_on_the_mount(tmp_path: Path) -> None:
    """With the server in the caller's own process, closing a WAL database (whose
    ``-shm`` SQLite maps) wrote the mapping back through a server that was waiting for
    the caller's memory-map lock: both hung for ever, unkillable. The server now runs
    apart; the caller here does just that and must get through."""
    (tmp_path / "backing").mkdir()
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": f"{tests.parent}{os.pathsep}{tests}"}
    proc = subprocess.Popen([sys.executable, "-c", _WAL_ON_THE_MOUNT, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _abort_fuse_under(tmp_path / "mnt")  # before the kill: a D-state process ignores it
        proc.kill()
        proc.communicate(timeout=60)
        pytest.fail("closing a WAL database on the mount hung the caller")
    assert proc.returncode == 0, err
    assert out.split() == ["1", "unmounted"]


@needs_fuse
def test_the_first_history_record_survives_a_power_cut(mount: Mount) -> None:
    """The history's first line creates the file: its name must be fsynced into the
    state dir too, or a cut takes the run's record (and every later one) with it."""
    from zmonitor_migrated import history

    mp = mount.mountpoint
    history.append(mp / "state" / "history.jsonl", {"run_id": "r1", "outcome": "applied"})
    history.append(mp / "state" / "history.jsonl", {"run_id": "r2", "outcome": "applied"})
    mount.fs.power_cut(mp)
    assert [r["run_id"] for r in history.read(mp / "state" / "history.jsonl")] == ["r1", "r2"]


@needs_fuse
def test_a_discarded_backup_never_outlives_its_checksum(mount: Mount) -> None:
    """Found by the sweep (``recover`` cut while it runs): undoing a run removed the
    backup link and its checksum with no directory fsync between them, so a cut could
    keep the checksum's removal and drop the backup's. ``status`` then listed a backup
    nothing could verify, and a hard link to the live file at that. Now the backups go
    durably first: every crash state of the removal lists no backup without its
    checksum."""
    from zmonitor_migrated import backup, fsutil, swap
    from zmonitor_migrated.journal import Journal

    mp = mount.mountpoint
    db, bdir = mp / "data" / "zmonitor.db", mp / "backups"
    fsutil.make_dirs(db.parent)
    fsutil.make_dirs(bdir)
    _write(db, b"SQLite format 3\0" + b"x" * 4000, sync=True)
    _fsync_dir(db.parent)
    bk = bdir / backup.backup_name(db, 2)
    os.link(db, bk)
    _fsync_dir(bdir)
    backup.write_checksum(bk, "0" * 64)
    mount.fs.load(mount.fs.crash_state())  # all of it durable: the baseline
    swap.discard(db, bdir, Journal.create(mount.backing.parent / "journal.json"))
    ops = list(mount.fs.ops)
    assert [op.kind for op in ops if op.kind == "unlink"] == ["unlink", "unlink"]
    plain = mount.backing.parent / "plain"
    plain.mkdir()
    for k in range(len(ops) + 1):
        for mode, seed in [("sync", 0), ("all", 0), *(("subset", s) for s in range(32))]:
            model.materialize(mount.fs.crash_state(k, mode, seed), plain)
            for b in backup.list_backups(plain / "data" / "zmonitor.db", plain / "backups"):
                assert backup.checksum_path(b).exists(), (k, mode, seed)
    assert backup.list_backups(db, bdir) == []


# Two tables on pages 2 and 3, checkpointed; then rows for one of them in the WAL only
# (page 3), and the writer dies. The backup has the same tables with other rows: its page
# 2 with the WAL's page 3 would be a mix no one ever wrote.
_CRASHING_WRITER = ("import os, sqlite3; c = sqlite3.connect('live.db', isolation_level=None);"
                    " c.execute('PRAGMA journal_mode=WAL');"
                    " c.execute('PRAGMA wal_autocheckpoint=0');"
                    " c.execute('CREATE TABLE t (x)'); c.execute('CREATE TABLE u (x)');"
                    " c.execute(\"INSERT INTO t VALUES ('live')\");"
                    " c.execute(\"INSERT INTO u VALUES ('live')\");"
                    " c.execute('PRAGMA wal_checkpoint(TRUNCATE)');"
                    " c.execute(\"INSERT INTO u VALUES ('in the wal')\");"
                    " os.kill(os.getpid(), 9)")


def _rows(db: Path) -> str:
    try:
        conn = sqlite3.connect(db)
        try:
            return str([conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()
                        for t in ("t", "u")])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"error: {exc}"


@needs_fuse
def test_a_restore_never_leaves_the_old_wal_to_be_replayed_into_the_backup(
        mount: Mount) -> None:
    """An app that crashed leaves a ``-wal`` full of committed rows. A restore removes
    it before renaming the backup in, and that removal must be durable before the
    rename: else a cut keeps the rename, undoes the removal, and SQLite replays the
    crashed database's WAL into the restored one (found in review). Every crash state of
    the restore holds the old database (with its WAL, or without it once the removal is
    durable: the journal still says ``restoring`` and recovery finishes the restore; the
    WAL was kept with the replaced database before) or the backup, nothing else."""
    from zmonitor_migrated import backup, fsutil

    mp = mount.mountpoint
    subprocess.run([sys.executable, "-c", _CRASHING_WRITER], cwd=mp, check=False)
    assert (mp / "live.db-wal").stat().st_size > 0
    conn = sqlite3.connect(mp / "backup.db")
    for table in ("t", "u"):
        conn.execute(f"CREATE TABLE {table} (x)")
        conn.execute(f"INSERT INTO {table} VALUES ('backup')")
    conn.commit()
    conn.close()
    mount.fs.load(mount.fs.crash_state(mode="all"))  # all of it durable: the baseline
    plain = mount.backing.parent / "plain"
    plain.mkdir()
    model.materialize(mount.fs.crash_state(0), plain)
    (plain / "live.db-wal").unlink()
    (plain / "live.db-shm").unlink()
    bare = _rows(plain / "live.db")  # the old file without its WAL: recovery redoes the
    assert bare == str([[("live",)], [("live",)]])  # restore from there (`restoring`)
    model.materialize(mount.fs.crash_state(0), plain)
    old = _rows(plain / "live.db")
    assert old == str([[("live",)], [("live",), ("in the wal",)]])
    backup.restore(mp / "backup.db", mp / "live.db",
                   verified=fsutil.sha256_file(mp / "backup.db"))
    ops = list(mount.fs.ops)
    seen = set()
    for k in range(len(ops) + 1):
        for mode, seed in [("sync", 0), ("all", 0), *(("subset", s) for s in range(16))]:
            model.materialize(mount.fs.crash_state(k, mode, seed), plain)
            rows = _rows(plain / "live.db")
            assert rows in (old, bare, str([[("backup",)], [("backup",)]])), (k, mode, seed,
                                                                              rows)
            seen.add(rows)
    assert len(seen) == 3  # the cut points cover each side of the removal and the rename


@needs_fuse
def test_the_daemon_never_loses_a_bundle_between_inbox_and_archive(mount: Mount) -> None:
    """The daemon links a bundle into ``archive/`` (or ``rejected/``) and unlinks it from
    the inbox. The link must be durable before the unlink: else a cut can keep the unlink
    and undo the link, and the bundle is in neither (found in review). Every crash state
    of the move has it in one of the two, whole."""
    from zmonitor_migrated import daemon, fsutil

    mp = mount.mountpoint
    fsutil.make_dirs(mp / "inbox")
    body = os.urandom(3000)
    _write(mp / "inbox" / "b.zmb", body, sync=True)
    _fsync_dir(mp / "inbox")
    mount.fs.load(mount.fs.crash_state())
    daemon.keep(mp / "inbox" / "b.zmb", mp / "state" / "archive", "b.zmb")
    assert (mp / "state" / "archive" / "b.zmb").read_bytes() == body
    ops = list(mount.fs.ops)
    plain = mount.backing.parent / "plain"
    plain.mkdir()
    for k in range(len(ops) + 1):
        for mode, seed in [("sync", 0), ("all", 0), *(("subset", s) for s in range(32))]:
            model.materialize(mount.fs.crash_state(k, mode, seed), plain)
            found = [p.read_bytes() for p in (plain / "inbox" / "b.zmb",
                                              plain / "state" / "archive" / "b.zmb")
                     if p.exists()]
            assert body in found, (k, mode, seed)


@needs_fuse
def test_a_discarded_copy_is_gone_for_good_when_discard_returns(mount: Mount) -> None:
    """Recovery closes the journal right after ``discard``: the working copy's removal
    must be durable by then, or a cut leaves a database-sized file nothing will ever
    remove (the journal no longer names it)."""
    from zmonitor_migrated import fsutil, swap
    from zmonitor_migrated.journal import Journal

    mp = mount.mountpoint
    db = mp / "data" / "zmonitor.db"
    copy = db.with_name(db.name + ".migrating-20261203T000000Z-abcdef")
    fsutil.make_dirs(db.parent)
    for path in (db, copy):
        _write(path, b"SQLite format 3\0" + os.urandom(4000), sync=True)
    _fsync_dir(db.parent)
    mount.fs.load(mount.fs.crash_state())
    journal = Journal.create(mount.backing.parent / "journal.json", copy=str(copy))
    assert journal.facts.copy == str(copy)
    swap.discard(db, mp / "backups", journal)
    after = mount.fs.crash_state(len(mount.fs.ops), "sync").live()
    assert sorted(n for n in after.names if n.startswith("data")) == ["data",
                                                                     "data/zmonitor.db"]


def test_side_files_left_under_the_copy_s_old_name_go_once_it_went_live(
        tmp_path: Path) -> None:
    """Found by the sweep: the copy's switch back to WAL creates and deletes a
    ``-journal`` under the copy's name; a cut after the swap's rename that undid that
    deletion left the file for good (nothing names it once the journal closes).
    Recovery going forward removes it; while the copy itself exists it is the copy's."""
    from zmonitor_migrated import swap
    from zmonitor_migrated.journal import Journal

    copy = tmp_path / "zmonitor.db.migrating-20261203T000000Z-abcdef"
    side = copy.with_name(copy.name + "-journal")
    side.write_bytes(b"x" * 512)
    journal = Journal.create(tmp_path / "journal.json", copy=str(copy))
    copy.write_bytes(b"the copy, not yet renamed")
    swap.drop_copy_leftovers(journal)
    assert side.exists()
    copy.unlink()  # renamed over the live file
    swap.drop_copy_leftovers(journal)
    assert not side.exists()
