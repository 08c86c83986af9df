"""One migration run, end to end.

::

    verify (private copy) → pre-checks + rehearsal on a snapshot        [app running]
    → stop app → copy (hashed) → back up (hard link) → migrate the copy → validate
    → rename the copy over the live file → start app → health gate → commit
    any failure after the stop → restore → start app

Guarantees:

- Everything that can fail without the app stopped (signature, policy, integrity,
  foreign keys, free space, a full rehearsal of the bundle on an online snapshot, the
  downtime estimate) fails *before* the stop: exit 3 or 4, app untouched.
- The bundle is admitted by ``admission.admit`` (the same verdict as ``bundle verify``
  and ``rollback --bundle``); the anti-rollback floor in the state dir is raised as soon
  as it is accepted, before the rehearsal (a dry run records nothing).
- The live file is never written by a migration. The copy is migrated and validated,
  then ``rename(2)``-ed over the live path, so a crash at any instant leaves either the
  old database (every row intact) or the migrated, validated one. Until the rename,
  failing needs no restore: the copy is discarded. After it, the backup is restored.
- The journal is written before each phase's work; ``recovery.recover`` finishes any run
  it finds open, so the app is never left stopped because this process died.
- Downtime is measured from the moment the stop is requested until ``systemctl start``
  returns (the app is ready: it is ``Type=notify``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import backup as backups
from . import dbinfo, fsutil, history
from .config import Config
from .engine import Engine, Interrupted, Progress, watch
from .errors import (
    BundleRejected,
    MigrateError,
    MigrationFailed,
    PlanError,
    PrecheckFailed,
    RestoreFailed,
)
from .journal import Journal, Phase
from .lock import RunLock
from .plan import Plan
from .progress import Reporter, format_duration
from .services import ServiceManager, for_unit
from .sources import Source

BUNDLES_DDL = """CREATE TABLE IF NOT EXISTS zmonitor_migrated_bundles (
    sequence INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    applied_at TEXT NOT NULL,
    run_id TEXT
)"""
SLOW_RUN_S = 300.0  # the migration-slow alert: a run longer than 5 minutes
# Hard time limits (Run._rehearsal_budget, Run._downtime): the rehearsal may take
# REHEARSAL_FACTOR × max_downtime_s (at least REHEARSAL_SLACK_S more than it), with
# --allow-long LONG_REHEARSAL_FACTOR ×; with --allow-long the downtime may take
# LONG_DOWNTIME_FACTOR × the rehearsal's measured time + LONG_DOWNTIME_SLACK_S.
REHEARSAL_FACTOR = 3.0
REHEARSAL_SLACK_S = 5.0
LONG_REHEARSAL_FACTOR = 10.0
LONG_DOWNTIME_FACTOR = 3.0
LONG_DOWNTIME_SLACK_S = 30.0


@dataclass
class RunResult:
    run_id: str
    outcome: str  # applied | up-to-date | dry-run | rejected | precheck-failed | restored | ...
    exit_code: int = 0
    bundle: str | None = None
    sequence: int | None = None
    from_version: int | None = None
    to_version: int | None = None
    downtime_s: float | None = None
    estimate_s: float | None = None
    backup: str | None = None
    plan: Plan | None = None
    phase_times: dict[str, float] = field(default_factory=dict)
    error: MigrateError | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok, "run_id": self.run_id, "outcome": self.outcome,
            "exit_code": self.exit_code, "bundle": self.bundle, "sequence": self.sequence,
            "from_version": self.from_version, "to_version": self.to_version,
            "downtime_s": self.downtime_s, "estimate_s": self.estimate_s,
            "backup": self.backup, "phase_times": self.phase_times,
        }
        if self.plan is not None:
            out["plan"] = self.plan.to_dict()
        if self.error is not None:
            out["error"] = self.error.to_dict()
        return out


@dataclass
class Verified:
    """What verification hands to the run: the manifest and the checked payload."""

    name: str
    sequence: int
    manifest_sha256: str
    source: Source
    declared_loss: set[str]


class Run:
    """State of one run; ``execute`` drives it through the journal's phases."""

    def __init__(self, config: Config, *, services: ServiceManager, reporter: Reporter,
                 stop_requested: Callable[[], bool], now: Callable[[], datetime]) -> None:
        self.config = config
        self.services = services
        self.reporter = reporter
        self.stop_requested = stop_requested
        self.now = now
        self.db = config.database
        self.journal: Journal | None = None
        self.record: dict[str, Any] = {}
        self.t_stop: float | None = None
        self.t_start: float | None = None
        self.deadline: float | None = None
        self.budget_s = config.max_downtime_s
        self.rehearsal_deadline: float | None = None
        self.rollback_to: int | None = None  # set for 'rollback --to N' runs

    def _work(self, eng: Engine, source: Source, the_plan: Plan) -> None:
        if self.rollback_to is None:
            eng.apply(source, the_plan=the_plan)
        else:
            eng.rollback(source, self.rollback_to)

    # -- helpers --------------------------------------------------------------------
    def emit(self, phase: str, message: str, **fields: Any) -> None:
        self.reporter.emit(phase, message, **fields)

    def _progress(self, phase: str) -> Callable[[Progress], None]:
        def on_progress(p: Progress) -> None:
            if p.done:
                return
            if p.batches:
                # "row changes": the sum over the migration's statements, which may touch
                # the same row twice, so it is not a row count of the table.
                self.emit(phase, f"{p.path} ({p.index}/{p.count}) batch {p.batch}/{p.batches} "
                          f"{100.0 * p.batch / max(1, p.batches):.0f}% ETA "
                          f"{format_duration(p.eta_s or 0.0)}, {p.rows:,} row changes",
                          version=p.version,
                          batch=p.batch, batches=p.batches, rows=p.rows,
                          percent=100.0 * p.batch / max(1, p.batches), eta_s=p.eta_s)
            else:
                self.emit(phase, f"{p.path} ({p.index}/{p.count})", version=p.version,
                          percent=100.0 * (p.index - 1) / max(1, p.count))
        return on_progress

    def _should_stop(self) -> bool:
        self.reporter.heartbeat()
        if self.stop_requested():
            return True
        return self.deadline is not None and time.monotonic() > self.deadline

    def _interrupted_before_stop(self) -> PrecheckFailed:
        # Exit 4 (nothing touched, app never stopped); kind "interrupted" like a stop
        # mid-apply, so the daemon keeps the bundle for its next start.
        return PrecheckFailed("stop requested (SIGTERM) before the app was stopped; "
                              "nothing was changed", kind="interrupted")

    def _interrupt_reason(self) -> str:
        if self.stop_requested():
            return "stop requested (SIGTERM); stopped at a safe point"
        if self.budget_s == self.config.max_downtime_s:
            return f"the downtime budget max_downtime_s={self.budget_s:g} ran out"
        return (f"the downtime budget of {self.budget_s:g} s (--allow-long: "
                f"{LONG_DOWNTIME_FACTOR:g} x the rehearsal + {LONG_DOWNTIME_SLACK_S:g} s; "
                f"max_downtime_s={self.config.max_downtime_s:g}) ran out")

    # -- phases -----------------------------------------------------------------------
    def precheck(self, verified: Verified, target: int | None, allow_long: bool,
                 run_dir: Path) -> tuple[Plan, float, dict[str, int]]:
        """Checks and rehearsal while the app runs. Raises PrecheckFailed."""
        cfg = self.config
        if not self.db.is_file():
            raise PrecheckFailed(f"database {self.db} does not exist; check 'database' in the "
                                 "config (the app creates it on its first start)",
                                 kind="database-missing")
        try:
            conn = dbinfo.open_ro(self.db)
            try:
                bad = dbinfo.integrity_problems(conn, quick=cfg.integrity_check == "quick")
                if bad:
                    self.reporter.alert("precheck-failed", f"database {self.db} fails its "
                                        f"integrity check: {'; '.join(bad[:3])}")
                    raise PrecheckFailed(f"database {self.db} fails its integrity check "
                                         f"({'; '.join(bad[:3])}); not migrating a damaged "
                                         "database — restore a backup first",
                                         kind="integrity")
                fks = dbinfo.fk_problems(conn)
                if fks:
                    raise PrecheckFailed(f"database {self.db} has foreign-key violations "
                                         f"before the run: {'; '.join(fks[:3])}",
                                         kind="foreign-keys")
                from .engine import read_applied
                from .plan import plan as make_plan
                from .plan import rollback_plan

                try:
                    applied = read_applied(conn)
                    if self.rollback_to is None:
                        the_plan = make_plan(verified.source.migrations, applied, target)
                    else:
                        undo = rollback_plan(verified.source.migrations, applied,
                                             self.rollback_to)
                        the_plan = Plan(current=max((r.version for r in applied), default=0),
                                        target=self.rollback_to, pending=undo,
                                        applied=tuple(applied))
                except PlanError as exc:
                    raise PrecheckFailed(exc.message, kind=exc.kind) from None
                counts = dbinfo.row_counts(conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise PrecheckFailed(f"database {self.db} cannot be read: {exc}",
                                 kind="database-unreadable") from None
        size = dbinfo.file_size(self.db)
        need = int(size * 1.1) + 1024 * 1024
        free = fsutil.free_bytes(run_dir)
        if free < need:
            raise PrecheckFailed(f"not enough space for the rehearsal in {run_dir}: need "
                                 f"{need / 1e6:.1f} MB, {free / 1e6:.1f} MB free",
                                 kind="disk-space")
        if the_plan.is_noop:
            return the_plan, 0.0, counts
        # Rehearsal: the whole bundle on an online snapshot, validated like the real run.
        snapshot = run_dir / "rehearsal.db"
        self.emit("rehearsal", f"rehearsing {len(the_plan.pending)} migration(s) on a "
                               "snapshot")
        t0 = time.monotonic()
        self.rehearsal_deadline = t0 + self._rehearsal_budget(allow_long)
        try:
            src = dbinfo.open_ro(self.db)
            dst = sqlite3.connect(snapshot)
            try:
                src.backup(dst)  # one step: one read snapshot, never restarted by app writes
            finally:
                dst.close()
                src.close()
            t_copy = time.monotonic() - t0
            with Engine(snapshot, fast=True, min_batch=self.config.batch_size,
                        on_progress=self._progress("rehearsal"),
                        should_stop=self._stop_before_downtime) as eng:
                watch(eng.conn, expired=self._rehearsal_expired, tick=self.reporter.heartbeat)
                self._work(eng, verified.source, the_plan)
            # A fresh connection: nothing the migrations left on theirs answers for the file.
            problems = self._validate(snapshot, the_plan, counts, verified,
                                      deadline=self.rehearsal_deadline)
            if problems:
                raise PrecheckFailed("the rehearsal on a snapshot failed validation: "
                                     + "; ".join(problems[:5]), kind="rehearsal-validation")
            grown = dbinfo.file_size(snapshot)
        except MigrateError as exc:
            if isinstance(exc, PrecheckFailed):
                raise
            if isinstance(exc, Interrupted):
                if self.stop_requested():
                    raise self._interrupted_before_stop() from None
                raise PrecheckFailed(
                    f"the rehearsal ran out of its time budget "
                    f"({self._rehearsal_budget(allow_long):g} s, from max_downtime_s="
                    f"{cfg.max_downtime_s:g}): {exc.message}; the app was never stopped — "
                    "fix the migration or check (a runaway query?), or raise max_downtime_s",
                    kind="too-slow"
                ) from None
            raise PrecheckFailed(f"the rehearsal on a snapshot failed: {exc.message}",
                                 kind="rehearsal") from None
        except (sqlite3.Error, OSError) as exc:
            raise PrecheckFailed(f"the rehearsal on a snapshot failed: {exc}",
                                 kind="rehearsal") from None
        finally:
            fsutil.remove(snapshot)
            fsutil.remove_sidecars(snapshot)
        estimate = time.monotonic() - t0
        # The real copy is a plain file copy, faster than the online backup; keep the
        # estimate conservative anyway (apply + validation dominate).
        self.emit("rehearsal", f"passed in {estimate:.2f} s (snapshot "
                               f"{t_copy:.2f} s); estimated downtime {estimate:.2f} s")
        if estimate > cfg.max_downtime_s and not allow_long:
            raise PrecheckFailed(
                f"estimated downtime {estimate:.1f} s exceeds max_downtime_s="
                f"{cfg.max_downtime_s:g}; schedule a window and rerun with --allow-long, or "
                "raise max_downtime_s", kind="downtime-estimate")
        # The migrated copy, and room to copy the backup back should the new version fail
        # after the swap: a restore that cannot be written leaves the monitor stopped.
        need = grown + size + 1024 * 1024
        free = fsutil.free_bytes(self.db.parent)
        if free < need:
            raise PrecheckFailed(f"not enough space next to {self.db}: need {need / 1e6:.1f} "
                                 f"MB (migrated copy {grown / 1e6:.1f} MB + room to restore "
                                 f"the backup {size / 1e6:.1f} MB), {free / 1e6:.1f} MB free",
                                 kind="disk-space")
        if not self._backup_linkable():
            # The backup is a copy on the backup dir's own filesystem, not next to the DB.
            need = size + 1024 * 1024
            free = fsutil.free_bytes(cfg.backup_dir)
            if free < need:
                raise PrecheckFailed(f"not enough space in {cfg.backup_dir} (another "
                                     f"filesystem than the database) for the backup copy: "
                                     f"need {need / 1e6:.1f} MB, {free / 1e6:.1f} MB free",
                                     kind="disk-space")
        return the_plan, estimate, counts

    def _rehearsal_budget(self, allow_long: bool) -> float:
        """The rehearsal's hard limit: REHEARSAL_FACTOR × max_downtime_s, at least
        REHEARSAL_SLACK_S more than it (LONG_REHEARSAL_FACTOR with --allow-long). The
        rehearsal runs while the app is up, so running past the budget costs no downtime,
        and a migration that is merely too slow should finish it: its measured time is
        the estimate the operator acts on (--allow-long, a maintenance window). A
        runaway statement or check is cut at the limit instead of running for ever."""
        budget = self.config.max_downtime_s
        factor = LONG_REHEARSAL_FACTOR if allow_long else REHEARSAL_FACTOR
        return max(factor * budget, budget + REHEARSAL_SLACK_S)

    def _rehearsal_expired(self) -> bool:
        return self.rehearsal_deadline is not None and \
            time.monotonic() > self.rehearsal_deadline

    def _stop_before_downtime(self) -> bool:
        """The rehearsal's safe points: a stop request ends it (the app still runs), and
        so does its time budget."""
        self.reporter.heartbeat()
        return self.stop_requested() or self._rehearsal_expired()

    def _backup_linkable(self) -> bool:
        try:
            fsutil.make_dirs(self.config.backup_dir)
            return fsutil.can_hardlink(self.db.parent, self.config.backup_dir)
        except OSError:
            return False

    def _validate(self, db: Path, the_plan: Plan, counts: dict[str, int],
                  verified: Verified, *, downtime: bool = False,
                  deadline: float | None = None,
                  rows_after: dict[str, int] | None = None) -> list[str]:
        """The validation rules on a migrated database, on a fresh read-only connection
        (never the one the migrations ran on), with the run's deadline. While the app is
        down the integrity check is ``downtime_integrity_check`` (quick by default): the
        full check already passed on the live database and on the rehearsal, which ran
        the same statements over the same pages before the stop; ``quick_check`` still
        reads every page and checks every b-tree, and only skips matching each index
        against its table, which is what a migration's statements determine.
        ``rows_after``, when given, is filled with the row counts on the same
        connection."""
        from .validate import validate

        setting = self.config.downtime_integrity_check if downtime else \
            self.config.integrity_check

        # Undoing migrations may remove what they added (seed rows), by definition.
        loss = set(counts) if self.rollback_to is not None else verified.declared_loss
        conn = dbinfo.open_ro(db)
        try:
            problems = validate(conn, target=the_plan.target,
                                last_version=verified.source.last_version,
                                counts_before=counts, declared_loss=loss,
                                source_root=verified.source.root,
                                quick=setting == "quick", deadline=deadline,
                                tick=self.reporter.heartbeat)
            if rows_after is not None and not problems:
                rows_after.update(dbinfo.row_counts(conn))
            return problems
        finally:
            conn.close()

    def quiesce(self) -> str:
        """Make the live file self-contained (no WAL content, no hot journal) and prove
        nobody else holds it. Returns its journal mode."""
        try:
            conn = sqlite3.connect(self.db, isolation_level=None, timeout=2.0)
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
                    f"{self.db} is still locked by another process after the app was "
                    "stopped (the app did not really stop, or something else holds the "
                    "database); nothing was changed", kind="database-locked") from None
            raise
        wal = self.db.with_name(self.db.name + "-wal")
        if wal.exists() and wal.stat().st_size:
            raise MigrateError(f"{wal} still holds data after a checkpoint; nothing was "
                               "changed", kind="wal-not-empty")
        if self.db.with_name(self.db.name + "-journal").exists():
            raise MigrateError(f"a hot journal next to {self.db} survived opening the "
                               "database; nothing was changed", kind="hot-journal")
        return mode

    def execute(self, verified: Verified, *, dry_run: bool, target: int | None,
                allow_long: bool, run_dir: Path) -> RunResult:
        j = self.journal
        assert j is not None
        result = RunResult(run_id=j.run_id, outcome="", bundle=verified.name,
                           sequence=verified.sequence)
        self.record.update(bundle=verified.name, sequence=verified.sequence,
                           db_size_before=dbinfo.file_size(self.db))
        j.advance(Phase.VERIFIED, bundle_name=verified.name, sequence=verified.sequence,
                  manifest_sha256=verified.manifest_sha256)
        the_plan, estimate, counts = self.precheck(verified, target, allow_long, run_dir)
        result.plan, result.estimate_s = the_plan, round(estimate, 3)
        result.from_version, result.to_version = the_plan.current, the_plan.target
        self.record.update(from_version=the_plan.current, to_version=the_plan.target,
                           rows_before=counts, estimate_s=round(estimate, 3))
        j.advance(Phase.PRECHECKED, from_version=the_plan.current, to_version=the_plan.target,
                  estimate_s=estimate)
        for line in the_plan.describe():
            self.emit("plan", line)
        for m in the_plan.pending:  # the header's size is raised on the private copy
            if m.batch and self.config.batch_size > m.batch.size and self.rollback_to is None:
                self.emit("plan", f"  {m.version:04d} runs in batches of "
                                  f"{self.config.batch_size:,} rows (batch_size in the config; "
                                  f"size={m.batch.size} bounds batches on a live table)")
        if dry_run:
            result.outcome = "dry-run"
            return result
        if the_plan.is_noop:
            result.outcome = "up-to-date"
            self.emit("plan", f"database already at version {the_plan.current}; nothing to do")
            return result
        if self.stop_requested():
            raise self._interrupted_before_stop()  # no downtime for a run being stopped
        return self._downtime(verified, the_plan, counts, result, allow_long)

    def _downtime(self, verified: Verified, the_plan: Plan, counts: dict[str, int],
                  result: RunResult, allow_long: bool) -> RunResult:
        cfg = self.config
        j = self.journal
        assert j is not None
        copy = self.db.with_name(f"{self.db.name}.migrating-{j.run_id}")
        live_ino = os.stat(self.db).st_ino
        j.advance(Phase.APP_STOPPED, copy=str(copy), live_inode=live_ino,
                  app_unit=self.services.name)
        # Only effective while systemd waits for our start or stop (recovery at boot, a
        # SIGTERM mid-run): give the downtime phase room to end consistently.
        self.reporter.extend(2 * cfg.max_downtime_s + 60)
        self.t_stop = time.monotonic()
        # With --allow-long a downtime above max_downtime_s was accepted, as long as the
        # rehearsal measured it: an endless statement or check still ends the run.
        budget = cfg.max_downtime_s if not allow_long else max(
            cfg.max_downtime_s,
            LONG_DOWNTIME_FACTOR * (result.estimate_s or 0.0) + LONG_DOWNTIME_SLACK_S)
        self.deadline = self.t_stop + budget
        self.budget_s = budget
        try:
            self.emit("app_stopped", f"stopping {self.services.name}" if self.services.name
                      else "no app unit configured (app_unit: null): nothing to stop")
            self.services.stop(cfg.stop_timeout_s, tick=self.reporter.heartbeat)
            mode = self.quiesce()
            version = the_plan.current
            # The working copy is copied in the kernel; the backup is a hard link to the
            # same, now untouched, inode, hashed on another core while the copy is
            # migrated. Its checksum is durable before the swap, the first moment a
            # restore could need it (before that the live file is the original, and
            # recovery removes a link to it).
            original = _content_stamp(self.db)
            fsutil.copy_fast(self.db, copy)
            bk = backups.take(self.db, cfg.backup_dir, version, defer_hash=True)
            hasher = fsutil.InBackground(fsutil.sha256_file, bk.path) if not bk.sha256 else None
            # The row counts the validation compares against are those of the database the
            # app left behind, not of the pre-check (the app kept writing until the stop):
            # counted on the quiesced live file, beside the apply.
            stopped_counts = fsutil.InBackground(dbinfo.row_counts_of, self.db)
            j.advance(Phase.BACKED_UP, backup=str(bk.path), backup_sha256=bk.sha256 or None,
                      backup_linked=bk.linked, journal_mode=mode)
            result.backup = str(bk.path)
            self.record["backup"] = str(bk.path)
            self.emit("backed_up", f"backup {bk.path} ({'hard link' if bk.linked else 'copy'})")
            j.advance(Phase.APPLYING, migration=the_plan.pending[0].version)
            if mode == "wal":
                # The private copy needs no WAL while it is migrated: an in-memory
                # rollback journal writes each page once instead of twice (WAL, then
                # checkpoint). The original's WAL mode is put back before validation ends.
                _set_journal_mode(copy, "delete")
            with Engine(copy, fast=True, min_batch=cfg.batch_size,
                        on_progress=self._progress("applying"),
                        should_stop=self._should_stop) as eng:
                self._abort_long_statements(eng)
                try:
                    self._work(eng, verified.source, the_plan)
                except Interrupted as exc:
                    raise MigrateError(f"{self._interrupt_reason()} ({exc.message})",
                                       kind="interrupted") from None
                if the_plan.target == verified.source.last_version:
                    eng.conn.execute(BUNDLES_DDL)
                    eng.conn.execute(
                        "INSERT OR REPLACE INTO main.zmonitor_migrated_bundles "
                        "VALUES (?,?,?,?,?)",
                        (verified.sequence, verified.name, verified.manifest_sha256,
                         self.now().strftime("%Y-%m-%dT%H:%M:%SZ"), j.run_id))
            # The migrations' connection is closed: validation sees only the file.
            self.emit("validating", "post-migration validation of the migrated copy")
            # Validation only reads: write the migrated pages back meanwhile, so the
            # fsync before the swap has (almost) nothing left to wait for.
            flushed = fsutil.InBackground(fsutil.fsync_file, copy)
            rows_after: dict[str, int] = {}
            counts = stopped_counts.result()
            self.record["rows_before"] = counts
            try:
                problems = self._validate(copy, the_plan, counts, verified, downtime=True,
                                          deadline=self.deadline, rows_after=rows_after)
            except Interrupted as exc:
                raise MigrateError(f"{self._interrupt_reason()} ({exc.message})",
                                   kind="too-slow") from None
            finally:
                flushed.result()
            if problems:
                self.reporter.alert("validation-failed", "; ".join(problems[:5]))
                raise MigrateError("post-migration validation failed: "
                                   + "; ".join(problems[:5]), kind="validation-failed")
            self.record["rows_after"] = rows_after
            if mode == "wal":
                _set_journal_mode(copy, mode)
            fsutil.fsync_file(copy)
            fsutil.copy_owner(self.db, copy)
            if any(p.exists() for p in fsutil.sidecars(copy)):
                raise MigrateError(f"side files of {copy} survived closing it",
                                   kind="copy-sidecars")
            if hasher is not None:
                bk = backups.seal(bk, hasher.result())
            if _content_stamp(self.db) != original:
                # The copy, the backup and its sha256 must all be the same bytes.
                raise MigrateError(f"{self.db} was written while the app was stopped: "
                                   "another writer is active", kind="concurrent-writer")
            j.advance(Phase.VALIDATED, backup_sha256=bk.sha256)
            j.advance(Phase.SWAPPING)
            wal = self.db.with_name(self.db.name + "-wal")
            if wal.exists() and wal.stat().st_size:
                raise MigrateError(f"{wal} gained data while the app was stopped: another "
                                   "writer is active", kind="concurrent-writer")
            fsutil.remove_sidecars(self.db)
            os.replace(copy, self.db)
            fsutil.fsync_dir(self.db.parent)
            j.advance(Phase.SWAPPED, swapped=True)
            self.emit("swapped", f"migrated database is live at version {the_plan.target}")
            self.services.start()
            self.t_start = time.monotonic()
            downtime = self.t_start - self.t_stop
            j.advance(Phase.APP_STARTED, downtime_s=downtime)
            result.downtime_s = round(downtime, 3)
            self.emit("app_started", f"{self.services.name or 'no app unit'}"
                                     f"{' started' if self.services.name else ''} after "
                                     f"{downtime:.2f} s downtime; health gate "
                                     f"{cfg.health_check_s:g} s")
            self.services.health_gate(cfg.health_check_s, tick=self.reporter.heartbeat)
            j.advance(Phase.COMMITTED)
        except BaseException as exc:
            self.fail(_classify(exc))
            raise AssertionError("unreachable") from None
        result.outcome = "applied"
        self.record["db_size_after"] = dbinfo.file_size(self.db)
        if downtime > SLOW_RUN_S:
            self.reporter.alert("migration-slow", f"downtime {downtime:.0f} s exceeded "
                                f"{SLOW_RUN_S:.0f} s")
        return result

    def _abort_long_statements(self, eng: Engine) -> None:
        """SQLite calls this while a statement runs: real progress for the watchdog, and
        a way to abort one long statement when the downtime budget is gone."""
        watch(eng.conn, expired=self._deadline_passed, tick=self.reporter.heartbeat,
              every=200_000)

    def _deadline_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def fail(self, err: MigrateError) -> None:
        """Failure after the stop: put the old database back, start the app, raise."""
        from .recovery import restore_after_failure

        assert self.journal is not None
        self.reporter.alert("migration-failed", f"{err.kind}: {err.message}")
        try:
            restored_backup = restore_after_failure(self.config, self.journal, self.services,
                                                    self.reporter, error=err.to_dict())
        except OSError as exc:
            self._journal_unwritable(exc)
        if self.t_stop is not None:
            self.record["downtime_s"] = round(time.monotonic() - self.t_stop, 3)
        if self.journal.data.get("replaced"):
            self.record["replaced"] = self.journal.data["replaced"]
        raise MigrationFailed(
            f"{err.message} — {'the backup was restored and ' if restored_backup else ''}"
            "the app runs on the old database", kind=err.kind, restored=True)


    def _journal_unwritable(self, exc: OSError) -> None:
        """The journal cannot record the failure (its filesystem is full or gone). Before
        the rename the live file was never written, so the app is started on it at once;
        the journal stays in its last durable phase, whose recovery (discard) is what was
        just done, so a later ``recover`` closes the run idempotently. After the rename
        nothing is guessed: exit 6, every file kept."""
        from .recovery import _discard_copy, _start_app, _swapped

        assert self.journal is not None
        where = f"{self.config.journal_path}: {exc.strerror or exc}"
        if _swapped(self.config, self.journal):
            self.reporter.alert("restore-failed", f"the run journal cannot be written "
                                f"({where}) after the migrated database went live; the app "
                                "is left as it is; manual action needed")
            raise RestoreFailed(f"the run journal cannot be written ({where}) after the "
                                "migrated database went live; free space, then run "
                                "'zmonitor-migrate recover'") from None
        _discard_copy(self.config, self.journal)
        _start_app(self.services, self.reporter)
        raise MigrationFailed(f"the run journal cannot be written ({where}); the live "
                              "database was never changed and the app runs on it; free space "
                              "in the state dir, then 'zmonitor-migrate recover' closes the "
                              "run", kind="journal-unwritable", restored=True) from None


