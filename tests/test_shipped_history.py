"""The shipped bundle source bundles/zmonitor/ checked the way the workflow's CI checks a history.

(a) the whole history applied to an empty database matches database.yaml and passes every
post check; (b) so does a field database at version 4 (tests/fixtures/sample_data.sql);
(c) every migration goes up, down and up again with the data intact, and the whole chain
goes down to 0 and up again. All through the real engine on real SQLite files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from zmonitor_migrated import sources
from zmonitor_migrated.engine import Engine
from zmonitor_migrated.errors import MigrationSqlError
from zmonitor_migrated.lint import lint_source
from zmonitor_migrated.post_checks import load_checks, run_checks
from zmonitor_migrated.schema_spec import SchemaSpec, diff, is_ignored_table, live_schema, load_spec

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "bundles" / "zmonitor"
FIXTURES = ROOT / "tests" / "fixtures"
SAMPLE_VERSION = 4

# Rollbacks that deliberately keep derived values in nullable columns (see their comments:
# clearing them would also destroy values the firmware wrote itself).
KEEPS_DERIVED = {5: {"vitals"}, 7: {"vitals", "telemetry_metrics"}}
# Columns a migration fills with datetime('now') or a fresh AUTOINCREMENT id: left out of
# the comparison of the first and the second "up".
STAMPED = {6: {"admission_events": ("id", "created_at")},
           13: {"settings": ("updated_at",)},
           14: {"alarm_thresholds": ("created_at",)}}


@pytest.fixture(scope="module")
def source() -> sources.Source:
    return sources.load(BUNDLE)


@pytest.fixture(scope="module")
def sample_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture loaded into a file, once; tests copy it."""
    path = tmp_path_factory.mktemp("sample") / "sample.db"
    conn = sqlite3.connect(path)
    conn.executescript((FIXTURES / "sample_data.sql").read_text(encoding="utf-8"))  # set-up
    conn.close()
    return path


def copy_of(db: Path, tmp_path: Path, name: str = "monitor.db") -> Path:
    target = tmp_path / name
    shutil.copyfile(db, target)
    return target


