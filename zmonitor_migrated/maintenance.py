"""Operator actions around runs: the app's start gate, restoring a backup, rolling back.

- ``gate``: the app unit's ``ExecStartPre``. The app may start unless a run is between
  the stop and a consistent database. If such a run is open and nobody holds the run
  lock (the daemon died), the gate finishes it on the spot (``recover(gate=True)``: no
  unit control, database only), so a dead daemon can never keep the monitor down.
  After a failed restore it refuses until an operator has restored a backup.
- ``restore``: stop the app, put a backup back (verified against its recorded sha256
  first), start the app. Journaled like a run, so a kill half-way is finished by
  ``recover``.
- ``rollback``: the rollback scripts of a verified bundle (or a source directory) down to
  version N, through the same stop/backup/copy/validate/swap/start pipeline as apply.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import backup as backups
from . import history, sources
from .config import Config
from .errors import LockHeld, RestoreFailed, UsageError
from .journal import BEFORE_SWAP, Journal, Phase
from .lock import RunLock
from .progress import Reporter
from .recovery import recover, restore_after_failure
from .services import for_unit

_UNSAFE = BEFORE_SWAP | {Phase.SWAPPING, Phase.FAILED, Phase.RESTORING}


def gate(config: Config, reporter: Reporter) -> tuple[bool, str]:
    journal = Journal.load(config.journal_path)
    if journal is None:
        return True, "no migration run recorded; the app may start"
    if journal.closed:
        if journal.outcome == "restore-failed":
            return False, (f"run {journal.run_id} could not restore its backup; the database "
                           "may be damaged. Restore one by hand: 'zmonitor-migrate restore "
                           "BACKUP' (see 'zmonitor-migrate status')")
        return True, f"last run {journal.run_id}: {journal.outcome}; the app may start"
    if journal.phase not in _UNSAFE:
        return True, f"run {journal.run_id} is in phase {journal.phase}; the database is " \
                     "consistent"
    try:
        with RunLock(config.lock_path):
            outcome = recover(config, services=for_unit(None), reporter=reporter, gate=True)
    except LockHeld:
        return False, (f"run {journal.run_id} is migrating the database (phase "
                       f"{journal.phase}); the app will be started when it finishes")
    return True, f"finished interrupted run {journal.run_id}: {outcome}"


def _pick_backup(config: Config, backup: Path | None, run_id: str | None) -> Path:
    if backup is not None:
        return backup.absolute()
    if run_id is not None:
        for record in reversed(history.read(config.history_path)):
            if record.get("run_id") == run_id and record.get("backup"):
                return Path(record["backup"])
        journal = Journal.load(config.journal_path)
        if journal and journal.run_id == run_id and journal.data.get("backup"):
            return Path(journal.data["backup"])
        raise UsageError(f"run {run_id} has no backup on record; see 'zmonitor-migrate "
                         "history' for run ids")
    found = backups.list_backups(config.database, config.backup_dir)
    if not found:
        raise UsageError(f"no backups of {config.database} in {config.backup_dir}")
    return found[-1]


def restore(config: Config, *, backup: Path | None = None, run_id: str | None = None,
            wait: bool = False, reporter: Reporter | None = None) -> Path:
    reporter = reporter or Reporter()
    services = for_unit(config.app_unit, config.systemctl)
    with RunLock(config.lock_path, wait=wait):
        recover(config, services=services, reporter=reporter)
        path = _pick_backup(config, backup, run_id)
        digest = backups.verify(path)  # refuse a damaged backup before stopping anything
        started = time.time()
        journal = Journal.create(config.journal_path, bundle=None, operation="restore",
                                 database=str(config.database))
        reporter.run_id = journal.run_id
        journal.advance(Phase.VERIFIED)
        journal.advance(Phase.PRECHECKED)
        # live_inode -1: recovery must treat the live file as replaced and restore again.
        journal.advance(Phase.APP_STOPPED, backup=str(path), backup_sha256=digest,
                        backup_linked=False, live_inode=-1)
        try:
            restore_after_failure(config, journal, services, reporter,
                                  error={"kind": "operator-restore",
                                         "message": f"restore of {path} requested"})
        finally:
            history.append(config.history_path, {
                "run_id": journal.run_id, "operation": "restore", "backup": str(path),
                "outcome": "restored" if journal.outcome != "restore-failed"
                else "restore-failed", "restored": journal.outcome != "restore-failed",
                "started_at": started, "finished_at": time.time(),
                "duration_s": round(time.time() - started, 3),
                "phase_times": journal.phase_times(), "downtime_s": None,
                "replaced": journal.data.get("replaced"),
            })
        if journal.outcome == "restore-failed":
            raise RestoreFailed(f"restoring {path} failed; see the log")
        return path


def rollback(config: Config, *, to: int, source_dir: Path | None, bundle: Path | None,
             wait: bool = False, reporter: Reporter | None = None) -> dict[str, Any]:
    from .pipeline import Verified, _verify_only, drive

    if (source_dir is None) == (bundle is None):
        raise UsageError("rollback needs exactly one of --bundle B.zmb (verified first) or "
                         "--source DIR (holding migrations/rollback/)")

    reporter = reporter or Reporter()

    def obtain(run_dir: Path) -> Verified:
        if bundle is not None:
            return _verify_only(config, bundle, run_dir, reporter.heartbeat)
        assert source_dir is not None
        src = sources.load(source_dir)
        return Verified(name=src.info.name, sequence=0, manifest_sha256="", source=src,
                        declared_loss=set())

    result = drive(config, obtain, label=f"rollback --to {to}", reporter=reporter,
                   wait=wait, rollback_to=to)
    return result.to_dict()
