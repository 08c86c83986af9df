"""One migration run, end to end, through the real CLI in a subprocess.

Every test runs on a real SQLite file with the simulated monitor (a real process started
by ``fake_systemctl.py``) writing a vitals row every 5 ms. "Nothing touched" is checked
on bytes where the app is stopped first, and on content otherwise: the monitor only
ever appends vitals, so every other table and every vitals row that existed before must
be identical.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    Device,
    add_migration,
    build_variant,
    make_device,
    max_vitals_rowid,
    table_rows,
)

from zmonitor_migrated import fsutil, maintenance
from zmonitor_migrated.config import load as load_config
from zmonitor_migrated.lock import RunLock
from zmonitor_migrated.progress import Reporter

BACKUP_NAME = re.compile(r"^zmonitor-\d{8}T\d{6}Z-v(\d+)\.db$")


# -- helpers ------------------------------------------------------------------------------
def version(db: Path) -> int:
    conn = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])
    finally:
        conn.close()


def stop_app(dev: Device) -> None:
    """Stop the monitor (it checkpoints and removes its WAL) and forget the calls so far."""
    assert dev.systemctl("stop", "zmonitor.service").returncode == 0
    assert not dev.app_active()
    (dev.systemctl_dir / "calls.log").unlink(missing_ok=True)


def stops(dev: Device) -> list[str]:
    return [c for c in dev.calls() if c.startswith("stop")]


def dir_state(d: Path) -> dict[str, str]:
    return {p.name: fsutil.sha256_file(p) for p in sorted(d.iterdir()) if p.is_file()}


def journal(dev: Device) -> dict[str, object]:
    return json.loads((dev.root / "state" / "journal.json").read_text())


def phase_time(j: dict[str, object], name: str) -> float:
    times = [t for p, t in j["phases"] if p == name]  # type: ignore[union-attr]
    assert times, f"phase {name} not in journal {j['phases']}"
    return float(times[0])


def backups(dev: Device) -> list[Path]:
    d = dev.root / "backups"
    return sorted(p for p in d.iterdir() if BACKUP_NAME.match(p.name)) if d.is_dir() else []


def tamper(bundle: Path, out: Path, member: str) -> Path:
    """Copy ``bundle`` with one byte of ``member``'s data changed (sizes unchanged)."""
    data = bytearray(bundle.read_bytes())
    with tarfile.open(bundle) as tar:
        info = tar.getmember(member)
    data[info.offset_data + 10] ^= 0x20
    out.write_bytes(bytes(data))
    return out


def assert_old_content(dev: Device, reference: dict[str, list[tuple[object, ...]]],
                       upto: int) -> None:
    """The live DB holds exactly ``reference`` (vitals up to rowid ``upto``), at v10."""
    assert version(dev.db) == 10
    assert table_rows(dev.db, vitals_up_to=upto) == reference


def assert_untouched_run(dev: Device) -> None:
    """A run refused before the stop: no stop, app running, no backup, no leftovers."""
    assert stops(dev) == []
    assert dev.app_active()
    assert backups(dev) == []
    leftovers = [p.name for p in dev.db.parent.iterdir()
                 if ".migrating-" in p.name or p.name.endswith(".restoring")]
    assert leftovers == []
    runs = dev.root / "state" / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


