"""History rendering (zmonitor_migrated.history) and ``status`` (zmonitor_migrated.status),
in process: records and status mappings in, the operator's lines out; ``collect`` against
a real database file and state directory."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from zmonitor_migrated import history, status
from zmonitor_migrated.config import Config

APPLIED = {
    "run_id": "r1", "outcome": "applied", "bundle": "zmonitor-2.zmb", "sequence": 2,
    "from_version": 10, "to_version": 14, "downtime_s": 1.234, "duration_s": 9.5,
    # JSON sorts the mapping by name; the rendering puts it back in run order.
    "phase_times": {"applying": 2.0, "received": 0.01, "verified": 0.5},
    "db_size_before": 13_000_000, "db_size_after": 14_500_000,
    "rows_before": {"patients": 10, "vitals": 100_000},
    "rows_after": {"patients": 10, "vitals": 100_001},
    "backup": "/b/zmonitor.db.v10",
}

# (name, record, expected summary line)
SUMMARIES = [
    ("applied bundle", APPLIED, "r1  applied  bundle zmonitor-2.zmb sequence 2, version "
     "10 → 14, downtime 1.23 s, took 9.50 s"),
    ("refused before the app stopped",
     {"run_id": "r2", "outcome": "refused", "from_version": 10, "to_version": 14},
     "r2  refused  apply, version 10 → 14, app not stopped"),
    ("an operator restore", {"run_id": "r3", "outcome": "restored", "operation": "restore"},
     "r3  restored  restore"),
    ("a bundle without sequence", {"run_id": "r4", "outcome": "up-to-date", "bundle": "b.zmb"},
     "r4  up-to-date  bundle b.zmb"),
    ("an empty record", {}, "None  None  apply"),
]


@pytest.mark.parametrize(("name", "record", "line"), SUMMARIES, ids=[s[0] for s in SUMMARIES])
def test_summary(name: str, record: dict[str, Any], line: str) -> None:
    assert history.summary(record) == line


def test_describe_puts_phases_in_run_order_and_shows_what_changed() -> None:
    lines = history.describe({**APPLIED, "replaced": "/b/zmonitor.db.replaced",
                              "error": {"kind": "k", "message": "m"}})
    assert lines[1:] == [
        "  phases: received 0.01 s, verified 0.50 s, applying 2.00 s",
        "  database size: 13.0 MB → 14.5 MB",
        "  rows: patients 10, vitals 100,000 → 100,001",
        "  backup: /b/zmonitor.db.v10",
        "  replaced database kept: /b/zmonitor.db.replaced",
        "  error [k]: m",
    ]


def test_describe_survives_a_hand_edited_record() -> None:
    lines = history.describe({"run_id": "x", "phase_times": {"zzz": "soon", "applying": 1},
                              "rows_before": {"t": True}, "rows_after": "lost",
                              "db_size_before": "big", "error": "not a mapping"})
    assert lines[1:] == ["  phases: applying 1.00 s, zzz -", "  database size: ?",
                         "  rows: t True"]


def test_render_cleans_every_line() -> None:
    out = history.render([{"run_id": "r\x1b[2J", "outcome": "failed",
                           "error": {"kind": "sql", "message": "bad\nline\u202e"}}])
    assert len(out) == 2
    assert all(ch.isprintable() for line in out for ch in line)


def test_read_skips_torn_and_foreign_lines(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    history.append(path, {"run_id": "a", "outcome": "applied"})
    with path.open("ab") as f:
        f.write(b'[1, 2]\n\xff\xfe not json\n{"run_id": "b", "outc')
    assert [r["run_id"] for r in history.read(path)] == ["a"]
    assert history.read(tmp_path / "missing.jsonl") == []


def test_metrics_are_derived_from_the_records() -> None:
    text = history.render_metrics(
        [{"outcome": "applied"}, {"outcome": "restored"},
         {"outcome": "applied", "finished_at": 5.0, "duration_s": 2, "downtime_s": True}],
        current_version=14, db_size=1000)
    lines = text.splitlines()
    assert 'zmonitor_migrate_runs_total{outcome="applied"} 2' in lines
    assert 'zmonitor_migrate_runs_total{outcome="restored"} 1' in lines
    assert "zmonitor_migrate_restores_total 1" in lines
    assert "zmonitor_migrate_last_run_timestamp_seconds 5.000" in lines
    assert "zmonitor_migrate_last_downtime_seconds 0.000" in lines  # a bool is no number
    assert "zmonitor_migrate_last_run_success 1" in lines
    assert "zmonitor_db_schema_version 14" in lines and "zmonitor_db_size_bytes 1000" in lines
    assert "last_run" not in history.render_metrics([], current_version=None, db_size=None)


STATUS = {
    "database": "/d/zmonitor.db", "current_version": 2, "db_size": 2_500_000,
    "journal_mode": "wal",
    "applied": [{"version": 1, "migration_type": "schema", "applied_at": "2026-01-01 00:00:00",
                 "file_hash": "ab" * 32, "execution_time_ms": 3, "description": "init"},
                {"version": 2, "migration_type": None, "applied_at": "2026-01-02 00:00:00",
                 "file_hash": None, "execution_time_ms": None, "description": None}],
    "source": "/src", "pending": [{"version": 3, "type": "data", "path": "m/0003.sql"}],
    "journal": {"run_id": "r9", "phase": "applying", "outcome": None, "open": True},
    "last_run": {"run_id": "r8", "outcome": "applied"},
    "backups": ["/b/one"], "replaced": [],
}


def test_status_render() -> None:
    assert status.render(STATUS) == [
        "database /d/zmonitor.db: version 2 (2.5 MB, journal wal)",
        "applied:",
        "  0001 schema 2026-01-01 00:00:00  abababababab  3 ms  init",
        "  0002 -      2026-01-02 00:00:00  no hash  0 ms  ",
        "pending (against /src): 1",
        "  0003 data   m/0003.sql",
        "journal: run r9 OPEN in phase applying",
        "last run: r8  applied  apply",
        "backups: 1",
        "  /b/one",
    ]


def test_status_render_pending_unknown_closed_journal_and_replaced() -> None:
    info = {**STATUS, "pending": None, "pending_error": {"message": "database ahead"},
            "journal": {"run_id": "r9", "phase": "done", "outcome": "applied", "open": False},
            "last_run": None, "replaced": ["/d/zmonitor.db.replaced"]}
    lines = status.render(info)
    assert "pending: unknown (database ahead)" in lines
    assert "journal: run r9 applied" in lines
    assert not any(line.startswith("last run") for line in lines)
    assert lines[-2:] == ["replaced databases kept by restores: 1",
                          "  /d/zmonitor.db.replaced"]


def test_status_collect_reads_the_device(tmp_path: Path) -> None:
    db = tmp_path / "zmonitor.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (a)")
    conn.commit()
    conn.close()
    cfg = Config(database=db, state_dir=tmp_path / "state", backup_dir=tmp_path / "b")
    history.append(cfg.history_path, {"run_id": "r1", "outcome": "applied"})
    info = status.collect(cfg, source=None)
    assert info["current_version"] == 0 and info["applied"] == []
    assert info["journal"] is None and info["backups"] == [] and info["replaced"] == []
    assert info["last_run"] == {"run_id": "r1", "outcome": "applied"}
    assert info["db_size"] == db.stat().st_size
