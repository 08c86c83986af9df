"""``zmonitor-migrate check``: the shipped source passes every step, and a deliberately
broken copy fails the step meant to catch it (one test per step), with one line per
step, exit 3, and JSON and JUnit XML a CI system can read."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from author_helpers import FIXTURE_SQL, SHIPPED, copy_source, run

from zmonitor_migrated import check


def statuses(out: str) -> dict[str, str]:
    """The step lines of the printed report: step name → PASS/FAIL/SKIP."""
    found = {}
    for line in out.splitlines():
        word, _, rest = line.partition("  ")
        if word in ("PASS", "FAIL", "SKIP"):
            found[rest.split()[0]] = word
    return found


def test_the_shipped_source_passes_every_step(tmp_path: Path) -> None:
    code, out, err = run(["check", str(SHIPPED), "--json", str(tmp_path / "c.json"),
                          "--junit", str(tmp_path / "c.xml"), "--timing-rows", "3000"])
    assert code == 0, out + err
    assert statuses(out) == dict.fromkeys(
        ("lint", "empty", "fixture", "roundtrip", "codegen", "timing"), "PASS")
    assert "0012_data_backfill_vitals_legacy_mrn_and_ews.sql: -- Estimated time: " in out
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["ok"] is True and [s["status"] for s in report["steps"]] == ["pass"] * 6
    suite = ET.parse(tmp_path / "c.xml").getroot()
    assert suite.tag == "testsuites" and suite.get("failures") == "0"
    assert len(suite.findall("./testsuite/testcase")) == 6


def test_the_shipped_source_passes_with_the_committed_field_fixture() -> None:
    code, out, err = run(["check", str(SHIPPED), "--fixture", str(FIXTURE_SQL)])
    assert code == 0, out + err
    assert "at version 4" in out


def check_copy(src: Path, tmp_path: Path) -> tuple[int, dict[str, str], str, dict]:
    code, out, err = run(["check", str(src), "--json", str(tmp_path / "c.json"),
                          "--junit", str(tmp_path / "c.xml")])
    assert "Traceback" not in err
    return code, statuses(out), out, json.loads((tmp_path / "c.json").read_text())


def test_a_number_collision_fails_lint_naming_both_files(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    (src / "migrations/data/0014_data_fix_labels.sql").write_text(
        "UPDATE vitals SET device_label = upper(device_label);\n")
    code, steps, out, report = check_copy(src, tmp_path)
    assert code == 3
    assert steps["lint"] == "FAIL"
    assert "migrations/data/0014_data_fix_labels.sql" in out
    assert "migrations/seed/0014_seed_alarm_thresholds.sql" in out
    assert {steps[s] for s in ("empty", "fixture", "roundtrip")} == {"SKIP"}
    assert report["ok"] is False


def test_a_rollback_that_loses_a_child_tables_rows_fails_the_round_trip(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    rb = src / "migrations/rollback/0010_rollback.sql"
    # alarms is a child of patients: a "clean-up" slipped into the rollback of 0010
    rb.write_text(rb.read_text() + "DELETE FROM alarms WHERE resolved_at IS NULL;\n")
    code, steps, out, _ = check_copy(src, tmp_path)
    assert code == 3
    assert steps == {"lint": "PASS", "empty": "PASS", "fixture": "PASS", "roundtrip": "FAIL",
                     "codegen": "PASS"}
    assert "0010 down: table alarms has" in out and "(rows lost)" in out


def test_a_migration_that_fails_on_the_fixture_fails_that_step(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    # fine on an empty table, impossible on a monitor's data (many rows per device)
    (src / "migrations/schema/0015_schema_unique_vitals_device.sql").write_text(
        "CREATE UNIQUE INDEX ux_vitals_device ON vitals(device_id);\n")
    (src / "migrations/rollback/0015_rollback.sql").write_text(
        "DROP INDEX ux_vitals_device;\n")
    spec = src / "schema/database.yaml"
    spec.write_text(spec.read_text().replace(
        "      - {name: idx_vitals_timestamp, columns: [timestamp]}\n",
        "      - {name: idx_vitals_timestamp, columns: [timestamp]}\n"
        "      - {name: ux_vitals_device, columns: [device_id], unique: true}\n", 1)
        .replace("version: 14", "version: 15", 1))
    code, steps, out, _ = check_copy(src, tmp_path)
    assert code == 3
    assert (steps["lint"], steps["empty"], steps["fixture"]) == ("PASS", "PASS", "FAIL")
    assert "UNIQUE constraint failed: vitals.device_id" in out
    suite = ET.parse(tmp_path / "c.xml").getroot()
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed[0].startswith("fixture")


def test_a_migration_that_loses_the_fixtures_rows_fails_its_validation(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    (src / "migrations/data/0015_data_drop_open_alarms.sql").write_text(
        "DELETE FROM alarms WHERE resolved_at IS NULL;\n")
    (src / "migrations/rollback/0015_rollback.sql").write_text("-- nothing to undo\n")
    spec = src / "schema/database.yaml"
    spec.write_text(spec.read_text().replace("version: 14", "version: 15", 1))
    code, steps, out, _ = check_copy(src, tmp_path)
    assert code == 3
    assert (steps["lint"], steps["empty"], steps["fixture"]) == ("PASS", "PASS", "FAIL")
    assert "table alarms lost rows" in out


def test_a_stale_header_fails_codegen(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    # a new column, its migration, its rollback and database.yaml: but no codegen
    (src / "migrations/schema/0015_schema_add_patient_weight.sql").write_text(
        "ALTER TABLE patients ADD COLUMN weight_kg REAL;\n")
    (src / "migrations/rollback/0015_rollback.sql").write_text(
        "ALTER TABLE patients DROP COLUMN weight_kg;\n")
    spec = src / "schema/database.yaml"
    spec.write_text(spec.read_text().replace(
        "      - {name: notes, type: TEXT}\n",
        "      - {name: notes, type: TEXT}\n      - {name: weight_kg, type: REAL}\n", 1))
    spec.write_text(spec.read_text().replace("version: 14", "version: 15", 1))
    code, steps, out, _ = check_copy(src, tmp_path)
    assert code == 3
    assert steps == {"lint": "PASS", "empty": "PASS", "fixture": "PASS", "roundtrip": "PASS",
                     "codegen": "FAIL"}
    assert "SchemaInfo.h is stale" in out
    header = str(src / "generated/SchemaInfo.h")
    assert run(["codegen", str(src), "-o", header])[0] == 0
    assert run(["codegen", str(src), "-o", header, "--check"])[0] == 0
    assert "WEIGHT_KG" in Path(header).read_text()


def test_a_database_yaml_version_behind_the_history_fails_the_empty_step(
        tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    (src / "migrations/schema/0015_schema_add_patient_weight.sql").write_text(
        "ALTER TABLE patients ADD COLUMN weight_kg REAL;\n")
    spec = src / "schema/database.yaml"
    spec.write_text(spec.read_text().replace(
        "      - {name: notes, type: TEXT}\n",
        "      - {name: notes, type: TEXT}\n      - {name: weight_kg, type: REAL}\n", 1))
    (src / "migrations/rollback/0015_rollback.sql").write_text(
        "ALTER TABLE patients DROP COLUMN weight_kg;\n")
    checker = check.Checker(src, check.Options(), tmp_path)
    checker.lint()
    with pytest.raises(check._Failed) as failed:
        checker.empty()
    assert failed.value.details == ["schema/database.yaml says version 14, the history ends "
                                    "at 15: update its version"]


def test_a_rollback_that_fails_is_named_with_its_phase(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    (src / "migrations/rollback/0003_rollback.sql").write_text("DROP TABLE no_such_table;\n")
    code, out, _ = run(["check", str(src), "--fixture", str(FIXTURE_SQL)])
    assert code == 3
    assert statuses(out)["roundtrip"] == "FAIL"
    assert "0003 down (from the fixture) failed" in out and "no such table" in out


@pytest.mark.parametrize(("argv", "named"), [
    (["--timing-rows", "0"], "--timing-rows"),
    (["--fixture", "MISSING"], "--fixture"),
    (["--fixture-version", "14"], "--fixture-version"),
    (["--fixture-version", "-3"], "--fixture-version"),
    (["--json", "DIR"], "--json"),
    (["--junit", "NODIR/x.xml"], "--junit"),
    (["--header", "MISSING"], "--header"),
    (["--fixture", "NOTDB"], "--fixture"),
])
def test_bad_arguments_are_exit_2_naming_the_option(tmp_path: Path, argv: list[str],
                                                    named: str) -> None:
    (tmp_path / "notdb.sql").write_bytes(b"\xff\xfe not sql")
    subst = {"MISSING": str(tmp_path / "missing"), "DIR": str(tmp_path),
             "NODIR/x.xml": str(tmp_path / "nodir" / "x.xml"),
             "NOTDB": str(tmp_path / "notdb.sql")}
    code, out, err = run(["check", str(SHIPPED), *[subst.get(a, a) for a in argv]])
    assert code == 2, out + err
    assert named in err and "Traceback" not in err
