"""The A/B swap: the working copy of the live database, and whether it went live.

The product's central invariant is that at every instant the database at the live path
is **the old database intact, or the migrated and validated one, never a mix**. This
module is where that is kept, in this order:

1. ``quiesce``: with the app stopped, the live file is made self-contained (WAL
   checkpointed, no hot journal) and proven unlocked, so a copy of its bytes is the
   whole database.
2. ``WorkingCopy.take``: the working copy is a kernel copy of the live file; the backup
   is a hard link to the same, now untouched, inode (hashed in the background). The
   live file is never written by a migration: only the copy is.
3. ``WorkingCopy.seal``: after the copy is migrated and validated, its journal mode is
   put back, it is fsynced, it gets the live file's owner, no side file of it survives,
   the backup's sha256 is made durable (the first moment a restore could need it is the
   swap) and the live file is proven unchanged since the copy (no other writer).
4. ``WorkingCopy.swap_in``: the old file's side files are removed (a stale ``-wal`` or
   ``-journal`` is never applied to the other database), then ``rename(2)`` puts the
   copy at the live path in one step and the directory is fsynced.
5. ``went_live``: whether the rename happened is read from the file system (the live
   path's inode against the one the journal recorded before the stop), never from
   memory, so a crash between the rename and the journal write is decided correctly.
6. Until the copy went live, failing needs no restore: ``discard`` drops the copy and
   any backup link to the live inode. After it, the backup is restored (``recovery``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from . import backup as backups
from . import dbinfo, fsutil
from .errors import MigrateError
from .journal import Journal


def content_stamp(path: Path) -> tuple[int, int]:
    """What changes when a file's bytes do (not its ctime: the backup link changes that)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def set_journal_mode(path: Path, mode: str) -> None:
    """Switch the private copy's journal mode. Without ``synchronous=OFF`` leaving WAL
    fsyncs the whole freshly copied file, which the swap's single fsync does anyway."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        got = str(conn.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]).lower()
    finally:
        conn.close()
    if got != mode:
        raise MigrateError(f"cannot switch {path} to {mode} journal mode (got {got})",
                           kind="journal-mode")


def quiesce(db: Path) -> str:
    """Make the live file self-contained (no WAL content, no hot journal) and prove
    nobody else holds it. Returns its journal mode."""
    try:
        conn = sqlite3.connect(db, isolation_level=None, timeout=2.0)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            mode = dbinfo.journal_mode(conn)
            if mode == "wal":
                busy, _log, _ckpt = conn.execute(
                    "PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if busy:
                    raise sqlite3.OperationalError("database is locked")
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise MigrateError(
                f"{db} is still locked by another process after the app was "
                "stopped (the app did not really stop, or something else holds the "
                "database); nothing was changed", kind="database-locked") from None
        raise
    wal = db.with_name(db.name + "-wal")
    if wal.exists() and wal.stat().st_size:
        raise MigrateError(f"{wal} still holds data after a checkpoint; nothing was "
                           "changed", kind="wal-not-empty")
    if db.with_name(db.name + "-journal").exists():
        raise MigrateError(f"a hot journal next to {db} survived opening the "
                           "database; nothing was changed", kind="hot-journal")
    return mode


def copy_path(live: Path, run_id: str) -> Path:
    """Where a run's working copy lives: next to the live file, so the swap is a rename."""
    return live.with_name(f"{live.name}.migrating-{run_id}")


