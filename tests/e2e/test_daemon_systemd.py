"""The daemon under a real systemd: inbox, start, rejection, restore, kill, watchdog, STATUS.

Every check goes through real systemctl and the real files of the installed package,
against the stand-in app (zmonitor.service) writing vitals the whole time.
"""

from __future__ import annotations

import re
import time

import pytest

from .harness import APP, DAEMON, ZMonitor, phase_starts

pytestmark = pytest.mark.e2e

INCOMPATIBLE = """-- Migration: e2e only: a schema the stand-in app refuses to run on
CREATE TABLE e2e_app_incompatible (id INTEGER PRIMARY KEY);
"""
INCOMPATIBLE_ROLLBACK = "DROP TABLE e2e_app_incompatible;\n"
BROKEN = """-- Migration: e2e only: fails on every database
INSERT INTO e2e_no_such_table (x) VALUES (1);
"""
BROKEN_ROLLBACK = "SELECT 1;\n"


def full_bundle(zm: ZMonitor, sequence: int = 1, name: str = "zmonitor-s1") -> str:
    return zm.build(zm.make_source("full"), sequence, name)


def long_bundle(zm: ZMonitor) -> str:
    """The shipped bundle with 0012 cut into batches of 2,000 rows: 200+ batches, a few
    seconds of batched work to act in."""
    return zm.build(zm.make_source("long", batch_rows=2000), 1, "zmonitor-long")


def assert_app_never_stopped(zm: ZMonitor, pid_before: str) -> None:
    assert zm.is_active(APP) == "active"
    assert zm.prop(APP, "MainPID") == pid_before, "the app was restarted"
    assert not [e for e in zm.ledger() if e[0] == "stop"], "the app was stopped"


def assert_no_writes_while_run_held_db(zm: ZMonitor, journal: dict) -> None:
    """No app session overlaps the run's stop..swap window, and no vitals row carries a
    timestamp inside it."""
    t = phase_starts(journal)
    # "app_stopped" is entered when the stop is asked for; the database is the run's
    # from the next phase on, once systemctl stop has returned.
    assert "backed_up" in t, journal
    lo = int(t["backed_up"] * 1000)
    hi_phase = "swapped" if "swapped" in t else ("restored" if "restored" in t else "closed")
    hi = int(t[hi_phase] * 1000)
    for start, stop, _rows in zm.app_sessions():
        assert (stop is not None and stop <= lo) or start >= hi, (
            f"app session {start}..{stop} overlaps the run's window {lo}..{hi}")
    inside = int(zm.sql(f"SELECT count(*) FROM vitals WHERE timestamp > {lo} "
                        f"AND timestamp < {hi}"))
    assert inside == 0, f"{inside} vitals rows were written while the run held the database"


def test_bundle_renamed_into_inbox_is_applied(zm: ZMonitor) -> None:
    bundle = full_bundle(zm)
    assert zm.version() == 4
    name = zm.drop(bundle)
    record = zm.wait_settled(name, "archive")
    assert record["outcome"] == "applied", record
    assert (record["from_version"], record["to_version"]) == (4, 14)
    assert zm.version() == 14
    assert zm.sql("PRAGMA integrity_check") == "ok"
    assert zm.is_active(APP) == "active"
    assert zm.is_active(DAEMON) == "active"
    assert zm.files("inbox") == []
    assert_no_writes_while_run_held_db(zm, zm.journal())
    # the app is writing again, on the migrated database, and lost nothing
    n = int(zm.sql("SELECT count(*) FROM vitals WHERE device_id = 'standin'"))
    zm.wait_for("new vitals rows", lambda: int(
        zm.sql("SELECT count(*) FROM vitals WHERE device_id = 'standin'")) > n, 10)
    zm.systemctl("stop", APP)  # closes the ledger's session so every row can be counted
    zm.assert_no_vitals_lost()