# -- a full apply -------------------------------------------------------------------------
def test_full_apply(device: Device, shipped_bundle: Path) -> None:
    t_test = time.time()
    proc = device.cli("apply", str(shipped_bundle))
    assert proc.returncode == 0, proc.stderr
    assert "applied: run" in proc.stdout
    assert version(device.db) == 14
    assert device.app_active()
    assert device.calls()[-3:][0].startswith("start") or "start zmonitor.service" in \
        device.calls()

    # Backup: named after the DB, UTC stamp, old version; sidecar matches; only those files.
    [bk] = backups(device)
    assert BACKUP_NAME.match(bk.name) and bk.name.endswith("-v10.db")
    stamp = time.strptime(bk.name.split("-")[1], "%Y%m%dT%H%M%SZ")
    assert abs(time.mktime(stamp) - time.mktime(time.gmtime(t_test))) < 120
    side = bk.with_name(bk.name + ".sha256")
    assert side.read_text().split()[0] == fsutil.sha256_file(bk)
    assert sorted(p.name for p in bk.parent.iterdir()) == sorted([bk.name, side.name]), \
        "nothing but the backup and its checksum in the backup dir (no -wal/-shm)"
    assert version(bk) == 10

    # History: one record with everything the issue lists.
    [rec] = device.history()
    assert rec["outcome"] == "applied" and rec["bundle"] == "zmonitor" and rec["sequence"] == 1
    assert rec["from_version"] == 10 and rec["to_version"] == 14
    assert rec["backup"] == str(bk)
    assert rec["error"] is None
    phases = rec["phase_times"]
    assert isinstance(phases, dict)
    for p in ("received", "verified", "prechecked", "app_stopped", "backed_up", "applying",
              "validated", "swapping", "swapped", "app_started"):
        assert p in phases, p
    assert isinstance(rec["downtime_s"], float) and 0 < rec["downtime_s"] < 60
    assert rec["rows_before"]["vitals"] >= 20_000  # type: ignore[index]
    assert rec["rows_after"]["vitals"] >= rec["rows_before"]["vitals"]  # type: ignore[index]
    assert rec["rows_after"]["patients"] == rec["rows_before"]["patients"]  # type: ignore[index]
    assert rec["db_size_before"] > 0 and rec["db_size_after"] > 0  # type: ignore[operator]

    # Downtime window: the app wrote nothing between the backup and the swap, and every
    # row the old file holds (the backup is its untouched inode) is in the new one.
    j = journal(device)
    t_backed = phase_time(j, "backed_up") * 1000
    t_swapped = phase_time(j, "swapped") * 1000
    conn = sqlite3.connect(f"{bk.as_uri()}?mode=ro&immutable=1", uri=True)
    old = conn.execute("SELECT rowid, timestamp FROM vitals ORDER BY rowid").fetchall()
    conn.close()
    conn = sqlite3.connect(f"{device.db.as_uri()}?mode=ro", uri=True)
    try:
        in_window = conn.execute(
            "SELECT COUNT(*) FROM vitals WHERE timestamp >= ? AND timestamp <= ?",
            (int(t_backed), int(t_swapped))).fetchone()[0]
        before = conn.execute("SELECT COUNT(*) FROM vitals WHERE timestamp >= ? AND "
                              "timestamp < ?", (int(t_test * 1000), int(t_backed))).fetchone()[0]
        new_ids = conn.execute("SELECT rowid, timestamp FROM vitals WHERE rowid <= ? "
                               "ORDER BY rowid", (old[-1][0],)).fetchall()
    finally:
        conn.close()
    assert before > 0, "the monitor was writing before the stop"
    assert in_window == 0, "vitals written while the app should have been stopped"
    assert new_ids == old, "a row of the old file is missing"
    time.sleep(0.3)
    assert max_vitals_rowid(device.db) > old[-1][0], "the monitor writes again after start"

    # Metrics (Prometheus text format), status.json, status/history --json.
    prom = (device.root / "metrics" / "zmonitor_migrate.prom").read_text()
    for line in prom.splitlines():
        assert line.startswith("# ") or re.match(
            r'^[a-z_]+(\{[a-z_]+="[^"]*"\})? -?[0-9.e+]+$', line), line
    assert 'zmonitor_migrate_runs_total{outcome="applied"} 1' in prom
    assert "zmonitor_db_schema_version 14" in prom
    assert "zmonitor_migrate_last_run_success 1" in prom
    status_file = json.loads((device.root / "run" / "status.json").read_text())
    assert status_file["run_id"] == rec["run_id"]
    st = device.cli("status", "--json")
    assert st.returncode == 0, st.stderr
    assert st.stdout.count("\n") == 1
    info = json.loads(st.stdout)
    assert info["current_version"] == 14 and info["pending"] == []
    assert info["backups"] == [str(bk)]
    hi = device.cli("history", "--json")
    assert hi.returncode == 0 and hi.stdout.count("\n") == 1
    assert [r["run_id"] for r in json.loads(hi.stdout)["runs"]] == [rec["run_id"]]

    # The same bundle again: a no-op, the app is never stopped.
    (device.systemctl_dir / "calls.log").unlink()
    again = device.cli("apply", str(shipped_bundle))
    assert again.returncode == 0, again.stderr
    assert "up-to-date" in again.stdout
    assert stops(device) == []
    assert device.app_active()
    assert backups(device) == [bk]


