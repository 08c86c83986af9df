"""Read-only or vanished paths, a lock that is never released, bad config,
and corruption.

Each case: a clear error that names the problem, the documented exit code, the database
bytes identical to before (compared by sha256; the app is not writing in these cases,
or its rows are compared), the app running where it was running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import Device, make_device
from fault_helpers import TALLY, before, run_cli, sha256


def _quiet_device(tmp: Path, template: Path, pub: Path) -> Device:
    """No app unit: nothing writes the database, so its bytes can be compared."""
    return make_device(tmp / "dev", template, pub, app_unit=None)


def _refused(dev: Device, bundle: Path, code: int, *words: str, label: str) -> str:
    digest = sha256(dev.db) if dev.db.exists() else None
    proc = run_cli(dev, "apply", str(bundle))
    TALLY.faults[label] += 1
    TALLY.outcomes[f"exit {proc.returncode}"] += 1
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    for w in words:
        assert w in proc.stderr, (w, proc.stderr[-800:])
    if dev.db.exists() and sha256(dev.db) != digest:
        TALLY.data_lost.append(label)
        raise AssertionError(f"{label}: database bytes changed")
    return proc.stderr


def test_backup_dir_is_a_file(tmp_path: Path, sample_db_v10: Path, shipped_bundle: Path,
                              release_key: tuple[Path, Path]) -> None:
    dev = _quiet_device(tmp_path, sample_db_v10, release_key[1])
    (dev.root / "backups").write_text("not a directory\n")
    _refused(dev, shipped_bundle, 4, str(dev.root / "backups"), label="backup dir is a file")


def test_backup_dir_read_only_mount(tmp_path: Path, sample_db_v10: Path,
                                    shipped_bundle: Path,
                                    release_key: tuple[Path, Path]) -> None:
    if os.geteuid() != 0:
        pytest.skip("a read-only mount needs root (chmod does not stop root)")
    dev = _quiet_device(tmp_path, sample_db_v10, release_key[1])
    bdir = dev.root / "backups"
    bdir.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(bdir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {proc.stderr.strip()}")
    try:
        _refused(dev, shipped_bundle, 4, str(bdir), "not writable",
                 label="backup dir read-only")
    finally:
        subprocess.run(["umount", "-l", str(bdir)], check=False)


def test_state_dir_missing_is_created(tmp_path: Path, sample_db_v10: Path,
                                      shipped_bundle: Path,
                                      release_key: tuple[Path, Path]) -> None:
    dev = _quiet_device(tmp_path, sample_db_v10, release_key[1])
    dev.set_config(state_dir=str(dev.root / "gone" / "deeper" / "state"))
    proc = run_cli(dev, "apply", str(shipped_bundle))
    TALLY.faults["state dir missing"] += 1
    TALLY.outcomes[f"exit {proc.returncode}"] += 1
    assert proc.returncode == 0, proc.stderr
    assert (dev.root / "gone" / "deeper" / "state" / "journal.json").is_file()


def test_state_dir_is_a_file(tmp_path: Path, sample_db_v10: Path, shipped_bundle: Path,
                             release_key: tuple[Path, Path]) -> None:
    dev = _quiet_device(tmp_path, sample_db_v10, release_key[1])
    (dev.root / "statefile").write_text("x")
    dev.set_config(state_dir=str(dev.root / "statefile"))
    _refused(dev, shipped_bundle, 4, str(dev.root / "statefile"), label="state dir is a file")


def test_database_missing(tmp_path: Path, sample_db_v10: Path, shipped_bundle: Path,
                          release_key: tuple[Path, Path]) -> None:
    dev = _quiet_device(tmp_path, sample_db_v10, release_key[1])
    dev.db.unlink()
    _refused(dev, shipped_bundle, 4, "does not exist", str(dev.db), label="database missing")
    assert not dev.db.exists()


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("LOCKED", flush=True)
time.sleep(600)
"""