def user_tables(conn: sqlite3.Connection) -> list[str]:
    return [n for (n,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
        if not is_ignored_table(n)]


def checksum(conn: sqlite3.Connection, table: str, exclude: tuple[str, ...] = ()) -> str:
    """Order-independent digest of a table's content (rowids may change in a rebuild)."""
    cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")') if r[1] not in exclude]
    rows = conn.execute(f'SELECT {", ".join(cols)} FROM "{table}"').fetchall()
    digest = hashlib.sha256(repr(cols).encode())
    for row in sorted(repr(r) for r in rows):
        digest.update(row.encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    schema: SchemaSpec
    counts: dict[str, int]
    sums: dict[str, str]


def snapshot(db: Path) -> Snapshot:
    conn = sqlite3.connect(db)
    try:
        tables = user_tables(conn)
        return Snapshot(live_schema(conn),
                        {t: conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]
                         for t in tables},
                        {t: checksum(conn, t) for t in tables})
    finally:
        conn.close()


def same_schema(a: SchemaSpec, b: SchemaSpec) -> list[str]:
    return diff(a, b) + diff(b, a)


@pytest.fixture
def engine_for() -> Iterator[Callable[[Path], Engine]]:
    opened: list[Engine] = []

    def make(db: Path) -> Engine:
        engine = Engine(db)
        opened.append(engine)
        return engine

    yield make
    for engine in opened:
        engine.close()


def mentioned_tables(source: sources.Source, version: int, tables: list[str]) -> set[str]:
    mig = source.by_version()[version]
    text = source.text(mig.path) + (source.text(mig.rollback) if mig.rollback else "")
    return {t for t in tables if re.search(rf"\b{t}\b", text, re.IGNORECASE)}


# -- the source itself ---------------------------------------------------------------------
def test_source_is_one_clean_sequence_with_a_rollback_each(source: sources.Source) -> None:
    _, problems = sources.discover(BUNDLE)
    assert problems == []
    assert lint_source(BUNDLE) == []  # no warnings either: rebuilds are acknowledged
    assert [m.version for m in source.migrations] == list(range(1, 15))
    assert all(m.rollback for m in source.migrations)
    assert {m.version: m.kind for m in source.migrations if m.kind != "schema"} == {
        5: "data", 6: "data", 7: "data", 12: "data", 13: "seed", 14: "seed"}
    batched = [(m.version, m.batch.table, m.batch.size) for m in source.migrations if m.batch]
    assert batched == [(12, "vitals", 10000)]
    assert source.info.name == "zmonitor"
    assert source.info.device_types == ("zmonitor-bedside",)
    assert load_spec(BUNDLE / "schema" / "database.yaml").version == source.last_version


def test_sample_data_is_reproducible_and_pinned_to_the_bundle(source: sources.Source) -> None:
    spec = importlib.util.spec_from_file_location("make_sample_data",
                                                  FIXTURES / "make_sample_data.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.VERSION == SAMPLE_VERSION
    assert module.render() == (FIXTURES / "sample_data.sql").read_text(encoding="utf-8"), \
        "sample_data.sql is stale: run python tests/fixtures/make_sample_data.py"


# -- (a) and (b) ---------------------------------------------------------------------------
def assert_final(db: Path, source: sources.Source) -> sqlite3.Connection:
    conn = sqlite3.connect(db)
    assert diff(load_spec(BUNDLE / "schema" / "database.yaml"), live_schema(conn)) == []
    assert run_checks(conn, load_checks(BUNDLE / "checks" / "post.yaml")) == []
    versions = [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == list(range(1, source.last_version + 1))
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    return conn


def test_a_history_applies_to_an_empty_database(tmp_path: Path, source: sources.Source,
                                                engine_for) -> None:
    db = tmp_path / "empty.db"
    assert engine_for(db).apply(source) == list(range(1, 15))
    conn = assert_final(db, source)
    assert conn.execute("SELECT COUNT(*) FROM settings").fetchone() == (7,)
    assert conn.execute("SELECT COUNT(*) FROM alarm_thresholds").fetchone() == (5,)


def news2(rr: int, spo2: int, sbp: int, hr: int, temp: float) -> int:
    """Independent reimplementation of the partial NEWS2 migration 0012 computes."""
    score = 3 if rr <= 8 else 1 if rr <= 11 else 0 if rr <= 20 else 2 if rr <= 24 else 3
    score += 3 if spo2 <= 91 else 2 if spo2 <= 93 else 1 if spo2 <= 95 else 0
    score += 3 if sbp <= 90 else 2 if sbp <= 100 else 1 if sbp <= 110 else \
        0 if sbp <= 219 else 3
    score += 3 if hr <= 40 else 1 if hr <= 50 else 0 if hr <= 90 else 1 if hr <= 110 else \
        2 if hr <= 130 else 3
    score += 3 if temp <= 35.0 else 1 if temp <= 36.0 else 0 if temp <= 38.0 else \
        1 if temp <= 39.0 else 2
    return score


def test_b_history_applies_to_the_sample_database(tmp_path: Path, source: sources.Source,
                                                  sample_db: Path, engine_for) -> None:
    db = copy_of(sample_db, tmp_path)
    before = snapshot(db)
    with sqlite3.connect(db) as conn:
        legacy = conn.execute(
            "SELECT v.id, p.mrn FROM vitals v JOIN patients p ON p.old_id = v.patient_id "
            "WHERE v.patient_mrn IS NULL").fetchall()
        admitted = conn.execute("SELECT COUNT(*) FROM patients WHERE admission_status = "
                                "'ADMITTED' AND admitted_at IS NOT NULL").fetchone()[0]
    assert len(legacy) > 100  # the fixture really has legacy-firmware rows

    assert engine_for(db).apply(source) == list(range(5, 15))
    conn = assert_final(db, source)
    for table in ("patients", "vitals", "alarms", "telemetry_metrics"):
        assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == before.counts[table]
    mapped = dict(conn.execute("SELECT id, patient_mrn FROM vitals"))
    assert all(mapped[vid] == mrn for vid, mrn in legacy)
    rows = conn.execute("SELECT respiration_rate, spo2, blood_pressure_systolic, heart_rate, "
                        "temperature, early_warning_score FROM vitals "
                        "WHERE temperature IS NOT NULL").fetchall()
    assert rows and all(r[5] == news2(*r[:5]) for r in rows)
    # 0006 derived one ADMISSION per admitted patient without duplicating the event the
    # application had recorded itself.
    assert conn.execute("SELECT COUNT(*) FROM admission_events WHERE event_type='ADMISSION'"
                        ).fetchone()[0] == admitted
    # The seed migrations never overwrite what a user or clinician set.
    assert conn.execute("SELECT value, updated_by FROM settings WHERE key='alarmVolume'"
                        ).fetchone() == ("60", "nurse.jones")
    assert conn.execute("SELECT low_critical, high_critical FROM alarm_thresholds "
                        "WHERE parameter='heart_rate'").fetchone() == (35, 160)


# -- (c) -----------------------------------------------------------------------------------
def database_at(version: int, sample_db: Path, tmp_path: Path, source: sources.Source,
                engine_for) -> Path:
    """A copy of the sample database moved to ``version`` (down by rollbacks, or up)."""
    if version == 0:
        return tmp_path / "monitor.db"
    db = copy_of(sample_db, tmp_path)
    engine = engine_for(db)
    if version < SAMPLE_VERSION:
        engine.rollback(source, to=version)
    elif version > SAMPLE_VERSION:
        engine.apply(source, target=version)
    assert engine.current_version() == version
    return db


@pytest.mark.parametrize("version", range(1, 15))
def test_c_each_migration_goes_up_down_and_up_again(
        version: int, tmp_path: Path, source: sources.Source, sample_db: Path,
        engine_for) -> None:
    db = database_at(version - 1, sample_db, tmp_path, source, engine_for)
    engine = engine_for(db)
    before = snapshot(db) if db.exists() else Snapshot(SchemaSpec(()), {}, {})

    assert engine.apply(source, target=version) == [version]
    up = snapshot(db)
    touched = mentioned_tables(source, version, list(up.counts))
    untouched = [t for t in before.sums if t not in touched]
    for table in untouched:
        assert up.sums[table] == before.sums[table], f"{version} changed untouched {table}"

    assert engine.rollback(source, to=version - 1) == [version]
    down = snapshot(db)
    assert same_schema(before.schema, down.schema) == []
    assert down.counts == before.counts
    kept = KEEPS_DERIVED.get(version, set())
    for table, value in before.sums.items():
        if table not in kept:
            assert down.sums[table] == value, f"rollback {version} changed {table}"
    assert kept <= set(before.sums)

    assert engine.apply(source, target=version) == [version]
    again = snapshot(db)
    assert same_schema(up.schema, again.schema) == []
    assert again.counts == up.counts
    stamped = STAMPED.get(version, {})
    for table, value in up.sums.items():
        if table not in stamped:
            assert again.sums[table] == value, f"re-applying {version} changed {table}"


def test_c_stamped_tables_agree_apart_from_their_stamps(
        tmp_path: Path, source: sources.Source, sample_db: Path, engine_for) -> None:
    db = database_at(5, sample_db, tmp_path, source, engine_for)
    engine = engine_for(db)
    engine.apply(source, target=6)
    with sqlite3.connect(db) as conn:
        first = checksum(conn, "admission_events", ("id", "created_at"))
        derived = conn.execute("SELECT COUNT(*) FROM admission_events "
                               "WHERE notes = 'Migrated from patients table'").fetchone()[0]
    assert derived > 0
    engine.rollback(source, to=5)
    engine.apply(source, target=6)
    with sqlite3.connect(db) as conn:
        assert checksum(conn, "admission_events", ("id", "created_at")) == first


def test_c_full_chain_down_to_zero_and_up_again(
        tmp_path: Path, source: sources.Source, sample_db: Path, engine_for) -> None:
    db = copy_of(sample_db, tmp_path)
    original = snapshot(db)
    engine = engine_for(db)
    engine.apply(source)
    assert engine.rollback(source, to=SAMPLE_VERSION) == list(range(14, 4, -1))
    back = snapshot(db)
    assert same_schema(original.schema, back.schema) == []
    assert back.counts == original.counts
    for table, value in original.sums.items():
        if table not in ("vitals", "telemetry_metrics"):  # derived values kept, see 5 and 7
            assert back.sums[table] == value, table
    with sqlite3.connect(db) as conn, sqlite3.connect(":memory:") as mem:
        mem.executescript((FIXTURES / "sample_data.sql").read_text(encoding="utf-8"))
        kept = ("patient_mrn", "device_label")
        assert checksum(conn, "vitals", kept) == checksum(mem, "vitals", kept)
        assert checksum(conn, "telemetry_metrics", ("device_label",)) == \
            checksum(mem, "telemetry_metrics", ("device_label",))

    assert engine.rollback(source, to=0) == [4, 3, 2, 1]
    assert snapshot(db).counts == {}
    assert engine.apply(source) == list(range(1, 15))
    assert_final(db, source)


def test_rollback_of_the_mrn_change_refuses_to_truncate_a_long_mrn(
        tmp_path: Path, source: sources.Source, sample_db: Path, engine_for) -> None:
    db = copy_of(sample_db, tmp_path)
    engine = engine_for(db)
    engine.apply(source)
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO patients (mrn, name) VALUES (?, 'Long Mrn')", ("M" * 30,))
        conn.execute("INSERT INTO alarms (patient_mrn, alarm_type, severity, timestamp) "
                     "VALUES (?, 'HR_HIGH', 'HIGH', 1)", ("M" * 30,))
    counts = snapshot(db).counts
    with pytest.raises(MigrationSqlError) as info:
        engine.rollback(source, to=8)
    assert info.value.version == 9
    assert "CHECK constraint failed" in info.value.sqlite_message
    assert engine.current_version() == 9
    after = snapshot(db).counts
    for table in ("patients", "alarms", "admission_events", "alarm_history"):
        assert after[table] == counts[table]
