"""The package removed and upgraded under a real systemd and dpkg, while the daemon is
idle and during a long run; and what journald keeps of a run killed in its downtime.

Removal and upgrade must stop the daemon before dpkg touches its files, and never in the
middle of a run: the prerm waits for the run (bounded, saying so) or refuses. The
upgrades install the same .deb with its version bumped (built here from the session's
.deb). Every test leaves the shared container as the others expect it: the session's
.deb installed.

A run holds the run lock from its start (the rehearsal, with the app running) through
the downtime and the health gate to its end; the full bundle on the baseline database
takes about 15 s, time for two package commands to land in it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import APP, DAEMON, E2E, STATE, Booted, ZMonitor

pytestmark = pytest.mark.e2e

PACKAGE = "zmonitor-migrated"
APT = "DEBIAN_FRONTEND=noninteractive apt-get -y -o Dpkg::Options::=--force-confold"


def _bumped(deb: Path, out: Path, version: str) -> Path:
    """DEB with its version changed to VERSION, nothing else."""
    tree = out / f"tree-{version}"
    shutil.rmtree(tree, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", control.read_text()))
    dest = out / f"{PACKAGE}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(dest)], check=True,
                   capture_output=True)
    return dest


@pytest.fixture(scope="module")
def debs(deb_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths inside the container: the session's .deb and two bumped versions."""
    out = tmp_path_factory.mktemp("debs")
    base = subprocess.run(["dpkg-deb", "-f", str(deb_path), "Version"], check=True,
                          capture_output=True, text=True).stdout.strip()
    return {"orig": str(deb_path), "v1": str(_bumped(deb_path, out, f"{base}+e2e1")),
            "v2": str(_bumped(deb_path, out, f"{base}+e2e2")), "base": base}


@pytest.fixture(scope="module", autouse=True)
def device_as_found(booted: Booted, debs: dict[str, str]) -> Iterator[None]:
    """Afterwards, pass or fail: the session's .deb installed, as provisioned."""
    yield
    dev = booted.dev
    dev.put(Path(debs["orig"]).read_bytes(), f"{E2E}/pkg/orig.deb")
    dev.run(f"{APT} --allow-downgrades install {E2E}/pkg/orig.deb", check=False, timeout=300)


def _put_deb(zm: ZMonitor, host: str, name: str) -> str:
    inside = f"{E2E}/pkg/{name}.deb"
    zm.dev.put(Path(host).read_bytes(), inside)
    return inside


def _apt(zm: ZMonitor, args: str, env: str = "") -> subprocess.CompletedProcess[str]:
    return zm.run(f"{env} {APT} {args} 2>&1", timeout=600)


def _installed(zm: ZMonitor) -> tuple[str, str]:
    res = zm.run(["dpkg-query", "-W", "-f=${Status}|${Version}", PACKAGE])
    status, _, version = res.stdout.partition("|")
    return status, version


def _unit_log(zm: ZMonitor, since: str) -> str:
    return zm.run(["journalctl", "--no-pager", "-o", "cat", "-u", DAEMON, "--since", since]
                  ).stdout


