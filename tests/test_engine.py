"""The migration runner (zmonitor_migrated.engine) against real SQLite files.

Every test builds its own source folder and database in tmp_path and asserts on the
database's content, its dump or its exact bytes afterwards."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from engine_helpers import (
    apply,
    dump,
    make_db,
    make_source,
    query,
    source,
    table_hash,
    versions,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmonitor_migrated.engine import BATCH_TABLE, Engine, Interrupted, Progress
from zmonitor_migrated.errors import MigrationSqlError, PlanError
from zmonitor_migrated.sources import load

# --------------------------------------------------------------------------- fixtures

INIT = """\
CREATE TABLE patients (id INTEGER PRIMARY KEY, mrn TEXT UNIQUE, name TEXT NOT NULL);
CREATE TABLE alarms (
    id INTEGER PRIMARY KEY,
    patient_id INTEGER NOT NULL REFERENCES patients(id) ON DELETE CASCADE,
    kind TEXT
);
"""
DATA = """\
INSERT INTO patients VALUES (1, 'MRN1', 'Ann'), (2, 'MRN2', 'Bob'), (3, 'MRN3', 'Cy');
INSERT INTO alarms VALUES (10, 1, 'HR'), (11, 1, 'SPO2'), (12, 2, 'HR'), (13, 3, 'RR');
"""
REBUILD_PATIENTS = """\
-- zmonitor:allow rebuild-with-children
CREATE TABLE patients_new (id INTEGER PRIMARY KEY, mrn TEXT UNIQUE, name TEXT NOT NULL,
                           notes TEXT);
INSERT INTO patients_new (id, mrn, name) SELECT id, mrn, name FROM patients;
DROP TABLE patients;
ALTER TABLE patients_new RENAME TO patients;
"""


def monitor(tmp_path: Path, extra: dict[str, str] | None = None) -> tuple[Path, Path]:
    """A source whose 0001 creates patients/alarms and 0002 loads rows; a DB at v2."""
    files = {"schema/0001_initial_schema.sql": INIT,
             "rollback/0001_rollback.sql": "DROP TABLE alarms;\nDROP TABLE patients;\n",
             "seed/0002_sample_rows.sql": DATA,
             "rollback/0002_rollback.sql": "DELETE FROM alarms;\nDELETE FROM patients;\n"}
    files.update(extra or {})
    src = make_source(tmp_path / "src", files)
    db = tmp_path / "monitor.db"
    apply(db, load(src), target=2)
    return src, db


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------ seed-style files, hashes

SEED_STYLE = """\
-- Migration: Add emergency_contact column to patients table
-- Version: 0003

-- Migration UP
BEGIN TRANSACTION;

-- Add new column
ALTER TABLE patients
ADD COLUMN emergency_contact TEXT NULL;

-- Update schema version
INSERT INTO schema_version (version, applied_at, description, migration_type)
VALUES (3, datetime('now'), 'Add emergency_contact column', 'schema');

