"""The package on a device: apt install, units, hardening, the app stand-in, lintian."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from .harness import APP, DAEMON, DB, Booted, ZMonitor

pytestmark = pytest.mark.e2e


def test_lintian_reports_no_errors(deb_path: Path) -> None:
    res = subprocess.run(["lintian", "--fail-on", "error", str(deb_path)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not re.search(r"^E: ", res.stdout, re.M), res.stdout


def test_apt_installs_the_deb_with_debian_dependencies(booted: Booted) -> None:
    dev = booted.dev
    for pkg in ("zmonitor-migrated", "python3-yaml", "python3-cryptography",
                "python3-watchdog", "python3-sdnotify"):
        res = dev.run(["dpkg-query", "-W", "-f=${Status}", pkg], check=False)
        assert res.stdout == "install ok installed", f"{pkg}: {res.stdout} {res.stderr}"
    res = dev.run(["dpkg-query", "-W", "-f=${Conffiles}", "zmonitor-migrated"])
    assert "/etc/zmonitor-migrated/config.yaml" in res.stdout
    assert dev.run(["test", "-x", "/usr/share/mender/modules/v3/zmonitor-migration"],
                   check=False).returncode == 0
    assert dev.run(["test", "-f", "/usr/share/zmonitor-migrated/bundles/zmonitor/bundle.yaml"],
                   check=False).returncode == 0


def test_install_enables_the_daemon_without_starting_it(booted: Booted) -> None:
    assert booted.enabled_after_install == "enabled"
    assert booted.active_after_install in ("inactive", "unknown"), booted.active_after_install


def test_app_drop_in_is_loaded(booted: Booted) -> None:
    res = booted.dev.run(["systemctl", "show", "-p", "DropInPaths", "--value", APP])
    assert "10-zmonitor-migrated.conf" in res.stdout
    res = booted.dev.run(["systemctl", "cat", APP])
    assert "ExecStartPre=+/usr/bin/zmonitor-migrate gate" in res.stdout


def test_security_exposure_of_the_loaded_unit_is_ok(booted: Booted) -> None:
    res = booted.dev.run(["systemd-analyze", "security", "--no-pager", DAEMON], check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", res.stdout)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 4.0, res.stdout
    print(f"systemd-analyze security {DAEMON}: {m.group(1)} {m.group(2)}")


def test_standin_app_holds_the_db_and_writes_vitals(zm: ZMonitor) -> None:
    assert zm.is_active(APP) == "active"
    before = int(zm.sql("SELECT count(*) FROM vitals WHERE device_id = 'standin'"))
    time.sleep(1.0)
    after = int(zm.sql("SELECT count(*) FROM vitals WHERE device_id = 'standin'"))
    assert after - before > 50, (before, after)
    pid = zm.prop(APP, "MainPID")
    res = zm.run(f"ls -l /proc/{pid}/fd | grep -c {DB}")
    assert int(res.stdout.strip() or 0) >= 1, "the app does not hold the database open"


def test_daemon_runs_under_its_sandbox(zm: ZMonitor) -> None:
    assert zm.is_active(DAEMON) == "active", zm.diagnostics()
    assert zm.prop(DAEMON, "Type") == "notify"
    assert zm.prop(DAEMON, "WatchdogUSec") not in ("0", "infinity", "")
    pid = zm.prop(DAEMON, "MainPID")
    status = zm.run(["cat", f"/proc/{pid}/status"]).stdout
    cap_bnd = int(re.search(r"CapBnd:\s*([0-9a-f]+)", status).group(1), 16)  # type: ignore[union-attr]
    # CAP_CHOWN(0) | CAP_DAC_OVERRIDE(1) | CAP_FOWNER(3)
    assert cap_bnd == 0b1011, hex(cap_bnd)
    assert re.search(r"NoNewPrivs:\s*1", status)
    assert re.search(r"Seccomp:\s*2", status)