@dataclass
class WorkingCopy:
    """One run's private copy of the live database, from ``take`` to ``swap_in``."""

    live: Path
    path: Path
    mode: str = "delete"  # the live file's journal mode, put back on the copy by seal
    backup: backups.Backup | None = None
    _original: tuple[int, int] | None = field(default=None, repr=False)
    _hasher: fsutil.InBackground[str] | None = field(default=None, repr=False)

    def take(self, backup_dir: Path, version: int, mode: str) -> backups.Backup:
        """Copy the quiesced live file and link the backup to its untouched inode; the
        backup's sha256 is computed on another core while the copy is migrated."""
        self.mode = mode
        self._original = content_stamp(self.live)
        fsutil.copy_fast(self.live, self.path)
        bk = backups.take(self.live, backup_dir, version, defer_hash=True)
        self._hasher = fsutil.InBackground(fsutil.sha256_file, bk.path) if not bk.sha256 \
            else None
        self.backup = bk
        if mode == "wal":
            # The private copy needs no WAL while it is migrated: an in-memory rollback
            # journal writes each page once instead of twice (WAL, then checkpoint).
            set_journal_mode(self.path, "delete")
        return bk

    def seal(self) -> backups.Backup:
        """Make the migrated, validated copy ready to go live and the backup ready to be
        restored; refuse if anything wrote the live file since ``take``."""
        assert self.backup is not None
        copy = self.path
        if self.mode == "wal":
            set_journal_mode(copy, self.mode)
        fsutil.fsync_file(copy)
        fsutil.copy_owner(self.live, copy)
        if any(p.exists() for p in fsutil.sidecars(copy)):
            raise MigrateError(f"side files of {copy} survived closing it",
                               kind="copy-sidecars")
        if self._hasher is not None:
            self.backup = backups.seal(self.backup, self._hasher.result())
        if content_stamp(self.live) != self._original:
            # The copy, the backup and its sha256 must all be the same bytes.
            raise MigrateError(f"{self.live} was written while the app was stopped: "
                               "another writer is active", kind="concurrent-writer")
        return self.backup

    def swap_in(self) -> None:
        """The one step that changes the live database: rename the sealed copy over it."""
        db, copy = self.live, self.path
        wal = db.with_name(db.name + "-wal")
        if wal.exists() and wal.stat().st_size:
            raise MigrateError(f"{wal} gained data while the app was stopped: another "
                               "writer is active", kind="concurrent-writer")
        fsutil.rename_over_database(copy, db)


def went_live(db: Path, journal: Journal) -> bool:
    """Whether the run's copy replaced the live file: the live path's inode is no longer
    the one recorded before the stop. An operator restore always restores."""
    facts = journal.facts
    if facts.operation == "restore":
        return True
    live_inode = facts.live_inode
    if live_inode is None:
        return False
    try:
        return os.stat(db).st_ino != live_inode
    except FileNotFoundError:
        return True  # the live file is gone: only the backup can bring it back


def drop_copy_leftovers(journal: Journal) -> None:
    """After the copy went live: side files left under its old name (a ``-journal`` the
    copy's switch back to WAL created and deleted, brought back by a power cut that
    undid the deletion) belong to no database any more; removed, durably."""
    copy = journal.facts.copy
    if copy and not os.path.lexists(copy) and fsutil.remove_sidecars(Path(copy)):
        fsutil.fsync_dir(Path(copy).parent)


def discard(db: Path, backup_dir: Path, journal: Journal) -> None:
    """Undo a run whose copy never went live: the copy and any backup link to the live
    inode go; the live file was never written."""
    copy = journal.facts.copy
    if copy:
        fsutil.remove(Path(copy))
        fsutil.remove_sidecars(Path(copy))
        # Durable before the journal closes, or a cut leaves the copy's disk space taken
        # with nothing left to remove it.
        with contextlib.suppress(FileNotFoundError):
            fsutil.fsync_dir(Path(copy).parent)
    # A hard link to the live inode stops being a point-in-time copy as soon as the app
    # writes again; this run never swapped, so nothing depends on it. Look for every
    # such link, not only the journal's: a kill between link(2) and the journal write
    # that names the backup (the backup is hashed in between) leaves one unrecorded.
    try:
        live = os.stat(db)
    except FileNotFoundError:
        return
    linked = []
    for path in backups.list_backups(db, backup_dir):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if (st.st_ino, st.st_dev) == (live.st_ino, live.st_dev):
            linked.append(path)
    backups.remove(linked)