COMMIT;
"""


def test_seed_style_file_is_accepted_unchanged_and_version_row_written_once(
        tmp_path: Path) -> None:
    src, db = monitor(tmp_path, {"schema/0003_add_emergency_contact.sql": SEED_STYLE})
    raw = (src / "migrations/schema/0003_add_emergency_contact.sql").read_bytes()
    assert apply(db, load(src), applied_by="test-suite") == [3]
    rows = query(db, "SELECT version, description, migration_type, file_hash, "
                     "execution_time_ms, applied_by, applied_at FROM schema_version "
                     "WHERE version = 3")
    assert len(rows) == 1
    version, description, kind, file_hash, ms, applied_by, applied_at = rows[0]
    assert (version, description, kind) == (3, "Add emergency contact", "schema")
    assert file_hash == hashlib.sha256(raw).hexdigest()
    assert isinstance(ms, int) and ms >= 0
    assert applied_by == "test-suite"
    assert len(applied_at) == 19  # "YYYY-MM-DD HH:MM:SS"
    assert "emergency_contact" in [c[1] for c in query(db, "PRAGMA table_info(patients)")]
    assert versions(db) == [1, 2, 3]


def test_default_applied_by_names_the_tool(tmp_path: Path) -> None:
    _src, db = monitor(tmp_path)
    by = query(db, "SELECT applied_by FROM schema_version")
    assert all(b[0].startswith("zmonitor-migrate (") for b in by)


def test_edited_applied_migration_is_refused_and_db_untouched(tmp_path: Path) -> None:
    src, db = monitor(tmp_path, {"schema/0003_add_notes.sql":
                                 "ALTER TABLE patients ADD COLUMN notes TEXT;\n"})
    before = db.read_bytes()
    (src / "migrations/seed/0002_sample_rows.sql").write_text(
        DATA + "INSERT INTO patients VALUES (4, 'MRN4', 'Dee');\n")
    edited = load(src)
    with Engine(db) as engine, pytest.raises(PlanError) as info:
        engine.apply(edited)
    assert info.value.kind == "applied-migration-changed"
    assert "0002" in info.value.message or "seed/0002" in info.value.message
    assert db.read_bytes() == before


def test_already_applied_is_a_noop(tmp_path: Path) -> None:
    src, db = monitor(tmp_path)
    before = db.read_bytes()
    assert apply(db, load(src)) == []
    assert db.read_bytes() == before


# ------------------------------------------------------------- failing migration


def test_failing_migration_leaves_db_exactly_as_before(tmp_path: Path) -> None:
    bad = ("-- first statement works, second fails\n"
           "UPDATE patients SET name = upper(name);\n"
           "INSERT INTO alarms SELECT * FROM alarms_archive;\n")
    src, db = monitor(tmp_path, {"data/0003_copy_archive.sql": bad})
    before_dump, before_bytes = dump(db), db.read_bytes()
    with Engine(db) as engine:
        engine.conn.execute("PRAGMA foreign_keys=ON")
        with pytest.raises(MigrationSqlError) as info:
            engine.apply(load(src))
        assert engine.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert not engine.conn.in_transaction
    err = info.value
    assert err.path == "migrations/data/0003_copy_archive.sql"
    assert err.line == 3
    assert "no such table: alarms_archive" in err.sqlite_message
    assert str(err).startswith("migrations/data/0003_copy_archive.sql:3: ")
    assert err.version == 3
    assert dump(db) == before_dump
    assert db.read_bytes() == before_bytes
    assert query(db, "SELECT name FROM patients ORDER BY id") == [("Ann",), ("Bob",), ("Cy",)]


def test_failure_in_a_later_migration_keeps_the_earlier_ones(tmp_path: Path) -> None:
    src, db = monitor(tmp_path, {
        "schema/0003_add_notes.sql": "ALTER TABLE patients ADD COLUMN notes TEXT;\n",
        "schema/0004_broken.sql": "\n\nCREATE TABLE x (a);\nCREATE TABLE x (b);\n"})
    with pytest.raises(MigrationSqlError) as info:
        apply(db, load(src))
    assert (info.value.line, info.value.version) == (4, 4)
    assert "already exists" in info.value.sqlite_message
    assert versions(db) == [1, 2, 3]
    assert query(db, "SELECT name FROM sqlite_master WHERE name='x'") == []


def test_incomplete_statement_is_reported_with_its_line(tmp_path: Path) -> None:
    src, db = monitor(tmp_path, {"schema/0003_bad.sql":
                                 "CREATE TABLE a (x);\n\nCREATE TABLE b (y)\n"})
    before = db.read_bytes()
    with pytest.raises(MigrationSqlError) as info:
        apply(db, load(src))
    assert info.value.line == 3
    assert db.read_bytes() == before


# ------------------------------------------------------------ foreign keys, rebuilds


def test_rebuild_of_parent_with_cascading_child_keeps_every_child_row(tmp_path: Path) -> None:
    src, db = monitor(tmp_path, {"schema/0003_rebuild_patients.sql": REBUILD_PATIENTS})
    alarms_before = table_hash(db, "alarms")
    with Engine(db) as engine:
        engine.conn.execute("PRAGMA foreign_keys=ON")  # as the app (and the reference runner) runs
        assert engine.apply(load(src)) == [3]
        assert engine.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1  # restored
    assert query(db, "SELECT count(*) FROM alarms") == [(4,)]
    assert table_hash(db, "alarms") == alarms_before
    assert "notes" in [c[1] for c in query(db, "PRAGMA table_info(patients)")]
    # the child still references "patients" (not a renamed old table) and is consistent
    assert query(db, "PRAGMA foreign_key_list(alarms)")[0][2] == "patients"
    assert query(db, "PRAGMA foreign_key_check") == []


def test_control_same_rebuild_with_foreign_keys_on_loses_children(tmp_path: Path) -> None:
    """Shows the rebuild test above could fail: plain sqlite3 with enforcement on, as the
    the reference runner would run it, cascades the DROP into alarms."""
    db = make_db(tmp_path / "plain.db", INIT + DATA)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("BEGIN")
    for stmt in REBUILD_PATIENTS.split(";")[:-1]:
        conn.execute(stmt)
    conn.execute("COMMIT")
    assert conn.execute("SELECT count(*) FROM alarms").fetchone() == (0,)
    conn.close()


def test_rebuild_that_breaks_references_is_rolled_back(tmp_path: Path) -> None:
    lossy = REBUILD_PATIENTS.replace("FROM patients;", "FROM patients WHERE id <> 2;")
    src, db = monitor(tmp_path, {"schema/0003_lossy_rebuild.sql": lossy})
    before_dump, before_bytes = dump(db), db.read_bytes()
    with Engine(db) as engine:
        engine.conn.execute("PRAGMA foreign_keys=OFF")
        with pytest.raises(MigrationSqlError) as info:
            engine.apply(load(src))
        assert engine.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 0  # restored
    assert "foreign key violations" in info.value.sqlite_message
    assert "alarms rowid 12 references patients" in info.value.sqlite_message
    assert dump(db) == before_dump
    assert db.read_bytes() == before_bytes


def test_autoincrement_sequence_survives_a_rebuild(tmp_path: Path) -> None:
    """Bug fix: the copy set the new table's sequence to the highest *remaining* id, so
    ids of deleted rows were handed out again after the rebuild."""
    init = ("CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT);\n"
            "CREATE TABLE other (id INTEGER PRIMARY KEY AUTOINCREMENT);\n")
    rebuild = ("CREATE TABLE events_new (id INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT, "
               "at INTEGER);\n"
               "INSERT INTO events_new (id, what) SELECT id, what FROM events;\n"
               "DROP TABLE events;\n"
               "ALTER TABLE events_new RENAME TO events;\n")
    src = make_source(tmp_path / "src", {"schema/0001_init.sql": init,
                                         "schema/0002_rebuild_events.sql": rebuild})
    db = tmp_path / "db"
    apply(db, load(src), target=1)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executemany("INSERT INTO events (what) VALUES (?)", [(str(i),) for i in range(5)])
    conn.execute("DELETE FROM events WHERE id >= 4")  # sequence stays at 5
    conn.execute("INSERT INTO other DEFAULT VALUES")
    conn.close()
    apply(db, load(src))
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("INSERT INTO events (what) VALUES ('after')")
    assert conn.execute("SELECT max(id) FROM events").fetchone() == (6,)  # not 4
    assert conn.execute("SELECT name, seq FROM sqlite_sequence ORDER BY name").fetchall() == [
        ("events", 6), ("other", 1)]
    conn.close()


def test_autoincrement_sequence_survives_a_rebuild_of_an_emptied_table(tmp_path: Path) -> None:
    init = "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT);\n"
    rebuild = ("CREATE TABLE events_new (id INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT);\n"
               "INSERT INTO events_new SELECT * FROM events;\n"
               "DROP TABLE events;\nALTER TABLE events_new RENAME TO events;\n")
    src = make_source(tmp_path / "src", {"schema/0001_init.sql": init,
                                         "schema/0002_rebuild.sql": rebuild})
    db = tmp_path / "db"
    apply(db, load(src), target=1)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executemany("INSERT INTO events (what) VALUES (?)", [("x",)] * 3)
    conn.execute("DELETE FROM events")
    conn.close()
    apply(db, load(src))
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("INSERT INTO events (what) VALUES ('after')")
    assert conn.execute("SELECT id FROM events").fetchall() == [(4,)]
    conn.close()


# ------------------------------------------------------------------- authorizer


@pytest.mark.parametrize(("sql", "word"), [
    ("ATTACH DATABASE '{other}' AS other;", "ATTACH"),
    ("DETACH DATABASE main;", "DETACH"),
    ("PRAGMA writable_schema=ON;", "PRAGMA writable_schema"),
    ("PRAGMA foreign_keys=ON;", "PRAGMA foreign_keys"),
    ("SELECT load_extension('/nonexistent/evil.so');", "load_extension()"),
    ("SAVEPOINT s1;", "SAVEPOINT"),
    ("ROLLBACK;", "ROLLBACK"),
])
def test_dangerous_statements_are_refused(tmp_path: Path, sql: str, word: str) -> None:
    other = tmp_path / "other.db"
    text = ("UPDATE patients SET name = 'changed';\n"
            + sql.format(other=other) + "\nUPDATE patients SET name = 'after';\n")
    src, db = monitor(tmp_path, {"schema/0003_sneaky.sql": text})
    before = db.read_bytes()
    with pytest.raises(MigrationSqlError) as info:
        apply(db, load(src))
    assert info.value.line == 2
    assert "not authorized" in info.value.sqlite_message
    assert info.value.sqlite_message.startswith(f"{word} is not allowed in a migration")
    assert db.read_bytes() == before
    assert not other.exists()
    assert versions(db) == [1, 2]


def test_read_only_pragmas_are_allowed(tmp_path: Path) -> None:
    src, db = monitor(tmp_path, {"schema/0003_introspect.sql":
                                 "PRAGMA table_info(patients);\n"
                                 "CREATE TABLE t (x);\n"})
    assert apply(db, load(src)) == [3]


# -------------------------------------------------------------------- targets, rollback


def four_versions(tmp_path: Path, *, rollback_2: bool = True) -> Path:
    files = {
        "schema/0001_initial_schema.sql": INIT,
        "rollback/0001_rollback.sql": "DROP TABLE alarms;\nDROP TABLE patients;\n",
        "seed/0002_sample_rows.sql": DATA,
        "schema/0003_add_notes.sql": "ALTER TABLE patients ADD COLUMN notes TEXT;\n",
        "rollback/0003_rollback.sql": "ALTER TABLE patients DROP COLUMN notes;\n",
        "schema/0004_add_beds.sql": "CREATE TABLE beds (id INTEGER PRIMARY KEY);\n",
        "rollback/0004_rollback.sql": ("BEGIN TRANSACTION;\nDROP TABLE beds;\n"
                                       "DELETE FROM schema_version WHERE version = 4;\n"
                                       "COMMIT;\n"),
    }
    if rollback_2:
        files["rollback/0002_rollback.sql"] = "DELETE FROM alarms;\nDELETE FROM patients;\n"
    return make_source(tmp_path / "src", files)


def test_target_stops_there_and_below_current_is_refused(tmp_path: Path) -> None:
    src = load(four_versions(tmp_path))
    db = tmp_path / "db"
    assert apply(db, src, target=2) == [1, 2]
    assert versions(db) == [1, 2]
    assert apply(db, src, target=3) == [3]
    before = db.read_bytes()
    with pytest.raises(PlanError) as info:
        apply(db, src, target=2)
    assert info.value.kind == "bad-target"
    with pytest.raises(PlanError) as info:
        apply(db, src, target=9)
    assert info.value.kind == "bad-target"
    assert db.read_bytes() == before
    assert apply(db, src) == [4]


def test_rollback_runs_newest_first_and_removes_version_rows(tmp_path: Path) -> None:
    src = load(four_versions(tmp_path))
    db = tmp_path / "db"
    apply(db, src)
    seen: list[Progress] = []
    with Engine(db, on_progress=seen.append) as engine:
        assert engine.rollback(src, to=1) == [4, 3, 2]
    assert [p.version for p in seen] == [4, 3, 2]
    assert seen[0].path == "migrations/rollback/0004_rollback.sql"
    assert versions(db) == [1]
    tables = {r[0] for r in query(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert "beds" not in tables
    assert "notes" not in [c[1] for c in query(db, "PRAGMA table_info(patients)")]
    assert query(db, "SELECT count(*) FROM patients") == [(0,)]
    # and up again, with the same hashes recorded
    assert apply(db, src) == [2, 3, 4]
    assert versions(db) == [1, 2, 3, 4]


def test_rollback_with_a_missing_script_refuses_before_anything_runs(tmp_path: Path) -> None:
    src = load(four_versions(tmp_path, rollback_2=False))
    db = tmp_path / "db"
    apply(db, src)
    before = db.read_bytes()
    with Engine(db) as engine, pytest.raises(PlanError) as info:
        engine.rollback(src, to=0)
    assert info.value.kind == "missing-rollback"
    assert "0002" in info.value.message
    assert db.read_bytes() == before
    assert versions(db) == [1, 2, 3, 4]  # 4 and 3 were NOT rolled back


def test_failing_rollback_keeps_its_version_and_data(tmp_path: Path) -> None:
    files = {"schema/0001_init.sql": INIT,
             "rollback/0001_rollback.sql": "DROP TABLE alarms;\nDROP TABLE nope;\n"}
    src = load(make_source(tmp_path / "src", files))
    db = tmp_path / "db"
    apply(db, src)
    before = dump(db)
    with Engine(db) as engine, pytest.raises(MigrationSqlError) as info:
        engine.rollback(src, to=0)
    assert info.value.path == "migrations/rollback/0001_rollback.sql"
    assert info.value.line == 2
    assert dump(db) == before


# ------------------------------------------------------------------------ batches

BACKFILL = """\
-- Backfill vitals.patient_mrn (batched)
-- zmonitor:batch table=vitals size={size}
BEGIN TRANSACTION;
UPDATE vitals
   SET patient_mrn = (SELECT mrn FROM patients WHERE patients.old_id = vitals.patient_id),
       touched = touched + 1
 WHERE rowid BETWEEN :batch_start AND :batch_end AND patient_mrn IS NULL;
