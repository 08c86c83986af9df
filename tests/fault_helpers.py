"""Helpers for the issue-6 fault-injection tests (``tests/test_faults_*.py``).

``TALLY`` counts every injected fault and its outcome; ``conftest.pytest_terminal_summary``
prints it at the end of the session (faults injected, runs, data lost, app left stopped:
the last two must be zero). ``settle`` is the check applied after every fault: the
database is the old content (every row that existed before, the running monitor may
have appended vitals) or the fully migrated, valid one; the journal is closed; no temp
files are left; the app runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from conftest import ROOT, Device, max_vitals_rowid, table_rows

from zmonitor_migrated import dbinfo


@dataclass
class Tally:
    faults: Counter[str] = field(default_factory=Counter)
    runs: int = 0
    data_lost: list[str] = field(default_factory=list)
    app_left_stopped: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    def lines(self) -> list[str]:
        if not self.faults:
            return []
        out = [f"faults injected: {sum(self.faults.values())} "
               f"({', '.join(f'{k} {v}' for k, v in sorted(self.faults.items()))})",
               f"runs of the CLI/daemon/Mender module: {self.runs}",
               f"outcomes: {', '.join(f'{k} {v}' for k, v in sorted(self.outcomes.items()))}",
               f"data lost: {len(self.data_lost)}" + (f" {self.data_lost}" if self.data_lost
                                                      else ""),
               f"app left stopped: {len(self.app_left_stopped)}"
               + (f" {self.app_left_stopped}" if self.app_left_stopped else "")]
        return out


TALLY = Tally()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def journal_phase(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text())["phase"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


@dataclass
class Before:
    upto: int
    rows: dict[str, list[tuple[object, ...]]]
    version: int


def before(dev: Device) -> Before:
    conn = sqlite3.connect(f"file:{dev.db}?mode=ro", uri=True)
    try:
        version = dbinfo.current_version(conn)
    finally:
        conn.close()
    upto = max_vitals_rowid(dev.db)
    return Before(upto=upto, rows=table_rows(dev.db, vitals_up_to=upto), version=version)


def old_or_migrated(dev: Device, ref: Before, target: int = 14) -> str:
    """'old' or 'migrated'; raises AssertionError (counted as data lost) otherwise."""
    conn = sqlite3.connect(f"file:{dev.db}?mode=ro", uri=True)
    try:
        version = dbinfo.current_version(conn)
        if version == ref.version:
            assert table_rows(dev.db, vitals_up_to=ref.upto) == ref.rows, \
                "old version but rows differ from before the run"
            return "old"
        assert version == target, f"version {version}: neither old nor migrated"
        assert dbinfo.integrity_problems(conn) == []
        assert dbinfo.fk_problems(conn) == []
        n = conn.execute("SELECT COUNT(*) FROM vitals WHERE rowid <= ?", (ref.upto,))
        assert n.fetchone()[0] == len(ref.rows["vitals"]), "vitals rows lost"
        nulls = conn.execute("SELECT COUNT(*) FROM vitals WHERE rowid <= ? AND "
                             "early_warning_score IS NULL", (ref.upto,)).fetchone()[0]
        assert nulls == 0, "migrated version but 0012 did not score every row"
        return "migrated"
    finally:
        conn.close()


def leftovers(dev: Device) -> list[str]:
    out = []
    for d in (dev.db.parent, dev.root / "backups", dev.root / "state"):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if ".migrating-" in p.name or p.name.endswith(".restoring") or ".tmp-" in p.name:
                out.append(str(p))
    runs = dev.root / "state" / "runs"
    if runs.is_dir():
        out += [str(p) for p in runs.iterdir()]
    return out


def settle(dev: Device, ref: Before, label: str, target: int = 14) -> str:
    """The after-every-fault check; counts data loss and a stopped app in TALLY."""
    try:
        state = old_or_migrated(dev, ref, target)
    except AssertionError as exc:
        TALLY.data_lost.append(f"{label}: {exc}")
        raise
    TALLY.outcomes[state] += 1
    if not dev.app_active():
        TALLY.app_left_stopped.append(label)
        raise AssertionError(f"{label}: app left stopped")
    j = json.loads((dev.root / "state" / "journal.json").read_text())
    assert j.get("outcome"), f"{label}: journal still open in {j['phase']}"
    assert leftovers(dev) == [], f"{label}: {leftovers(dev)}"
    return state


def cli_popen(dev: Device, *args: str) -> subprocess.Popen[str]:
    TALLY.runs += 1
    return subprocess.Popen(
        [sys.executable, "-m", "zmonitor_migrated.cli", "--config", str(dev.config_path),
         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dev.env,
        cwd=ROOT, start_new_session=True)


def run_cli(dev: Device, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    TALLY.runs += 1
    return dev.cli(*args, timeout=timeout)


def kill_at_phase(proc: subprocess.Popen[str], journal: Path, phases: set[str],
                  timeout: float = 120) -> str | None:
    """SIGKILL ``proc`` as soon as the journal shows one of ``phases``; the phase the
    journal shows once the process is dead (None if it finished first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if journal_phase(journal) in phases:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return journal_phase(journal)
        time.sleep(0.0005)
    proc.kill()
    proc.wait()
    return None
