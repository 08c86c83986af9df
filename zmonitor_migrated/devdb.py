"""The laptop path: apply, inspect and roll back a plain database file from a source.

``zmonitor-migrate dev apply|status|rollback --db FILE --source SRC`` is the author's
analogue of the workflow's ``migrate.py --db data/zmonitor_test.db`` with ``--dry-run``,
``--target``, ``--status`` and ``--rollback``. It shares the device's parts, not a copy of
them: the source goes through the same lint (``lint.lint_source``) and discovery, the
plan is ``plan.plan`` / ``plan.rollback_plan`` (an edited applied migration, a gap or a
database ahead of the source is refused the same way), the migrations run in
``engine.Engine`` (same authorizer, transactions, batches, ``schema_version`` rows with
sha256), and the result is judged by ``validate.validate`` (version, integrity, foreign
keys, row counts with ``bundle.yaml``'s ``declared_row_loss``, ``checks/post.yaml``,
``schema/database.yaml``) on a fresh read-only connection.

What it leaves out is everything that makes a device run a device run: no signature, no
trust directory, no configuration file, no state directory, journal or anti-rollback
floor, no app unit. The command line keeps it apart: it takes no ``--config`` and reads
none, and it refuses the packaged device database path.

As on the device the file itself is never migrated: a copy beside it is migrated and
validated, and only a valid result is renamed over it. A failing migration or validation
leaves the file as it was (exit 4); ``--dry-run`` does the same on a copy in a temporary
directory and always leaves the file alone. There is no app unit to stop: a program
writing the file is detected only while it holds a write transaction or a WAL reader
(exit 4 ``database-locked``), so close the app on a laptop before applying.

A stub that ``zmonitor-migrate new`` left unwritten (``-- zmonitor:todo``) does not stop
the laptop path where it is not run: a migration can be tried before its rollback is
written. A pending migration, or a rollback to run, that is still a stub is refused.
"""

from __future__ import annotations

import getpass
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import dbinfo, fsutil, sources
from .bundle import declared_row_loss
from .config import Config
from .engine import Engine, read_applied
from .errors import LintFailed, MigrateError, PlanError, PrecheckFailed, UsageError
from .lint import lint_source
from .plan import AppliedRow, Plan, plan, rollback_plan
from .sources import Problem, Source
from .validate import validate

DEVICE_DATABASE = Config().database
# The device's private copy is migrated in batches of at least this many rows: the
# laptop path times and behaves the same.
MIN_BATCH = Config().batch_size


@dataclass(frozen=True)
class DevSource:
    source: Source
    declared_loss: set[str]
    stubs: dict[str, Problem]  # path → its todo problem (unwritten files)
    warnings: list[Problem] = field(default_factory=list)


def load_source(root: Path) -> DevSource:
    """Lint and discover ``root`` as ``bundle build`` would, except that unwritten stubs
    are reported to the caller instead of refused (see the module docstring)."""
    problems = lint_source(root)
    errors = [p for p in problems if p.severity == "error" and p.code != "todo"]
    if errors:
        raise LintFailed(f"{root}: {len(errors)} lint error(s); fix them first:\n"
                         + "\n".join(str(p) for p in errors))
    source, _ = sources.discover(root)
    stubs = {p.path: p for p in problems if p.code == "todo"}
    return DevSource(source=source, declared_loss=set(declared_row_loss(root)), stubs=stubs,
                     warnings=[p for p in problems if p.severity == "warning"])


def _refuse_stubs(dev: DevSource, paths: list[str], what: str) -> None:
    unwritten = [p for p in paths if p in dev.stubs]
    if unwritten:
        raise LintFailed(f"{what} is not written yet (still the stub 'zmonitor-migrate new' made, "
                         f"with its zmonitor:todo line): {', '.join(unwritten)}", kind="todo")


def check_db_path(db: Path) -> None:
    if db.absolute() == DEVICE_DATABASE:
        raise UsageError(f"--db {db}: that is the device's database; the laptop path works "
                         "on a copy (cp it to another path first)")