def _classify(exc: BaseException) -> MigrateError:
    """Name the cause of a failure after the stop; a full disk gets its own kind."""
    full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or \
        "database or disk is full" in str(getattr(exc, "message", exc))
    if full:
        text = exc.message if isinstance(exc, MigrateError) else str(exc)
        return MigrateError(f"the disk filled up during the run ({text}); free space on the "
                            "database's filesystem and retry", kind="disk-full")
    if isinstance(exc, MigrateError):
        return exc
    return MigrateError(f"{type(exc).__name__}: {exc}", kind="internal")


def _verify(config: Config, bundle_path: Path, run_dir: Path, now: datetime, *,
            record: bool = True, purpose: str = "apply",
            tick: Callable[[], None] | None = None) -> Verified:
    """Early signature check and private copy (``bundle.receive``), then
    ``admission.admit``: full verification, device policy with the anti-rollback floor
    (recorded here, before the rehearsal, unless ``record`` is off), the payload's YAML.
    Raises BundleRejected, or AlreadyApplied for a no-op. ``tick`` (the watchdog
    heartbeat) is called between bounded reads of the bundle."""
    from . import bundle as bundle_mod
    from .admission import admit
    from .archive import Caps
    from .trust import TrustStore
    from .verify import Decision, Purpose

    caps = Caps.from_config(config)
    trust = TrustStore.from_config(config)
    private = bundle_mod.receive(Path(bundle_path), run_dir, trust, caps=caps, tick=tick)
    adm = admit(config, private, extract_to=run_dir / "payload", now=now,
                purpose=Purpose(purpose), record=record, trust=trust, tick=tick)
    vb = adm.bundle
    if adm.decision == Decision.ALREADY_APPLIED:
        applied = adm.state.applied
        pending = [m.version for m in vb.manifest.migrations if m.version not in applied]
        if pending:  # rolled back since: "nothing to do" would be untrue
            raise BundleRejected(
                f"bundle {vb.manifest.name} sequence {vb.manifest.sequence} was applied "
                f"before, but the database was rolled back since: version "
                f"{max(applied, default=0)}, {len(pending)} migration(s) of this bundle pending "
                f" ({', '.join(f'{v:04d}' for v in pending)}). A bundle is applied "
                "once (anti-rollback); to re-apply, build the same source with a higher "
                f"sequence ('zmonitor-migrate bundle build SRC -o NEW.zmb --key KEY "
                f"--sequence {vb.manifest.sequence + 1}') and apply that bundle",
                kind="rollback")
        raise AlreadyApplied(vb.manifest.name, vb.manifest.sequence)
    return Verified(name=vb.manifest.name, sequence=vb.manifest.sequence,
                    manifest_sha256=vb.manifest_sha256, source=vb.source,
                    declared_loss=set(vb.manifest.declared_row_loss))