def test_systemctl_start_processes_a_bundle_already_waiting(zm: ZMonitor) -> None:
    bundle = full_bundle(zm)
    assert zm.systemctl("stop", DAEMON).returncode == 0
    name = zm.drop(bundle)
    time.sleep(1.0)
    assert name in zm.files("inbox"), "processed although the daemon was stopped"
    assert zm.version() == 4
    res = zm.systemctl("start", DAEMON)
    assert res.returncode == 0, res.stderr
    record = zm.wait_settled(name, "archive")
    assert record["outcome"] == "applied", record
    assert zm.version() == 14


def test_tampered_bundle_is_rejected_and_the_app_never_stopped(zm: ZMonitor) -> None:
    bundle = full_bundle(zm)
    data = bytearray(zm.dev.path(bundle).read_bytes())
    idx = data.find(b"early_warning_score INTEGER")
    assert idx > 0, "could not find a migration's text in the bundle"
    data[idx] ^= 0x20  # one flipped bit in a signed file
    tampered = bundle.replace(".zmb", "-tampered.zmb")
    zm.dev.put(bytes(data), tampered)
    pid = zm.prop(APP, "MainPID")
    name = zm.drop(tampered)
    zm.wait_for("the bundle in rejected/", lambda: zm.has("rejected", name), 60)
    assert any(name in f and f.endswith(".reason.json") for f in zm.files("rejected"))
    assert name not in zm.files("inbox")
    assert zm.version() == 4
    assert_app_never_stopped(zm, pid)
    assert zm.history()[-1]["outcome"] == "rejected"


def test_migration_error_is_caught_by_the_rehearsal_app_never_stopped(zm: ZMonitor) -> None:
    src = zm.make_source("broken", keep_expectations=False, extra={
        "migrations/schema/0015_schema_e2e_broken.sql": BROKEN,
        "migrations/rollback/0015_rollback.sql": BROKEN_ROLLBACK})
    bundle = zm.build(src, 1, "broken")
    pid = zm.prop(APP, "MainPID")
    name = zm.drop(bundle)
    zm.wait_for("the bundle in rejected/", lambda: zm.has("rejected", name), 120)
    record = zm.history()[-1]
    assert record["outcome"] == "precheck-failed", record
    assert zm.version() == 4
    assert_app_never_stopped(zm, pid)


def test_failing_bundle_is_restored_with_the_app_on_the_old_version(zm: ZMonitor) -> None:
    """The migration applies and validates, but the app cannot run on the result: the
    health gate catches it, the backup goes back, the app runs on version 4."""
    src = zm.make_source("incompatible", keep_expectations=False, extra={
        "migrations/schema/0015_schema_e2e_app_incompatible.sql": INCOMPATIBLE,
        "migrations/rollback/0015_rollback.sql": INCOMPATIBLE_ROLLBACK})
    bundle = zm.build(src, 1, "incompatible")
    name = zm.drop(bundle)
    zm.wait_for("a finished run", lambda: zm.history() and zm.journal_closed()
                and name not in zm.files("inbox"), 240)
    record = zm.history()[-1]
    assert record["outcome"] == "restored", record
    zm.wait_for("the app active", lambda: zm.is_active(APP) == "active", 60)
    assert zm.version() == 4
    assert zm.sql("SELECT count(*) FROM sqlite_master WHERE name = 'e2e_app_incompatible'") == "0"
    assert zm.sql("PRAGMA integrity_check") == "ok"
    assert_no_writes_while_run_held_db(zm, zm.journal())
    zm.systemctl("stop", APP)
    zm.assert_no_vitals_lost()


def test_status_line_shows_progress_during_a_long_run(zm: ZMonitor) -> None:
    name = zm.drop(long_bundle(zm))

    def status_line() -> str:
        shown = zm.systemctl("status", "--no-pager", "-n", "0", DAEMON).stdout
        m = re.search(r'Status: "(applying .*batch \d+/\d+.*)"', shown)
        return m.group(1) if m else ""

    line = zm.wait_for("systemctl status showing live batch progress", status_line, 120, 0.05)
    assert re.search(r"batch \d+/\d+ +\d+%", line), line
    print(f"systemctl status: Status: {line!r}")
    zm.wait_settled(name, "archive")


