"""checks/post.yaml: loading, and running the queries read-only against a real database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmonitor_migrated.errors import BundleRejected
from zmonitor_migrated.post_checks import (
    Check,
    CheckFailure,
    load_checks,
    parse_checks,
    plan_scans,
    run_check,
    run_checks,
)

POST = Path(__file__).resolve().parent.parent / "bundles" / "zmonitor" / "checks" / "post.yaml"


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    c = sqlite3.connect(tmp_path / "monitor.db")
    c.executescript("""
        CREATE TABLE vitals (id INTEGER PRIMARY KEY, patient_mrn TEXT, spo2 REAL);
        INSERT INTO vitals (patient_mrn, spo2) VALUES ('MRN-1', 97.0), (NULL, 91.5);
        CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT);
        INSERT INTO settings VALUES ('measurementUnit', 'metric');
    """)
    return c


def test_shipped_post_checks_load() -> None:
    checks = load_checks(POST)
    names = [c.name for c in checks]
    assert "no_null_patient_mrn" in names
    assert len(names) == len(set(names)) >= 10
    nulls = next(c for c in checks if c.name == "no_null_patient_mrn")
    assert nulls.expect == 0
    assert nulls.sql == "SELECT COUNT(*) FROM vitals WHERE patient_mrn IS NULL"


def test_passing_and_failing_checks(conn: sqlite3.Connection) -> None:
    checks = parse_checks("""
