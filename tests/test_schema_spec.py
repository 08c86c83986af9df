"""database.yaml: loading, DDL, reading a live database and listing differences."""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

import pytest

from zmonitor_migrated import cli_schema
from zmonitor_migrated.errors import BundleRejected, UsageError
from zmonitor_migrated.schema_spec import SchemaSpec, ddl, diff, live_schema, load_spec, parse_spec

SPEC = Path(__file__).resolve().parent.parent / "bundles" / "zmonitor" / "schema" / "database.yaml"

SMALL = """\
tables:
  patients:
    columns:
      - {name: mrn, type: TEXT, nullable: false, primary_key: true, check: "length(mrn) <= 50"}
      - {name: name, type: TEXT, nullable: false}
      - {name: status, type: TEXT, default: "'DISCHARGED'"}
    indices:
      - {name: idx_patients_status, columns: [status], where: status IS NOT NULL}
  alarms:
    columns:
      - {name: id, type: INTEGER, primary_key: true, autoincrement: true}
      - {name: patient_mrn, type: TEXT, nullable: false}
      - {name: severity, type: text}
    foreign_keys:
      - {columns: [patient_mrn], ref_table: patients, ref_columns: [mrn], on_delete: CASCADE}
    indices:
      - {name: idx_alarms_patient_mrn, columns: [patient_mrn]}
"""


def db_from(tmp_path: Path, sql: str, name: str = "t.db") -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / name)
    conn.executescript(sql)  # test set-up only
    return conn


