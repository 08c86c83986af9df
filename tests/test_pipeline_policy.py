"""Small policy decisions of the run, tested on real files: failure classification,
the daemon's handling of a bundle while a failed restore blocks new runs."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from zmonitor_migrated import config as config_mod
from zmonitor_migrated.daemon import _Stop, process
from zmonitor_migrated.errors import MigrateError, MigrationSqlError
from zmonitor_migrated.journal import Journal, Phase
from zmonitor_migrated.pipeline import classify_failure
from zmonitor_migrated.progress import Reporter


def test_a_full_disk_is_named_whatever_layer_noticed_it() -> None:
    os_err = classify_failure(OSError(errno.ENOSPC, "No space left on device"))
    sql_err = classify_failure(MigrationSqlError("m.sql", 3, "database or disk is full",
                                                 version=12))
    other = classify_failure(ValueError("boom"))
    assert os_err.kind == "disk-full" and "free space" in os_err.message
    assert sql_err.kind == "disk-full" and "m.sql:3" in sql_err.message
    assert other.kind == "internal" and "ValueError" in other.message
    named = MigrateError("x", kind="validation-failed")
    assert classify_failure(named) is named


def _record_failed_restore(device) -> config_mod.Config:
    cfg = config_mod.load(device.config_path)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    j = Journal.create(cfg.journal_path)
    for phase in (Phase.VERIFIED, Phase.PRECHECKED, Phase.APP_STOPPED, Phase.FAILED,
                  Phase.RESTORING):
        j.advance(phase)
    j.close("restore-failed")
    return cfg


def test_daemon_keeps_bundles_while_a_failed_restore_blocks_runs(device, shipped_bundle) -> None:
    cfg = _record_failed_restore(device)
    cfg.inbox.mkdir(parents=True, exist_ok=True)
    dropped = cfg.inbox / "zmonitor-1.zmb"
    dropped.write_bytes(shipped_bundle.read_bytes())
    before = sqlite3.connect(device.db).execute("SELECT MAX(version) FROM schema_version")
    version_before = before.fetchone()[0]

    summary = process(dropped, cfg, Reporter(), _Stop())

    assert summary["outcome"] == "blocked" and summary["kept_in_inbox"]
    assert dropped.exists(), "the bundle must wait in the inbox, not be rejected"
    assert not (cfg.state_dir / "rejected").exists()
    after = sqlite3.connect(device.db).execute("SELECT MAX(version) FROM schema_version")
    assert after.fetchone()[0] == version_before == 10
    assert device.app_active()


def test_gate_refuses_the_app_after_a_failed_restore(device) -> None:
    cfg = _record_failed_restore(device)
    proc = device.cli("gate")
    assert proc.returncode == 1
    assert "restore" in proc.stdout
    assert Path(cfg.journal_path).exists()


def test_recover_removes_run_dirs_left_by_a_recovery_killed_after_closing(device) -> None:
    cfg = config_mod.load(device.config_path)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    j = Journal.create(cfg.journal_path)
    j.close("abandoned")
    stale = cfg.state_dir / "runs" / j.run_id / "payload"
    stale.mkdir(parents=True)
    (stale / "bundle.zmb").write_bytes(b"x" * 100)
    proc = device.cli("recover")
    assert proc.returncode == 0, proc.stderr
    assert not (cfg.state_dir / "runs" / j.run_id).exists()
    assert device.app_active()