def _verify_only(config: Config, bundle_path: Path, run_dir: Path,
                 now: datetime | None = None,
                 tick: Callable[[], None] | None = None) -> Verified:
    """For ``rollback --bundle``: the same admission as apply (signature, device type,
    anti-rollback floor, time, applied hashes, payload YAML), never "nothing to do"."""
    return _verify(config, bundle_path, run_dir, now or datetime.now(UTC),
                   purpose="rollback", tick=tick)


class AlreadyApplied(Exception):
    def __init__(self, name: str, sequence: int) -> None:
        super().__init__(f"bundle {name} sequence {sequence} is already applied")
        self.name, self.sequence = name, sequence


def apply(bundle_path: Path, config: Config, *, services: ServiceManager | None = None,
          reporter: Reporter | None = None, dry_run: bool = False, target: int | None = None,
          allow_long: bool = False, wait: bool = False,
          stop_requested: Callable[[], bool] | None = None,
          now: Callable[[], datetime] | None = None) -> RunResult:
    """Run one bundle through the whole pipeline. Raises a MigrateError subclass on
    failure (its ``exit_code`` is the documented one); returns the result otherwise."""
    bundle_path = Path(bundle_path)
    if not bundle_path.is_file():
        raise BundleRejected(f"bundle {bundle_path} does not exist or is not a file",
                             kind="malformed")
    clock = now or (lambda: datetime.now(UTC))
    reporter = reporter or Reporter()
    # A dry run writes nothing, not even the anti-rollback floor.
    return drive(config, lambda run_dir: _verify(config, bundle_path, run_dir, clock(),
                                                 record=not dry_run,
                                                 tick=reporter.heartbeat),
                 label=str(bundle_path), services=services, reporter=reporter,
                 dry_run=dry_run, target=target, allow_long=allow_long, wait=wait,
                 stop_requested=stop_requested, now=clock)


