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
import os
import shutil
import time
from pathlib import Path
from typing import Any

from . import backup as backups
from . import fsutil, history
from .config import Config
from .errors import MigrateError, RestoreFailed
from .journal import Journal, Phase
from .progress import Reporter
from .services import NoUnit, ServiceManager


def _swapped(config: Config, journal: Journal) -> bool:
    live_inode = journal.data.get("live_inode")
    if live_inode is None:
        return False
    try:
        return os.stat(config.database).st_ino != live_inode
    except FileNotFoundError:
        return True  # the live file is gone: only the backup can bring it back


def _discard_copy(config: Config, journal: Journal) -> None:
    copy = journal.data.get("copy")
    if copy:
        fsutil.remove(Path(copy))
        fsutil.remove_sidecars(Path(copy))
    # A hard link to the live inode stops being a point-in-time copy as soon as the app
    # writes again; this run never swapped, so nothing depends on it. Look for every
    # such link, not only the journal's: a kill between link(2) and the journal write
    # that names the backup (the backup is hashed in between) leaves one unrecorded.
    try:
        live = os.stat(config.database)
    except FileNotFoundError:
        return
    for path in backups.list_backups(config.database, config.backup_dir):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if (st.st_ino, st.st_dev) == (live.st_ino, live.st_dev):
            fsutil.remove(path)
            fsutil.remove(backups.checksum_path(path))


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
    replaced: str | None = None
    if journal.phase is Phase.RESTORING:
        swapped = _swapped(config, journal)
        if swapped:
            bk = journal.data.get("backup")
            try:
                if not gate:
                    services.stop(config.stop_timeout_s)
                if not bk:
                    raise RestoreFailed("the migrated database went live but the journal "
                                        "names no backup; nothing was overwritten")
                reporter.emit("restoring", f"restoring {bk} over {config.database}")
                reporter.extend(600)
                # A damaged backup is refused before anything, the kept file included.
                digest = backups.verify(Path(bk), journal.data.get("backup_sha256"))
                replaced = _keep_replaced(config, journal, reporter, Path(bk).parent)
                backups.restore(Path(bk), config.database, verified=digest)
            except (RestoreFailed, MigrateError, OSError) as exc:
                message = exc.message if isinstance(exc, MigrateError) else str(exc)
                reporter.alert("restore-failed", f"{message}; the app is left STOPPED; manual "
                               f"action needed: 'zmonitor-migrate restore BACKUP'")
                journal.close("restore-failed", restore_error=message)
                raise RestoreFailed(message) from None
            reporter.alert("restore-executed", f"backup {bk} restored over {config.database}"
                           + (f"; the database it replaced (with any rows written since the "
                              f"backup) is kept as {replaced}" if replaced else ""))
            restored = True
        _discard_copy(config, journal)
        journal.advance(Phase.RESTORED, restored_backup=restored)
    if journal.phase is Phase.RESTORED:
        if not gate:
            _start_app(services, reporter)
        journal.advance(Phase.APP_STARTED)
    journal.close("restored" if journal.data.get("restored_backup") else "recovered-old")
    return restored


def _keep_replaced(config: Config, journal: Journal, reporter: Reporter,
                   where: Path) -> str | None:
    """Keep the live database before a restore replaces it, once per run: the journal
    records the kept file before the rename, so a restore re-run after a kill past the
    rename does not keep the restored copy in its place. Best effort: a monitor left
    stopped is worse than losing the few rows written since the backup, so a failure to
    keep it is an alert, not a failed restore."""
    if journal.data.get("replaced"):
        return str(journal.data["replaced"])
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


def _start_app(services: ServiceManager, reporter: Reporter) -> None:
    try:
        services.start()
    except MigrateError as exc:
        reporter.alert("app-start-failed", f"the app did not start on the old database: "
                       f"{exc.message}")


def _finish_forward(config: Config, journal: Journal, services: ServiceManager,
                    reporter: Reporter, gate: bool) -> str:
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
    journal.close("applied", recovered=True)
    return "applied"


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
    if gate:
        services = NoUnit()
    started = time.time()
    action = journal.recovery_action()
    # A run that did not finish (a crash, a kill, a power cut) is news for biomed:
    # warning priority, so `journalctl -p warning` shows it and what it became.
    reporter.emit("recover", f"run {journal.run_id} was interrupted in phase "
                             f"{journal.phase}; recovery: {action}", level="warning")
    reporter.extend(600)
    outcome: str
    try:
        if action == "abandon":
            journal.close("abandoned")
            outcome = "abandoned"
            if not gate and not services.is_active():
                _start_app(services, reporter)
        elif (action in ("resolve-swap", "finish", "commit") and _swapped(config, journal)) \
                or action == "commit":
            try:
                outcome = _finish_forward(config, journal, services, reporter, gate)
            except MigrateError as exc:
                reporter.alert("migration-failed", f"after recovery: {exc.message}")
                restore_after_failure(config, journal, services, reporter,
                                      error=exc.to_dict(), gate=gate)
                outcome = journal.outcome or "restored"
        else:
            restore_after_failure(config, journal, services, reporter,
                                  error={"kind": "interrupted",
                                         "message": f"run interrupted in {journal.phase}"},
                                  gate=gate)
            outcome = journal.outcome or "recovered-old"
    finally:
        shutil.rmtree(config.state_dir / "runs" / journal.run_id, ignore_errors=True)
    # From the stop the journal recorded to the start just made: the history and the
    # metrics count an interrupted run's downtime too.
    downtime = journal.downtime_s()
    history.append(config.history_path, {
        "run_id": journal.run_id, "bundle": journal.data.get("bundle_name"),
        "sequence": journal.data.get("sequence"), "outcome": outcome, "recovered": True,
        "recovery_action": action, "started_at": started, "finished_at": time.time(),
        "duration_s": round(time.time() - started, 3), "phase_times": journal.phase_times(),
        "from_version": journal.data.get("from_version"),
        "to_version": journal.data.get("to_version"), "backup": journal.data.get("backup"),
        "error": journal.data.get("error"), "restored": outcome == "restored",
        "downtime_s": downtime, "replaced": journal.data.get("replaced"),
    })
    from .pipeline import write_metrics  # pipeline imports this module

    write_metrics(config)
    reporter.emit("recover", f"run {journal.run_id}: {outcome}"
                  + (f", downtime {downtime:.2f} s" if downtime is not None else ""),
                  level="warning")
    return outcome
