"""A simulated bedside monitor for the demo: holds the database open and records a vitals
row every few milliseconds, as the Z Monitor app does. Prints READY once it has written
its first row; exits non-zero as soon as a write fails (a migration broke it).

    python -m zmonitor_migrated.demo_monitor DB [--interval-ms 20]
"""

from __future__ import annotations

import argparse
import random
import signal
import sqlite3
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("db")
    parser.add_argument("--interval-ms", type=float, default=20.0)
    args = parser.parse_args(argv)
    running = True

    def stop(_signum: int, _frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    conn = sqlite3.connect(args.db, isolation_level=None, timeout=2.0)
    conn.execute("PRAGMA journal_mode=WAL")
    mrn = conn.execute("SELECT mrn FROM patients ORDER BY mrn LIMIT 1").fetchone()
    mrn = mrn[0] if mrn else None
    # The app of version 11 on scores each row itself (NEWS2; only SpO2 varies out of
    # the normal band in what this simulation records).
    scores = any(r[1] == "early_warning_score" for r in conn.execute("PRAGMA table_info(vitals)"))
    columns = ("timestamp, patient_id, patient_mrn, heart_rate, spo2, respiration_rate, "
               "temperature, blood_pressure_systolic, blood_pressure_diastolic, device_id, "
               "device_label" + (", early_warning_score" if scores else ""))
    marks = ", ".join("?" * (12 if scores else 11))
    rng = random.Random(1)
    ready = False
    try:
        while running:
            spo2 = rng.randint(94, 100)
            row = [int(time.time() * 1000), mrn, mrn, rng.randint(60, 90), spo2,
                   rng.randint(12, 20), 36.8, rng.randint(111, 130), rng.randint(70, 85),
                   "SERIAL-042", "DEVICE-042"]
            if scores:
                row.append(1 if spo2 <= 95 else 0)
            conn.execute(f"INSERT INTO vitals ({columns}) VALUES ({marks})", row)
            if not ready:
                print("READY", flush=True)
                ready = True
            time.sleep(args.interval_ms / 1000)
    except sqlite3.Error as exc:
        print(f"monitor: cannot record vitals: {exc}", file=sys.stderr, flush=True)
        return 3
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
