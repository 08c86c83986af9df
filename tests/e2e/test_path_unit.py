"""The optional ``zmonitor-migrate.path`` unit under a real systemd.

The README's alternative setup: the daemon disabled at boot, the path unit enabled, so
systemd starts the daemon only when a ``*.zmb`` is renamed into the inbox. The test
switches the shared container to that setup, drives it with real bundles and puts the
default back (service enabled and running, path unit disabled) whatever happens, so the
other tests find the device as they expect in any order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from .harness import APP, DAEMON, INBOX, ZMonitor, phase_starts

pytestmark = pytest.mark.e2e

PATH_UNIT = "zmonitor-migrate.path"


def _is_enabled(zm: ZMonitor, unit: str) -> str:
    return zm.systemctl("is-enabled", unit).stdout.strip()


def _stops(zm: ZMonitor) -> int:
    return sum(1 for e in zm.ledger() if e[0] == "stop")


def _tampered_copy(zm: ZMonitor, bundle: str) -> str:
    """BUNDLE with one bit flipped in a signed migration's text."""
    data = bytearray(zm.dev.path(bundle).read_bytes())
    idx = data.find(b"early_warning_score INTEGER")
    assert idx > 0, "could not find a migration's text in the bundle"
    data[idx] ^= 0x20
    tampered = bundle.replace(".zmb", "-tampered.zmb")
    zm.dev.put(bytes(data), tampered)
    return tampered


def _daemon_starts(zm: ZMonitor) -> int:
    """Monotonic µs of the daemon's last start (0 if never started)."""
    return int(zm.prop(DAEMON, "ExecMainStartTimestampMonotonic") or 0)


@pytest.fixture
def path_setup(zm: ZMonitor) -> Iterator[ZMonitor]:
    """The device with the daemon disabled and stopped, the path unit enabled and waiting;
    afterwards (pass or fail) the package's default again."""
    # As shipped: present, not enabled (checked before this test changes anything).
    assert zm.systemctl("cat", PATH_UNIT).returncode == 0, "the .path unit is not installed"
    assert _is_enabled(zm, PATH_UNIT) == "disabled"
    assert _is_enabled(zm, DAEMON) == "enabled"
    try:
        res = zm.systemctl("disable", "--now", DAEMON)
        assert res.returncode == 0, res.stderr
        res = zm.systemctl("enable", "--now", PATH_UNIT)
        assert res.returncode == 0, res.stderr
        yield zm
    finally:
        # Path unit first, so a bundle left behind by a failure triggers nothing.
        zm.systemctl("disable", "--now", PATH_UNIT)
        zm.systemctl("reset-failed", PATH_UNIT)
        zm.systemctl("enable", "--now", DAEMON)
    assert _is_enabled(zm, PATH_UNIT) == "disabled"
    assert zm.is_active(PATH_UNIT) == "inactive"
    assert _is_enabled(zm, DAEMON) == "enabled"
    assert zm.is_active(DAEMON) == "active", zm.diagnostics()


def test_path_unit_starts_the_daemon_for_a_bundle_and_it_stays_in_charge(
        path_setup: ZMonitor) -> None:
    zm = path_setup
    assert _is_enabled(zm, DAEMON) == "disabled"
    assert zm.is_active(DAEMON) == "inactive", zm.diagnostics()
    assert zm.is_active(PATH_UNIT) == "active"
    assert zm.prop(PATH_UNIT, "SubState") == "waiting"
    assert PATH_UNIT in zm.prop(DAEMON, "TriggeredBy").split()
    assert zm.version() == 4
    app_pid = zm.prop(APP, "MainPID")

    # 1. A delivery in progress does not match the unit's glob: the daemon stays down.
    #    (NAME.partial here; zm.drop below uses the other documented form, .NAME.partial.)
    bundle = zm.build(zm.make_source("full"), 1, "zmonitor-s1")
    name = "zmonitor-s1.zmb"
    zm.run(["cp", bundle, f"{INBOX}/{name}.partial"], check=True)
    time.sleep(2.0)
    assert zm.is_active(DAEMON) == "inactive", "a .partial file started the daemon"
    assert zm.version() == 4

    # 2. The rename completes it: the path unit starts the daemon, which applies it once.
    started_before = _daemon_starts(zm)
    zm.run(["mv", f"{INBOX}/{name}.partial", f"{INBOX}/{name}"], check=True)
    zm.wait_for("the path unit to start the daemon",
                lambda: zm.is_active(DAEMON) in ("activating", "active"), 30, 0.1)
    assert _daemon_starts(zm) > started_before
    assert zm.prop(PATH_UNIT, "SubState") == "running"
    record = zm.wait_settled(name, "archive")
    assert record["outcome"] == "applied", record
    assert (record["from_version"], record["to_version"]) == (4, 14)
    assert [r["outcome"] for r in zm.history()] == ["applied"]
    assert sum(1 for f in zm.files("archive") if f.endswith(f"-{name}")) == 1
    assert zm.files("inbox") == []
    assert zm.version() == 14
    assert zm.sql("SELECT count(*) = count(DISTINCT version) FROM schema_version") == "1"
    assert zm.sql("PRAGMA integrity_check") == "ok"
    # the daemon stays up; the app is a new process on the migrated database, writing
    assert zm.is_active(DAEMON) == "active"
    new_pid = zm.prop(APP, "MainPID")
    assert new_pid not in ("", "0", app_pid), (app_pid, new_pid)
    swapped_ms = int(phase_starts(zm.journal())["swapped"] * 1000)
    assert zm.app_sessions()[-1][0] >= swapped_ms, "the running app started before the swap"
    zm.wait_for("the app writing on version 14", lambda: int(zm.sql(
        f"SELECT count(*) FROM vitals WHERE device_id = 'standin' "
        f"AND timestamp > {swapped_ms}")) > 50, 20)
    assert zm.version() == 14

    # 3. Daemon stopped again: the path unit re-arms, and a tampered bundle brings the
    #    daemon back, which rejects it without touching the app.
    assert zm.systemctl("stop", DAEMON).returncode == 0
    zm.wait_for("the path unit waiting again",
                lambda: zm.prop(PATH_UNIT, "SubState") == "waiting", 30)
    assert zm.is_active(DAEMON) == "inactive"
    stops = _stops(zm)
    started_before = _daemon_starts(zm)
    bad = zm.drop(_tampered_copy(zm, bundle))
    record = zm.wait_settled(bad, "rejected", 120)
    assert _daemon_starts(zm) > started_before, "the daemon was not started for the bundle"
    assert record["outcome"] == "rejected", record
    assert any(f == f"{bad}.reason.json" for f in zm.files("rejected"))
    assert zm.prop(APP, "MainPID") == new_pid, "the app was restarted"
    assert _stops(zm) == stops, "the app was stopped"
    assert zm.version() == 14

    # 4. The daemon, still running, sees the already-applied bundle again: a no-op.
    again = zm.drop(bundle, "zmonitor-s1-again.zmb")
    record = zm.wait_settled(again, "archive", 120)
    assert record["outcome"] == "up-to-date", record
    assert [r["outcome"] for r in zm.history()] == ["applied", "rejected", "up-to-date"]
    assert zm.prop(APP, "MainPID") == new_pid, "the app was restarted"
    assert _stops(zm) == stops, "the app was stopped"
    assert zm.version() == 14
    assert zm.files("inbox") == []
    assert zm.is_active(DAEMON) == "active"