def test_dry_run_touches_nothing(device: Device, shipped_bundle: Path) -> None:
    stop_app(device)
    before = dir_state(device.db.parent)
    proc = device.cli("apply", str(shipped_bundle), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "0012" in proc.stdout and "target 14" in proc.stdout
    assert "estimated downtime" in proc.stdout
    assert dir_state(device.db.parent) == before, "bytes or side files changed"
    assert stops(device) == [] and not any(c.startswith("start") for c in device.calls())
    assert backups(device) == []


def test_tampered_bundle_refused(device: Device, shipped_bundle: Path,
                                 tmp_path: Path) -> None:
    bad = tamper(shipped_bundle, tmp_path / "bad.zmb",
                 "migrations/data/0012_data_backfill_vitals_legacy_mrn_and_ews.sql")
    stop_app(device)
    before = dir_state(device.db.parent)
    proc = device.cli("apply", str(bad))
    assert proc.returncode == 3, proc.stderr
    assert "hash-mismatch" in proc.stderr
    assert dir_state(device.db.parent) == before
    assert stops(device) == []
    assert device.history()[-1]["outcome"] == "rejected"


# -- pre-checks: exit 4, app never stopped --------------------------------------------------
def _corrupt_index(db: Path) -> None:
    """Change one key in the patients MRN index: the table and index disagree, the file
    still opens."""
    conn = sqlite3.connect(db)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE type='index' AND "
                        "name='sqlite_autoindex_patients_1'").fetchone()[0]
    conn.close()
    data = bytearray(db.read_bytes())
    start = (root - 1) * page
    at = data.find(b"MRN1000003", start, start + page)
    assert at > 0
    data[at:at + 10] = b"MRN9999993"
    db.write_bytes(bytes(data))