def _read(db: Path) -> tuple[list[AppliedRow], dict[str, int], str]:
    try:
        conn = dbinfo.open_ro(db)
        try:
            return read_applied(conn), dbinfo.row_counts(conn), dbinfo.file_journal_mode(db,
                                                                                        conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise UsageError(f"--db {db}: not a readable SQLite database ({exc})") from None


def _existing(db: Path) -> None:
    if not db.is_file():
        raise UsageError(f"--db {db}: no such database file")


def _quiesce(db: Path) -> None:
    """Nobody else may be writing the file while its copy is migrated: the rename would
    drop their rows. Checkpoint a WAL so the file is self-contained."""
    try:
        conn = sqlite3.connect(db, isolation_level=None, timeout=2.0)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            if dbinfo.journal_mode(conn) == "wal":
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                if busy:
                    raise sqlite3.OperationalError("database is locked")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise PrecheckFailed(f"{db} is in use by another program ({exc}); close it and try "
                             "again", kind="database-locked") from None


def _copy(db: Path, dst: Path) -> None:
    """An online snapshot of ``db`` (an empty database when there is none yet)."""
    if db.is_file():
        dbinfo.snapshot(db, dst)
    else:
        sqlite3.connect(dst).close()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@dataclass
class DevRun:
    db: Path
    action: str
    from_version: int
    to_version: int
    versions: list[int]
    dry_run: bool
    seconds: float
    plan: Plan | None = None
    created: bool = False
    final: bool = False  # at the source's last version: post.yaml and database.yaml checked
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, "database": str(self.db), "action": self.action,
                "from_version": self.from_version, "to_version": self.to_version,
                "versions": self.versions, "dry_run": self.dry_run,
                "seconds": round(self.seconds, 3), "created": self.created,
                "plan": self.plan.to_dict() if self.plan else None,
                "final": self.final, "warnings": self.warnings}


def _migrate_copy(db: Path, work: Path, run: Callable[[Engine], list[int]], *,
                  target: int, last_version: int, counts: dict[str, int],
                  loss: set[str], root: Path) -> list[int]:
    """Copy, run, validate on a fresh read-only connection; raise on any failure."""
    _copy(db, work)
    try:
        with Engine(work, fast=True, min_batch=MIN_BATCH,
                    applied_by=f"zmonitor-migrate dev ({_user()})") as eng:
            done = run(eng)
    except (PlanError, LintFailed):
        raise
    except MigrateError as exc:
        raise PrecheckFailed(f"{exc.message}; {db} was not changed",
                             kind="migration-failed") from None
    except sqlite3.Error as exc:
        raise PrecheckFailed(f"the migration failed: {exc}; {db} was not changed",
                             kind="migration-failed") from None
    conn = dbinfo.open_ro(work)
    try:
        problems = validate(conn, target=target, last_version=last_version,
                            counts_before=counts, declared_loss=loss, source_root=root)
    finally:
        conn.close()
    if problems:
        raise PrecheckFailed("validation failed: " + "; ".join(problems[:8])
                             + f"; {db} was not changed", kind="validation-failed")
    return done


