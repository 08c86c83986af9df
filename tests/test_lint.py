"""Lint rules (zmonitor_migrated.lint): every rule reports its file and line; the CLI's
``lint`` command exits non-zero on errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine_helpers import make_source

from zmonitor_migrated.lint import lint_source
from zmonitor_migrated.sources import Problem

ROOT = Path(__file__).resolve().parent.parent

INIT = """\
CREATE TABLE patients (id INTEGER PRIMARY KEY, mrn TEXT NOT NULL);
CREATE TABLE alarms (
    id INTEGER PRIMARY KEY,
    patient_id INTEGER REFERENCES patients(id) ON DELETE CASCADE
);
"""
RB_INIT = "DROP TABLE alarms;\nDROP TABLE patients;\n"


def lint(tmp_path: Path, files: dict[str, str]) -> list[Problem]:
    return lint_source(make_source(tmp_path / "src", files))


def found(problems: list[Problem], code: str) -> list[tuple[str, str, int]]:
    return [(p.severity, p.path, p.line) for p in problems if p.code == code]


def clean_base(**extra: str) -> dict[str, str]:
    files = {"schema/0001_initial_schema.sql": INIT, "rollback/0001_rollback.sql": RB_INIT}
    files.update(extra)
    return files


def test_clean_source_has_no_problems(tmp_path: Path) -> None:
    files = clean_base(**{"schema/0002_add_notes.sql":
                          "ALTER TABLE patients ADD COLUMN notes TEXT;\n",
                          "rollback/0002_rollback.sql":
                          "ALTER TABLE patients DROP COLUMN notes;\n"})
    assert lint(tmp_path, files) == []


# ------------------------------------------------------------------ sequence, naming


def test_gap_in_the_sequence(tmp_path: Path) -> None:
    files = clean_base(**{"schema/0003_add_beds.sql": "CREATE TABLE beds (id INTEGER);\n",
                          "rollback/0003_rollback.sql": "DROP TABLE beds;\n"})
    problems = lint(tmp_path, files)
    assert found(problems, "sequence") == [("error", "migrations/schema/0003_add_beds.sql", 1)]
    assert "gap: 2 is missing" in str(problems[0])


def test_sequence_must_start_at_one(tmp_path: Path) -> None:
    problems = lint(tmp_path, {"schema/0002_init.sql": INIT,
                               "rollback/0002_rollback.sql": RB_INIT})
    assert found(problems, "sequence") == [("error", "migrations/schema/0002_init.sql", 1)]
    assert "must start at 1" in next(p.message for p in problems if p.code == "sequence")


def test_seeds_own_problem_schema_0001_and_seed_0001_both_claim_version_1(
        tmp_path: Path) -> None:
    files = clean_base(**{"seed/0001_default_settings.sql":
                          "INSERT INTO patients VALUES (1, 'x');\n"})
    problems = lint(tmp_path, files)
    assert found(problems, "duplicate-version") == [
        ("error", "migrations/seed/0001_default_settings.sql", 1)]
    msg = next(p.message for p in problems if p.code == "duplicate-version")
    assert "migrations/schema/0001_initial_schema.sql" in msg


def test_type_word_in_name_must_match_folder(tmp_path: Path) -> None:
    files = clean_base(**{"data/0002_schema_add_beds.sql": "UPDATE patients SET mrn = mrn;\n",
                          "rollback/0002_rollback.sql": "SELECT 1;\n"})
    problems = lint(tmp_path, files)
    assert found(problems, "naming") == [("error", "migrations/data/0002_schema_add_beds.sql",
                                          1)]
    assert "'schema'" in next(p.message for p in problems if p.code == "naming")


def test_type_word_matching_folder_is_fine(tmp_path: Path) -> None:
    files = clean_base(**{"data/0002_data_fill_mrn.sql": "UPDATE patients SET mrn = mrn;\n",
                          "rollback/0002_rollback.sql": "SELECT 1;\n"})
    assert lint(tmp_path, files) == []


def test_bad_file_name_and_orphan_rollback(tmp_path: Path) -> None:
    files = clean_base(**{"schema/2_Add-Beds.sql": "CREATE TABLE beds (id INTEGER);\n",
                          "rollback/0007_rollback.sql": "SELECT 1;\n"})
    problems = lint(tmp_path, files)
    assert found(problems, "naming") == [("error", "migrations/schema/2_Add-Beds.sql", 1)]
    assert found(problems, "orphan-rollback") == [
        ("error", "migrations/rollback/0007_rollback.sql", 1)]


# ------------------------------------------------------------------------ rollbacks


def test_missing_rollback_is_an_error_for_schema_and_data_a_warning_for_seed(
        tmp_path: Path) -> None:
    files = clean_base(**{"data/0002_fill.sql": "UPDATE patients SET mrn = upper(mrn);\n",
                          "seed/0003_defaults.sql": "INSERT INTO patients VALUES (1, 'M');\n"})
    problems = lint(tmp_path, files)
    assert found(problems, "missing-rollback") == [
        ("error", "migrations/data/0002_fill.sql", 1),
        ("warning", "migrations/seed/0003_defaults.sql", 1)]


def test_drop_without_rollback(tmp_path: Path) -> None:
    files = clean_base(**{"schema/0002_drop_things.sql":
                          "-- cleanup\n\nDROP TABLE alarms;\n"
                          "ALTER TABLE patients DROP COLUMN mrn;\n"})
    problems = lint(tmp_path, files)
    assert found(problems, "destructive-without-rollback") == [
        ("error", "migrations/schema/0002_drop_things.sql", 3),
        ("error", "migrations/schema/0002_drop_things.sql", 4)]


# ------------------------------------------------------------ rebuilds, foreign keys

REBUILD = """\
CREATE TABLE patients_new (id INTEGER PRIMARY KEY, mrn TEXT NOT NULL, notes TEXT);
INSERT INTO patients_new (id, mrn) SELECT id, mrn FROM patients;
DROP TABLE patients;
ALTER TABLE patients_new RENAME TO patients;
"""


def test_rebuild_of_a_parent_with_children_warns(tmp_path: Path) -> None:
    files = clean_base(**{"schema/0002_rebuild_patients.sql": REBUILD,
                          "rollback/0002_rollback.sql": "SELECT 1;\n"})
    problems = lint(tmp_path, files)
    assert found(problems, "rebuild-with-children") == [
        ("warning", "migrations/schema/0002_rebuild_patients.sql", 3)]
    assert "alarms" in next(p.message for p in problems if p.code == "rebuild-with-children")
    # the rebuild's INSERT … SELECT copy is not "mixing DDL and DML"
    assert found(problems, "mixed-ddl-dml") == []
    assert [p for p in problems if p.severity == "error"] == []


def test_rebuild_warning_in_a_rollback_script(tmp_path: Path) -> None:
    """The reference 0004 rollback rebuilds patients: with FKs on it cascades."""
    files = clean_base(**{"schema/0002_add_contact.sql":
                          "ALTER TABLE patients ADD COLUMN contact TEXT;\n",
                          "rollback/0002_rollback.sql": "BEGIN TRANSACTION;\n" + REBUILD
                          + "DELETE FROM schema_version WHERE version = 2;\nCOMMIT;\n"})
    problems = lint(tmp_path, files)
    assert found(problems, "rebuild-with-children") == [
        ("warning", "migrations/rollback/0002_rollback.sql", 4)]


def test_rebuild_warning_is_acknowledged_by_a_comment(tmp_path: Path) -> None:
    files = clean_base(**{"schema/0002_rebuild_patients.sql":
                          "-- zmonitor:allow rebuild-with-children\n" + REBUILD,
                          "rollback/0002_rollback.sql": "SELECT 1;\n"})
    assert lint(tmp_path, files) == []


def test_acknowledgement_does_not_silence_errors(tmp_path: Path) -> None:
    files = clean_base(**{"schema/0002_x.sql": "-- zmonitor:allow forbidden mixed-ddl-dml\n"
                          "PRAGMA foreign_keys=OFF;\n",
                          "rollback/0002_rollback.sql": "SELECT 1;\n"})
    assert found(lint(tmp_path, files), "forbidden") == [
        ("error", "migrations/schema/0002_x.sql", 2)]


def test_dropping_parent_and_all_children_together_is_no_rebuild(tmp_path: Path) -> None:
    """Bug fix: the rollback of the initial schema (drop every table) was reported as a
    rebuild that loses child rows."""
    assert found(lint(tmp_path, clean_base()), "rebuild-with-children") == []


def test_children_added_by_alter_table_count(tmp_path: Path) -> None:
    """Bug fix: a foreign key added with ALTER TABLE … ADD COLUMN … REFERENCES was not
    seen, so rebuilding its parent raised no warning."""
    files = clean_base(**{
        "schema/0002_vitals.sql": "CREATE TABLE vitals (id INTEGER PRIMARY KEY);\n",
        "rollback/0002_rollback.sql": "DROP TABLE vitals;\n",
        "schema/0003_link.sql":
            "ALTER TABLE vitals ADD COLUMN patient_id INTEGER REFERENCES patients(id);\n",
        "rollback/0003_rollback.sql": "ALTER TABLE vitals DROP COLUMN patient_id;\n",
        "schema/0004_rebuild_patients.sql": REBUILD,
        "rollback/0004_rollback.sql": "SELECT 1;\n"})
    problems = lint(tmp_path, files)
    rebuild = [p for p in problems if p.code == "rebuild-with-children"
               and p.path == "migrations/schema/0004_rebuild_patients.sql"]
    assert [(p.severity, p.line) for p in rebuild] == [("warning", 3)]
    assert "alarms, vitals" in rebuild[0].message


def test_renaming_a_parent_first_is_an_error(tmp_path: Path) -> None:
    bad = ("ALTER TABLE patients RENAME TO patients_old;\n"
           "CREATE TABLE patients (id INTEGER PRIMARY KEY, mrn TEXT NOT NULL, notes TEXT);\n"
           "INSERT INTO patients (id, mrn) SELECT id, mrn FROM patients_old;\n"
           "DROP TABLE patients_old;\n")
    files = clean_base(**{"schema/0002_rebuild_rename_first.sql": bad,
                          "rollback/0002_rollback.sql": "SELECT 1;\n"})
    problems = lint(tmp_path, files)
    assert found(problems, "rename-parent-first") == [
        ("error", "migrations/schema/0002_rebuild_rename_first.sql", 1)]


# -------------------------------------------------------------- DDL/DML, batches, misc


def test_mixed_ddl_and_dml(tmp_path: Path) -> None:
    files = clean_base(**{"schema/0002_mixed.sql":
                          "ALTER TABLE patients ADD COLUMN notes TEXT;\n"
                          "\n"
                          "UPDATE patients SET notes = '';\n",
                          "rollback/0002_rollback.sql": "SELECT 1;\n"})
    problems = lint(tmp_path, files)
    assert found(problems, "mixed-ddl-dml") == [("error", "migrations/schema/0002_mixed.sql", 3)]
    assert "line 1" in next(p.message for p in problems if p.code == "mixed-ddl-dml")


def test_new_table_with_its_rows_is_not_mixing_and_temp_tables_are_refused(
        tmp_path: Path) -> None:
    files = clean_base(**{
        "seed/0002_settings.sql": "CREATE TABLE settings (k TEXT PRIMARY KEY, v TEXT);\n"
                                  "INSERT INTO settings VALUES ('unit', 'bpm');\n",
        "rollback/0002_rollback.sql": "DROP TABLE settings;\n",
        "data/0003_fill.sql": "CREATE TEMP TABLE map (a, b);\n"
                              "UPDATE patients SET mrn = upper(mrn);\nDROP TABLE map;\n",
        "rollback/0003_rollback.sql": "SELECT 1;\n"})
    problems = lint(tmp_path, files)
    # A TEMP table would shadow a real one for the rest of the run's connection.
    assert [(p.code, p.path, p.line) for p in problems] == [
        ("temp-object", "migrations/data/0003_fill.sql", 1)]
    assert "use a regular table and DROP it" in problems[0].message


def test_ddl_in_a_batched_migration(tmp_path: Path) -> None:
    batched = ("-- zmonitor:batch table=patients size=100\n"
               "CREATE INDEX patients_mrn ON patients(mrn);\n"
               "UPDATE patients SET mrn = upper(mrn) "
               "WHERE rowid BETWEEN :batch_start AND :batch_end;\n")
    files = clean_base(**{"data/0002_fill.sql": batched,
                          "rollback/0002_rollback.sql": "SELECT 1;\n"})
    problems = lint(tmp_path, files)
    assert found(problems, "ddl-in-batch") == [("error", "migrations/data/0002_fill.sql", 2)]


def test_bad_batch_headers(tmp_path: Path) -> None:
    files = clean_base(**{
        "data/0002_no_bounds.sql": "-- zmonitor:batch table=patients size=100\n"
                                   "UPDATE patients SET mrn = upper(mrn);\n",
        "rollback/0002_rollback.sql": "SELECT 1;\n",
        "data/0003_bad_size.sql": "\n-- zmonitor:batch table=patients size=0\n"
                                  "UPDATE patients SET mrn = mrn "
                                  "WHERE rowid BETWEEN :batch_start AND :batch_end;\n",
        "rollback/0003_rollback.sql": "SELECT 1;\n"})
    problems = lint(tmp_path, files)
    assert found(problems, "batch-header") == [
        ("error", "migrations/data/0002_no_bounds.sql", 1),
        ("error", "migrations/data/0003_bad_size.sql", 2)]


def test_forbidden_statements(tmp_path: Path) -> None:
    text = ("ATTACH DATABASE 'x.db' AS x;\nDETACH DATABASE x;\nPRAGMA writable_schema=ON;\n"
            "SAVEPOINT a;\nRELEASE a;\nROLLBACK;\nVACUUM;\n")
    files = clean_base(**{"schema/0002_evil.sql": text,
                          "rollback/0002_rollback.sql": "SELECT 1;\n"})
    problems = lint(tmp_path, files)
    assert [line for _s, _p, line in found(problems, "forbidden")] == [1, 2, 3, 4, 5, 6, 7]
    # seed-style transaction control is not forbidden: the runner drops it
    files2 = clean_base(**{"schema/0002_ok.sql": "BEGIN TRANSACTION;\n"
                           "CREATE TABLE beds (id INTEGER);\nCOMMIT;\n",
                           "rollback/0002_rollback.sql": "DROP TABLE beds;\n"})
    assert lint(tmp_path / "2", files2) == []


def test_add_column_not_null_without_default(tmp_path: Path) -> None:
    files = clean_base(**{
        "schema/0002_cols.sql":
            "ALTER TABLE patients ADD COLUMN ward TEXT NOT NULL;\n"
            "ALTER TABLE patients ADD COLUMN bed TEXT NOT NULL DEFAULT '';\n"
            "ALTER TABLE patients ADD note TEXT;\n"
            "ALTER TABLE patients ADD COLUMN default_unit TEXT NOT NULL;\n",
        "rollback/0002_rollback.sql": "SELECT 1;\n"})
    problems = lint(tmp_path, files)
    # line 4: bug fix, the word DEFAULT inside a column name hid the problem
    assert found(problems, "add-not-null") == [("error", "migrations/schema/0002_cols.sql", 1),
                                               ("error", "migrations/schema/0002_cols.sql", 4)]


def test_syntax_error_reports_its_line(tmp_path: Path) -> None:
    files = clean_base(**{"schema/0002_broken.sql": "CREATE TABLE a (x);\n\nCREATE TABLE b (y)\n",
                          "rollback/0002_rollback.sql": "SELECT 1;\n"})
    assert found(lint(tmp_path, files), "syntax") == [
        ("error", "migrations/schema/0002_broken.sql", 3)]


# ------------------------------------------------------------------------------ CLI


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("ZMONITOR_MIGRATE_CONFIG", None)  # lint needs no config: the defaults do
    return subprocess.run([sys.executable, "-c",
                           "import sys; from zmonitor_migrated.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_cli_lint_exits_non_zero_on_errors_and_names_file_and_line(tmp_path: Path) -> None:
    src = make_source(tmp_path / "bad", clean_base(**{
        "seed/0001_default_settings.sql": "INSERT INTO patients VALUES (1, 'x');\n",
        "schema/0002_mixed.sql": "ALTER TABLE patients ADD COLUMN n TEXT;\n"
                                 "UPDATE patients SET n = '';\n"}))
    proc = run_cli("lint", str(src))
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "migrations/seed/0001_default_settings.sql:1: error: [duplicate-version]" \
        in proc.stdout
    assert "migrations/schema/0002_mixed.sql:2: error: [mixed-ddl-dml]" in proc.stdout
    assert "migrations/schema/0002_mixed.sql:1: error: [missing-rollback]" in proc.stdout

    as_json = run_cli("lint", "--json", str(src))
    assert as_json.returncode == proc.returncode
    doc = json.loads(as_json.stdout)
    assert doc["ok"] is False
    assert {"path": "migrations/schema/0002_mixed.sql", "line": 2, "code": "mixed-ddl-dml",
            "severity": "error"}.items() <= next(
        p for p in doc["problems"] if p["code"] == "mixed-ddl-dml").items()


def test_cli_lint_exits_zero_on_a_clean_source_with_warnings(tmp_path: Path) -> None:
    src = make_source(tmp_path / "ok", clean_base(**{
        "seed/0002_defaults.sql": "INSERT INTO patients VALUES (1, 'x');\n"}))
    proc = run_cli("lint", str(src))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning: [missing-rollback]" in proc.stdout
