"""Session fixtures of the end-to-end suite: a Debian 12 device under a real systemd.

Once per session: build the .deb (packaging/build-deb.sh), get the cached rootfs
(device.RootfsCache), boot an overlay of it with systemd-nspawn, install the .deb with
apt inside the running system, a stand-in Z Monitor app as zmonitor.service, a signing
key and a database at version 4 with enough vitals rows for a batched migration that
takes a few seconds. Before each test, ``zm`` puts the device back to that baseline.

The suite skips, with the reason printed, only where the machine cannot run it: not
root, or systemd-nspawn/debootstrap missing even after packaging/e2e-deps.sh.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .device import (
    CACHE_DIR,
    Device,
    DeviceError,
    Overlay,
    RootfsCache,
    stop_stale_containers,
)
from .harness import (
    APP,
    APP_UNIT,
    CONFIG,
    DAEMON,
    E2E,
    HERE,
    REPO,
    VITALS_ROWS,
    Booted,
    ZMonitor,
)

TIMINGS: dict[str, float] = {}

def _tool(name: str) -> bool:
    return shutil.which(name) is not None or Path("/usr/sbin", name).exists()


def _host_problem() -> str | None:
    if os.geteuid() != 0:
        return "the e2e suite needs root (debootstrap, mount, systemd-nspawn)"
    needed = ("systemd-nspawn", "debootstrap", "nsenter", "dpkg-buildpackage")
    if not all(_tool(t) for t in needed):
        subprocess.run(["bash", str(REPO / "packaging/e2e-deps.sh")], check=False)
    missing = [t for t in needed if not _tool(t)]
    if missing:
        return f"missing after packaging/e2e-deps.sh: {', '.join(missing)}"
    return None


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    TIMINGS[name] = time.monotonic() - t0


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.section("e2e timings")
        for name, secs in TIMINGS.items():
            terminalreporter.write_line(f"{name:<32} {secs:7.1f} s")


@pytest.fixture(scope="session")
def e2e_host() -> None:
    problem = _host_problem()
    if problem:
        print(f"\nSKIPPING the e2e suite: {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="session")
def deb_path(e2e_host: None) -> Path:
    with timed("build .deb"):
        res = subprocess.run([str(REPO / "packaging/build-deb.sh")], capture_output=True,
                             text=True, check=False)
    if res.returncode != 0:
        pytest.fail(f"packaging/build-deb.sh failed:\n{res.stderr[-4000:]}")
    return Path(res.stdout.strip().splitlines()[-1])


def _clean_stale_runs(runs: Path) -> None:
    for run in runs.glob("*"):
        with contextlib.suppress(ValueError, OSError):
            if Path(f"/proc/{int(run.name)}").exists():
                continue
        subprocess.run(["umount", "-l", str(run / "root")], check=False,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(run, ignore_errors=True)


@pytest.fixture(scope="session")
def booted(deb_path: Path) -> Iterator[Booted]:
    # Stable place for the console log, the rootfs build log and the units' journal,
    # so a failed CI run can be read afterwards.
    logs = CACHE_DIR / "logs" / "last"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    cache = RootfsCache()
    with timed("rootfs (debootstrap or cache)"):
        try:
            lower, built = cache.ensure(logs / "rootfs-build.log")
        except subprocess.CalledProcessError as exc:
            pytest.fail(f"building the rootfs failed ({exc}); see {logs / 'rootfs-build.log'}")
    TIMINGS["rootfs built now (1=cold)"] = float(built)
    runs = CACHE_DIR / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stop_stale_containers()  # from sessions killed before their teardown
    _clean_stale_runs(runs)
    with Overlay(lower, runs / str(os.getpid())) as root:
        dev = Device(root, logs / "console.log", name=f"zmonitor-e2e-{os.getpid()}")
        try:
            with timed("boot"):
                dev.boot()
            with timed("install .deb + app + baseline DB"):
                booted = _provision(dev, deb_path, logs)
            yield booted
        finally:
            _save_debug(dev, logs)
            dev.shutdown()
            print(f"\ne2e logs: {logs}")


def _save_debug(dev: Device, logs: Path) -> None:
    with contextlib.suppress(Exception):
        res = dev.run(["journalctl", "--no-pager", "-o", "short-precise",
                       "-u", DAEMON, "-u", APP], check=False, timeout=30)
        (logs / "journal.txt").write_text(res.stdout, encoding="utf-8")


def _provision(dev: Device, deb: Path, logs: Path) -> Booted:
    dev.put(deb.read_bytes(), f"{E2E}/{deb.name}")
    dev.run(["mkdir", "-p", f"{E2E}/keys", f"{E2E}/bundles"])
    # 1. The package, through apt in the booted system: dependencies come from Debian.
    res = dev.run(["apt-get", "install", "-y", "--no-install-recommends",
                   f"{E2E}/{deb.name}"], timeout=300)
    enabled = dev.run(["systemctl", "is-enabled", DAEMON], check=False).stdout.strip()
    active = dev.run(["systemctl", "is-active", DAEMON], check=False).stdout.strip()
    # 2. The app: a system user, its data dir, the stand-in program and its unit.
    dev.run("id zmonitor >/dev/null 2>&1 || useradd --system --home-dir /var/lib/zmonitor "
            "--shell /usr/sbin/nologin zmonitor")
    dev.run(["install", "-d", "-o", "zmonitor", "-g", "zmonitor", "-m", "0750",
             "/var/lib/zmonitor"])
    dev.put((HERE / "zmonitor_standin.py").read_bytes(),
            "/usr/local/lib/zmonitor/zmonitor_standin.py", 0o755)
    dev.put(APP_UNIT.encode(), f"/etc/systemd/system/{APP}")
    dev.put(CONFIG.encode(), "/etc/zmonitor-migrated/config.yaml")
    dev.run(["systemctl", "daemon-reload"])
    dev.run(["systemctl", "enable", APP])
    # 3. A signing key, trusted on the device.
    dev.run(["zmonitor-migrate", "keygen", f"{E2E}/keys/fleet"])
    dev.run(["cp", f"{E2E}/keys/fleet.pub", "/etc/zmonitor-migrated/trusted.d/fleet.pub"])
    # 4. The baseline database: the project's sample DB at version 4, vitals multiplied.
    dev.put((REPO / "tests/fixtures/sample_data.sql").read_bytes(), f"{E2E}/sample_data.sql")
    dev.put(_grow_vitals_sql(VITALS_ROWS).encode(), f"{E2E}/grow.sql")
    dev.run(f"rm -f {E2E}/baseline.db && sqlite3 {E2E}/baseline.db < {E2E}/sample_data.sql "
            f"&& sqlite3 {E2E}/baseline.db < {E2E}/grow.sql "
            f"&& sqlite3 {E2E}/baseline.db 'PRAGMA journal_mode=WAL;' >/dev/null", timeout=300)
    return Booted(dev=dev, install_output=res.stdout, enabled_after_install=enabled,
                  active_after_install=active, artifacts=logs)


def _grow_vitals_sql(rows: int) -> str:
    """Copy the sample's vitals (all three firmware generations) until ROWS exist."""
    return f"""
BEGIN;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n
                        WHERE i < ({rows} / (SELECT count(*) FROM vitals)) + 1)
INSERT INTO vitals (timestamp, patient_id, patient_mrn, heart_rate, spo2, respiration_rate,
                    temperature, blood_pressure_systolic, blood_pressure_diastolic,
                    signal_quality, device_id, device_label, is_synced)
SELECT v.timestamp - n.i * 1000, v.patient_id, v.patient_mrn, v.heart_rate, v.spo2,
       v.respiration_rate, v.temperature, v.blood_pressure_systolic,
       v.blood_pressure_diastolic, v.signal_quality, v.device_id, v.device_label, v.is_synced
FROM n, (SELECT * FROM vitals) AS v
LIMIT max(0, {rows} - (SELECT count(*) FROM vitals));
COMMIT;
"""


@pytest.fixture
def zm(booted: Booted) -> ZMonitor:
    z = ZMonitor(booted)
    try:
        z.reset()
    except DeviceError as exc:
        pytest.fail(f"could not reset the device to the baseline: {exc}\n{z.diagnostics()}")
    return z