def drive(config: Config, obtain: Callable[[Path], Verified], *, label: str,
          services: ServiceManager | None = None, reporter: Reporter | None = None,
          dry_run: bool = False, target: int | None = None, allow_long: bool = False,
          wait: bool = False, stop_requested: Callable[[], bool] | None = None,
          now: Callable[[], datetime] | None = None,
          rollback_to: int | None = None) -> RunResult:
    """The run skeleton shared by apply and rollback: lock, recover what an earlier run
    left, journal, obtain the verified source, execute, record."""
    from .recovery import recover

    services = services or for_unit(config.app_unit, config.systemctl)
    reporter = reporter or Reporter()
    stop_requested = stop_requested or (lambda: False)
    now = now or (lambda: datetime.now(UTC))
    _ensure_dirs(config)
    with RunLock(config.lock_path, wait=wait):
        recover(config, services=services, reporter=reporter)
        last = Journal.load(config.journal_path)
        if last is not None and last.outcome == "restore-failed":
            raise RestoreFailed(
                f"run {last.run_id} could not restore its backup and the database may be "
                "damaged; no new run starts until an operator restores a backup "
                "('zmonitor-migrate restore BACKUP')", kind="restore-blocked")
        run = Run(config, services=services, reporter=reporter,
                  stop_requested=stop_requested, now=now)
        run.rollback_to = rollback_to
        journal = Journal.create(config.journal_path, bundle=label,
                                 database=str(config.database), dry_run=dry_run,
                                 rollback_to=rollback_to)
        run.journal = journal
        reporter.run_id = journal.run_id
        run_dir = config.state_dir / "runs" / journal.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        result = RunResult(run_id=journal.run_id, outcome="")
        error: MigrateError | None = None
        try:
            reporter.emit("received", label)
            try:
                verified = obtain(run_dir)
            except AlreadyApplied as done:
                reporter.emit("verified", f"{done}; nothing to do")
                result = RunResult(run_id=journal.run_id, outcome="up-to-date",
                                   bundle=done.name, sequence=done.sequence)
                return result
            reporter.emit("verified", f"{verified.name} sequence {verified.sequence} verified"
                          if verified.sequence else f"{verified.name}: source directory "
                          "(unsigned, not verified)")
            result = run.execute(verified, dry_run=dry_run, target=target,
                                 allow_long=allow_long, run_dir=run_dir)
            if rollback_to is not None and result.outcome == "applied":
                result.outcome = "rolled-back"
                reporter.alert("rollback-executed", f"rolled back to version {rollback_to}")
            return result
        except BaseException as exc:
            error = exc if isinstance(exc, MigrateError) else MigrateError(
                f"{type(exc).__name__}: {exc}", kind="internal")
            raise
        finally:
            _finish(config, run, journal, result, error, started, run_dir, dry_run)


