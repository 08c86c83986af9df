"""Crash faults: SIGKILL aimed at the backup, the swap and a restore, then
recovery itself killed at a random instant and run again.

The kill point is found honestly, without a hook in the product: the test polls the
run's journal (written before each phase's work) and kills the whole process group as
soon as it shows the wanted phase; the phase the journal shows after the death is what
is asserted on. Then ``recover`` is started and SIGKILLed after a random delay, and
``recover`` runs again to the end. After each: the database is the old content or the
fully migrated, valid one, the journal is closed, no temp files are left, the app runs.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Device
from fault_helpers import (
    TALLY,
    before,
    cli_popen,
    journal_phase,
    kill_at_phase,
    run_cli,
    settle,
)

SEEDS = (1, 2, 3)


def _mount_tmpfs(path: Path, size_kb: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("the backup is forced onto another filesystem with a tmpfs mount, "
                    "which needs root")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


def _kill_recover_then_recover(dev: Device, rng: random.Random) -> str:
    """Recovery killed at a random instant, then run to the end."""
    rec = cli_popen(dev, "recover")
    time.sleep(rng.uniform(0.0, 0.6))
    phase = journal_phase(dev.root / "state" / "journal.json")
    if rec.poll() is None:
        os.killpg(rec.pid, signal.SIGKILL)
        TALLY.faults["SIGKILL during recover"] += 1
    rec.wait()
    second = run_cli(dev, "recover")
    assert second.returncode == 0, second.stderr
    return str(phase)


def _crash(dev: Device, bundle: Path, phases: set[str], seed: int, label: str) -> str:
    rng = random.Random(seed)
    ref = before(dev)
    journal = dev.root / "state" / "journal.json"
    proc = cli_popen(dev, "apply", str(bundle))
    landed = kill_at_phase(proc, journal, phases)
    assert landed is not None, f"the run finished before reaching {phases}"
    TALLY.faults[f"SIGKILL during {label}"] += 1
    dev.clear_fault("crash-after-start")
    _kill_recover_then_recover(dev, rng)
    return settle(dev, ref, f"{label} seed {seed} (landed in {landed})")


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_kill_during_backup(device: Device, shipped_bundle: Path, tmp_path: Path,
                            seed: int) -> None:
    """The backup dir on its own filesystem, so the backup is a real streamed copy."""
    bfs = tmp_path / "backupfs"
    _mount_tmpfs(bfs, 64 * 1024)
    try:
        device.set_config(backup_dir=str(bfs))
        state = _crash(device, shipped_bundle, {"app_stopped"}, seed, "backup")
        assert state == "old"
    finally:
        device.systemctl("stop", "zmonitor.service")
        subprocess.run(["umount", "-l", str(bfs)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_kill_during_swap(device: Device, shipped_bundle: Path, seed: int) -> None:
    state = _crash(device, shipped_bundle, {"swapping", "swapped"}, seed, "swap")
    assert state in ("old", "migrated")


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_kill_during_restore(device: Device, shipped_bundle: Path, seed: int) -> None:
    """The migrated database goes live, the app crashes in the health gate, the run
    restores its backup: killed while restoring."""
    device.fault("crash-after-start")
    state = _crash(device, shipped_bundle, {"restoring", "failed"}, seed, "restore")
    assert state == "old"
    assert device.history()[-1]["outcome"] in ("restored", "recovered-old")


@pytest.mark.slow
def test_recover_killed_repeatedly(device: Device, shipped_bundle: Path) -> None:
    """One run killed after the swap; recovery then killed five times in a row at
    random instants before one is let finish."""
    rng = random.Random(99)
    ref = before(device)
    journal = device.root / "state" / "journal.json"
    proc = cli_popen(device, "apply", str(shipped_bundle))
    assert kill_at_phase(proc, journal, {"swapped", "app_started"}) is not None
    TALLY.faults["SIGKILL after swap"] += 1
    for _ in range(5):
        rec = cli_popen(device, "recover")
        time.sleep(rng.uniform(0.0, 0.4))
        if rec.poll() is None:
            os.killpg(rec.pid, signal.SIGKILL)
            TALLY.faults["SIGKILL during recover"] += 1
        rec.wait()
    last = run_cli(device, "recover")
    assert last.returncode == 0, last.stderr
    assert settle(device, ref, "recover killed 5x") in ("old", "migrated")
