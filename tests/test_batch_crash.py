"""A batched migration killed with SIGKILL at random moments (a real subprocess) resumes
and ends with exactly the content of an uninterrupted run.

Each kill lands at a random moment chosen by a seeded RNG: after a random batch (the
child reports each commit on stdout) plus a random offset of up to two batch durations,
so it falls inside a batch's transaction or between two, whatever the machine's speed.
The migration is deliberately not idempotent (``heart_rate = heart_rate + 1`` on every
row of the range): a batch applied twice, or skipped, changes the final content hash.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from engine_helpers import make_source, query, table_hash

from zmonitor_migrated.engine import BATCH_TABLE

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "batch_crash_child.py"
ROWS = 100_000  # 400 batches: hundreds of commit points to land a kill between or in
ITERATIONS = 5
BATCHES = ROWS // 250
MIGRATION = """\
-- Backfill with a counter, batched
-- zmonitor:batch table=vitals size=250
BEGIN TRANSACTION;
UPDATE vitals
   SET patient_mrn = (SELECT mrn FROM patients WHERE patients.old_id = vitals.patient_id),
       heart_rate = heart_rate + 1
 WHERE rowid BETWEEN :batch_start AND :batch_end;
COMMIT;
"""


def base_db(path: Path) -> Path:
    rng = random.Random(7)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript("""
        CREATE TABLE patients (mrn TEXT PRIMARY KEY, old_id TEXT UNIQUE);
        CREATE TABLE vitals (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp INTEGER,
                             patient_id TEXT, patient_mrn TEXT, heart_rate INTEGER,
                             spo2 INTEGER, device_id TEXT);
    """)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO patients VALUES (?, ?)",
                     [(f"MRN{i}", f"P{i}") for i in range(500)])
    conn.executemany(
        "INSERT INTO vitals (timestamp, patient_id, heart_rate, spo2, device_id) "
        "VALUES (?, ?, ?, ?, ?)",
        ((i, f"P{rng.randrange(510)}", rng.randint(40, 180), rng.randint(85, 100), "D1")
         for i in range(ROWS)))
    conn.execute("COMMIT")
    conn.close()
    return path


def start(db: Path, src: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.Popen([sys.executable, str(CHILD), str(db), str(src)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return proc


def run_to_end(db: Path, src: Path) -> float:
    started = time.perf_counter()
    proc = start(db, src)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()  # through the same buffer that read "ready"
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, err
    assert out.splitlines()[-1] == "done"
    return time.perf_counter() - started


def kill_at(proc: subprocess.Popen[str], batch: int, offset_s: float) -> None:
    """SIGKILL ``offset_s`` after the child reported batch ``batch`` (0: after start)."""
    assert proc.stdout is not None
    while batch:
        line = proc.stdout.readline()
        assert line, "the child ended before the chosen batch"
        if line.strip() == f"batch {batch}":
            break
    time.sleep(offset_s)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def test_sigkill_at_random_moments_then_resume_gives_the_same_content(tmp_path: Path) -> None:
    base = base_db(tmp_path / "base.db")
    src = make_source(tmp_path / "src", {"data/0001_backfill_counter.sql": MIGRATION,
                                         "rollback/0001_rollback.sql":
                                             "UPDATE vitals SET patient_mrn = NULL;\n"})
    reference = tmp_path / "reference.db"
    reference.write_bytes(base.read_bytes())
    duration = run_to_end(reference, src)
    expected = table_hash(reference, "vitals")
    assert query(reference, "SELECT count(*) FROM vitals WHERE heart_rate = 0") == [(0,)]

    rng = random.Random(20240601)
    killed_mid_batches = 0
    for i in range(ITERATIONS):
        db = tmp_path / f"crash-{i}.db"
        db.write_bytes(base.read_bytes())
        proc = start(db, src)
        batch = 0 if i == 0 else rng.randint(1, BATCHES * 4 // 5)
        kill_at(proc, batch, rng.uniform(0.0, 2 * duration / BATCHES))
        state = query(db, f"SELECT batches_done, batches_total FROM {BATCH_TABLE}") \
            if query(db, "SELECT name FROM sqlite_master WHERE name=?", (BATCH_TABLE,)) else []
        if state and 0 < state[0][0] < state[0][1]:
            killed_mid_batches += 1
        run_to_end(db, src)
        assert table_hash(db, "vitals") == expected, f"iteration {i}: content differs"
        assert query(db, "SELECT count(*) FROM schema_version WHERE version = 1") == [(1,)]
        assert query(db, f"SELECT count(*) FROM {BATCH_TABLE}") == [(0,)]
        assert query(db, "PRAGMA integrity_check") == [("ok",)]
        db.unlink()
    # the kills really landed in the middle of the batches (not all before or after)
    assert killed_mid_batches >= ITERATIONS - 2, killed_mid_batches