def _now(zm: ZMonitor) -> str:
    return zm.run(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()


def _start_long_run(zm: ZMonitor, name: str) -> str:
    """Drop the full bundle and wait until its run has begun: from here it holds the
    run lock through the rehearsal, the downtime and the health gate (about 15 s on
    the baseline database, 2 cores)."""
    dropped = zm.drop(zm.build(zm.make_source("full"), 1, name))
    zm.wait_for("the run to begin", lambda: zm.journal().get("phase") is not None
                and zm.journal().get("outcome") is None, 180, 0.05)
    return dropped


def _last_run(zm: ZMonitor) -> dict[str, object]:
    """The last history record, read from the file (the CLI may be removed)."""
    lines = zm.run(["cat", f"{STATE}/history.jsonl"]).stdout.splitlines()
    return dict(json.loads(lines[-1]))


def _no_traceback(log: str) -> None:
    assert "Traceback" not in log and "FileNotFoundError" not in log, log


def test_a_run_killed_in_its_downtime_is_recovered_at_warning_priority(zm: ZMonitor) -> None:
    """A run (the CLI's) SIGKILLed while the app is down; the daemon's start-up recovery,
    as at boot, is logged at warning priority and records the downtime."""
    bundle = zm.build(zm.make_source("full"), 1, "zmonitor-killed")
    since = _now(zm)
    res = zm.run(
        f"zmonitor-migrate apply {bundle} >/dev/null 2>&1 & pid=$!; i=0; "
        "while [ $i -lt 18000 ]; do "
        f"if grep -q '\"phase\": \"applying\"' {STATE}/journal.json 2>/dev/null; then "
        "kill -9 $pid; exit 0; fi; i=$((i+1)); sleep 0.01; done; exit 1", timeout=300)
    assert res.returncode == 0, "the run never reached applying"
    assert zm.journal()["phase"] == "applying" and zm.is_active(APP) != "active"
    assert zm.systemctl("restart", DAEMON).returncode == 0  # recovery before READY=1
    assert zm.is_active(APP) == "active" and zm.version() == 4
    warnings = zm.run(["journalctl", "--no-pager", "-o", "cat", "-u", DAEMON, "--since",
                       since, "-p", "warning"]).stdout
    assert re.search(r"recover: run \S+ was interrupted in phase applying; recovery: discard",
                     warnings), warnings
    assert re.search(r"recover: run \S+: recovered-old, downtime \d+\.\d\d s", warnings), \
        warnings
    last = _last_run(zm)
    assert last["recovered"] is True and isinstance(last["downtime_s"], float), last


def test_upgrade_while_idle_restarts_the_daemon_on_the_new_version(
        zm: ZMonitor, debs: dict[str, str]) -> None:
    pkg = _put_deb(zm, debs["v1"], "v1")
    since = _now(zm)
    pid = zm.prop(DAEMON, "MainPID")
    res = _apt(zm, f"install {pkg}")
    assert res.returncode == 0, res.stdout
    assert "stopping zmonitor-migrate.service for the package upgrade" in res.stdout
    assert _installed(zm) == ("install ok installed", f"{debs['base']}+e2e1")
    zm.wait_for("the daemon running again", lambda: zm.is_active(DAEMON) == "active", 60)
    assert zm.prop(DAEMON, "MainPID") != pid, "the daemon was not restarted"
    assert zm.run(["test", "-e", "/run/zmonitor-migrated.package-restart"]).returncode != 0
    _no_traceback(_unit_log(zm, since))
    # status.json is for the fleet agent, which need not be root.
    zm.wait_for("status.json", lambda: zm.run(
        ["test", "-s", "/run/zmonitor-migrated/status.json"]).returncode == 0, 30)
    assert zm.run(["stat", "-c", "%a", "/run/zmonitor-migrated/status.json"]
                  ).stdout.strip() == "644"
    read = zm.run(["runuser", "-u", "nobody", "--", "cat", "/run/zmonitor-migrated/status.json"])
    assert read.returncode == 0 and json.loads(read.stdout)["phase"] == "idle", read.stderr


def test_during_a_long_run_remove_is_refused_and_upgrade_waits_for_the_run(
        zm: ZMonitor, debs: dict[str, str]) -> None:
    """One run, two package commands landing in it: a removal given no time to wait is
    refused and changes nothing; an upgrade with the default wait lets the run finish,
    then stops the daemon, upgrades and starts it again."""
    pkg = _put_deb(zm, debs["v2"], "v2")
    since = _now(zm)
    name = _start_long_run(zm, "zmonitor-long-run")
    res = _apt(zm, "remove zmonitor-migrated", env="ZMONITOR_MIGRATE_PACKAGE_WAIT_S=0")
    assert res.returncode != 0, res.stdout
    assert re.search(r"migration run \S+ \(phase \w+\) is still in progress after 0 s; the "
                     r"package remove is refused and nothing was changed", res.stdout), res.stdout
    assert "systemctl stop zmonitor-migrate.service" in res.stdout
    assert _installed(zm) == ("install ok installed", f"{debs['base']}+e2e1")
    assert zm.journal().get("outcome") is None, "the refusal ended the run"
    assert zm.is_active(DAEMON) == "active"

    res = _apt(zm, f"install {pkg}")
    assert res.returncode == 0, res.stdout
    assert re.search(r"migration run \S+ \(phase \w+\) is in progress; waiting for it to "
                     r"end before the package upgrade stops the daemon", res.stdout), res.stdout
    assert "stopping zmonitor-migrate.service for the package upgrade" in res.stdout
    assert _installed(zm) == ("install ok installed", f"{debs['base']}+e2e2")
    last = _last_run(zm)
    assert last["outcome"] == "applied", last  # the run was not cut by the upgrade
    assert zm.version() == 14 and zm.sql("PRAGMA integrity_check") == "ok"
    assert zm.has("archive", name)
    zm.wait_for("the daemon running again", lambda: zm.is_active(DAEMON) == "active", 60)
    assert zm.is_active(APP) == "active"
    _no_traceback(_unit_log(zm, since))


def test_remove_while_idle_stops_the_daemon_before_its_files_go(
        zm: ZMonitor, debs: dict[str, str]) -> None:
    since = _now(zm)
    assert zm.is_active(DAEMON) == "active"
    res = _apt(zm, "remove zmonitor-migrated")
    assert res.returncode == 0, res.stdout
    assert "stopping zmonitor-migrate.service for the package remove" in res.stdout
    assert _installed(zm)[0] == "deinstall ok config-files"
    assert zm.is_active(DAEMON) != "active"
    log = _unit_log(zm, since)
    _no_traceback(log)
    # Stopped by the prerm and exited cleanly, before dpkg removed a file.
    assert "Deactivated successfully" in log and "Failed with result" not in log, log
    assert zm.is_active(APP) == "active"
    res = _apt(zm, f"--allow-downgrades install {_put_deb(zm, debs['orig'], 'orig')}")
    assert res.returncode == 0, res.stdout
    assert _installed(zm) == ("install ok installed", debs["base"])
    # As a first install leaves it, which the other tests expect.
    assert zm.systemctl("is-enabled", DAEMON).stdout.strip() == "enabled"
    assert zm.systemctl("is-enabled", "zmonitor-migrate.path").stdout.strip() == "disabled"
