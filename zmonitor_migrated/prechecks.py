"""The pre-checks: what must hold before the app is stopped.

Each check reads, never writes, and refuses with ``PrecheckFailed`` (exit 4, the app was
never stopped) under its own ``kind``. ``pipeline.Run.precheck`` calls them in order:
the database exists, is sound (integrity, foreign keys) and has a plan; there is room
for the rehearsal; after the rehearsal, its measured time fits the downtime budget and
there is room for the migrated copy, a restore, and a backup copy where no hard link
can be made.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from . import dbinfo, fsutil
from .engine import read_applied
from .errors import InterruptedBeforeStop, PlanError, PrecheckFailed
from .plan import Plan, rollback_plan
from .plan import plan as make_plan
from .progress import Reporter
from .sources import Migration

MB = 1024 * 1024


def interrupted() -> InterruptedBeforeStop:
    """A stop request before the app was stopped: exit 4 (nothing touched), interrupted
    like a stop mid-apply, so the daemon keeps the bundle for its next start."""
    return InterruptedBeforeStop("stop requested (SIGTERM) before the app was stopped; "
                                 "nothing was changed")


def database_exists(db: Path) -> None:
    if not db.is_file():
        raise PrecheckFailed(f"database {db} does not exist; check 'database' in the "
                             "config (the app creates it on its first start)",
                             kind="database-missing")


def database_sound(conn: sqlite3.Connection, db: Path, *, quick: bool,
                   reporter: Reporter) -> None:
    """Integrity and foreign keys of the live database: a damaged one is not migrated."""
    bad = dbinfo.integrity_problems(conn, quick=quick)
    if bad:
        reporter.alert("precheck-failed", f"database {db} fails its "
                       f"integrity check: {'; '.join(bad[:3])}")
        raise PrecheckFailed(f"database {db} fails its integrity check "
                             f"({'; '.join(bad[:3])}); not migrating a damaged "
                             "database — restore a backup first",
                             kind="integrity")
    fks = dbinfo.fk_problems(conn)
    if fks:
        raise PrecheckFailed(f"database {db} has foreign-key violations "
                             f"before the run: {'; '.join(fks[:3])}",
                             kind="foreign-keys")


def plan_for(conn: sqlite3.Connection, migrations: list[Migration] | tuple[Migration, ...],
             target: int | None, rollback_to: int | None) -> Plan:
    """What this run will do to the database: forward to ``target``, or the rollback
    scripts down to ``rollback_to``. A disagreement between source and database is a
    pre-check failure under the plan's own kind."""
    try:
        applied = read_applied(conn)
        if rollback_to is None:
            return make_plan(migrations, applied, target)
        undo = rollback_plan(migrations, applied, rollback_to)
        return Plan(current=max((r.version for r in applied), default=0),
                    target=rollback_to, pending=undo, applied=tuple(applied))
    except PlanError as exc:
        raise PrecheckFailed(exc.message, kind=exc.kind) from None


def room_for_rehearsal(db_size: int, run_dir: Path) -> None:
    need = int(db_size * 1.1) + MB
    free = fsutil.free_bytes(run_dir)
    if free < need:
        raise PrecheckFailed(f"not enough space for the rehearsal in {run_dir}: need "
                             f"{need / 1e6:.1f} MB, {free / 1e6:.1f} MB free",
                             kind="disk-space")


def estimate_fits(estimate: float, max_downtime_s: float, allow_long: bool) -> None:
    if estimate > max_downtime_s and not allow_long:
        raise PrecheckFailed(
            f"estimated downtime {estimate:.1f} s exceeds max_downtime_s="
            f"{max_downtime_s:g}; schedule a window and rerun with --allow-long, or "
            "raise max_downtime_s", kind="downtime-estimate")


def room_for_swap(db: Path, db_size: int, grown: int) -> None:
    """The migrated copy, and room to copy the backup back should the new version fail
    after the swap: a restore that cannot be written leaves the monitor stopped."""
    need = grown + db_size + MB
    free = fsutil.free_bytes(db.parent)
    if free < need:
        raise PrecheckFailed(f"not enough space next to {db}: need {need / 1e6:.1f} "
                             f"MB (migrated copy {grown / 1e6:.1f} MB + room to restore "
                             f"the backup {db_size / 1e6:.1f} MB), {free / 1e6:.1f} MB free",
                             kind="disk-space")


def backup_linkable(db: Path, backup_dir: Path) -> bool:
    try:
        fsutil.make_dirs(backup_dir)
        return fsutil.can_hardlink(db.parent, backup_dir)
    except OSError:
        return False


def room_for_backup(db: Path, db_size: int, backup_dir: Path) -> None:
    """Where the backup dir cannot take a hard link to the live file, the backup is a
    copy on the backup dir's own filesystem."""
    if backup_linkable(db, backup_dir):
        return
    need = db_size + MB
    free = fsutil.free_bytes(backup_dir)
    if free < need:
        raise PrecheckFailed(f"not enough space in {backup_dir} (another "
                             f"filesystem than the database) for the backup copy: "
                             f"need {need / 1e6:.1f} MB, {free / 1e6:.1f} MB free",
                             kind="disk-space")
