"""Operator actions around runs: the app's start gate, restoring a backup, rolling back.

- ``gate``: the app unit's ``ExecStartPre``. The app may start unless a run is between
  the stop and a consistent database. If such a run is open and nobody holds the run
  lock (the daemon died), the gate finishes it on the spot (``recover(gate=True)``: no
  unit control, database only), so a dead daemon can never keep the monitor down.
  After a failed restore it refuses until an operator has restored a backup.
- ``restore``: stop the app, put a backup back (verified against its recorded sha256
  first), start the app. Journaled like a run, so a kill half-way is finished by
  ``recover``.
- ``rollback``: the rollback scripts of a bundle admitted like apply's (signature, device
  type, anti-rollback floor, time: ``admission.admit``) down to version N, through the
  same stop/backup/copy/validate/swap/start pipeline as apply. An unsigned source
  directory needs ``--unsigned-source`` and ``allow_unsigned_source: true`` (never on a
  device). A restore first seeds the anti-rollback floor from the live database.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import backup as backups
from . import history, sources
from .config import Config
from .device_state import device_state, mark_rolled_back, seed_floor
from .errors import BundleRejected, LockHeld, PrecheckFailed, RestoreFailed, UsageError
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


def _seed_before_restore(config: Config, reporter: Reporter) -> None:
    """The anti-rollback floor is seeded from the live database before a restore can put
    an older one (with an older record) in its place. A restore is an emergency repair:
    it is never blocked by the floor, only reported."""
    try:
        seed_floor(config.state_dir, device_state(config.database))
    except (BundleRejected, PrecheckFailed) as exc:
        reporter.alert("anti-rollback-state", f"{exc.message} (the restore goes ahead)")


def restore(config: Config, *, backup: Path | None = None, run_id: str | None = None,
            wait: bool = False, reporter: Reporter | None = None) -> Path:
    reporter = reporter or Reporter()
    services = for_unit(config.app_unit, config.systemctl)
    with RunLock(config.lock_path, wait=wait):
        recover(config, services=services, reporter=reporter)
        _seed_before_restore(config, reporter)
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
                "phase_times": journal.phase_times(), "downtime_s": journal.downtime_s(),
                "replaced": journal.data.get("replaced"),
            })
        from .pipeline import write_metrics  # pipeline imports this module

        write_metrics(config)
        if journal.outcome == "restore-failed":
            raise RestoreFailed(f"restoring {path} failed; see the log")
        return path


UNSIGNED_FLAG = "--unsigned-source"


def _allow_unsigned(config: Config, unsigned_source: bool) -> None:
    """``rollback --source`` runs unsigned SQL: a developer-machine tool. It needs both
    the flag and the config key, which the packaged config does not set."""
    if unsigned_source and config.allow_unsigned_source:
        return
    if not unsigned_source:
        raise UsageError(
            "rollback --source runs unsigned SQL from a directory and is refused without "
            f"{UNSIGNED_FLAG}; on a device roll back with the signed bundle instead: "
            "'zmonitor-migrate rollback --to N --bundle BUNDLE.zmb'. On a developer "
            f"machine add {UNSIGNED_FLAG} and set 'allow_unsigned_source: true' in its "
            "config", kind="unsigned-source")
    raise UsageError(
        f"rollback --source {UNSIGNED_FLAG} needs 'allow_unsigned_source: true' in the "
        "config, and this config does not allow unsigned sources (the packaged default); "
        "never set it on a device. On a device roll back with the signed bundle: "
        "'zmonitor-migrate rollback --to N --bundle BUNDLE.zmb'", kind="unsigned-source")


def rollback(config: Config, *, to: int, source_dir: Path | None, bundle: Path | None,
             unsigned_source: bool = False, wait: bool = False,
             reporter: Reporter | None = None) -> dict[str, Any]:
    """``bundle``: admitted like apply (signature, device type, anti-rollback floor,
    time, applied hashes); the floor's own bundle is recorded as rolled back, so the same
    bundle again is a no-op and going forward needs a higher sequence."""
    from .pipeline import Verified, _verify_only, drive

    if (source_dir is None) == (bundle is None):
        raise UsageError("rollback needs exactly one of --bundle B.zmb (verified first) or "
                         "--source DIR (holding migrations/rollback/)")
    if source_dir is not None:
        _allow_unsigned(config, unsigned_source)
    used: list[Verified] = []

    reporter = reporter or Reporter()

    def obtain(run_dir: Path) -> Verified:
        if bundle is not None:
            used.append(_verify_only(config, bundle, run_dir, tick=reporter.heartbeat))
            return used[-1]
        assert source_dir is not None
        src = sources.load(source_dir)
        return Verified(name=src.info.name, sequence=0, manifest_sha256="", source=src,
                        declared_loss=set())

    result = drive(config, obtain, label=f"rollback --to {to}", reporter=reporter,
                   wait=wait, rollback_to=to)
    if result.outcome == "rolled-back":
        with RunLock(config.lock_path, wait=True):
            mark_rolled_back(config.state_dir, sequence=used[0].sequence if used else 0,
                             manifest_sha256=used[0].manifest_sha256 if used else "", to=to)
    return result.to_dict()