COMMIT;
"""
UNBATCHED = ("UPDATE vitals SET patient_mrn = (SELECT mrn FROM patients "
             "WHERE patients.old_id = vitals.patient_id), touched = touched + 1 "
             "WHERE patient_mrn IS NULL")
VITALS_DDL = """\
CREATE TABLE patients (mrn TEXT PRIMARY KEY, old_id TEXT UNIQUE);
CREATE TABLE vitals (id INTEGER PRIMARY KEY, patient_id TEXT, patient_mrn TEXT,
                     heart_rate INTEGER, touched INTEGER NOT NULL DEFAULT 0);
"""


def vitals_db(path: Path, rowids: list[int], *, unmatched_every: int = 0,
              patients: int = 7) -> Path:
    """vitals rows at the given rowids; every ``unmatched_every``-th names no patient."""
    rows = []
    for i, rid in enumerate(rowids):
        pid = f"X{i}" if unmatched_every and i % unmatched_every == 0 else f"P{i % patients}"
        rows.append((rid, pid, 60 + i % 50))
    return make_db(path, VITALS_DDL, [
        ("INSERT INTO patients VALUES (?, ?)", [(f"MRN{i}", f"P{i}") for i in range(patients)]),
        ("INSERT INTO vitals (id, patient_id, heart_rate) VALUES (?, ?, ?)", rows)])


def backfill_source(root: Path, size: int) -> Path:
    return make_source(root, {"data/0001_backfill_mrn.sql": BACKFILL.format(size=size),
                              "rollback/0001_rollback.sql":
                                  "UPDATE vitals SET patient_mrn = NULL;\n"})


def unbatched_copy(db: Path, out: Path) -> Path:
    out.write_bytes(db.read_bytes())
    conn = sqlite3.connect(out, isolation_level=None)
    conn.execute(UNBATCHED)
    conn.close()
    return out


def test_batched_equals_unbatched_and_reports_progress(tmp_path: Path) -> None:
    db = vitals_db(tmp_path / "db", list(range(1, 1001)), unmatched_every=13)
    expected = unbatched_copy(db, tmp_path / "expected.db")
    src = load(backfill_source(tmp_path / "src", 64))
    seen: list[Progress] = []
    assert apply(db, src, on_progress=seen.append) == [1]
    assert table_hash(db, "vitals") == table_hash(expected, "vitals")
    batches = [p for p in seen if not p.done]
    assert [p.batch for p in batches] == list(range(1, 17))  # ceil(1000 / 64)
    assert {p.batches for p in seen} == {16}
    assert all(p.eta_s is not None and p.eta_s >= 0 for p in batches)
    assert [p.rows for p in batches] == sorted(p.rows for p in batches)
    assert seen[-1].done and seen[-1].eta_s == 0.0 and seen[-1].rows == 1000
    assert query(db, f"SELECT count(*) FROM {BATCH_TABLE}") == [(0,)]
    assert query(db, "SELECT file_hash IS NOT NULL, execution_time_ms >= 0, migration_type "
                     "FROM schema_version") == [(1, 1, "data")]


def test_batched_terminates_when_rows_never_match(tmp_path: Path) -> None:
    # the first 30 rows (and every 5th after) name no patient: they stay NULL forever
    rowids = list(range(1, 201))
    db = vitals_db(tmp_path / "db", rowids, unmatched_every=5)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE vitals SET patient_id = 'NOBODY' WHERE id <= 30")
    conn.close()
    seen: list[Progress] = []
    apply(db, load(backfill_source(tmp_path / "src", 10)), on_progress=seen.append)
    assert seen[-1].done and seen[-1].batch == 20
    unmatched = query(db, "SELECT count(*) FROM vitals WHERE patient_mrn IS NULL")[0][0]
    assert unmatched == 30 + len([i for i in range(30, 200) if i % 5 == 0])
    assert query(db, "SELECT count(*) FROM vitals WHERE patient_mrn IS NULL "
                     "AND patient_id IN (SELECT old_id FROM patients)") == [(0,)]
    assert query(db, "SELECT min(touched), max(touched) FROM vitals") == [(1, 1)]


def test_the_seeds_limit_loop_makes_no_progress(tmp_path: Path) -> None:
    """Control for the test above: the reference runner's loop (``WHERE id IN (SELECT id
    … WHERE patient_mrn IS NULL LIMIT n)``, repeated while NULL rows remain) keeps picking
    the same unmatched rows. Run it a bounded number of times and show it is stuck."""
    db = vitals_db(tmp_path / "db", list(range(1, 201)))
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE vitals SET patient_id = 'NOBODY' WHERE id <= 30")
    seed_batch = ("UPDATE vitals SET patient_mrn = (SELECT mrn FROM patients "
                  "WHERE patients.old_id = vitals.patient_id) WHERE id IN "
                  "(SELECT id FROM vitals WHERE patient_mrn IS NULL LIMIT 10)")
    remaining = []
    for _ in range(25):  # the reference runner loops "while rows remain": bounded here
        conn.execute(seed_batch)
        remaining.append(conn.execute(
            "SELECT count(*) FROM vitals WHERE patient_mrn IS NULL").fetchone()[0])
    conn.close()
    assert remaining == [200] * 25  # zero progress, from the first iteration on
    # ours, on the same data, finishes and fills every row that has a patient
    db2 = vitals_db(tmp_path / "db2", list(range(1, 201)))
    conn = sqlite3.connect(db2, isolation_level=None)
    conn.execute("UPDATE vitals SET patient_id = 'NOBODY' WHERE id <= 30")
    conn.close()
    apply(db2, load(backfill_source(tmp_path / "src", 10)))
    assert query(db2, "SELECT count(*) FROM vitals WHERE patient_mrn IS NULL") == [(30,)]


def test_batched_on_empty_table_records_the_version(tmp_path: Path) -> None:
    db = vitals_db(tmp_path / "db", [])
    seen: list[Progress] = []
    assert apply(db, load(backfill_source(tmp_path / "src", 10)), on_progress=seen.append) \
        == [1]
    assert versions(db) == [1]
    assert [(p.done, p.batches) for p in seen] == [(True, 0)]


def test_batched_with_sparse_zero_and_negative_rowids(tmp_path: Path) -> None:
    """Bug fix: ``min(rowid) or 1`` skipped rowid 0 when it was the smallest."""
    rowids = [0, 1, 2, 5, 999, 1000, 1001, 50_000, 50_001, 1_000_000]
    db = vitals_db(tmp_path / "db", rowids)
    expected = unbatched_copy(db, tmp_path / "expected.db")
    seen: list[Progress] = []
    apply(db, load(backfill_source(tmp_path / "src", 1000)), on_progress=seen.append)
    assert table_hash(db, "vitals") == table_hash(expected, "vitals")
    assert query(db, "SELECT touched, patient_mrn FROM vitals WHERE id = 0") == [(1, "MRN0")]
    assert seen[-1].batches == 1001

    neg = vitals_db(tmp_path / "neg", [-7, -1, 3])
    apply(neg, load(backfill_source(tmp_path / "src2", 2)))
    assert query(neg, "SELECT id, touched FROM vitals ORDER BY id") == [(-7, 1), (-1, 1), (3, 1)]


def test_rows_inserted_after_the_start_beyond_max_rowid_are_not_touched(
        tmp_path: Path) -> None:
    """Documented behaviour: the range is fixed when the migration starts."""
    db = vitals_db(tmp_path / "db", list(range(1, 101)))

    def insert_late(p: Progress) -> None:
        if p.batch == 1 and not p.done:
            conn = sqlite3.connect(db, isolation_level=None)
            conn.execute("INSERT INTO vitals (id, patient_id) VALUES (500, 'P1')")
            conn.close()

    apply(db, load(backfill_source(tmp_path / "src", 10)), on_progress=insert_late)
    assert query(db, "SELECT patient_mrn, touched FROM vitals WHERE id = 500") == [(None, 0)]
    assert query(db, "SELECT count(*) FROM vitals WHERE touched = 1") == [(100,)]


def stop_after(n: int) -> tuple[list[int], object]:
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        return calls[0] > n

    return calls, should_stop


def test_should_stop_interrupts_between_batches_and_a_later_run_resumes(
        tmp_path: Path) -> None:
    db = vitals_db(tmp_path / "db", list(range(1, 501)), unmatched_every=7)
    expected = unbatched_copy(db, tmp_path / "expected.db")
    src = load(backfill_source(tmp_path / "src", 50))
    # should_stop is polled once before the migration and once before every batch
    _calls, should_stop = stop_after(4)
    with Engine(db, should_stop=should_stop) as engine:  # type: ignore[arg-type]
        with pytest.raises(Interrupted):
            engine.apply(src)
        assert engine.batch_state(1) == (3, 10)
        assert not engine.conn.in_transaction
    assert query(db, f"SELECT next_rowid, max_rowid FROM {BATCH_TABLE}") == [(151, 500)]
    assert query(db, "SELECT count(*) FROM vitals WHERE touched = 1") == [(150,)]
    assert versions(db) == []
    seen: list[Progress] = []
    apply(db, src, on_progress=seen.append)
    assert [p.batch for p in seen if not p.done] == list(range(4, 11))
    # no batch ran twice: touched would be 2 somewhere
    assert table_hash(db, "vitals") == table_hash(expected, "vitals")
    assert versions(db) == [1]
    assert query(db, f"SELECT count(*) FROM {BATCH_TABLE}") == [(0,)]


def test_edited_half_applied_batched_migration_is_refused(tmp_path: Path) -> None:
    """Bug fix: resuming used the edited file's SQL for the remaining batches."""
    db = vitals_db(tmp_path / "db", list(range(1, 101)))
    root = backfill_source(tmp_path / "src", 10)
    _calls, should_stop = stop_after(3)
    with Engine(db, should_stop=should_stop) as engine, \
            pytest.raises(Interrupted):  # type: ignore[arg-type]
        engine.apply(load(root))
    path = root / "migrations/data/0001_backfill_mrn.sql"
    path.write_text(path.read_text().replace("touched + 1", "touched + 100"))
    before = db.read_bytes()
    with pytest.raises(PlanError) as info:
        apply(db, load(root))
    assert info.value.kind == "applied-migration-changed"
    assert "half applied" in info.value.message
    assert db.read_bytes() == before


