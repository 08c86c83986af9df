"""The post-migration validation, rule by rule, on databases built to break each rule.

The validation is the last line of defence after the stop: the rehearsal catches every
broken migration the other tests use before the app is stopped, so there the validation
of the migrated copy never has anything to refuse. Here each rule gets a database that
violates it and nothing else (a migrated version-14 sample of the shipped history,
changed by one statement), and must name the problem; the unchanged database passes.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import SHIPPED

from zmonitor_migrated import dbinfo, sources
from zmonitor_migrated.engine import Engine
from zmonitor_migrated.sample import make_sample_db
from zmonitor_migrated.validate import validate


@pytest.fixture(scope="module")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A version-10 monitor database migrated by the engine, as a run's copy is."""
    path = tmp_path_factory.mktemp("v14") / "zmonitor-v14.db"
    source = sources.load(SHIPPED)
    make_sample_db(path, source, version=10, vitals=2_000, wal=False)
    with Engine(path, fast=True) as eng:
        eng.apply(source)
    return path


@pytest.fixture
def db(tmp_path: Path, migrated_template: Path) -> Path:
    path = tmp_path / "zmonitor.db"
    shutil.copyfile(migrated_template, path)
    return path


def counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dbinfo.row_counts(conn)
    finally:
        conn.close()


def change(db: Path, *statements: str) -> None:
    """Write the database the way a broken migration would (foreign keys not enforced,
    as on the runner's private copy)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys=OFF")
        for sql in statements:
            conn.execute(sql)
    finally:
        conn.close()


def problems(db: Path, before: dict[str, int], *, target: int = 14, last: int = 14,
             declared_loss: frozenset[str] = frozenset(),
             source_root: Path = SHIPPED) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return validate(conn, target=target, last_version=last, counts_before=before,
                        declared_loss=set(declared_loss), source_root=source_root,
                        quick=True)
    finally:
        conn.close()


def test_the_unchanged_migrated_database_passes_every_rule(db: Path) -> None:
    assert problems(db, counts(db)) == []


@pytest.mark.parametrize("table", ["alarms", "vitals", "settings"])
def test_a_lost_row_is_refused(db: Path, table: str) -> None:
    before = counts(db)
    change(db, f'DELETE FROM "{table}" WHERE rowid = (SELECT MIN(rowid) FROM "{table}")')
    found = problems(db, before)
    n = before[table]
    assert f"table {table} lost rows: {n} before, {n - 1} after; declare the loss in " \
           "bundle.yaml 'declared_row_loss' if that is intended" in found, found


def test_a_declared_loss_is_accepted(db: Path) -> None:
    before = counts(db)
    change(db, "DELETE FROM alarms WHERE rowid = (SELECT MIN(rowid) FROM alarms)")
    assert problems(db, before, declared_loss=frozenset({"alarms"})) == []


def test_a_disappeared_table_is_refused(db: Path) -> None:
    before = counts(db)
    change(db, "DROP TABLE telemetry_metrics")
    found = problems(db, before)
    assert any(p.startswith("table telemetry_metrics (0 rows) disappeared") for p in found), \
        found


def test_a_foreign_key_orphan_is_refused(db: Path) -> None:
    before = counts(db)
    # An alarm of a patient that does not exist: no post check looks at alarms, so only
    # the foreign-key rule can see it.
    change(db, "INSERT INTO alarms (patient_mrn, alarm_type, severity, timestamp) "
               "SELECT 'NO-SUCH-MRN', alarm_type, severity, timestamp FROM alarms LIMIT 1")
    found = problems(db, before)
    fk = [p for p in found if p.startswith("foreign key:")]
    assert fk and "alarms" in fk[0], found


def test_a_wrong_schema_version_is_refused(db: Path) -> None:
    # The plan said the copy would end at version 15; it is at 14.
    found = problems(db, counts(db), target=15, last=15)
    assert found[0] == "schema version is 14, expected 15", found


def test_a_failing_post_check_is_refused(db: Path) -> None:
    before = counts(db)
    change(db, "UPDATE vitals SET patient_mrn = NULL WHERE rowid = 1")
    found = problems(db, before)
    assert any("no_null_patient_mrn" in p for p in found), found


def test_a_failing_post_check_of_its_own_bundle_is_refused(tmp_path: Path, db: Path) -> None:
    """The checks are read from the bundle's own ``checks/post.yaml``."""
    src = tmp_path / "src"
    shutil.copytree(SHIPPED, src)
    (src / "checks" / "post.yaml").write_text(
        "- name: guard_sentinel\n  sql: SELECT COUNT(*) FROM patients\n  expect: -1\n")
    found = problems(db, counts(db), source_root=src)
    assert any("guard_sentinel" in p for p in found), found


def test_a_database_yaml_mismatch_is_refused(db: Path) -> None:
    before = counts(db)
    change(db, "CREATE INDEX idx_guard_not_in_spec ON vitals(heart_rate)")
    found = problems(db, before)
    assert any(p.startswith("schema:") and "idx_guard_not_in_spec" in p for p in found), found


def test_rules_of_the_final_state_are_skipped_for_a_target_short_of_it(db: Path) -> None:
    """Rules 5 and 6 describe the bundle's last version; a ``--target`` run stops short."""
    before = counts(db)
    change(db, "CREATE INDEX idx_guard_not_in_spec ON vitals(heart_rate)",
           "UPDATE vitals SET patient_mrn = NULL WHERE rowid = 1")
    assert problems(db, before, target=14, last=15) == []


def test_a_damaged_database_is_refused_by_the_integrity_rule(db: Path) -> None:
    change(db, "DELETE FROM vitals WHERE id <= 500")  # free pages on the freelist
    before = counts(db)
    with open(db, "r+b") as f:  # the header's freelist count no longer matches the list
        f.seek(36)
        n = int.from_bytes(f.read(4), "big")
        f.seek(36)
        f.write((n + 3).to_bytes(4, "big"))
    found = problems(db, before)
    assert any(p.startswith("integrity:") and "freelist" in p for p in found), found
