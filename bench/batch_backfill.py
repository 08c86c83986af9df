"""Benchmark: the runner's batched backfill against one UPDATE in the sqlite3 CLI.

Generates (seeded) a database of 1,000,000 vitals rows and 5,000 patients in a temp
dir, then on fresh copies of it:

1. the runner (``Engine``, durable default ``fast=False``, and ``fast=True`` as the
   pipeline runs it on its private copy) applies a batched migration
   (``-- zmonitor:batch table=vitals size=10000``) in a child process;
2. ``/usr/bin/sqlite3`` runs the same UPDATE as one statement (no rowid bound) in one
   transaction.

Each is run N times; the medians, the ratio runner/sqlite3 (target <= 1.3) and the
runner's peak RSS (target <= 80 MB, ``ru_maxrss`` of the child as reported by
``os.wait4``) are printed. Times are wall-clock of the whole child process for both
(Python start-up and imports included for the runner), and, for the runner, of
``Engine.apply`` alone.

    python bench/batch_backfill.py [--rows 1000000] [--runs 3] [--batch 10000]

Not a test: nothing asserts; it prints the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SQLITE3_CLI = "/usr/bin/sqlite3"
PATIENTS = 5000
UPDATE_ONE = ("UPDATE vitals SET patient_mrn = (SELECT mrn FROM patients "
              "WHERE patients.old_id = vitals.patient_id) WHERE patient_mrn IS NULL;")
MIGRATION = """-- Backfill vitals.patient_mrn from patients (batched)
-- zmonitor:batch table=vitals size={size}
UPDATE vitals SET patient_mrn = (SELECT mrn FROM patients WHERE patients.old_id = vitals.patient_id)
 WHERE rowid BETWEEN :batch_start AND :batch_end AND patient_mrn IS NULL;
"""

CHILD = """
import sys, time
t0 = time.perf_counter()
from pathlib import Path
from zmonitor_migrated.engine import Engine
from zmonitor_migrated.sources import load
db, src, fast = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
seen = []
source = load(Path(src))
t1 = time.perf_counter()
with Engine(db, fast=fast, on_progress=seen.append) as engine:
    engine.apply(source)
