"""Backups of the live database and putting one back.

Guarantees:

- A backup is named ``<db-name>-<UTC YYYYmmddTHHMMSSZ>-v<version>.db`` and has a
  ``.sha256`` sidecar; both are fsynced, and so is the backup directory.
- In the swap design the backup is a hard link to the untouched original inode (no copy
  during the downtime); where the kernel refuses the link (another filesystem, or
  another mount of the same one) it is a streamed, fsynced copy.
- ``restore`` checks the backup against its recorded sha256 *before* touching the live
  path (a corrupted backup overwrites nothing), copies it next to the live file, removes
  the live file's ``-wal``/``-shm``/``-journal`` first (a stale side file of the other
  database must never be applied to the restored one), then renames and fsyncs the dir.
- ``restore`` never deletes the database it replaces: the live file (and its ``-wal`` or
  ``-journal``, which may hold committed rows the app wrote after the migration) is kept
  by hard links as ``<db-name>-<UTC stamp>-replaced.db`` next to the backup, so rows
  written since the backup was taken can still be recovered by hand.
- ``prune`` keeps the newest ``keep`` backups and never deletes a protected one, and the
  newest ``keep`` replaced databases.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from . import fsutil
from .errors import RestoreFailed


@dataclass(frozen=True)
class Backup:
    path: Path
    sha256: str
    version: int
    linked: bool

    @property
    def checksum_path(self) -> Path:
        return checksum_path(self.path)

    def to_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "sha256": self.sha256, "version": self.version,
                "linked": self.linked}


def checksum_path(backup: Path) -> Path:
    return backup.with_name(backup.name + ".sha256")


def backup_name(db: Path, version: int, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{db.stem}-{stamp}-v{version}.db"


def _pattern(db: Path) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(db.stem)}-\d{{8}}T\d{{6}}Z(?:-\d+)?-v\d+\.db\Z")


def list_backups(db: Path, backup_dir: Path) -> list[Path]:
    if not backup_dir.is_dir():
        return []
    pat = _pattern(db)
    found = [p for p in backup_dir.iterdir() if pat.match(p.name)]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    for i in range(1, 1000):
        cand = path.with_name(re.sub(r"(-v\d+\.db)$", rf"-{i}\1", path.name))
        if not cand.exists():
            return cand
    raise FileExistsError(path)


def write_checksum(backup: Path, sha256: str) -> None:
    fsutil.atomic_write(checksum_path(backup), f"{sha256}  {backup.name}\n".encode())


def read_checksum(backup: Path) -> str | None:
    try:
        return checksum_path(backup).read_text().split()[0]
    except (FileNotFoundError, IndexError):
        return None


def take(db: Path, backup_dir: Path, version: int, *, defer_hash: bool = False) -> Backup:
    """Back up ``db`` (which nobody writes to now) into ``backup_dir``.

    With ``defer_hash`` a hard-linked backup is returned unhashed (``sha256`` empty) and
    not yet durable: the caller hashes it off the critical path and must ``seal`` it
    before anything depends on it. A copied backup is always hashed as it is written."""
    fsutil.make_dirs(backup_dir)
    target = _unique(backup_dir / backup_name(db, version))
    try:
        os.link(db, target)
        linked = True
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        linked = False  # another filesystem or mount: a streamed, fsynced copy instead
    if linked and defer_hash:
        return Backup(target, "", version, linked)
    digest = fsutil.sha256_file(target) if linked else fsutil.copy_durable(db, target)
    return seal(Backup(target, digest, version, linked), digest)


def seal(bk: Backup, sha256: str) -> Backup:
    """Record the backup's checksum; the directory fsync of that atomic write also makes
    the backup's own directory entry durable."""
    write_checksum(bk.path, sha256)
    return replace(bk, sha256=sha256)


def verify(backup: Path, expected: str | None = None) -> str:
    """Return the backup's sha256 after checking it against the recorded one."""
    if not backup.is_file():
        raise RestoreFailed(f"backup {backup} is missing; nothing was overwritten. Pick "
                            "another backup with 'zmonitor-migrate restore BACKUP'")
    recorded = expected or read_checksum(backup)
    actual = fsutil.sha256_file(backup)
    if recorded is None:
        raise RestoreFailed(f"backup {backup} has no recorded checksum, so it cannot be "
                            "trusted; nothing was overwritten")
    if actual != recorded:
        raise RestoreFailed(f"backup {backup} is corrupted: sha256 {actual[:12]}… but "
                            f"{recorded[:12]}… was recorded when it was taken; nothing was "
                            "overwritten. Pick another backup with 'zmonitor-migrate restore "
                            "BACKUP'")
    return actual