def test_precheck_integrity(tmp_path: Path, sample_db_v10: Path,
                            release_key: tuple[Path, Path], shipped_bundle: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(sample_db_v10.read_bytes())
    _corrupt_index(bad)
    conn = sqlite3.connect(bad)
    assert conn.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
    conn.close()
    dev = make_device(tmp_path / "dev", bad, release_key[1])
    before = dir_state(dev.db.parent)
    proc = dev.cli("apply", str(shipped_bundle))
    assert proc.returncode == 4, proc.stderr
    assert "[integrity]" in proc.stderr and "ALERT" in proc.stderr
    assert dir_state(dev.db.parent) == before
    assert dev.calls() == []


def test_precheck_foreign_keys(tmp_path: Path, sample_db_v10: Path,
                               release_key: tuple[Path, Path], shipped_bundle: Path) -> None:
    bad = tmp_path / "fk.db"
    bad.write_bytes(sample_db_v10.read_bytes())
    conn = sqlite3.connect(bad, isolation_level=None)
    fk = conn.execute("SELECT m.name, f.\"from\", f.\"table\" FROM sqlite_master m, "
                      "pragma_foreign_key_list(m.name) f WHERE m.type='table' "
                      "AND f.\"table\"='patients'").fetchone()
    assert fk is not None, "the v10 schema has a table referencing patients"
    child, col, _parent = fk
    rowid = conn.execute(f'SELECT rowid FROM "{child}" LIMIT 1').fetchone()[0]
    conn.execute(f'UPDATE "{child}" SET "{col}" = \'NO-SUCH-PATIENT\' WHERE rowid = ?',
                 (rowid,))
    assert conn.execute("PRAGMA foreign_key_check").fetchall()
    conn.close()
    dev = make_device(tmp_path / "dev", bad, release_key[1])
    assert dev.systemctl("start", "zmonitor.service").returncode == 0
    try:
        proc = dev.cli("apply", str(shipped_bundle))
        assert proc.returncode == 4, proc.stderr
        assert "[foreign-keys]" in proc.stderr
        assert_untouched_run(dev)
        assert version(dev.db) == 10
    finally:
        dev.systemctl("stop", "zmonitor.service")


def test_precheck_downtime_estimate(device: Device, shipped_bundle: Path) -> None:
    device.set_config(max_downtime_s=0.001)
    proc = device.cli("apply", str(shipped_bundle))
    assert proc.returncode == 4, proc.stderr
    assert "[downtime-estimate]" in proc.stderr and "--allow-long" in proc.stderr
    assert_untouched_run(device)
    assert version(device.db) == 10
    ok = device.cli("apply", str(shipped_bundle), "--allow-long")
    assert ok.returncode == 0, ok.stderr
    assert version(device.db) == 14 and device.app_active()


def test_precheck_rehearsal_fails(device: Device, tmp_path: Path,
                                  release_key: tuple[Path, Path]) -> None:
    bundle = build_variant(
        tmp_path / "b" / "broken-2.zmb", release_key[0], 2,
        edit=lambda s: add_migration(s, 15, "UPDATE vitals SET heart_rate = no_such_column;\n"))
    upto = max_vitals_rowid(device.db)
    ref = table_rows(device.db, vitals_up_to=upto)
    proc = device.cli("apply", str(bundle))
    assert proc.returncode == 4, proc.stderr
    assert "[rehearsal]" in proc.stderr and "no_such_column" in proc.stderr
    assert_untouched_run(device)
    assert_old_content(device, ref, upto)


def test_precheck_database_missing(device: Device, shipped_bundle: Path) -> None:
    device.set_config(database=str(device.root / "data" / "nope.db"))
    proc = device.cli("apply", str(shipped_bundle))
    assert proc.returncode == 4, proc.stderr
    assert "[database-missing]" in proc.stderr
    assert_untouched_run(device)
    assert not (device.root / "data" / "nope.db").exists()


# -- failures after the stop: exit 5, old DB back, app running -----------------------------
def _assert_restored(dev: Device, proc: subprocess.CompletedProcess[str], kind: str) -> None:
    assert proc.returncode == 5, proc.stderr
    assert f"[{kind}]" in proc.stderr
    assert "ALERT alert=migration-failed" in proc.stderr
    assert dev.app_active()
    assert version(dev.db) == 10
    [bk] = backups(dev)  # the old file, kept: the run swapped before it failed
    assert bk.with_name(bk.name + ".sha256").read_text().split()[0] == \
        fsutil.sha256_file(bk)
    j = journal(dev)
    assert j["outcome"] == "restored"
    t_restored = phase_time(j, "restored") * 1000
    # The live DB is the backup plus only what the restarted monitor appended after.
    ref_upto = max_vitals_rowid(bk)
    time.sleep(0.2)
    stop_app(dev)
    assert table_rows(dev.db, vitals_up_to=ref_upto) == table_rows(bk)
    conn = sqlite3.connect(dev.db)
    late = conn.execute("SELECT MIN(timestamp), COUNT(*) FROM vitals WHERE rowid > ?",
                        (ref_upto,)).fetchone()
    conn.close()
    assert late[1] > 0 and late[0] >= int(t_restored), "only rows written after the restore"
    rec = dev.history()[-1]
    assert rec["outcome"] == "restored" and rec["error"]["kind"] == kind  # type: ignore[index]
    prom = (dev.root / "metrics" / "zmonitor_migrate.prom").read_text()
    assert "zmonitor_migrate_restores_total 1" in prom


def test_health_gate_fails_restores(device: Device, shipped_bundle: Path) -> None:
    device.set_config(health_check_s=1.5)
    device.fault("crash-after-start", "once")
    proc = device.cli("apply", str(shipped_bundle))
    assert "ALERT alert=restore-executed" in proc.stderr
    _assert_restored(device, proc, "unit")
    # What the app recorded on the migrated database before it crashed is not thrown
    # away with it: the replaced database is kept, its -wal included.
    kept = Path(str(device.history()[-1]["replaced"]))
    assert kept.parent == device.root / "backups" and str(kept) in proc.stderr
    [bk] = backups(device)
    conn = sqlite3.connect(kept)
    try:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone() == (14,)
        written = conn.execute("SELECT COUNT(*) FROM vitals WHERE rowid > ?",
                               (max_vitals_rowid(bk),)).fetchone()[0]
    finally:
        conn.close()
    assert written > 0, "the app's rows on the migrated database were lost"


def test_fail_start_restores(device: Device, shipped_bundle: Path) -> None:
    device.fault("fail-start", "once")
    proc = device.cli("apply", str(shipped_bundle))
    _assert_restored(device, proc, "unit")


def test_restore_fails_exit_6(device: Device, shipped_bundle: Path, tmp_path: Path) -> None:
    # A good backup the operator keeps elsewhere (online backup while the app runs).
    safe = tmp_path / "safe"
    safe.mkdir()
    good = safe / "zmonitor-20260101T000000Z-v10.db"
    src = sqlite3.connect(f"{device.db.as_uri()}?mode=ro", uri=True)
    dst = sqlite3.connect(good)
    src.backup(dst)
    dst.close()
    src.close()
    (safe / (good.name + ".sha256")).write_text(f"{fsutil.sha256_file(good)}  {good.name}\n")

    device.fault("corrupt-backups-on-start", str(device.root / "backups"))
    proc = device.cli("apply", str(shipped_bundle))
    assert proc.returncode == 6, proc.stderr
    assert "ALERT alert=restore-failed" in proc.stderr
    assert not device.app_active(), "never run the app on a DB we could not restore"
    [bk] = backups(device)  # kept, damaged, for the operator
    assert version(device.db) == 14, "the migrated DB is kept in place"
    assert journal(device)["outcome"] == "restore-failed"

    gate = device.cli("gate")
    assert gate.returncode == 1 and "restore" in gate.stdout
    device.clear_fault("corrupt-backups-on-start")
    again = device.cli("apply", str(shipped_bundle))
    assert again.returncode == 6, again.stderr
    assert not device.app_active()
    assert bk.exists()

    fixed = device.cli("restore", str(good))
    assert fixed.returncode == 0, fixed.stderr
    assert device.app_active() and version(device.db) == 10
    assert device.cli("gate").returncode == 0
    final = device.cli("apply", str(shipped_bundle))
    assert final.returncode == 0, final.stderr
    assert version(device.db) == 14 and device.app_active()


# -- target, rollback, restore ----------------------------------------------------------
def test_target_rollback_restore(device: Device, shipped_bundle: Path) -> None:
    proc = device.cli("apply", str(shipped_bundle), "--target", "12")
    assert proc.returncode == 0, proc.stderr
    assert version(device.db) == 12 and device.app_active()
    first_run = device.history()[-1]["run_id"]

    proc = device.cli("apply", str(shipped_bundle))
    assert proc.returncode == 0, proc.stderr
    assert version(device.db) == 14

    (device.systemctl_dir / "calls.log").unlink()
    rb = device.cli("rollback", "--to", "10", "--bundle", str(shipped_bundle))
    assert rb.returncode == 0, rb.stderr
    assert version(device.db) == 10 and device.app_active()
    assert "ALERT alert=rollback-executed" in rb.stderr
    calls = device.calls()
    assert any(c.startswith("stop") for c in calls) and calls[-1].startswith(("start",
                                                                             "is-active",
                                                                             "show"))
    assert device.history()[-1]["outcome"] == "rolled-back"

    # restore: the newest backup (taken by the rollback run, at v14).
    proc = device.cli("restore")
    assert proc.returncode == 0, proc.stderr
    assert version(device.db) == 14 and device.app_active()
    # restore --run: the backup the --target 12 run took (v10).
    proc = device.cli("restore", "--run", str(first_run))
    assert proc.returncode == 0, proc.stderr
    assert version(device.db) == 10 and device.app_active()
    assert device.cli("gate").returncode == 0


# -- the lock -------------------------------------------------------------------------------
def test_lock(device: Device, shipped_bundle: Path) -> None:
    assert device.cli("apply", str(shipped_bundle)).returncode == 0
    cfg = load_config(device.config_path)
    with RunLock(cfg.lock_path):
        proc = device.cli("apply", str(shipped_bundle))
        assert proc.returncode == 7, proc.stderr
        assert "--wait" in proc.stderr
        waiting = subprocess.Popen(
            [sys.executable, "-m", "zmonitor_migrated.cli", "--config", str(device.config_path),
             "apply", str(shipped_bundle), "--wait"], env=device.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.5)
        assert waiting.poll() is None, "it waits for the lock"
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert "up-to-date" in out


# -- the app did not really stop -------------------------------------------------------
def test_app_ignores_stop(device: Device, shipped_bundle: Path) -> None:
    device.set_config(stop_timeout_s=1)
    upto = max_vitals_rowid(device.db)
    ref = table_rows(device.db, vitals_up_to=upto)
    device.fault("ignore-stop")
    proc = device.cli("apply", str(shipped_bundle))
    assert proc.returncode == 5, proc.stderr
    assert "[unit]" in proc.stderr and "still active" in proc.stderr
    assert device.app_active()
    assert backups(device) == []
    assert_old_content(device, ref, upto)


def test_other_process_holds_database(device: Device, shipped_bundle: Path) -> None:
    upto = max_vitals_rowid(device.db)
    ref = table_rows(device.db, vitals_up_to=upto)
    jpath = device.root / "state" / "journal.json"
    held = threading.Event()
    done = threading.Event()

    def holder() -> None:
        # Wait for the stop, then take the write lock as a second app would.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if json.loads(jpath.read_text())["phase"] == "app_stopped":
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.002)
        conn = sqlite3.connect(device.db, isolation_level=None, timeout=10)
        conn.execute("BEGIN EXCLUSIVE")
        held.set()
        while time.monotonic() < deadline:
            try:
                if json.loads(jpath.read_text())["phase"] not in ("app_stopped",):
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.002)
        conn.execute("ROLLBACK")
        conn.close()
        done.set()

    t = threading.Thread(target=holder, daemon=True)
    t.start()
    proc = device.cli("apply", str(shipped_bundle))
    t.join(timeout=30)
    assert held.is_set() and done.is_set()
    assert proc.returncode == 5, proc.stderr
    assert "[database-locked]" in proc.stderr
    assert device.app_active()
    assert_old_content(device, ref, upto)


