"""``zmonitor-migrate inventory`` and the Mender inventory script that wraps it.

Real runs on a device directory (``device`` fixture: real SQLite, real signed bundle, the
fake systemctl), then the command as mender-client would run it: a subprocess whose
stdout must be ``name=value`` lines that mender-client 3.4 parses (a line without ``=``
drops the script's whole output), with values that are one printable line holding no
``=``, and exit status 0 whatever it could not read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, Device

from zmonitor_migrated.inventory import MAX_VALUE_CHARS, value
from zmonitor_migrated.text import clean

SCRIPT = ROOT / "packaging" / "mender" / "mender-inventory-zmonitor-migrated"
_LINE = re.compile(r"(?P<key>zmonitor_[a-z0-9_]+)=(?P<value>[^=]*)")
# Keys that may repeat (mender-client merges them into a list); every other key once.
_REPEATABLE = {"zmonitor_migrate_operator_reason", "zmonitor_migrate_inventory_error"}


def parse(stdout: str) -> dict[str, list[str]]:
    """Parse as mender-client does, asserting the format on every line."""
    assert stdout.endswith("\n") and stdout.count("\r") == 0, repr(stdout)
    out: dict[str, list[str]] = {}
    for line in stdout.split("\n")[:-1]:
        m = _LINE.fullmatch(line)
        assert m, f"not a name=value inventory line: {line!r}"
        val = m["value"]
        assert clean(val) == val and len(val.splitlines()) <= 1, f"unprintable: {line!r}"
        assert len(val) <= MAX_VALUE_CHARS + 40, f"unbounded: {line!r}"
        out.setdefault(m["key"], []).append(val)
    for key, vals in out.items():
        assert len(vals) == 1 or key in _REPEATABLE, f"{key} repeated: {vals}"
    return out


def inventory(dev: Device) -> dict[str, list[str]]:
    proc = dev.cli("inventory")
    assert proc.returncode == 0, proc.stderr
    return parse(proc.stdout)


def one(inv: dict[str, list[str]], key: str) -> str:
    [val] = inv[key]
    return val


def digest_tree(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# -- after real runs ------------------------------------------------------------------------
def test_after_an_applied_run(device: Device, shipped_bundle: Path) -> None:
    applied = device.cli("apply", str(shipped_bundle))
    assert applied.returncode == 0, applied.stderr
    inv = inventory(device)
    assert one(inv, "zmonitor_db_schema_version") == "14"
    assert one(inv, "zmonitor_migrate_last_sequence") == "1"
    assert one(inv, "zmonitor_migrate_last_outcome") == "applied"
    assert one(inv, "zmonitor_migrate_last_bundle") == "zmonitor"
    assert one(inv, "zmonitor_migrate_last_run_id") == device.history()[-1]["run_id"]
    at = one(inv, "zmonitor_migrate_last_run_at")
    t = time.mktime(time.strptime(at, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert abs(t - time.time()) < 300, at
    assert one(inv, "zmonitor_migrate_run_in_progress") == "no"
    assert one(inv, "zmonitor_migrate_operator_needed") == "no"
    assert "zmonitor_migrate_inventory_error" not in inv
    assert "zmonitor_migrate_last_error" not in inv


def test_after_a_failed_and_restored_run(device: Device, shipped_bundle: Path) -> None:
    device.fault("fail-start", "once")
    failed = device.cli("apply", str(shipped_bundle))
    assert failed.returncode == 5, failed.stderr
    inv = inventory(device)
    assert one(inv, "zmonitor_db_schema_version") == "10"
    assert one(inv, "zmonitor_migrate_last_outcome") == "restored"
    assert one(inv, "zmonitor_migrate_last_error") == "unit"
    # The bundle was admitted before the run failed: the floor keeps its sequence.
    assert one(inv, "zmonitor_migrate_last_sequence") == "1"
    # Restored: the device runs on its old database and takes the next bundle.
    assert one(inv, "zmonitor_migrate_operator_needed") == "no"


def test_after_a_failed_restore_an_operator_is_needed(device: Device,
                                                      shipped_bundle: Path) -> None:
    device.fault("corrupt-backups-on-start", str(device.root / "backups"))
    proc = device.cli("apply", str(shipped_bundle))
    assert proc.returncode == 6, proc.stderr
    inv = inventory(device)
    assert one(inv, "zmonitor_migrate_last_outcome") == "restore-failed"
    assert one(inv, "zmonitor_migrate_operator_needed") == "yes"
    [reason] = inv["zmonitor_migrate_operator_reason"]
    assert "could not restore" in reason and "zmonitor-migrate restore" in reason


def test_json_holds_the_same_attributes(device: Device, shipped_bundle: Path) -> None:
    assert device.cli("apply", str(shipped_bundle)).returncode == 0
    lines = inventory(device)
    proc = device.cli("inventory", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True
    assert doc["inventory"] == {k: v[0] for k, v in lines.items()}


# -- read-only -------------------------------------------------------------------------------
def test_an_open_run_is_reported_and_left_alone(device: Device) -> None:
    """An interrupted run in an unsafe phase: `gate` would finish it; inventory only
    looks (no recovery, no lock, not a byte written)."""
    state = device.root / "state"
    state.mkdir(exist_ok=True)
    journal = {"run_id": "20260101T000000Z-abcd", "phase": "applying", "outcome": None,
               "failed": False, "data": {}, "phases": [["received", 1.0], ["applying", 2.0]]}
    (state / "journal.json").write_text(json.dumps(journal))
    device.systemctl("stop", "zmonitor.service")  # the app writes to its database
    calls = device.calls()
    before = digest_tree(state, device.db.parent)
    names_before = sorted(p.name for p in state.iterdir())
    inv = inventory(device)
    assert one(inv, "zmonitor_migrate_run_in_progress") == "yes"
    assert one(inv, "zmonitor_migrate_run_phase") == "applying"
    assert digest_tree(state, device.db.parent) == before
    assert sorted(p.name for p in state.iterdir()) == names_before  # no lock file, no floor
    assert device.calls() == calls  # no unit started or stopped


# -- whatever cannot be read: printed as an error line, exit 0 -------------------------------
def _break_database(dev: Device) -> str:
    dev.db.write_bytes(b"this is not an SQLite database" * 100)
    return "database"


def _break_floor(dev: Device) -> str:
    (dev.root / "state").mkdir(exist_ok=True)
    (dev.root / "state" / "anti-rollback.json").write_text('{"sequence": "x=1\\nfoo"}')
    return "anti-rollback state"


def _break_journal(dev: Device) -> str:
    (dev.root / "state").mkdir(exist_ok=True)
    (dev.root / "state" / "journal.json").write_bytes(b"\xff{not json\nzmonitor_x=1")
    return "run journal"


def _floor_is_a_fifo(dev: Device) -> str:
    (dev.root / "state").mkdir(exist_ok=True)
    (dev.root / "state" / "anti-rollback.json").unlink()
    os.mkfifo(dev.root / "state" / "anti-rollback.json")
    return "anti-rollback state"


@pytest.mark.parametrize("breaker", [_break_database, _break_floor, _break_journal,
                                     _floor_is_a_fifo])
def test_an_unreadable_source_is_an_error_line_and_exit_0(device: Device, shipped_bundle: Path,
                                                           breaker: object) -> None:
    assert device.cli("apply", str(shipped_bundle)).returncode == 0
    source = breaker(device)  # type: ignore[operator]
    proc = device.cli("inventory", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    inv = parse(proc.stdout)
    assert any(e.startswith(f"{source}: ") for e in inv["zmonitor_migrate_inventory_error"])
    assert one(inv, "zmonitor_migrate_operator_needed") == "yes"
    # The other sources are still reported.
    assert one(inv, "zmonitor_migrate_last_outcome") == "applied"
    assert "zmonitor_migrate_version" in inv


def test_a_missing_database_needs_an_operator(device: Device) -> None:
    device.systemctl("stop", "zmonitor.service")
    device.db.unlink()
    inv = inventory(device)
    assert "zmonitor_db_schema_version" not in inv
    assert one(inv, "zmonitor_migrate_operator_needed") == "yes"
    assert one(inv, "zmonitor_migrate_last_outcome") == "none"


# -- hostile text: one attribute a line, no second "=" -----------------------------------------
HOSTILE = [
    "evil\nzmonitor_migrate_operator_needed=no",
    "evil\rzmonitor_db_schema_version=99",
    "a\u2028zmonitor_migrate_operator_needed=no",
    "a\x85b\x0bc\x0cd\x1ce",
    "name=value=more",
    "100% sure %3D",
    "\x1b[2J\x1b]0;title\x07",
    "\u202eevil\u2066",
    "\udcff\udc80 not utf-8",
    "\x00nul",
    "x" * 100_000,
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_value_is_one_printable_line_without_equals(text: str) -> None:
    v = value(text)
    assert "=" not in v and len(v.splitlines()) <= 1 and clean(v) == v
    assert len(v) <= MAX_VALUE_CHARS + 40
    v.encode("utf-8")


def test_a_hostile_history_record_cannot_add_an_attribute(device: Device) -> None:
    """A damaged or hand-edited history line: every string in it comes out as one value."""
    state = device.root / "state"
    state.mkdir(exist_ok=True)
    record = {"run_id": "r1=x\nzmonitor_migrate_operator_needed=no",
              "bundle": "evil\u2028zmonitor_db_schema_version=99",
              "outcome": "applied\nzmonitor_migrate_last_sequence=999",
              "finished_at": "not a time", "error": {"kind": "k=v\r\nx=y"}}
    (state / "history.jsonl").write_text(json.dumps(record) + "\n")
    inv = inventory(device)
    assert one(inv, "zmonitor_db_schema_version") == "10"
    assert one(inv, "zmonitor_migrate_last_sequence") == "0"
    assert one(inv, "zmonitor_migrate_operator_needed") == "no"
    assert one(inv, "zmonitor_migrate_last_outcome") == \
        "applied\\nzmonitor_migrate_last_sequence%3D999"
    assert "zmonitor_migrate_last_run_at" not in inv
    assert one(inv, "zmonitor_migrate_last_error") == "k%3Dv\\r\\nx%3Dy"


# -- the script mender-client runs -------------------------------------------------------------
def _shim(tmp_path: Path, dev: Device) -> dict[str, str]:
    """The installed CLI, as the script finds it: $ZMONITOR_MIGRATE."""
    shim = tmp_path / "zmonitor-migrate"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m zmonitor_migrated.cli "$@"\n')
    shim.chmod(0o755)
    return {**dev.env, "ZMONITOR_MIGRATE": str(shim),
            "ZMONITOR_MIGRATE_CONFIG": str(dev.config_path)}


def test_script_is_what_mender_client_runs() -> None:
    """mender-client 3.4 runs files named mender-inventory-* with an execute bit."""
    assert SCRIPT.name.startswith("mender-inventory-")
    assert SCRIPT.stat().st_mode & stat.S_IXUSR
    install = (ROOT / "packaging" / "debian" / "zmonitor-migrated.install").read_text()
    assert f"packaging/mender/{SCRIPT.name} usr/share/mender/inventory/" in install.splitlines()


def test_script_prints_the_inventory(device: Device, shipped_bundle: Path,
                                     tmp_path: Path) -> None:
    assert device.cli("apply", str(shipped_bundle)).returncode == 0
    proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env=_shim(tmp_path, device))
    assert proc.returncode == 0, proc.stderr
    assert parse(proc.stdout) == inventory(device)


def test_script_says_so_when_the_command_cannot_run(device: Device, tmp_path: Path) -> None:
    env = {**_shim(tmp_path, device), "ZMONITOR_MIGRATE_CONFIG": str(tmp_path / "missing")}
    proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    inv = parse(proc.stdout)
    assert one(inv, "zmonitor_migrate_operator_needed") == "yes"
    assert one(inv, "zmonitor_migrate_inventory_error").startswith(
        "zmonitor-migrate inventory exited 2")