def restore(backup: Path, db: Path, expected: str | None = None, *,
            verified: str | None = None) -> None:
    """Put ``backup`` in place of ``db`` atomically. The caller keeps the database being
    replaced first (``keep_replaced``), after ``verify`` (whose result it passes as
    ``verified`` rather than hashing the backup twice). Raises RestoreFailed."""
    digest = verified or verify(backup, expected)
    tmp = db.with_name(db.name + ".restoring")
    try:
        fsutil.remove(tmp)
        copied = fsutil.copy_durable(backup, tmp)
        if copied != digest:
            raise RestoreFailed(f"copy of backup {backup} read back differently; the disk is "
                                "failing? nothing was overwritten")
        if db.exists():
            fsutil.copy_owner(db, tmp)
        fsutil.rename_over_database(tmp, db)
    except OSError as exc:
        fsutil.remove(tmp)
        raise RestoreFailed(f"restoring {backup} over {db} failed: {exc}; every file was "
                            "kept for the operator") from None


def _replaced_pattern(db: Path) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(db.stem)}-(\d{{8}}T\d{{6}}Z)(?:-(\d+))?-replaced\.db\Z")


def list_replaced(db: Path, *directories: Path) -> list[Path]:
    """Oldest first, by the name's stamp (opening one to read its rows checkpoints its WAL
    and changes its mtime), over every directory given."""
    pat = _replaced_pattern(db)
    found = []
    for directory in dict.fromkeys(directories):
        if directory.is_dir():
            found += [(m.group(1), int(m.group(2) or 0), p) for p in directory.iterdir()
                      if (m := pat.match(p.name))]
    return [p for *_key, p in sorted(found)]


def keep_replaced(db: Path, where: Path) -> Path:
    """Hard-link the live database and its ``-wal``/``-journal`` as a replaced database in
    ``where``, or next to ``db`` where that directory refuses the link. Costs no copy.
    Idempotent: a call for an inode already kept (a restore re-run after a kill) returns
    that file and links whatever side file the killed call had not linked yet. Raises
    OSError when neither directory takes the link."""
    live = os.stat(db)
    for old in list_replaced(db, where, db.parent):
        st = os.stat(old)
        if (st.st_ino, st.st_dev) == (live.st_ino, live.st_dev):
            _link_sides(db, old)
            return old
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    error: OSError | None = None
    for directory in dict.fromkeys((where, db.parent)):
        target = directory / f"{db.stem}-{stamp}-replaced.db"
        for i in range(1, 1000):
            if not target.exists():
                break
            target = directory / f"{db.stem}-{stamp}-{i}-replaced.db"
        try:
            os.link(db, target)
        except OSError as exc:  # another mount, no room for an entry, read-only …
            error = error or exc
            continue
        _link_sides(db, target)
        return target
    assert error is not None
    raise error


def _link_sides(db: Path, kept: Path) -> None:
    for suffix in ("-wal", "-journal"):
        side, link = db.with_name(db.name + suffix), kept.with_name(kept.name + suffix)
        if link.exists():
            continue
        with contextlib.suppress(FileNotFoundError):
            os.link(side, link)
    fsutil.fsync_dir(kept.parent)


def remove(doomed: list[Path],
           companions: Callable[[Path], list[Path]] = lambda b: [checksum_path(b)]) -> None:
    """Remove backups (or kept databases) and their companions (checksum, or side files),
    the files themselves durably first: a power cut may then leave a companion without
    its file (ignored), never a listed backup without its checksum (which nothing could
    verify) or a kept database without its ``-wal`` (rows missing from it). The second
    fsync makes the companions' removal durable too, or orphans would stay for ever
    (nothing lists them)."""
    for b in doomed:
        fsutil.remove(b)
    for directory in {b.parent for b in doomed}:
        fsutil.fsync_dir(directory)
    for b in doomed:
        for c in companions(b):
            fsutil.remove(c)
    for directory in {b.parent for b in doomed}:
        fsutil.fsync_dir(directory)


def prune(db: Path, backup_dir: Path, keep: int, protect: set[Path]) -> list[Path]:
    backups = list_backups(db, backup_dir)
    doomed = [b for b in backups[:-keep] if b not in protect] if keep else []
    remove(doomed)
    # Next to the database too: where the backup dir refused the link.
    replaced = list_replaced(db, backup_dir, db.parent)
    old = replaced[:-keep] if keep else []
    remove(old, fsutil.sidecars)
    return doomed + old