def test_rollback_refused_while_a_batched_migration_is_half_applied(tmp_path: Path) -> None:
    """Bug fix: rolling back earlier versions left the half-done batches in place and a
    stale range that a later apply resumed from."""
    db = vitals_db(tmp_path / "db", list(range(1, 101)))
    root = make_source(tmp_path / "src", {
        "schema/0001_add_index.sql": "CREATE INDEX vitals_pid ON vitals(patient_id);\n",
        "rollback/0001_rollback.sql": "DROP INDEX vitals_pid;\n",
        "data/0002_backfill_mrn.sql": BACKFILL.format(size=10),
        "rollback/0002_rollback.sql": "UPDATE vitals SET patient_mrn = NULL;\n"})
    _calls, should_stop = stop_after(4)  # 0001, then 0002 and two batches
    with Engine(db, should_stop=should_stop) as engine, \
            pytest.raises(Interrupted):  # type: ignore[arg-type]
        engine.apply(load(root))
    assert versions(db) == [1]
    before = db.read_bytes()
    with Engine(db) as engine, pytest.raises(PlanError) as info:
        engine.rollback(load(root), to=0)
    assert info.value.kind == "batch-in-progress"
    assert db.read_bytes() == before


def test_failing_batch_keeps_committed_batches_and_names_the_line(tmp_path: Path) -> None:
    db = vitals_db(tmp_path / "db", list(range(1, 101)))
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TRIGGER no_55 BEFORE UPDATE ON vitals WHEN old.id = 55 "
                 "BEGIN SELECT RAISE(ABORT, 'row 55 is locked'); END")
    conn.close()
    with pytest.raises(MigrationSqlError) as info:
        apply(db, load(backfill_source(tmp_path / "src", 10)))
    assert info.value.line == 4
    assert "row 55 is locked" in info.value.sqlite_message
    assert query(db, "SELECT count(*) FROM vitals WHERE touched = 1") == [(50,)]
    assert query(db, f"SELECT next_rowid FROM {BATCH_TABLE}") == [(51,)]


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rowids=st.sets(st.integers(min_value=-20, max_value=400), max_size=60),
       size=st.integers(min_value=1, max_value=70),
       unmatched_every=st.integers(min_value=0, max_value=6))