def _finish(config: Config, run: Run, journal: Journal, result: RunResult,
            error: MigrateError | None, started: float, run_dir: Path, dry_run: bool) -> None:
    if error is not None:
        outcome = {3: "rejected", 4: "precheck-failed", 5: "restored",
                   6: "restore-failed"}.get(error.exit_code, "failed")
        if error.kind == "interrupted":
            outcome = "interrupted"
    else:
        outcome = result.outcome
    if not journal.closed and journal.phase in (Phase.RECEIVED, Phase.VERIFIED,
                                                Phase.PRECHECKED, Phase.COMMITTED):
        journal.close(outcome, error=error.to_dict() if error else None)
    result.phase_times = journal.phase_times()
    if not dry_run:
        record = {
            "run_id": journal.run_id, "bundle": result.bundle or run.record.get("bundle"),
            "sequence": result.sequence or run.record.get("sequence"),
            "outcome": outcome, "started_at": started, "finished_at": time.time(),
            "duration_s": round(time.time() - started, 3), "phase_times": result.phase_times,
            "downtime_s": result.downtime_s if error is None else run.record.get("downtime_s"),
            "error": error.to_dict() if error else None, "restored": outcome == "restored",
            **{k: v for k, v in run.record.items() if k not in ("bundle", "sequence",
                                                                  "downtime_s")},
        }
        try:
            history.append(config.history_path, record)
        except OSError as exc:  # the outcome (exit code, journal) stands without it
            run.reporter.alert("history-unwritable", f"cannot append to "
                               f"{config.history_path}: {exc.strerror or exc}")
        write_metrics(config)
    if outcome in ("applied", "rolled-back"):
        protect = {Path(result.backup)} if result.backup else set()
        backups.prune(config.database, config.backup_dir, config.backup_keep, protect)
        _check_backup(run, result)
    shutil.rmtree(run_dir, ignore_errors=True)