def test_kill_mid_batch_restarts_and_recovers_consistently(zm: ZMonitor) -> None:
    restarts = int(zm.prop(DAEMON, "NRestarts") or 0)
    name = zm.drop(long_bundle(zm))
    # The rehearsal runs the same batches on a snapshot first; kill during the live
    # ones. A loop inside the device watches status.json every 10 ms, so the kill lands
    # mid-batch even when the whole batched migration takes under a second.
    # --kill-whom=main: in this nspawn container on a cgroup-v1 hybrid host, systemd
    # cannot enumerate the unit's cgroup for "all" (EIO) although the main process dies;
    # mid-batch the daemon has no child process anyway.
    res = zm.run(
        "i=0; while [ $i -lt 18000 ]; do "
        "if grep -q '\"phase\": \"applying\"' /run/zmonitor-migrated/status.json "
        "2>/dev/null && grep -q '\"batch\": [1-9]' /run/zmonitor-migrated/status.json; then "
        "grep -o '\"message\": \"[^\"]*\"' /run/zmonitor-migrated/status.json; "
        f"exec systemctl kill --kill-whom=main -s KILL {DAEMON}; fi; "
        "i=$((i+1)); sleep 0.01; done; echo never saw a live batch; exit 1", timeout=300)
    print(f"killed at: {res.stdout.strip()}")
    assert res.returncode == 0, res.stderr
    zm.wait_for("systemd to restart the daemon",
                lambda: int(zm.prop(DAEMON, "NRestarts") or 0) > restarts, 60)
    zm.wait_for("recovery to finish with the app running",
                lambda: zm.journal_closed() and zm.is_active(APP) == "active"
                and name not in zm.files("inbox"), 240)
    version = zm.version()
    assert version in (4, 14), version
    assert zm.sql("PRAGMA integrity_check") == "ok"
    assert zm.sql("PRAGMA foreign_key_check") == ""
    if version == 14:
        # 0012 scored every row that existed at the run (the stand-in's later rows carry
        # no score: the real app computes it, the stand-in does not)
        assert zm.sql("SELECT count(*) FROM vitals WHERE early_warning_score IS NULL AND "
                      "device_id IS NOT 'standin' AND "
                      "respiration_rate IS NOT NULL AND spo2 IS NOT NULL AND heart_rate IS NOT "
                      "NULL AND temperature IS NOT NULL AND blood_pressure_systolic IS NOT NULL"
                      ) == "0"
    assert zm.is_active(DAEMON) == "active"
    zm.systemctl("stop", APP)
    zm.assert_no_vitals_lost()


def test_watchdog_restarts_a_hung_daemon(zm: ZMonitor) -> None:
    # An operator-style drop-in with a short watchdog, so the test takes seconds.
    zm.dev.put(b"[Service]\nWatchdogSec=3s\nTimeoutAbortSec=3s\n",
               "/etc/systemd/system/zmonitor-migrate.service.d/50-e2e-watchdog.conf")
    zm.systemctl("daemon-reload")
    assert zm.systemctl("restart", DAEMON).returncode == 0
    time.sleep(4.0)  # idle longer than WatchdogSec: an idle daemon must keep pinging
    assert zm.is_active(DAEMON) == "active", zm.diagnostics()
    restarts = int(zm.prop(DAEMON, "NRestarts") or 0)
    pid = zm.prop(DAEMON, "MainPID")
    # hung for real: SIGSTOP, no code of the daemon runs any more
    assert zm.systemctl("kill", "--kill-whom=main", "-s", "SIGSTOP", DAEMON).returncode == 0
    zm.wait_for("the watchdog to restart the daemon",
                lambda: int(zm.prop(DAEMON, "NRestarts") or 0) > restarts
                and zm.is_active(DAEMON) == "active", 60)
    assert zm.prop(DAEMON, "MainPID") != pid
    log = zm.run(["journalctl", "--no-pager", "-u", DAEMON, "-n", "200"]).stdout
    assert re.search(r"[Ww]atchdog timeout", log), log[-2000:]
    assert zm.is_active(APP) == "active"
    # the new process keeps the watchdog fed while idle
    time.sleep(4.0)
    assert zm.is_active(DAEMON) == "active"
    assert int(zm.prop(DAEMON, "NRestarts") or 0) == restarts + 1