def test_property_batched_equals_single_statement(tmp_path_factory: pytest.TempPathFactory,
                                                  rowids: set[int], size: int,
                                                  unmatched_every: int) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    db = vitals_db(tmp / "db", sorted(rowids), unmatched_every=unmatched_every)
    expected = unbatched_copy(db, tmp / "expected.db")
    apply(db, load(backfill_source(tmp / "src", size)))
    assert table_hash(db, "vitals") == table_hash(expected, "vitals")
    assert versions(db) == [1]


def test_source_helper_loads(tmp_path: Path) -> None:
    src = source(tmp_path / "s", {"schema/0001_a.sql": "CREATE TABLE a (x);\n"})
    assert [m.version for m in src.migrations] == [1]


def test_planning_reads_only_the_db_bytes_stay_identical(tmp_path: Path) -> None:
    src = load(four_versions(tmp_path))
    db = tmp_path / "db"
    apply(db, src, target=2)
    before = db.read_bytes()
    with Engine(db) as engine:
        plan = engine.plan(src)
        assert [m.version for m in plan.pending] == [3, 4]
        assert engine.current_version() == 2
        assert engine.batch_state(3) is None
    assert db.read_bytes() == before


def test_batched_migration_on_a_table_without_rowid_fails_clearly(tmp_path: Path) -> None:
    db = make_db(tmp_path / "db", "CREATE TABLE vitals (k TEXT PRIMARY KEY, patient_mrn TEXT, "
                                  "touched INTEGER) WITHOUT ROWID;")
    with pytest.raises(MigrationSqlError) as info:
        apply(db, load(backfill_source(tmp_path / "src", 10)))
    assert info.value.path == "migrations/data/0001_backfill_mrn.sql"
    assert "batch table 'vitals'" in info.value.sqlite_message
    assert "rowid" in info.value.sqlite_message
    assert versions(db) == []


def test_migration_sql_never_reuses_a_statement_the_runner_compiled(tmp_path: Path) -> None:
    """The authorizer is asked only when SQLite compiles, and it is installed once per
    migration, letting the runner's own statements pass. A migration statement with the
    very text of a runner statement compiled in that window must still be checked, not
    served from the connection's statement cache (the engine's internals are used here
    because no shipped runner statement is both harmful and parameterless)."""
    from zmonitor_migrated import sqlscript
    from zmonitor_migrated.engine import Refusal

    db = make_db(tmp_path / "t.db")
    sql = "INSERT INTO main.schema_version (version, applied_at) VALUES (99, 'x');"
    with Engine(db) as eng:
        eng._ensure_bookkeeping()
        with eng._guarded(), eng._transaction():
            eng.conn.execute(sql)  # the runner's own write: passes unchecked
            with pytest.raises(Refusal) as err:
                eng._execute("m.sql", 1, sqlscript.Statement(sql, 1))
    assert err.value.code == "bookkeeping"
