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
- The live file is never written by a migration (``swap``: the working copy is migrated,
  validated, sealed, then ``rename(2)``-ed over the live path), so a crash at any instant
  leaves either the old database (every row intact) or the migrated, validated one.
  Until the rename, failing needs no restore: the copy is discarded. After it, the
  backup is restored.
- The journal is written before each phase's work; ``recovery.recover`` finishes any run
  it finds open, so the app is never left stopped because this process died.
- Downtime is measured from the moment the stop is requested until ``systemctl start``
  returns (the app is ready: it is ``Type=notify``).

Where each part lives: ``verified`` (what a run starts from), ``prechecks`` and
``rehearsal`` (before the stop), ``swap`` (the working copy and the rename),
``recovery`` (after a failure or a crash), ``runrecord`` (the history line). This module
is the order of the steps: ``drive`` → ``Run.execute`` → ``Run.precheck`` →
``Run._downtime`` (or ``Run.fail``) → ``_finish``.
"""

from __future__ import annotations

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
from . import dbinfo, fsutil, prechecks, swap
from .bookkeeping import BUNDLES_DDL, BUNDLES_TABLE
from .config import Config
from .engine import Engine, Interrupted, Progress, watch
from .errors import (
    BundleRejected,
    MigrateError,
    MigrationFailed,
    MigrationInterrupted,
    PrecheckFailed,
    RestoreBlocked,
    RestoreFailed,
    RunInterrupted,
    StopInterrupted,
)
from .journal import Journal, Outcome, Phase
from .lock import RunLock
from .plan import Plan
from .progress import Reporter, format_duration
from .recovery import recover, restore_after_failure, start_app
from .rehearsal import Rehearsal, Rehearsed
from .runrecord import RunRecord, write_metrics
from .services import ServiceManager, for_unit
from .sources import Source
from .validate import validate
from .verified import AlreadyApplied, Verified, verify_bundle

SLOW_RUN_S = 300.0  # the migration-slow alert: a run longer than 5 minutes
# With --allow-long the downtime may take LONG_DOWNTIME_FACTOR × the rehearsal's measured
# time + LONG_DOWNTIME_SLACK_S (the rehearsal's own limit: rehearsal.budget_s).
LONG_DOWNTIME_FACTOR = 3.0
LONG_DOWNTIME_SLACK_S = 30.0


@dataclass
class RunResult:
    """A run that succeeded (a failure raises its typed error instead)."""

    run_id: str
    outcome: Outcome  # applied, rolled-back, up-to-date or dry-run
    bundle: str | None = None
    sequence: int | None = None
    from_version: int | None = None
    to_version: int | None = None
    downtime_s: float | None = None
    estimate_s: float | None = None
    backup: str | None = None
    plan: Plan | None = None
    phase_times: dict[str, float] = field(default_factory=dict)

    ok = True
    exit_code = 0

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
        return out


@dataclass(frozen=True)
class Prechecked:
    """What the pre-checks and the rehearsal established, with the app still running."""

    plan: Plan
    estimate_s: float  # the rehearsal's measured time (0 for a run with nothing to do)
    counts: dict[str, int]  # row counts of the live database at the pre-check


class Run:
    """State of one run; ``execute`` drives it through the journal's phases."""

    def __init__(self, config: Config, *, services: ServiceManager, reporter: Reporter,
                 stop_requested: Callable[[], bool], now: Callable[[], datetime],
                 journal: Journal, started_at: float, rollback_to: int | None) -> None:
        self.config = config
        self.services = services
        self.reporter = reporter
        self.stop_requested = stop_requested
        self.now = now
        self.db = config.database
        self.journal = journal
        # What the history keeps of this run beyond the journal (sizes, row counts).
        self.record = RunRecord(run_id=journal.run_id, started_at=started_at)
        self.t_stop: float | None = None
        self.t_start: float | None = None
        self.deadline: float | None = None
        self.budget_s = config.max_downtime_s
        self.rollback_to = rollback_to  # set for 'rollback --to N' runs

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

    def _interrupt_reason(self) -> str:
        if self.stop_requested():
            return "stop requested (SIGTERM); stopped at a safe point"
        if self.budget_s == self.config.max_downtime_s:
            return f"the downtime budget max_downtime_s={self.budget_s:g} ran out"
        return (f"the downtime budget of {self.budget_s:g} s (--allow-long: "
                f"{LONG_DOWNTIME_FACTOR:g} x the rehearsal + {LONG_DOWNTIME_SLACK_S:g} s; "
                f"max_downtime_s={self.config.max_downtime_s:g}) ran out")

    # -- before the stop ----------------------------------------------------------------
    def precheck(self, verified: Verified, target: int | None, allow_long: bool,
                 run_dir: Path) -> Prechecked:
        """Checks and rehearsal while the app runs. Raises PrecheckFailed."""
        cfg = self.config
        prechecks.database_exists(self.db)
        the_plan, counts = self._read_live(verified, target)
        size = dbinfo.file_size(self.db)
        prechecks.room_for_rehearsal(size, run_dir)
        if the_plan.is_noop:
            return Prechecked(the_plan, 0.0, counts)
        rehearsed = self._rehearse(verified, the_plan, counts, allow_long, run_dir)
        prechecks.estimate_fits(rehearsed.estimate_s, cfg.max_downtime_s, allow_long)
        prechecks.room_for_swap(self.db, size, rehearsed.grown)
        prechecks.room_for_backup(self.db, size, cfg.backup_dir)
        return Prechecked(the_plan, rehearsed.estimate_s, counts)

    def _read_live(self, verified: Verified,
                   target: int | None) -> tuple[Plan, dict[str, int]]:
        """The live database's soundness, the plan and the row counts, on one read-only
        connection."""
        try:
            conn = dbinfo.open_ro(self.db)
            try:
                prechecks.database_sound(conn, self.db,
                                         quick=self.config.integrity_check == "quick",
                                         reporter=self.reporter)
                the_plan = prechecks.plan_for(conn, verified.source.migrations, target,
                                              self.rollback_to)
                return the_plan, dbinfo.row_counts(conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise PrecheckFailed(f"database {self.db} cannot be read: {exc}",
                                 kind="database-unreadable") from None

    def _rehearse(self, verified: Verified, the_plan: Plan, counts: dict[str, int],
                  allow_long: bool, run_dir: Path) -> Rehearsed:
        self.emit("rehearsal", f"rehearsing {len(the_plan.pending)} migration(s) on a "
                               "snapshot")
        rehearsal = Rehearsal(self.db, run_dir / "rehearsal.db",
                              max_downtime_s=self.config.max_downtime_s,
                              allow_long=allow_long, batch_size=self.config.batch_size,
                              stop_requested=self.stop_requested, tick=self.reporter.heartbeat)
        rehearsed = rehearsal.run(
            lambda eng: self._work(eng, verified.source, the_plan),
            lambda db, deadline: self._validate(db, the_plan, counts, verified,
                                                deadline=deadline),
            self._progress("rehearsal"))
        # The real copy is a plain file copy, faster than the online backup; keep the
        # estimate conservative anyway (apply + validation dominate).
        self.emit("rehearsal", f"passed in {rehearsed.estimate_s:.2f} s (snapshot "
                               f"{rehearsed.snapshot_s:.2f} s); estimated downtime "
                               f"{rehearsed.estimate_s:.2f} s")
        return rehearsed

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

    def execute(self, verified: Verified, *, dry_run: bool, target: int | None,
                allow_long: bool, run_dir: Path) -> RunResult:
        j = self.journal
        rec = self.record
        rec.bundle, rec.sequence = verified.name, verified.sequence
        rec.db_size_before = dbinfo.file_size(self.db)
        j.advance(Phase.VERIFIED, bundle_name=verified.name, sequence=verified.sequence,
                  manifest_sha256=verified.manifest_sha256)
        checked = self.precheck(verified, target, allow_long, run_dir)
        the_plan, estimate, counts = checked.plan, checked.estimate_s, checked.counts
        # Until the downtime succeeds (applied), the run changed nothing.
        result = RunResult(run_id=j.run_id,
                           outcome=Outcome.DRY_RUN if dry_run else Outcome.UP_TO_DATE,
                           bundle=verified.name,
                           sequence=verified.sequence, from_version=the_plan.current,
                           to_version=the_plan.target, estimate_s=round(estimate, 3),
                           plan=the_plan)
        rec.from_version, rec.to_version = the_plan.current, the_plan.target
        rec.rows_before, rec.estimate_s = counts, round(estimate, 3)
        j.advance(Phase.PRECHECKED, from_version=the_plan.current, to_version=the_plan.target,
                  estimate_s=estimate)
        self._describe(the_plan)
        if dry_run:
            return result
        if the_plan.is_noop:
            self.emit("plan", f"database already at version {the_plan.current}; nothing to do")
            return result
        if self.stop_requested():
            raise prechecks.interrupted()  # no downtime for a run being stopped
        return self._downtime(verified, the_plan, result, allow_long)

    def _describe(self, the_plan: Plan) -> None:
        for line in the_plan.describe():
            self.emit("plan", line)
        for m in the_plan.pending:  # the header's size is raised on the private copy
            if m.batch and self.config.batch_size > m.batch.size and self.rollback_to is None:
                self.emit("plan", f"  {m.version:04d} runs in batches of "
                                  f"{self.config.batch_size:,} rows (batch_size in the config; "
                                  f"size={m.batch.size} bounds batches on a live table)")

    # -- the downtime -------------------------------------------------------------------
    def _downtime(self, verified: Verified, the_plan: Plan, result: RunResult,
                  allow_long: bool) -> RunResult:
        """From the stop to the commit, as the steps of the run. Any failure puts the old
        database back and starts the app (``fail``)."""
        j = self.journal
        work = swap.WorkingCopy(self.db, swap.copy_path(self.db, j.run_id))
        j.advance(Phase.APP_STOPPED, copy=str(work.path), live_inode=os.stat(self.db).st_ino,
                  app_unit=self.services.name)
        self._arm_budget(result.estimate_s or 0.0, allow_long)
        try:
            self._stop_app()
            stopped_counts = self._take(work, the_plan, result)
            self._migrate(work, verified, the_plan)
            self._validate_copy(work, verified, the_plan, stopped_counts)
            self._swap_in(work, the_plan)
            downtime = self._start_app()
            j.advance(Phase.COMMITTED)
        except BaseException as exc:
            self.fail(classify_failure(exc))
            raise AssertionError("unreachable") from None
        result.downtime_s = self.record.downtime_s = round(downtime, 3)
        result.outcome = Outcome.APPLIED
        self.record.db_size_after = dbinfo.file_size(self.db)
        if downtime > SLOW_RUN_S:
            self.reporter.alert("migration-slow", f"downtime {downtime:.0f} s exceeded "
                                f"{SLOW_RUN_S:.0f} s")
        return result

    def _arm_budget(self, estimate_s: float, allow_long: bool) -> None:
        cfg = self.config
        # Only effective while systemd waits for our start or stop (recovery at boot, a
        # SIGTERM mid-run): give the downtime phase room to end consistently.
        self.reporter.extend(2 * cfg.max_downtime_s + 60)
        self.t_stop = time.monotonic()
        # With --allow-long a downtime above max_downtime_s was accepted, as long as the
        # rehearsal measured it: an endless statement or check still ends the run.
        budget = cfg.max_downtime_s if not allow_long else max(
            cfg.max_downtime_s, LONG_DOWNTIME_FACTOR * estimate_s + LONG_DOWNTIME_SLACK_S)
        self.deadline = self.t_stop + budget
        self.budget_s = budget

    def _stop_app(self) -> None:
        self.emit("app_stopped", f"stopping {self.services.name}" if self.services.name
                  else "no app unit configured (app_unit: null): nothing to stop")
        self.services.stop(self.config.stop_timeout_s, tick=self.reporter.heartbeat)

    def _take(self, work: swap.WorkingCopy, the_plan: Plan,
              result: RunResult) -> fsutil.InBackground[dict[str, int]]:
        """Quiesce, copy and back up the live file. Returns the row counts of the database
        the app left behind (not of the pre-check: the app kept writing until the stop),
        counted on the quiesced live file beside the apply."""
        mode = swap.quiesce(self.db)
        # The backup's checksum is durable before the swap, the first moment a restore
        # could need it (before that the live file is the original, and recovery removes
        # a link to it).
        bk = work.take(self.config.backup_dir, the_plan.current, mode)
        stopped_counts = fsutil.InBackground(dbinfo.row_counts_of, self.db)
        self.journal.advance(Phase.BACKED_UP, backup=str(bk.path),
                             backup_sha256=bk.sha256 or None, backup_linked=bk.linked,
                             journal_mode=mode)
        result.backup = str(bk.path)
        self.record.backup = str(bk.path)
        self.emit("backed_up", f"backup {bk.path} ({'hard link' if bk.linked else 'copy'})")
        return stopped_counts

    def _migrate(self, work: swap.WorkingCopy, verified: Verified, the_plan: Plan) -> None:
        j = self.journal
        j.advance(Phase.APPLYING, migration=the_plan.pending[0].version)
        with Engine(work.path, fast=True, min_batch=self.config.batch_size,
                    on_progress=self._progress("applying"),
                    should_stop=self._should_stop) as eng:
            self._abort_long_statements(eng)
            try:
                self._work(eng, verified.source, the_plan)
            except Interrupted as exc:
                raise RunInterrupted(f"{self._interrupt_reason()} ({exc.message})") from None
            if the_plan.target == verified.source.last_version:
                eng.conn.execute(BUNDLES_DDL)
                eng.conn.execute(
                    f"INSERT OR REPLACE INTO main.{BUNDLES_TABLE} VALUES (?,?,?,?,?)",
                    (verified.sequence, verified.name, verified.manifest_sha256,
                     self.now().strftime("%Y-%m-%dT%H:%M:%SZ"), j.run_id))

    def _validate_copy(self, work: swap.WorkingCopy, verified: Verified, the_plan: Plan,
                       stopped_counts: fsutil.InBackground[dict[str, int]]) -> None:
        """The migrations' connection is closed: validation sees only the file."""
        self.emit("validating", "post-migration validation of the migrated copy")
        # Validation only reads: write the migrated pages back meanwhile, so the
        # fsync before the swap has (almost) nothing left to wait for.
        flushed = fsutil.InBackground(fsutil.fsync_file, work.path)
        rows_after: dict[str, int] = {}
        counts = stopped_counts.result()
        self.record.rows_before = counts
        try:
            problems = self._validate(work.path, the_plan, counts, verified, downtime=True,
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
        self.record.rows_after = rows_after

    def _swap_in(self, work: swap.WorkingCopy, the_plan: Plan) -> None:
        j = self.journal
        bk = work.seal()
        j.advance(Phase.VALIDATED, backup_sha256=bk.sha256)
        j.advance(Phase.SWAPPING)
        work.swap_in()
        j.advance(Phase.SWAPPED, swapped=True)
        self.emit("swapped", f"migrated database is live at version {the_plan.target}")

    def _start_app(self) -> float:
        """Start the app on the migrated database and hold the health gate. Returns the
        downtime: from the stop request until ``start`` returned (the app is ready)."""
        assert self.t_stop is not None
        cfg = self.config
        self.services.start()
        self.t_start = time.monotonic()
        downtime = self.t_start - self.t_stop
        self.journal.advance(Phase.APP_STARTED, downtime_s=downtime)
        self.emit("app_started", f"{self.services.name or 'no app unit'}"
                                 f"{' started' if self.services.name else ''} after "
                                 f"{downtime:.2f} s downtime; health gate "
                                 f"{cfg.health_check_s:g} s")
        self.services.health_gate(cfg.health_check_s, tick=self.reporter.heartbeat)
        return downtime

    def _abort_long_statements(self, eng: Engine) -> None:
        """SQLite calls this while a statement runs: real progress for the watchdog, and
        a way to abort one long statement when the downtime budget is gone."""
        watch(eng.conn, expired=self._deadline_passed, tick=self.reporter.heartbeat,
              every=200_000)

    def _deadline_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def fail(self, err: MigrateError) -> None:
        """Failure after the stop: put the old database back, start the app, raise."""
        if isinstance(err, StopInterrupted) and self.stop_requested():
            # The operator's own stop (systemctl stop, Ctrl-C), not a fault: a warning.
            self.reporter.emit("interrupted", f"run interrupted by operator (SIGTERM): "
                               f"{err.message}; the old database stays (or is put back) "
                               "and the app is started again", level="warning")
        else:
            self.reporter.alert("migration-failed", f"{err.kind}: {err.message}")
        try:
            restored_backup = restore_after_failure(self.config, self.journal, self.services,
                                                    self.reporter, error=err.to_dict())
        except OSError as exc:
            self._journal_unwritable(exc)
        if self.t_stop is not None:
            self.record.downtime_s = round(time.monotonic() - self.t_stop, 3)
        failed = MigrationInterrupted if isinstance(err, StopInterrupted) else MigrationFailed
        raise failed(
            f"{err.message} — {'the backup was restored and ' if restored_backup else ''}"
            "the app runs on the old database", kind=err.kind, restored=True)

    def _journal_unwritable(self, exc: OSError) -> None:
        """The journal cannot record the failure (its filesystem is full or gone). Before
        the rename the live file was never written, so the app is started on it at once;
        the journal stays in its last durable phase, whose recovery (discard) is what was
        just done, so a later ``recover`` closes the run idempotently. After the rename
        nothing is guessed: exit 6, every file kept."""
        where = f"{self.config.journal_path}: {exc.strerror or exc}"
        if swap.went_live(self.db, self.journal):
            self.reporter.alert("restore-failed", f"the run journal cannot be written "
                                f"({where}) after the migrated database went live; the app "
                                "is left as it is; manual action needed")
            raise RestoreFailed(f"the run journal cannot be written ({where}) after the "
                                "migrated database went live; free space, then run "
                                "'zmonitor-migrate recover'") from None
        swap.discard(self.db, self.config.backup_dir, self.journal)
        start_app(self.services, self.reporter)
        raise MigrationFailed(f"the run journal cannot be written ({where}); the live "
                              "database was never changed and the app runs on it; free space "
                              "in the state dir, then 'zmonitor-migrate recover' closes the "
                              "run", kind="journal-unwritable", restored=True) from None


def classify_failure(exc: BaseException) -> MigrateError:
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
    return drive(config, lambda run_dir: verify_bundle(config, bundle_path, run_dir, clock(),
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
    services = services or for_unit(config.app_unit, config.systemctl)
    reporter = reporter or Reporter()
    _ensure_dirs(config)
    with RunLock(config.lock_path, wait=wait):
        recover(config, services=services, reporter=reporter)
        last = Journal.load(config.journal_path)
        if last is not None and last.outcome == Outcome.RESTORE_FAILED:
            raise RestoreBlocked(
                f"run {last.run_id} could not restore its backup and the database may be "
                "damaged; no new run starts until an operator restores a backup "
                "('zmonitor-migrate restore BACKUP')")
        journal = Journal.create(config.journal_path, bundle=label,
                                 database=str(config.database), dry_run=dry_run,
                                 rollback_to=rollback_to)
        reporter.run_id = journal.run_id
        run = Run(config, services=services, reporter=reporter,
                  stop_requested=stop_requested or (lambda: False),
                  now=now or (lambda: datetime.now(UTC)), journal=journal,
                  started_at=time.time(), rollback_to=rollback_to)
        run_dir = config.state_dir / "runs" / journal.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        result: RunResult | None = None
        error: MigrateError | None = None
        try:
            result = _obtain_and_execute(run, obtain, label, run_dir, dry_run=dry_run,
                                         target=target, allow_long=allow_long)
            return result
        except BaseException as exc:
            error = exc if isinstance(exc, MigrateError) else MigrateError(
                f"{type(exc).__name__}: {exc}", kind="internal")
            raise
        finally:
            _finish(run, result, error, run_dir, dry_run)


def _obtain_and_execute(run: Run, obtain: Callable[[Path], Verified], label: str,
                        run_dir: Path, *, dry_run: bool, target: int | None,
                        allow_long: bool) -> RunResult:
    reporter = run.reporter
    reporter.emit("received", label)
    try:
        verified = obtain(run_dir)
    except AlreadyApplied as done:
        reporter.emit("verified", f"{done}; nothing to do")
        run.record.bundle, run.record.sequence = done.name, done.sequence
        return RunResult(run_id=run.record.run_id, outcome=Outcome.UP_TO_DATE,
                         bundle=done.name, sequence=done.sequence)
    reporter.emit("verified", f"{verified.name} sequence {verified.sequence} verified"
                  if verified.sequence else f"{verified.name}: source directory "
                  "(unsigned, not verified)")
    result = run.execute(verified, dry_run=dry_run, target=target,
                         allow_long=allow_long, run_dir=run_dir)
    if run.rollback_to is not None and result.outcome == Outcome.APPLIED:
        result.outcome = Outcome.ROLLED_BACK
        reporter.alert("rollback-executed", f"rolled back to version {run.rollback_to}")
    return result


def _finish(run: Run, result: RunResult | None, error: MigrateError | None, run_dir: Path,
            dry_run: bool) -> None:
    """Close the journal (a run that never stopped the app, or committed), append the
    history line, prune the backups after a success, remove the run's directory."""
    config, journal = run.config, run.journal
    if error is not None or result is None:
        outcome = Outcome.of_error(error) if error is not None else Outcome.FAILED
    else:
        outcome = result.outcome
    if not journal.closed and journal.phase in (Phase.RECEIVED, Phase.VERIFIED,
                                                Phase.PRECHECKED, Phase.COMMITTED):
        journal.close(outcome, error=error.to_dict() if error else None)
    if result is not None:
        result.phase_times = journal.phase_times()
    if not dry_run:
        run.record.error = error.to_dict() if error else None
        try:
            run.record.finish(outcome, journal).append(config.history_path)
        except OSError as exc:  # the outcome (exit code, journal) stands without it
            run.reporter.alert("history-unwritable", f"cannot append to "
                               f"{config.history_path}: {exc.strerror or exc}")
        write_metrics(config)
    if result is not None and outcome in (Outcome.APPLIED, Outcome.ROLLED_BACK):
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
