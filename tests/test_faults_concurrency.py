"""Concurrency: the daemon (watching its inbox), the CLI ``apply`` and the Mender
update module (``packaging/mender/zmonitor-migration ArtifactInstall``) are handed the
same bundle at once. Exactly one run applies it (one "applied" record in the history,
one row in ``zmonitor_migrated_bundles``, each version once in ``schema_version``); the
others wait for the lock and find it applied, or exit 7; the app runs at the end.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, Device, make_device
from fault_helpers import TALLY, before, journal_phase, run_cli, settle

MENDER = ROOT / "packaging" / "mender" / "zmonitor-migration"


def _cli_wrapper(dev: Device) -> Path:
    path = dev.root / "zmonitor-migrate"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -m zmonitor_migrated.cli \"$@\"\n")
    path.chmod(0o755)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_daemon_cli_and_mender_at_once(device: Device, shipped_bundle: Path, tmp_path: Path,
                                       seed: int) -> None:
    rng = random.Random(seed)
    ref = before(device)
    env = {**device.env, "ZMONITOR_MIGRATE_CONFIG": str(device.config_path),
           "ZMONITOR_MIGRATE": str(_cli_wrapper(device))}
    inbox = device.root / "inbox"
    inbox.mkdir(exist_ok=True)
    daemon = subprocess.Popen([sys.executable, "-m", "zmonitor_migrated.cli", "daemon"],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    files = tmp_path / "mender-files"
    (files / "files").mkdir(parents=True)
    shutil.copy(shipped_bundle, files / "files" / shipped_bundle.name)
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def cli() -> None:
        results["cli"] = subprocess.run(
            [sys.executable, "-m", "zmonitor_migrated.cli", "apply", str(shipped_bundle)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)

    def mender() -> None:
        results["mender"] = subprocess.run(["sh", str(MENDER), "ArtifactInstall", str(files)],
                                           env=env, cwd=ROOT, capture_output=True, text=True,
                                           timeout=180)

    def drop() -> None:
        partial = inbox / (shipped_bundle.name + ".partial")
        shutil.copy(shipped_bundle, partial)
        past = time.time() - 10  # older than the daemon's settle time: picked up at once
        os.utime(partial, (past, past))
        partial.rename(inbox / shipped_bundle.name)

    try:
        time.sleep(0.5)  # the daemon's start-up recovery
        starters = [threading.Thread(target=f) for f in (cli, mender, drop)]
        rng.shuffle(starters)
        for t in starters:
            t.start()
        for t in starters:
            t.join(timeout=200)
        TALLY.runs += 3
        TALLY.faults["concurrent daemon + CLI + Mender"] += 1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(inbox.glob("*.zmb")):
            time.sleep(0.1)
        assert not any(inbox.glob("*.zmb")), "the daemon never took the bundle"
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        _out, err = daemon.communicate(timeout=60)
    print(err[-2000:])
    for name, proc in results.items():
        print(name, proc.returncode, proc.stderr[-600:])
        TALLY.outcomes[f"{name} exit {proc.returncode}"] += 1
    assert results["cli"].returncode in (0, 7), results["cli"].stderr
    assert results["mender"].returncode == 0, results["mender"].stderr
    assert daemon.returncode == 0, err
    outcomes = [r["outcome"] for r in device.history()]
    assert outcomes.count("applied") == 1, outcomes
    assert set(outcomes) <= {"applied", "up-to-date"}, outcomes
    archived = list((device.root / "state" / "archive").glob("*"))
    assert len(archived) == 1 and not list((device.root / "state" / "rejected").glob("*"))
    conn = sqlite3.connect(f"file:{device.db}?mode=ro", uri=True)
    try:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_version")]
        bundles = conn.execute("SELECT COUNT(*) FROM zmonitor_migrated_bundles").fetchone()[0]
    finally:
        conn.close()
    assert sorted(versions) == sorted(set(versions)) and max(versions) == 14
    assert bundles == 1
    assert settle(device, ref, f"concurrency seed {seed}") == "migrated"


@pytest.mark.slow
def test_live_file_written_while_the_app_is_stopped_is_not_swapped(
        tmp_path: Path, big_db_v10: Path, slow_bundle: Path,
        release_key: tuple[Path, Path]) -> None:
    """Something other than the app writes the live file after the working copy was
    taken (a rogue process, a tool that "touches" it): the copy, the backup and its
    sha256 would no longer be the same bytes, so the run must not swap."""
    dev = make_device(tmp_path / "dev", big_db_v10, release_key[1])
    dev.set_config(batch_size=1)  # the bundle's 25-row batches: seconds of applying
    assert dev.systemctl("start", "zmonitor.service").returncode == 0
    ref = before(dev)
    journal = dev.root / "state" / "journal.json"
    wrote: list[str] = []

    def rogue() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and journal_phase(journal) != "applying":
            time.sleep(0.001)
        with open(dev.db, "r+b") as f:  # the same bytes back: only the write shows
            header = f.read(100)
            f.seek(0)
            f.write(header)
        wrote.append(journal_phase(journal) or "?")

    t = threading.Thread(target=rogue, daemon=True)
    t.start()
    proc = run_cli(dev, "apply", str(slow_bundle))
    t.join(timeout=30)
    TALLY.faults["live file written while the app was stopped"] += 1
    TALLY.outcomes[f"cli exit {proc.returncode}"] += 1
    assert wrote == ["applying"], wrote
    assert proc.returncode == 5, proc.stderr
    assert "[concurrent-writer]" in proc.stderr
    assert settle(dev, ref, "live file written while stopped") == "old"
    assert dev.history()[-1]["outcome"] == "restored"
    dev.systemctl("stop", "zmonitor.service")
