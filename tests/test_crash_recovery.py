"""``apply`` killed with SIGKILL at seeded random instants in every phase, then
``recover``: the database is the exact old file or the fully migrated, validated one.

The run is the real CLI in a subprocess on a 100,000-vitals database with 0012 batched
by 25 rows (4,000 batches, seconds, once in the rehearsal and once for real).
The app unit is a stand-in ``systemctl`` that records its calls and an "active" flag
(no process writes the database, so "old" is checked on the file's sha256).

Instants: a calibration run gives each phase's start and length; each kill picks the
next phase of a weighted list (``TARGETS``, each entry once), waits until the journal shows it,
then sleeps a random part of its calibrated length. Where the kill actually landed is
read from the journal after the process died, before recovery.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SHIPPED

from zmonitor_migrated import dbinfo, fsutil
from zmonitor_migrated.validate import validate

SEED = 20261101
# (phase to wait for, weight): "start" = from process start, before the journal exists.
# One round of this list is the run: every phase is a target, the long ones (the
# verification with the rehearsal, the batches) and the steps around the swap more often,
# so at least three kills land before the app stops, in the batches and after the swap.
TARGETS = [("start", 1), ("received", 1), ("verified", 3), ("prechecked", 1),
           ("app_stopped", 2), ("backed_up", 1), ("applying", 6), ("validated", 1),
           ("swapping", 2), ("swapped", 3), ("app_started", 3)]
KILLS = sum(w for _name, w in TARGETS)

STUB = """#!/bin/sh
d='{d}'
echo "$*" >> "$d/calls.log"
case "$1" in
  start) touch "$d/active" ;;
  stop) rm -f "$d/active" ;;
  is-active) if [ -e "$d/active" ]; then echo active; exit 0; fi; echo inactive; exit 3 ;;
  show) echo 0 ;;