def test_shipped_spec_ddl_gives_zero_diff(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    assert spec.version == 14
    assert {t.name for t in spec.tables} >= {"patients", "vitals", "alarms", "alarm_history",
                                             "admission_events", "telemetry_metrics",
                                             "settings", "alarm_thresholds"}
    conn = db_from(tmp_path, ddl(spec))
    assert diff(spec, live_schema(conn)) == []
    assert diff(live_schema(conn), spec) == []


def test_ddl_round_trip_keeps_what_pragmas_do_not_show(tmp_path: Path) -> None:
    spec = parse_spec(SMALL, "small.yaml")
    live = live_schema(db_from(tmp_path, ddl(spec)))
    patients, alarms = live.table("patients"), live.table("alarms")
    assert patients is not None and alarms is not None
    assert patients.column("mrn").check == "length(mrn) <= 50"  # type: ignore[union-attr]
    assert alarms.column("id").autoincrement  # type: ignore[union-attr]
    assert not alarms.column("id").nullable  # type: ignore[union-attr]  # rowid alias
    assert patients.indices[0].where == "status is not null"
    assert alarms.foreign_keys[0].on_delete == "CASCADE"
    assert diff(spec, live) == []


def test_diff_finds_missing_column_changed_type_and_missing_index(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    conn = db_from(tmp_path, ddl(spec))
    conn.executescript("""
        ALTER TABLE patients DROP COLUMN notes;
        DROP INDEX idx_alarms_timestamp;
        CREATE TABLE settings_new (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL,
                                   updated_at TEXT NOT NULL, updated_by TEXT);
        DROP TABLE settings;
        ALTER TABLE settings_new RENAME TO settings;
    """)
    found = diff(spec, live_schema(conn))
    assert found == [
        "patients: missing column notes (TEXT)",
        "alarms: missing index idx_alarms_timestamp on (timestamp)",
        "settings.value: type TEXT expected, found BLOB",
    ]


def test_diff_finds_nullability_default_check_fk_where_order_and_extras(tmp_path: Path) -> None:
    spec = parse_spec(SMALL, "small.yaml")
    conn = db_from(tmp_path, """
        CREATE TABLE patients (mrn TEXT PRIMARY KEY CHECK (length(mrn) <= 20), name TEXT NOT NULL,
                               status TEXT DEFAULT 'ADMITTED', extra INTEGER);
        CREATE INDEX idx_patients_status ON patients(status);
        CREATE TABLE alarms (id INTEGER PRIMARY KEY, severity TEXT, patient_mrn TEXT NOT NULL
                             REFERENCES patients(mrn));
        CREATE TABLE audit (x);
        CREATE INDEX idx_audit_x ON audit(x);
    """)
    found = diff(spec, live_schema(conn))
    assert "patients.mrn: expected NOT NULL, found nullable" in found
    assert "patients.mrn: CHECK (length(mrn) <= 50) expected, found CHECK (length(mrn) <= 20)" \
        in found
    assert "patients.status: default 'DISCHARGED' expected, found 'ADMITTED'" in found
    assert "patients: extra column extra (INTEGER)" in found
    assert "patients: index idx_patients_status: WHERE status IS NOT NULL expected, " \
           "found (none)" in found
    assert "alarms.id: expected AUTOINCREMENT, found no AUTOINCREMENT" in found
    assert "alarms: column order (id, patient_mrn, severity) expected, found " \
           "(id, severity, patient_mrn)" in found
    assert "alarms: missing foreign key (patient_mrn) -> patients(mrn) ON DELETE CASCADE" in found
    assert "alarms: extra foreign key (patient_mrn) -> patients(mrn)" in found
    assert "alarms: missing index idx_alarms_patient_mrn on (patient_mrn)" in found
    assert "extra table audit" in found
    assert len(found) == 11, found


def test_diff_ignores_bookkeeping_tables_and_compares_types_case_insensitively(
        tmp_path: Path) -> None:
    spec = parse_spec(SMALL, "small.yaml")
    conn = db_from(tmp_path, ddl(spec).replace("severity text", "severity TEXT") + """
        CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);
        CREATE TABLE zmonitor_migrated_batch (version INTEGER PRIMARY KEY);
        INSERT INTO alarms (patient_mrn) VALUES ('x');  -- creates sqlite_sequence
    """)
    live = live_schema(conn)
    assert {t.name for t in live.tables} == {"patients", "alarms"}
    assert live.table("alarms").column("severity").type == "TEXT"  # type: ignore[union-attr]
    assert diff(spec, live) == []
    assert diff(spec, SchemaSpec(())) == ["missing table patients", "missing table alarms"]


@pytest.mark.parametrize(("text", "needle"), [
    (SMALL.replace("nullable: false}", "nulable: false}", 1), "tables.patients.columns[1]: "
                                                               "unknown key 'nulable'"),
    (SMALL.replace("columns: [status]", "columns: [state]"),
     "tables.patients.indices[0].columns[0]: no column 'state'"),
    (SMALL.replace("ref_columns: [mrn]", "ref_columns: [id]"),
     "tables.alarms.foreign_keys[0].ref_columns[0]: no column 'id' in table patients"),
    (SMALL.replace("ref_table: patients", "ref_table: people"),
     "tables.alarms.foreign_keys[0].ref_table: no table 'people'"),
    (SMALL.replace("on_delete: CASCADE", "on_delete: EXPLODE"),
     "tables.alarms.foreign_keys[0].on_delete: must be one of"),
    (SMALL.replace("nullable: false, primary_key", "nullable: 'no', primary_key"),
     "tables.patients.columns[0].nullable: must be true or false"),
    (SMALL.replace("{name: severity, type: text}", "{name: severity, type: text, "
                   "autoincrement: true}"), "tables.alarms.columns[2].autoincrement"),
    (SMALL + "  schema_version:\n    columns: [{name: version, type: INTEGER}]\n",
     "tables.schema_version: schema_version, sqlite_*"),
    ("tables: [patients]\n", "tables: must be a mapping"),
    ("tables: {t: {columns: []}}\n", "tables.t.columns: must list at least one column"),
    ("version: 3\n", "top level: missing required key 'tables'"),
    ("tables: {t: [\n", "not valid YAML"),
])
def test_load_spec_refuses_malformed_files_naming_file_and_key(
        tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "database.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BundleRejected) as info:
        load_spec(path)
    assert info.value.kind == "malformed"
    assert str(path) in info.value.message
    assert needle in info.value.message


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true")
    parser = argparse.ArgumentParser(prog="zmonitor-migrate")
    cli_schema.register(parser.add_subparsers(dest="command"), common)
    return parser


def test_cli_schema_ddl_and_diff_exit_codes(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser()
    args = parser.parse_args(["schema", "ddl", str(SPEC)])
    assert args.func(args, None) == 0
    text = capsys.readouterr().out
    assert "CREATE TABLE patients (" in text and "CREATE UNIQUE INDEX idx_patients_old_id" in text

    db = tmp_path / "live.db"
    db_from(tmp_path, text, "live.db").close()
    args = parser.parse_args(["schema", "diff", str(SPEC), "--db", str(db)])
    assert args.func(args, None) == 0
    assert "matches" in capsys.readouterr().out

    conn = sqlite3.connect(db)
    conn.execute("DROP INDEX idx_vitals_timestamp")
    conn.commit()
    conn.close()
    args = parser.parse_args(["schema", "diff", str(SPEC), "--db", str(db), "--json"])
    assert args.func(args, None) == 4
    out = json.loads(capsys.readouterr().out)
    assert out["differences"] == ["vitals: missing index idx_vitals_timestamp on (timestamp)"]

    args = parser.parse_args(["schema", "diff", str(SPEC), "--db", str(tmp_path / "nope.db")])
    with pytest.raises(UsageError, match="no such database file"):
        args.func(args, None)
    assert not (tmp_path / "nope.db").exists()