def _swap(work: Path, db: Path, journal_mode: str | None) -> None:
    if journal_mode == "wal":  # keep the file's mode: the app opened it that way
        conn = sqlite3.connect(work, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()
    fsutil.fsync_file(work)
    # The old file's side files belong to it: never leave them to be applied to the new one.
    fsutil.remove_sidecars(db)
    os.replace(work, db)
    fsutil.fsync_dir(db.parent)


def _run(db: Path, root: Path, action: str, *, dry_run: bool,
         decide: Callable[[DevSource, list[AppliedRow]], tuple[Plan, list[str]]],
         work_on: Callable[[DevSource, Plan], Callable[[Engine], list[int]]],
         rollback: bool) -> DevRun:
    check_db_path(db)
    dev = load_source(root)
    created = not db.exists()
    applied, counts, mode = _read(db) if not created else ([], {}, None)
    the_plan, stub_paths = decide(dev, applied)
    _refuse_stubs(dev, stub_paths, "a migration to run" if not rollback else "a rollback to run")
    warnings = [str(p) for p in dev.stubs.values()] + [str(p) for p in dev.warnings]
    result = DevRun(db=db, action=action, from_version=the_plan.current,
                    to_version=the_plan.target, versions=[], dry_run=dry_run, seconds=0.0,
                    plan=the_plan, created=created and not dry_run, warnings=warnings,
                    final=the_plan.target == dev.source.last_version)
    if the_plan.is_noop:
        result.created = False
        return result
    if not created and not dry_run:
        _quiesce(db)
    loss = set(counts) if rollback else dev.declared_loss
    started = time.monotonic()
    try:
        # Beside the file: the rename that replaces it stays on one filesystem.
        with tempfile.TemporaryDirectory(prefix="zmonitor-dev-",
                                         dir=None if dry_run else db.absolute().parent) as tmp:
            work = Path(tmp) / "migrated.db"
            result.versions = _migrate_copy(db, work, work_on(dev, the_plan),
                                            target=the_plan.target,
                                            last_version=dev.source.last_version,
                                            counts=counts, loss=loss, root=root)
            result.seconds = time.monotonic() - started
            if not dry_run:
                _swap(work, db, mode)
    except OSError as exc:
        raise PrecheckFailed(f"cannot write the migrated copy beside {db}: {exc}; {db} was "
                             "not changed", kind="io") from None
    return result


def apply(db: Path, root: Path, *, target: int | None = None, dry_run: bool = False) -> DevRun:
    def decide(dev: DevSource, applied: list[AppliedRow]) -> tuple[Plan, list[str]]:
        p = plan(dev.source.migrations, applied, target)
        return p, [m.path for m in p.pending]

    def work_on(dev: DevSource, p: Plan) -> Callable[[Engine], list[int]]:
        return lambda eng: eng.apply(dev.source, the_plan=p)

    return _run(db, root, "apply", dry_run=dry_run, decide=decide, work_on=work_on,
                rollback=False)


def rollback(db: Path, root: Path, *, to: int | None = None, dry_run: bool = False) -> DevRun:
    check_db_path(db)
    _existing(db)

    def decide(dev: DevSource, applied: list[AppliedRow]) -> tuple[Plan, list[str]]:
        current = max((r.version for r in applied), default=0)
        if current == 0:
            raise UsageError(f"--db {db} has no migration applied; there is nothing to roll "
                             "back")
        goal = current - 1 if to is None else to
        if goal >= current:
            raise UsageError(f"--to {goal}: {db} is at version {current}; roll back to a "
                             f"version below it (0 to {current - 1})")
        undo = rollback_plan(dev.source.migrations, applied, goal)
        p = Plan(current=current, target=goal, pending=undo, applied=tuple(applied))
        return p, [m.rollback for m in undo if m.rollback]

    def work_on(dev: DevSource, p: Plan) -> Callable[[Engine], list[int]]:
        return lambda eng: eng.rollback(dev.source, p.target)

    return _run(db, root, "rollback", dry_run=dry_run, decide=decide, work_on=work_on,
                rollback=True)


def status(db: Path, root: Path) -> dict[str, Any]:
    """Version, each applied migration against the source (hash), pending. Read-only."""
    check_db_path(db)
    _existing(db)
    applied, counts, mode = _read(db)
    source, problems = sources.discover(root)
    by_version = source.by_version()
    rows = []
    for row in applied:
        mig = by_version.get(row.version)
        state = ("not in the source" if mig is None else "unverified (no hash)"
                 if row.file_hash is None else "ok" if row.file_hash == mig.sha256
                 else "EDITED since it was applied")
        rows.append({**row.to_dict(), "source_file": mig.path if mig else None,
                     "hash": state})
    info: dict[str, Any] = {
        "ok": True, "database": str(db), "journal_mode": mode,
        "current_version": max((r.version for r in applied), default=0),
        "applied": rows, "rows": counts, "source": str(root),
        "source_problems": [str(p) for p in problems if p.severity == "error"]}
    try:
        info["pending"] = [m.to_dict() for m in plan(source.migrations, applied).pending]
    except PlanError as exc:
        info["pending"] = None
        info["pending_error"] = exc.to_dict()
    return info


def render_status(info: dict[str, Any]) -> list[str]:
    lines = [f"database {info['database']}: version {info['current_version']} "
             f"({info['journal_mode']} journal), {sum(info['rows'].values())} rows in "
             f"{len(info['rows'])} tables"]
    for row in info["applied"]:
        lines.append(f"  {row['version']:04d} {row['migration_type'] or '-':6s} applied "
                     f"{row['applied_at']} by {row['applied_by'] or '-'}: {row['hash']}")
    if info.get("pending") is None:
        lines.append(f"pending: cannot plan against {info['source']}: "
                     f"{info['pending_error']['message']}")
    elif info["pending"]:
        lines.append(f"pending from {info['source']}: "
                     + ", ".join(f"{m['version']:04d} ({m['path']})" for m in info["pending"]))
    else:
        lines.append(f"up to date with {info['source']}")
    lines += [f"source problem: {p}" for p in info["source_problems"]]
    return lines


def render_run(run: DevRun) -> list[str]:
    lines: list[str] = []
    if run.plan is not None and (run.dry_run or run.plan.is_noop):
        lines += run.plan.describe() if run.action == "apply" else [
            f"current version {run.plan.current}, roll back to {run.plan.target}: "
            + ", ".join(f"{m.version:04d}" for m in run.plan.pending)]
    lines += [f"warning: {w}" for w in run.warnings]
    if run.plan is not None and run.plan.is_noop:
        lines.append(f"{run.db}: nothing to do (version {run.from_version})")
        return lines
    done = ", ".join(f"{v:04d}" for v in run.versions)
    verb = "applied" if run.action == "apply" else "rolled back"
    checked = "validated (version, integrity, foreign keys, row counts" + (
        ", checks/post.yaml, schema/database.yaml)" if run.final else ")")
    if run.dry_run:
        lines.append(f"dry run: {verb} {done} on a copy in {run.seconds:.2f} s and "
                     f"{checked}; {run.db} was not changed")
    else:
        lines.append(f"{run.db}: version {run.from_version} → {run.to_version}, {verb} "
                     f"{done} in {run.seconds:.2f} s, {checked}"
                     + (" (new database)" if run.created else ""))
    return lines