def test_database_locked_by_a_process_that_never_lets_go(
        tmp_path: Path, sample_db_v10: Path, shipped_bundle: Path,
        release_key: tuple[Path, Path]) -> None:
    dev = _quiet_device(tmp_path, sample_db_v10, release_key[1])
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(dev.db)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "LOCKED"
        t0 = time.monotonic()
        err = _refused(dev, shipped_bundle, 4, "locked", label="database locked")
        assert time.monotonic() - t0 < 60
        assert str(dev.db) in err
    finally:
        locker.kill()
        locker.wait()


@pytest.mark.parametrize(("key", "value", "words"), [
    ("batch_size", "ten", ("'batch_size'", "integer")),
    ("max_downtime_s", True, ("'max_downtime_s'", "number")),
    ("app_unit", 5, ("'app_unit'",)),
    ("database", 7, ("'database'", "path")),
    ("revoked_keys", "abc", ("'revoked_keys'", "list")),
    ("integrity_check", "fast", ("'integrity_check'",)),
    ("backup_dir", None, ("'backup_dir'",)),
])
def test_config_wrong_types(tmp_path: Path, sample_db_v10: Path, shipped_bundle: Path,
                            release_key: tuple[Path, Path], key: str, value: object,
                            words: tuple[str, ...]) -> None:
    dev = _quiet_device(tmp_path, sample_db_v10, release_key[1])
    cfg = yaml.safe_load(dev.config_path.read_text())
    cfg[key] = value
    dev.config_path.write_text(yaml.safe_dump(cfg))
    _refused(dev, shipped_bundle, 2, *words, label="config wrong type")
    assert not (dev.root / "state").exists(), "a run started despite the bad config"


# -- corruption ---------------------------------------------------------------------------
def _corrupt_table_root(db: Path, table: str) -> None:
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name=?",
                            (table,)).fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size + 8)  # cell pointers of a leaf page
        f.write(b"\xff\x7f" * 16)


def test_database_fails_integrity_before_the_run(device: Device, shipped_bundle: Path) -> None:
    """A damaged table the monitor never writes: refused before the stop, ALERT, app
    still running, nothing written."""
    assert device.systemctl("stop", "zmonitor.service").returncode == 0
    _corrupt_table_root(device.db, "alarm_history")
    assert device.systemctl("start", "zmonitor.service").returncode == 0
    calls = len(device.calls())
    proc = run_cli(device, "apply", str(shipped_bundle))
    TALLY.faults["database corrupt before the run"] += 1
    TALLY.outcomes[f"exit {proc.returncode}"] += 1
    assert proc.returncode == 4, proc.stderr
    assert "ALERT alert=precheck-failed" in proc.stderr
    assert "integrity" in proc.stderr
    assert "stop zmonitor.service" not in device.calls()[calls:]
    if not device.app_active():
        TALLY.app_left_stopped.append("database corrupt before the run")
    assert device.app_active()
    assert list((device.root / "backups").glob("*.db")) == []


def test_backup_corrupted_before_the_restore(device: Device, shipped_bundle: Path) -> None:
    """The migrated DB goes live, then the app start corrupts every backup and fails:
    the restore finds the backup's sha256 wrong, overwrites nothing, exit 6."""
    ref = before(device)
    device.fault("corrupt-backups-on-start", str(device.root / "backups"))
    proc = run_cli(device, "apply", str(shipped_bundle))
    device.clear_fault("corrupt-backups-on-start")
    TALLY.faults["backup corrupted before a restore"] += 1
    TALLY.outcomes[f"exit {proc.returncode}"] += 1
    assert proc.returncode == 6, proc.stderr
    assert "corrupted" in proc.stderr and "nothing was overwritten" in proc.stderr
    assert "ALERT alert=restore-failed" in proc.stderr
    import sqlite3

    conn = sqlite3.connect(f"file:{device.db}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 14
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        n = conn.execute("SELECT COUNT(*) FROM vitals WHERE rowid <= ?",
                         (ref.upto,)).fetchone()[0]
    finally:
        conn.close()
    assert n == len(ref.rows["vitals"]), "the live (migrated) database lost rows"
    kept = list((device.root / "backups").glob("*.db"))
    assert len(kept) == 1, "the corrupted backup must be kept for the operator"
    # The app stays down by design (exit 6: manual action); the gate refuses to start it.
    gate = run_cli(device, "gate")
    assert gate.returncode == 1 and "restore" in gate.stdout