# -- SIGTERM mid-batch ---------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_mid_batches(tmp_path: Path, big_db_v10: Path, slow_bundle: Path,
                             release_key: tuple[Path, Path]) -> None:
    dev = make_device(tmp_path / "dev", big_db_v10, release_key[1])
    dev.set_config(batch_size=1)  # the bundle's 25-row batches: seconds between batches
    assert dev.systemctl("start", "zmonitor.service").returncode == 0
    try:
        upto = max_vitals_rowid(dev.db)
        ref = table_rows(dev.db, vitals_up_to=upto)
        jpath = dev.root / "state" / "journal.json"
        # stderr is a file named by JOURNAL_STREAM, as systemd names its stream socket:
        # the lines carry the syslog priority journald would keep.
        errf = (tmp_path / "apply.stderr").open("w+")
        st = os.fstat(errf.fileno())
        proc = subprocess.Popen(
            [sys.executable, "-m", "zmonitor_migrated.cli", "--config", str(dev.config_path),
             "apply", str(slow_bundle)], text=True, stdout=subprocess.PIPE, stderr=errf,
            env={**dev.env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        deadline = time.monotonic() + 60
        phase = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                phase = json.loads(jpath.read_text())["phase"]
            except (FileNotFoundError, ValueError):
                phase = None
            if phase == "applying":
                break
            time.sleep(0.005)
        assert phase == "applying", "the run reached the batched migration"
        time.sleep(0.4)
        proc.terminate()  # SIGTERM, what systemctl stop sends
        proc.communicate(timeout=60)
        errf.seek(0)
        err = errf.read()
        errf.close()
        assert proc.returncode == 5, err
        assert "[interrupted]" in err and "safe point" in err
        # The operator's own stop is a warning, not a failure alert.
        assert re.search(r"^<4>interrupted: run interrupted by operator \(SIGTERM\): ", err,
                         re.M), err
        assert "alert=migration-failed" not in err
        assert not re.search(r"^<[0-3]>", err, re.M), err  # nothing above warning
        assert dev.app_active()
        record = dev.history()[-1]
        assert record["outcome"] == "interrupted"
        assert isinstance(record["downtime_s"], float) and record["downtime_s"] > 0
        assert journal(dev)["outcome"] in ("recovered-old", "restored")
        assert [p for p in dev.db.parent.iterdir() if ".migrating-" in p.name] == []
        assert_old_content(dev, ref, upto)
    finally:
        dev.systemctl("stop", "zmonitor.service")


def test_restore_goes_ahead_when_the_replaced_database_cannot_be_kept(
        device: Device, shipped_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No directory takes the hard link (ENOSPC for a directory entry): the restore
    still puts the backup back and starts the app, and says loudly what was not kept."""
    assert device.cli("apply", str(shipped_bundle)).returncode == 0
    [bk] = backups(device)
    for key, value in device.env.items():
        monkeypatch.setenv(key, value)  # the stand-in systemctl, run from this process
    real_link = os.link

    def no_room(src: object, dst: object, *a: object, **k: object) -> None:
        if str(dst).endswith("-replaced.db"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_link(src, dst, *a, **k)  # type: ignore[arg-type]
    monkeypatch.setattr(os, "link", no_room)
    reporter = Reporter()

    maintenance.restore(load_config(device.config_path), backup=bk, reporter=reporter)

    alerts = {e.alert: e.message for e in reporter.events if e.alert}
    assert "No space left" in alerts["replaced-not-kept"]
    assert "kept as" not in alerts["restore-executed"]
    assert version(device.db) == 10 and device.app_active()
    stop_app(device)
    assert table_rows(device.db, vitals_up_to=max_vitals_rowid(bk)) == table_rows(bk)
    assert device.history()[-1]["replaced"] is None
    assert isinstance(device.history()[-1]["downtime_s"], float)  # stop to start, recorded
    assert not [p for p in (device.root / "backups").iterdir() if "replaced" in p.name]