esac
exit 0
"""


class Box:
    def __init__(self, root: Path, template: Path, trust_pub: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        (root / "data").mkdir()
        self.db = root / "data" / "zmonitor.db"
        shutil.copyfile(template, self.db)
        (root / "trusted.d").mkdir()
        shutil.copy(trust_pub, root / "trusted.d" / trust_pub.name)
        self.unit = root / "unit"
        self.unit.mkdir()
        (self.unit / "active").touch()
        stub = root / "systemctl"
        stub.write_text(STUB.format(d=self.unit))
        stub.chmod(0o755)
        self.state = root / "state"
        self.config = root / "config.yaml"
        self.config.write_text(yaml.safe_dump({
            "database": str(self.db), "app_unit": "zmonitor.service",
            "systemctl": str(stub), "state_dir": str(self.state),
            "runtime_dir": str(root / "run"), "inbox": str(root / "inbox"),
            "backup_dir": str(root / "backups"), "trust_dir": str(root / "trusted.d"),
            "health_check_s": 0.3, "stop_timeout_s": 5, "max_downtime_s": 120,
            "batch_size": 1}))  # keep the bundle's 25-row batches on the private copy
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.env.pop("NOTIFY_SOCKET", None)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "zmonitor_migrated.cli", "--config", str(self.config),
                *args]

    def journal(self) -> dict[str, object] | None:
        try:
            return json.loads((self.state / "journal.json").read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return None


def _calibrate(box: Box, bundle: Path) -> dict[str, tuple[float, float]]:
    t0 = time.time()
    proc = subprocess.run(box.argv("apply", str(bundle)), env=box.env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    j = box.journal()
    assert j is not None
    phases: list[tuple[str, float]] = [(p, t) for p, t in j["phases"]]  # type: ignore[union-attr]
    out = {"start": (0.0, phases[0][1] - t0)}
    for (name, t), (_n, t_next) in itertools.pairwise(phases):
        out.setdefault(name, (t - t0, t_next - t))
    return out


def _leftovers(box: Box) -> list[str]:
    found = []
    for p in box.root.rglob("*"):
        n = p.name
        if (".migrating-" in n or n.endswith(".restoring") or ".tmp-" in n
                or n.endswith(("-journal", "-wal", "-shm"))):
            found.append(str(p.relative_to(box.root)))
    runs = box.state / "runs"
    if runs.exists():
        found += [f"state/runs/{p.name}" for p in runs.iterdir()]
    live = os.stat(box.db).st_ino
    bdir = box.root / "backups"
    if bdir.exists():  # a "backup" that is a hard link of the live file is no backup
        found += [f"alias {p.name}" for p in bdir.iterdir() if os.stat(p).st_ino == live]
    return found


@pytest.mark.slow
def test_sigkill_anywhere_then_recover(tmp_path: Path, big_db_v10: Path, slow_bundle: Path,
                                       release_key: tuple[Path, Path]) -> None:
    old_sha = fsutil.sha256_file(big_db_v10)
    conn = dbinfo.open_ro(big_db_v10)
    counts_before = dbinfo.row_counts(conn)
    conn.close()

    calib = _calibrate(Box(tmp_path / "calib", big_db_v10, release_key[1]), slow_bundle)
    print("\ncalibration (start offset s, length s):",
          {k: (round(a, 3), round(b, 3)) for k, (a, b) in calib.items()})
    rng = random.Random(SEED)
    plan = [name for name, w in TARGETS for _ in range(w)]
    landed: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    t_all = time.monotonic()
    for i in range(KILLS):
        target = plan[i % len(plan)]
        box = Box(tmp_path / f"k{i:02d}", big_db_v10, release_key[1])
        delay = rng.uniform(0.0, max(0.002, calib[target][1]))
        proc = subprocess.Popen(box.argv("apply", str(slow_bundle)), env=box.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if target != "start":
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                j = box.journal()
                if j is not None and any(p == target for p, _t in j["phases"]):  # type: ignore[union-attr]
                    break
                time.sleep(0.0005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        j = box.journal()
        if proc.returncode != -signal.SIGKILL:
            where = "finished"
        elif j is None:
            where = "no-journal"
        elif j["outcome"] is not None:
            where = "closed"
        else:
            where = str(j["phase"])
        landed[where] += 1

        rec = subprocess.run(box.argv("recover"), env=box.env, capture_output=True, text=True,
                             timeout=120)
        assert rec.returncode == 0, f"kill {i} in {where}: {rec.stderr}"
        j = box.journal()
        assert j is None or j["outcome"] is not None, f"kill {i} in {where}: journal open"
        assert _leftovers(box) == [], f"kill {i} in {where}"
        assert (box.unit / "active").exists(), f"kill {i} in {where}: app not started"
        calls = (box.unit / "calls.log").read_text().splitlines() \
            if (box.unit / "calls.log").exists() else []
        stops = [k for k, c in enumerate(calls) if c.startswith("stop")]
        starts = [k for k, c in enumerate(calls) if c.startswith("start")]
        assert not stops or (starts and starts[-1] > stops[-1]), f"kill {i}: {calls}"

        if fsutil.sha256_file(box.db) == old_sha:
            outcomes["old"] += 1
            continue
        conn = sqlite3.connect(box.db, isolation_level=None)
        try:
            problems = validate(conn, target=14, last_version=14, counts_before=counts_before,
                                declared_loss=set(), source_root=SHIPPED)
            batch_left = conn.execute("SELECT COUNT(*) FROM zmonitor_migrated_batch"
                                      ).fetchone()[0]
            seq = conn.execute("SELECT MAX(sequence) FROM zmonitor_migrated_bundles"
                               ).fetchone()[0]
        finally:
            conn.close()
        assert problems == [], f"kill {i} in {where}: neither old nor valid: {problems}"
        assert batch_left == 0 and seq == 1
        outcomes["migrated"] += 1

    print(f"{KILLS} kills in {time.monotonic() - t_all:.0f} s; landed in: "
          f"{dict(sorted(landed.items()))}; after recover: {dict(outcomes)}")
    before_stop = landed["no-journal"] + landed["received"] + landed["verified"] \
        + landed["prechecked"]
    after_swap = landed["swapped"] + landed["app_started"] + landed["committed"]
    assert before_stop >= 3 and landed["applying"] >= 3 and after_swap >= 3, landed
    assert sum(landed.values()) == KILLS
