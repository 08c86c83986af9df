"""Finishing a run that did not finish: after a failure, a crash, a kill or a power cut.

``recover`` reads the journal and carries out ``journal.RECOVERY`` for its phase. Every
action is idempotent, so recovery killed half-way is simply run again.

Whether the migrated copy went live is decided from the file system, not from memory:
the journal records the live file's inode before the stop; a different inode at the live
path means the rename happened. So a crash between ``rename(2)`` and the journal write
that follows it is resolved correctly.

``gate=True`` is the app unit's ``ExecStartPre`` path: it must not call systemctl for
the unit that is being started, so it only puts the database in a consistent state
(discard the copy, or keep the validated swapped one, or restore) and lets the start
go on.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import backup as backups
from . import fsutil, swap
from .config import Config
from .errors import MigrateError, RestoreFailed
from .journal import Action, Journal, Outcome, Phase
from .progress import Reporter
from .runrecord import RunRecord, write_metrics
from .services import NoUnit, ServiceManager


def restore_after_failure(config: Config, journal: Journal, services: ServiceManager,
                          reporter: Reporter, *, error: dict[str, Any] | None,
                          gate: bool = False) -> bool:
    """Bring back the old database and start the app. Returns True if a backup had to
    be copied back (the migrated copy had gone live). Raises RestoreFailed."""
    if not journal.failed:
        journal.advance(Phase.FAILED, error=error)
    if journal.phase is Phase.FAILED:
        journal.advance(Phase.RESTORING)
    restored = False
    if journal.phase is Phase.RESTORING:
        restored = swap.went_live(config.database, journal)
        if restored:
            _put_backup_back(config, journal, services, reporter, gate)
        swap.discard(config.database, config.backup_dir, journal)
        journal.advance(Phase.RESTORED, restored_backup=restored)
    if journal.phase is Phase.RESTORED:
        if not gate:
            start_app(services, reporter)
        journal.advance(Phase.APP_STARTED)
    journal.close(Outcome.RESTORED if journal.facts.restored_backup
                  else Outcome.RECOVERED_OLD)
    return restored


def _put_backup_back(config: Config, journal: Journal, services: ServiceManager,
                     reporter: Reporter, gate: bool) -> None:
    """The migrated copy went live: stop the app, verify the backup against its recorded
    sha256, keep the database it replaces, copy the backup over the live path. Any
    failure closes the run ``restore-failed`` (the app stays stopped) and raises."""
    bk = journal.facts.backup
    try:
        if not gate:
            services.stop(config.stop_timeout_s)
        if not bk:
            raise RestoreFailed("the migrated database went live but the journal "
                                "names no backup; nothing was overwritten")
        reporter.emit("restoring", f"restoring {bk} over {config.database}")
        reporter.extend(600)
        # A damaged backup is refused before anything, the kept file included.
        digest = backups.verify(Path(bk), journal.facts.backup_sha256)
        replaced = _keep_replaced(config, journal, reporter, Path(bk).parent)
        backups.restore(Path(bk), config.database, verified=digest)
    except (RestoreFailed, MigrateError, OSError) as exc:
        message = exc.message if isinstance(exc, MigrateError) else str(exc)
        reporter.alert("restore-failed", f"{message}; the app is left STOPPED; manual "
                       f"action needed: 'zmonitor-migrate restore BACKUP'")
        journal.close(Outcome.RESTORE_FAILED, restore_error=message)
        raise RestoreFailed(message) from None
    reporter.alert("restore-executed", f"backup {bk} restored over {config.database}"
                   + (f"; the database it replaced (with any rows written since the "
                      f"backup) is kept as {replaced}" if replaced else ""))


def _keep_replaced(config: Config, journal: Journal, reporter: Reporter,
                   where: Path) -> str | None:
    """Keep the live database before a restore replaces it, once per run: the journal
    records the kept file before the rename, so a restore re-run after a kill past the
    rename does not keep the restored copy in its place. Best effort: a monitor left
    stopped is worse than losing the few rows written since the backup, so a failure to
    keep it is an alert, not a failed restore."""
    if journal.facts.replaced:
        return journal.facts.replaced
    if not config.database.exists():
        return None
    try:
        kept = str(backups.keep_replaced(config.database, where))
    except OSError as exc:
        reporter.alert("replaced-not-kept", f"could not keep {config.database} before "
                       f"restoring over it ({exc.strerror or exc}); rows written since the "
                       "backup are lost with it")
        return None
    with contextlib.suppress(OSError):  # unrecorded, a re-run keeps one file too many
        journal.update(replaced=kept)
    return kept


def start_app(services: ServiceManager, reporter: Reporter) -> None:
    try:
        services.start()
    except MigrateError as exc:
        reporter.alert("app-start-failed", f"the app did not start on the old database: "
                       f"{exc.message}")


def _finish_forward(config: Config, journal: Journal, services: ServiceManager,
                    reporter: Reporter, gate: bool) -> Outcome:
    if journal.phase is Phase.SWAPPING:
        journal.advance(Phase.SWAPPED, swapped=True)
    if journal.phase is Phase.SWAPPED:
        if not gate:
            services.start()
        journal.advance(Phase.APP_STARTED)
    if journal.phase is Phase.APP_STARTED and not gate:
        services.health_gate(config.health_check_s, tick=reporter.heartbeat)
    if journal.phase is Phase.APP_STARTED:
        journal.advance(Phase.COMMITTED)
    journal.close(Outcome.APPLIED, recovered=True)
    return Outcome.APPLIED


def _remove_stale_run_dirs(config: Config, keep: str | None) -> None:
    """Private bundle copies and payloads of runs that are over. Every caller holds the
    run lock, so no other run is using one; a recovery killed after closing its journal
    would otherwise leave its run's directory behind for good."""
    runs = config.state_dir / "runs"
    if not runs.is_dir():
        return
    for d in runs.iterdir():
        if d.name != keep:
            shutil.rmtree(d, ignore_errors=True)