- {name: rows, sql: SELECT COUNT(*) FROM vitals, expect: 2}
- {name: no_null_mrn, sql: SELECT COUNT(*) FROM vitals WHERE patient_mrn IS NULL, expect: 0}
- {name: unit, sql: "SELECT value FROM settings WHERE key = 'measurementUnit'", expect: metric}
- {name: float_vs_int, sql: SELECT MAX(spo2) FROM vitals, expect: 97}
- {name: no_row_is_null, sql: "SELECT value FROM settings WHERE key = 'x'", expect: null}
- {name: text_is_not_number, sql: SELECT '0', expect: 0}
""")
    failures = run_checks(conn, checks)
    assert [(f.name, f.expected, f.actual, f.error) for f in failures] == [
        ("no_null_mrn", 0, 1, None),
        ("text_is_not_number", 0, "0", None),
    ]
    assert str(failures[0]) == "check no_null_mrn: expected 0, got 1"


def test_a_failing_query_is_a_failure_naming_the_check(conn: sqlite3.Connection) -> None:
    failures = run_checks(conn, [Check("thresholds", "SELECT COUNT(*) FROM alarm_thresholds", 5),
                                 Check("rows", "SELECT COUNT(*) FROM vitals", 2)])
    assert len(failures) == 1
    assert failures[0].name == "thresholds"
    assert "no such table: alarm_thresholds" in (failures[0].error or "")
    assert str(failures[0]).startswith("check thresholds: query failed:")


def test_checks_cannot_change_the_database(conn: sqlite3.Connection) -> None:
    writes = [Check("delete", "DELETE FROM vitals", 0),
              Check("cte_update", "WITH x AS (SELECT 1) UPDATE vitals SET spo2 = 0", 0),
              Check("pragma", "PRAGMA foreign_keys = ON", 0),
              Check("attach", "ATTACH DATABASE ':memory:' AS other", 0)]
    failures = run_checks(conn, writes)
    assert [f.name for f in failures] == ["delete", "cte_update", "pragma", "attach"]
    assert all(f.error for f in failures)
    assert conn.execute("SELECT COUNT(*), MIN(spo2) FROM vitals").fetchone() == (2, 91.5)
    # read-only pragmas are fine, and the authorizer is gone afterwards
    assert run_checks(conn, [Check("ok", "PRAGMA integrity_check", "ok")]) == []
    conn.execute("DELETE FROM settings")
    assert conn.execute("SELECT COUNT(*) FROM settings").fetchone() == (0,)


@pytest.mark.parametrize(("text", "needle"), [
    ("- {name: a, sql: SELECT 1, expect: 1, expected: 2}\n", "[0]: unknown key 'expected'"),
    ("- {name: a, sql: SELECT 1}\n", "missing required key 'expect'"),
    ("- {name: a, sql: SELECT 1, expect: true}\n", "write 1 or 0"),
    ("- {name: a b, sql: SELECT 1, expect: 1}\n", "[0].name"),
    ("- {name: a, sql: SELECT 1, expect: 1}\n- {name: a, sql: SELECT 2, expect: 2}\n",
     "duplicate check name"),
    ("- {name: a, sql: 'SELECT 1; DELETE FROM vitals', expect: 1}\n",
     "must be exactly one SQL query"),
    ("- {name: a, sql: '', expect: 1}\n", "must be a non-empty SQL query"),
    ("checks: []\n", "top level: must be a list"),
    ("- [\n", "not valid YAML"),
])
def test_load_checks_refuses_malformed_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "post.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BundleRejected) as info:
        load_checks(path)
    assert info.value.kind == "malformed"
    assert str(path) in info.value.message
    assert needle in info.value.message


# -- whole-table counts answered by one scan -------------------------------------------

_CONDS = st.sampled_from([
    "spo2 IS NULL", "spo2 < 92", "spo2 >= 92 AND patient_mrn IS NOT NULL",
    "patient_mrn IS NULL OR spo2 IS NULL", "NOT (spo2 BETWEEN 90 AND 95)",
    "spo2 = 97 -- a trailing comment", "length(patient_mrn) > 5",
    "patient_mrn IN (SELECT patient_mrn FROM vitals WHERE spo2 < 90)",
    "spo2 > (SELECT avg(spo2) FROM vitals)", "nonsense_column = 1", "spo2 = 'x'",
])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conds=st.lists(_CONDS, min_size=1, max_size=6),
       rows=st.lists(st.tuples(st.one_of(st.none(), st.sampled_from(["M-1", "MRN-22"])),
                               st.one_of(st.none(), st.integers(80, 100))), max_size=30))
def test_merged_scans_give_what_each_check_gives_alone(
        tmp_path: Path, conds: list[str], rows: list[tuple[str | None, int | None]]) -> None:
    db = tmp_path / "merge.db"
    db.unlink(missing_ok=True)
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE vitals (id INTEGER PRIMARY KEY, patient_mrn TEXT, spo2 REAL)")
    c.executemany("INSERT INTO vitals (patient_mrn, spo2) VALUES (?, ?)", rows)
    checks = [Check(f"c{i}", f"SELECT COUNT(*) FROM vitals WHERE {cond}", i % 3)
              for i, cond in enumerate(conds)]
    alone = [f for f in (run_check(c, ch) for ch in checks) if f is not None]
    assert run_checks(c, checks) == alone
    c.close()


def test_only_whole_table_counts_of_one_table_share_a_scan(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE INDEX idx_mrn ON vitals(patient_mrn)")
    checks = [Check("a", "SELECT COUNT(*) FROM vitals WHERE spo2 < 90", 0),
              Check("indexed", "SELECT COUNT(*) FROM vitals WHERE patient_mrn = 'MRN-1'", 1),
              Check("b", "select count( * ) from \"vitals\" where spo2 > 99;", 0),
              Check("other_table", "SELECT COUNT(*) FROM settings WHERE value IS NULL", 0),
              Check("not_a_count", "SELECT MAX(spo2) FROM vitals WHERE spo2 < 99", 91)]
    jobs = plan_scans(conn, checks)
    assert [[ch.name for _i, ch in job] for job in jobs] == [
        ["a", "b"], ["indexed"], ["other_table"], ["not_a_count"]]
    assert run_checks(conn, checks) == [
        CheckFailure("not_a_count", checks[4].sql, 91, 97.0)]


def test_a_merged_scan_that_fails_reports_each_check_alone(conn: sqlite3.Connection) -> None:
    checks = [Check("good", "SELECT COUNT(*) FROM vitals WHERE spo2 < 90", 0),
              Check("grouped",
                    "SELECT COUNT(*) FROM vitals WHERE spo2 <> 'a' GROUP BY patient_mrn", 0)]
    failures = run_checks(conn, checks)
    assert [f.name for f in failures] == ["grouped"]  # GROUP BY: one row per MRN
    assert failures[0].actual == 1 and failures[0].error is None
