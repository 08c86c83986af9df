"""``zmonitor-migrate new``: the next free number, the header block, the rollback stub,
collisions refused with the colliding files named, and stubs that lint flags as unwritten
until they are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from author_helpers import copy_source, run

from zmonitor_migrated import sources
from zmonitor_migrated.lint import lint_source


def errors(src: Path) -> list[tuple[str, str]]:
    return [(p.path, p.code) for p in lint_source(src) if p.severity == "error"]


def test_new_schema_migration_gets_the_next_number_header_and_rollback_stub(
        tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    code, out, err = run(["new", "schema", "Add discharge reason to patients",
                          "--source", str(src), "--json"])
    assert code == 0, err
    made = json.loads(out)
    assert made["version"] == 15
    mig = Path(made["migration"])
    assert mig == src / "migrations/schema/0015_schema_add_discharge_reason_to_patients.sql"
    text = mig.read_text()
    for line in ("-- Migration: Add discharge reason to patients", "-- Version: 0015",
                 "-- Description: Add discharge reason to patients", "-- Risk: MEDIUM",
                 "-- Estimated time: "):
        assert line in text
    assert Path(made["rollback"]) == src / "migrations/rollback/0015_rollback.sql"
    # lint flags exactly the two stubs as not written yet, nothing else
    assert errors(src) == [("migrations/rollback/0015_rollback.sql", "todo"),
                           ("migrations/schema/0015_schema_add_discharge_reason_to_patients"
                            ".sql", "todo")]
    # written: lint is clean and discovery sees version 15 with its rollback
    mig.write_text(text.replace("-- zmonitor:todo", "--") +
                   "ALTER TABLE patients ADD COLUMN discharge_reason TEXT NULL;\n")
    rb = Path(made["rollback"])
    rb.write_text(rb.read_text().replace("-- zmonitor:todo", "--") +
                  "ALTER TABLE patients DROP COLUMN discharge_reason;\n")
    assert errors(src) == []
    last = sources.load(src).migrations[-1]
    assert (last.version, last.kind, last.rollback) == (
        15, "schema", "migrations/rollback/0015_rollback.sql")


def test_new_data_migration_with_batching_writes_the_runner_batch_line(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    code, out, err = run(["new", "data", "Backfill device serials", "--source", str(src),
                          "--batch-table", "vitals", "--batch-size", "5000"])
    assert code == 0, err
    assert "0015_data_backfill_device_serials.sql" in out
    mig = sources.discover(src)[0].migrations[-1]
    assert mig.batch == sources.BatchSpec("vitals", 5000)
    text = (src / mig.path).read_text()
    assert text.startswith("-- zmonitor:batch table=vitals size=5000\n-- Data Migration: ")
    assert "-- Risk: HIGH" in text


def test_new_seed_number_follows_an_orphan_rollback(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    (src / "migrations/rollback/0016_rollback.sql").write_text("-- left behind\n")
    code, _, _ = run(["new", "seed", "Default ward names", "--source", str(src)])
    assert code == 0
    assert (src / "migrations/seed/0017_seed_default_ward_names.sql").is_file()


def test_a_number_collision_across_types_is_refused_naming_both_files(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    (src / "migrations/data/0013_data_fix_labels.sql").write_text("UPDATE vitals SET "
                                                                  "device_label = 'x';\n")
    before = sorted(p for p in src.rglob("*"))
    code, _, err = run(["new", "schema", "Add a column", "--source", str(src)])
    assert code == 2
    assert "migrations/data/0013_data_fix_labels.sql" in err
    assert "migrations/seed/0013_seed_default_settings.sql" in err
    assert sorted(p for p in src.rglob("*")) == before  # nothing written


@pytest.mark.parametrize(("argv", "named"), [
    (["new", "ddl", "x"], "TYPE"),
    (["new", "data", "x", "--batch-size", "0", "--batch-table", "vitals"], "--batch-size"),
    (["new", "data", "x", "--batch-size", "ten"], "--batch-size"),
    (["new", "data", "x", "--source", "/nonexistent"], "--source"),
    (["new", "schema", "x", "--risk", "EXTREME"], "--risk"),
])
def test_bad_arguments_are_exit_2_naming_the_option(argv: list[str], named: str) -> None:
    code, _, err = run(argv)
    assert code == 2
    assert named in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["new", "schema", "!!!"],
    ["new", "schema", "Add x", "--batch-table", "vitals"],
    ["new", "data", "Add x", "--batch-table", "vitals; DROP"],
    ["new", "data", "Add x", "--batch-size", "20"],
])
def test_meaningless_requests_are_usage_errors_that_write_nothing(
        tmp_path: Path, argv: list[str]) -> None:
    src = copy_source(tmp_path)
    before = sorted(p for p in src.rglob("*"))
    code, _, err = run([*argv, "--source", str(src)])
    assert code == 2, err
    assert "error [usage]" in err
    assert sorted(p for p in src.rglob("*")) == before


def test_a_config_option_is_refused(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    code, _, err = run(["--config", str(tmp_path / "c.yaml"), "new", "schema", "x",
                        "--source", str(src)])
    assert code == 2
    assert "does not read a configuration" in err


def test_the_default_source_is_the_current_directory_and_must_be_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["new", "schema", "Add a column"])
    assert code == 2 and "--source" in err
    assert list(tmp_path.iterdir()) == []  # nothing created in a directory that is no source
    src = copy_source(tmp_path)
    monkeypatch.chdir(src)
    assert run(["new", "schema", "Add a column"])[0] == 0
    assert (src / "migrations/schema/0015_schema_add_a_column.sql").is_file()


def test_a_stub_cannot_be_built_into_a_bundle(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    assert run(["new", "data", "Fix labels", "--source", str(src)])[0] == 0
    assert run(["keygen", str(tmp_path / "release")])[0] == 0
    code, _, err = run(["bundle", "build", str(src), "-o", str(tmp_path / "b.zmb"), "--key",
                        str(tmp_path / "release.key"), "--sequence", "1"])
    assert code == 3 and "[todo]" in err and "0015_data_fix_labels.sql" in err
    assert not (tmp_path / "b.zmb").exists()