def _check_backup(run: Run, result: RunResult) -> None:
    """Full integrity check of the backup this run depends on, after the app is back:
    it costs a read of the whole file, so it stays off the downtime path."""
    if not result.backup:
        return
    try:
        conn = dbinfo.open_ro(Path(result.backup))
        try:
            bad = dbinfo.integrity_problems(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        bad = [str(exc)]
    if bad:
        run.reporter.alert("backup-damaged", f"backup {result.backup} fails its integrity "
                           f"check: {'; '.join(bad[:3])}")


def write_metrics(config: Config) -> None:
    if config.metrics_path is None:
        return
    version = size = None
    try:
        if config.database.exists():
            conn = dbinfo.open_ro(config.database)
            try:
                version = dbinfo.current_version(conn)
            finally:
                conn.close()
            size = dbinfo.file_size(config.database)
    except sqlite3.Error:
        version = None
    with contextlib.suppress(OSError):  # metrics are advisory; the history holds the truth
        history.write_metrics(config.metrics_path, history.render_metrics(
            history.read(config.history_path), current_version=version, db_size=size))


def _content_stamp(path: Path) -> tuple[int, int]:
    """What changes when a file's bytes do (not its ctime: the backup link changes that)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _set_journal_mode(path: Path, mode: str) -> None:
    """Switch the private copy's journal mode. Without ``synchronous=OFF`` leaving WAL
    fsyncs the whole freshly copied file (43 ms at 1M rows), which the swap's single
    fsync does anyway."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        got = str(conn.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]).lower()
    finally:
        conn.close()
    if got != mode:
        raise MigrateError(f"cannot switch {path} to {mode} journal mode (got {got})",
                           kind="journal-mode")


def _ensure_dirs(config: Config) -> None:
    for d in (config.state_dir, config.backup_dir):
        try:
            fsutil.make_dirs(d)
        except OSError as exc:
            raise PrecheckFailed(f"cannot create {d}: {exc.strerror}; check the config "
                                 "and the permissions", kind="path") from None
        if not os.access(d, os.W_OK | os.X_OK):
            raise PrecheckFailed(f"{d} is not writable by this user; fix its permissions or "
                                 "point the config elsewhere", kind="path")


__all__ = ["RunResult", "apply", "drive"]
