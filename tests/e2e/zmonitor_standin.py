#!/usr/bin/python3
"""A stand-in for the Z Monitor app, run as ``zmonitor.service`` in the e2e container.

It behaves the way the migration daemon must cope with: it keeps the database open
for its whole life and commits a vitals row every few milliseconds, so stopping and
starting it around a migration is real and any row it wrote to a database that a
run then replaced would be lost and noticed.

Guarantees the tests rely on:
- READY=1 is sent (Type=notify) only after the first row is committed, so "active"
  means "writing".
- Every session appends one line to the ledger (``--ledger``) when it starts and one
  when it stops on SIGTERM: ``start <ms> <pid>`` and ``stop <ms> <pid> <rows>``, where
  ``rows`` counts the vitals rows this session committed (all tagged
  ``device_id = 'standin'``, timestamps in Unix milliseconds within the session).
- It refuses to run (exit 3, before READY=1) on a database holding a table named
  ``e2e_app_incompatible``: the tests' way to ship a migration that succeeds and
  validates but that the app cannot run on, which only the health gate can catch.
- Rows are built from ``PRAGMA table_info(vitals)``, so the app keeps working across
  migrations that add columns; NOT NULL columns without a default get a value.

Only the standard library: it runs on the device's Debian python3.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

DEVICE_ID = "standin"
KNOWN: dict[str, object] = {
    "patient_id": "MRN-0001",
    "patient_mrn": "MRN-0001",
    "heart_rate": 72,
    "spo2": 97,
    "respiration_rate": 16,
    "temperature": 36.8,
    "blood_pressure_systolic": 120,
    "blood_pressure_diastolic": 80,
    "signal_quality": 95,
    "device_id": DEVICE_ID,
    "device_label": "Bed 1",
    "is_synced": 0,
}


def sd_notify(message: str) -> None:
    """Send one sd_notify datagram; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(addr)
        sock.sendall(message.encode())


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def row_builder(conn: sqlite3.Connection) -> tuple[str, list[str]]:
    cols = conn.execute("PRAGMA table_info(vitals)").fetchall()
    if not cols:
        raise SystemExit("zmonitor-standin: the database has no vitals table")
    names: list[str] = []
    for _cid, name, ctype, notnull, default, pk in cols:
        if pk:
            continue
        if name == "timestamp" or name in KNOWN or (notnull and default is None):
            names.append(name)
            if name not in KNOWN and name != "timestamp":
                KNOWN[name] = 0 if "INT" in (ctype or "").upper() else ""
    sql = (f"INSERT INTO vitals ({', '.join(names)}) "
           f"VALUES ({', '.join('?' for _ in names)})")
    return sql, names


def ledger(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("database", type=Path)
    ap.add_argument("--ledger", type=Path, default=Path("/var/lib/zmonitor/standin.ledger"))
    ap.add_argument("--interval-ms", type=float, default=5.0)
    args = ap.parse_args(argv)

    stopping = False

    def on_term(_signo: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    conn = sqlite3.connect(args.database, timeout=10.0, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'e2e_app_incompatible'").fetchone():
        print("zmonitor-standin: incompatible database schema, refusing to start", file=sys.stderr)
        return 3
    sql, names = row_builder(conn)
    patient = conn.execute("SELECT mrn FROM patients ORDER BY mrn LIMIT 1").fetchone()
    if patient:  # attribute rows to a real patient, as the post-migration checks demand
        KNOWN["patient_id"] = KNOWN["patient_mrn"] = patient[0]
    pid = os.getpid()
    ledger(args.ledger, f"start {now_ms()} {pid}")
    rows = 0
    first = True
    rng = random.Random(pid)
    while not stopping:
        ts = now_ms()
        values = []
        for name in names:
            if name == "timestamp":
                values.append(ts)
            elif name == "heart_rate":
                values.append(60 + rng.randrange(40))
            else:
                values.append(KNOWN[name])
        conn.execute(sql, values)  # autocommit: one durable row per statement
        rows += 1
        if first:
            sd_notify("READY=1\nSTATUS=writing vitals")
            first = False
        time.sleep(args.interval_ms / 1000.0)
    conn.close()
    ledger(args.ledger, f"stop {now_ms()} {pid} {rows}")
    print(f"zmonitor-standin: stopped after {rows} rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
