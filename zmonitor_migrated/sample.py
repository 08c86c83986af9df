"""A realistic Z Monitor database at a chosen version, for the demo and the benchmarks.

Seeded: the same ``(version, vitals, seed)`` gives the same content. Proportions follow
a bedside unit's: one patient per ~2,500 vitals rows (at least 20), one alarm per ~400
vitals, a third of the alarms archived into ``alarm_history``, an admission event per
patient. About 8 % of vitals are legacy rows (only ``patient_id`` = the numeric old id,
no MRN), the ones the batched migration 0012 maps. Only columns that exist at the
chosen version are written, as the firmware of that version would.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from .engine import Engine
from .sources import Source

BASE_MS = 1_764_000_000_000


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]


def _insert(conn: sqlite3.Connection, table: str, rows: Iterator[dict[str, object]]) -> None:
    cols = set(_columns(conn, table))
    if not cols:
        return
    first = next(rows, None)
    if first is None:
        return
    names = [c for c in first if c in cols]
    sql = (f'INSERT INTO "{table}" ({", ".join(names)}) '
           f'VALUES ({", ".join("?" for _ in names)})')

    def tuples() -> Iterator[tuple[object, ...]]:
        yield tuple(first[n] for n in names)
        for row in rows:
            yield tuple(row[n] for n in names)

    conn.executemany(sql, tuples())


def make_sample_db(path: Path, source: Source, *, version: int, vitals: int = 300_000,
                   seed: int = 7, wal: bool = True) -> Path:
    """Create ``path`` (must not exist) at ``version`` with generated content."""
    if path.exists():
        raise FileExistsError(path)
    with Engine(path, fast=True, applied_by="sample-generator") as eng:
        eng.apply(source, target=version)
    rng = random.Random(seed)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    n_patients = max(20, vitals // 2500)
    patients = [(f"MRN{1000000 + i}", 500 + i) for i in range(n_patients)]
    wards = ["ICU", "CCU", "WARD-3", "WARD-4", "ED"]
    _insert(conn, "patients", ({
        "mrn": mrn, "name": f"Patient {old}", "dob": f"19{40 + old % 60:02d}-0{1 + old % 9}-1"
        f"{old % 9}", "sex": "MFOU"[old % 4], "bed_location": f"{wards[old % 5]}-{old % 40}",
        "old_id": old, "admission_status": "ADMITTED" if old % 3 else "DISCHARGED",
        "admitted_at": BASE_MS - old * 3_600_000,
        "discharged_at": None if old % 3 else BASE_MS - old * 1_800_000,
        "admission_source": "ADT", "emergency_contact": f"+4479{old:08d}",
    } for mrn, old in patients))

    _insert(conn, "vitals", _vital_rows(rng, patients, vitals))
    _insert_events(conn, rng, patients, vitals)
    conn.execute("COMMIT")
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    return path


def _vital_rows(rng: random.Random, patients: list[tuple[str, int]], vitals: int
                ) -> Iterator[dict[str, object]]:
    """``vitals`` readings of random patients, 8% of them in the legacy id form."""
    n_patients = len(patients)
    for i in range(vitals):
        mrn, old = patients[rng.randrange(n_patients)]
        legacy = rng.random() < 0.08
        device = f"SERIAL-{100 + (old % 50):03d}"
        yield {
            "timestamp": BASE_MS + i * 1000,
            "patient_id": str(old) if legacy else mrn,
            "patient_mrn": None if legacy else mrn,
            "heart_rate": rng.randint(45, 140), "spo2": rng.randint(86, 100),
            "respiration_rate": rng.randint(8, 28),
            "temperature": round(rng.uniform(35.0, 39.5), 1),
            "blood_pressure_systolic": rng.randint(85, 180),
            "blood_pressure_diastolic": rng.randint(50, 110),
            "signal_quality": rng.randint(60, 100), "device_id": device,
            "device_label": f"DEVICE-{device[7:10]}", "is_synced": int(rng.random() < .9),
        }


def _insert_events(conn: sqlite3.Connection, rng: random.Random,
                   patients: list[tuple[str, int]], vitals: int) -> None:
    """Alarms, their archived history and admission events."""
    n_patients = len(patients)
    n_alarms = max(10, vitals // 400)
    alarms = [(patients[rng.randrange(n_patients)][0], BASE_MS + rng.randrange(vitals) * 1000)
              for _ in range(n_alarms)]
    _insert(conn, "alarms", ({
        "patient_mrn": mrn, "alarm_type": rng.choice(["HR_HIGH", "SPO2_LOW", "RR_HIGH"]),
        "severity": rng.choice(["LOW", "MEDIUM", "HIGH", "CRITICAL"]), "timestamp": ts,
        "value": rng.randint(80, 160), "threshold_value": 120,
        "acknowledged_at": ts + 30_000, "acknowledged_by": "nurse",
        "resolved_at": ts + 120_000 if i % 4 else None,
    } for i, (mrn, ts) in enumerate(alarms)))
    _insert(conn, "alarm_history", ({
        "alarm_id": i + 1, "timestamp": ts, "patient_mrn": mrn, "alarm_type": "HR_HIGH",
        "severity": "HIGH", "acknowledged_at": ts + 30_000, "acknowledged_by": "nurse",
        "resolved_at": ts + 120_000, "archived_at": ts + 86_400_000,
    } for i, (mrn, ts) in enumerate(alarms) if i % 3 == 0))
    _insert(conn, "admission_events", ({
        "event_type": "ADMISSION", "timestamp": BASE_MS - old * 3_600_000, "patient_mrn": mrn,
        "device_id": None, "device_label": None, "user_id": "adt", "bed_location": "ICU-1",
        "source": "ADT", "notes": "recorded by the app", "created_at": "2025-11-01 00:00:00",
    } for mrn, old in patients if old % 3))