t2 = time.perf_counter()
assert seen and seen[-1].done, "no final progress event"
print(f"{t2 - t1:.6f} {len(seen)}")
"""


def generate(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE patients (mrn TEXT PRIMARY KEY NOT NULL, old_id TEXT UNIQUE, "
                 "name TEXT)")
    conn.execute("CREATE TABLE vitals (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                 "timestamp INTEGER, patient_id TEXT, patient_mrn TEXT, heart_rate INTEGER, "
                 "spo2 INTEGER, device_id TEXT)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO patients VALUES (?, ?, ?)",
                     ((f"MRN{i:07d}", f"P{i}", f"Patient {i}") for i in range(PATIENTS)))
    # ~1 % of vitals name a patient id that does not exist: they stay NULL.
    conn.executemany(
        "INSERT INTO vitals (timestamp, patient_id, patient_mrn, heart_rate, spo2, device_id) "
        "VALUES (?, ?, NULL, ?, ?, ?)",
        ((1_700_000_000 + i, f"P{rng.randrange(int(PATIENTS * 1.01))}",
          rng.randint(40, 180), rng.randint(85, 100), f"DEV{rng.randrange(50):02d}")
         for i in range(rows)))
    conn.execute("COMMIT")
    conn.close()


def write_source(root: Path, size: int) -> Path:
    (root / "migrations" / "data").mkdir(parents=True)
    (root / "migrations" / "rollback").mkdir()
    (root / "bundle.yaml").write_text("name: bench\napp: zmonitor\ndevice_types: [bench]\n")
    (root / "migrations" / "data" / "0001_backfill_patient_mrn.sql").write_text(
        MIGRATION.format(size=size))
    (root / "migrations" / "rollback" / "0001_rollback.sql").write_text(
        "UPDATE vitals SET patient_mrn = NULL;\n")
    return root


def content_hash(path: Path) -> str:
    conn = sqlite3.connect(path)
    h = hashlib.sha256()
    for row in conn.execute("SELECT id, patient_mrn FROM vitals ORDER BY id"):
        h.update(repr(row).encode())
    conn.close()
    return h.hexdigest()


def run_child(args: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Wall time, peak RSS (KiB, this child only) and stdout of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"child {args[:3]} failed ({proc.returncode}):\n{err}")
    return wall, usage.ru_maxrss, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    ns = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="zm-bench-"))
    try:
        base = tmp / "base.db"
        t = time.perf_counter()
        generate(base, ns.rows, ns.seed)
        print(f"generated {ns.rows:,} vitals rows in {time.perf_counter() - t:.1f}s "
              f"({base.stat().st_size / 1e6:.0f} MB) under {tmp}")
        src = write_source(tmp / "src", ns.batch)
        env = dict(os.environ, PYTHONPATH=str(ROOT))

        results: dict[str, list[float]] = {"sqlite3": [], "runner": [], "runner-apply": [],
                                           "fast": [], "fast-apply": []}
        rss: dict[str, int] = {"runner": 0, "fast": 0, "sqlite3": 0}
        hashes: set[str] = set()
        for i in range(ns.runs):
            for label in ("sqlite3", "runner", "fast"):
                db = tmp / f"{label}-{i}.db"
                shutil.copyfile(base, db)
                if label == "sqlite3":
                    wall, kib, _ = run_child([SQLITE3_CLI, str(db),
                                              f"BEGIN; {UPDATE_ONE} COMMIT;"])
                else:
                    wall, kib, out = run_child(
                        [sys.executable, "-c", CHILD, str(db), str(src),
                         "1" if label == "fast" else "0"], env)
                    results[f"{label}-apply"].append(float(out.split()[0]))
                results[label].append(wall)
                rss[label] = max(rss[label], kib)
                hashes.add(content_hash(db))
                db.unlink()
            print(f"run {i + 1}/{ns.runs}: sqlite3 {results['sqlite3'][-1]:.2f}s, "
                  f"runner {results['runner'][-1]:.2f}s, fast {results['fast'][-1]:.2f}s")
        if len(hashes) != 1:
            sys.exit(f"the runs disagree on the result: {len(hashes)} distinct contents")

        med = {k: statistics.median(v) for k, v in results.items()}
        print()
        print(f"median sqlite3 CLI (one UPDATE, one transaction): {med['sqlite3']:.3f} s")
        print(f"median runner, durable (fast=False), process:     {med['runner']:.3f} s "
              f"(Engine.apply {med['runner-apply']:.3f} s)")
        print(f"median runner, fast=True, process:                {med['fast']:.3f} s "
              f"(Engine.apply {med['fast-apply']:.3f} s)")
        ratio = med["runner"] / med["sqlite3"]
        print(f"ratio runner/sqlite3 (durable, process): {ratio:.2f}  "
              f"[target <= 1.3: {'met' if ratio <= 1.3 else 'MISSED'}]")
        apply_ratio = med["runner-apply"] / med["sqlite3"]
        print(f"ratio runner/sqlite3 (durable, apply):   {apply_ratio:.2f}")
        print(f"ratio runner/sqlite3 (fast, process):    {med['fast'] / med['sqlite3']:.2f}")
        peak = max(rss["runner"], rss["fast"]) / 1024
        print(f"runner peak RSS: {peak:.1f} MB  [target <= 80 MB: "
              f"{'met' if peak <= 80 else 'MISSED'}]  "
              f"(sqlite3 CLI: {rss['sqlite3'] / 1024:.1f} MB)")
        print(f"result identical across all {3 * ns.runs} runs: {hashes.pop()[:16]}…")
    finally:
        if ns.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