@dataclass
class Recovery:
    """One open run being finished: what every recovery action needs."""

    config: Config
    journal: Journal
    services: ServiceManager
    reporter: Reporter
    gate: bool

    def went_live(self) -> bool:
        return swap.went_live(self.config.database, self.journal)


def _abandon(r: Recovery) -> Outcome:
    """The app was never stopped: close the run; start the app if it is down anyway."""
    r.journal.close(Outcome.ABANDONED)
    if not r.gate and not r.services.is_active():
        start_app(r.services, r.reporter)
    return Outcome.ABANDONED


def _go_back(r: Recovery) -> Outcome:
    """The old database: drop the copy if it never went live, restore the backup if it
    did, start the app (``restore_after_failure`` resumes from the journal's phase)."""
    restore_after_failure(r.config, r.journal, r.services, r.reporter,
                          error={"kind": "interrupted",
                                 "message": f"run interrupted in {r.journal.phase}"},
                          gate=r.gate)
    return Outcome(r.journal.outcome or Outcome.RECOVERED_OLD)


def _go_forward(r: Recovery) -> Outcome:
    """The migrated database is live: start the app, hold the health gate, commit; a
    failing gate restores the backup."""
    swap.drop_copy_leftovers(r.journal)
    try:
        return _finish_forward(r.config, r.journal, r.services, r.reporter, r.gate)
    except MigrateError as exc:
        r.reporter.alert("migration-failed", f"after recovery: {exc.message}")
        restore_after_failure(r.config, r.journal, r.services, r.reporter,
                              error=exc.to_dict(), gate=r.gate)
        return Outcome(r.journal.outcome or Outcome.RESTORED)


def _by_the_live_inode(r: Recovery) -> Outcome:
    """Whether the rename happened is read from the live file, not from the journal."""
    return _go_forward(r) if r.went_live() else _go_back(r)


# journal.RECOVERY names the action for each phase; this is what each action does.
ACTIONS: dict[Action, Callable[[Recovery], Outcome]] = {
    Action.ABANDON: _abandon,
    Action.DISCARD: _go_back,
    Action.RESOLVE_SWAP: _by_the_live_inode,
    Action.FINISH: _by_the_live_inode,
    Action.COMMIT: _go_forward,
    Action.RESTORE: _go_back,
    Action.START_APP: _go_back,
}


def recover(config: Config, *, services: ServiceManager, reporter: Reporter,
            gate: bool = False) -> str | None:
    """Finish the run the journal describes, if it is open. Returns the outcome, or None
    when there was nothing to do."""
    for d in {config.state_dir, config.runtime_dir, config.backup_dir,
              *([config.metrics_path.parent] if config.metrics_path else [])}:
        fsutil.remove_stale_temps(d)  # a killed writer's journal/status/metrics temp
    journal = Journal.load(config.journal_path)
    _remove_stale_run_dirs(config, keep=None if journal is None or journal.closed
                           else journal.run_id)
    if journal is None or journal.closed:
        return None
    started = time.time()
    action = journal.recovery_action()
    assert action is not None
    # A run that did not finish (a crash, a kill, a power cut) is news for biomed:
    # warning priority, so `journalctl -p warning` shows it and what it became.
    reporter.emit("recover", f"run {journal.run_id} was interrupted in phase "
                             f"{journal.phase}; recovery: {action}", level="warning")
    reporter.extend(600)
    try:
        outcome = ACTIONS[action](Recovery(config, journal, NoUnit() if gate else services,
                                           reporter, gate))
    finally:
        shutil.rmtree(config.state_dir / "runs" / journal.run_id, ignore_errors=True)
    record = RunRecord.from_journal(journal, kind="recovery", started_at=started)
    record.recovered, record.recovery_action = True, action
    # From the stop the journal recorded to the start just made: the history and the
    # metrics count an interrupted run's downtime too.
    record.downtime_s = downtime = journal.downtime_s()
    record.finish(outcome, journal).append(config.history_path)
    write_metrics(config)
    reporter.emit("recover", f"run {journal.run_id}: {outcome}"
                  + (f", downtime {downtime:.2f} s" if downtime is not None else ""),
                  level="warning")
    return outcome
