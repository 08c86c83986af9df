"""A signed migration that is wrong or hostile (an author's mistake, a stolen signing key)
cannot fool the validation, crash the process, touch the runner's bookkeeping or overrun
the time budget.

Three levels, each on real SQLite files:

- the engine on a small monitor database (fast, many inputs);
- ``lint`` on a source (the same refusals, with file and line);
- the real CLI in a subprocess on a device whose app writes vitals, with a signed bundle
  made from a copy of ``bundles/zmonitor`` plus a hostile migration or check. These
  bundles are built without lint, as an attacker with a stolen key would build them.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import (
    Device,
    add_migration,
    build_variant,
    max_vitals_rowid,
    table_rows,
)
from engine_helpers import make_source, query

from zmonitor_migrated import bundle as bundle_mod
from zmonitor_migrated import lint as lint_mod
from zmonitor_migrated import sources
from zmonitor_migrated.engine import Engine
from zmonitor_migrated.errors import MigrateError, MigrationSqlError
from zmonitor_migrated.lint import lint_source
from zmonitor_migrated.post_checks import Check, run_check
from zmonitor_migrated.sources import load

ROOT = Path(__file__).resolve().parent.parent
FTS3_POINTER = ("SELECT fts3_tokenizer('evil', x'4141414141414141');\n"
                "CREATE VIRTUAL TABLE boom USING fts3(tokenize=evil);\n")

# --------------------------------------------------------------------- engine level

INIT = """\
CREATE TABLE patients (mrn TEXT PRIMARY KEY, name TEXT NOT NULL, old_id INTEGER);
CREATE TABLE vitals (id INTEGER PRIMARY KEY AUTOINCREMENT, patient_mrn TEXT,
                     heart_rate INTEGER);
"""
# What the pipeline writes after a bundle is applied (the engine itself never does).
BUNDLES = """
CREATE TABLE zmonitor_migrated_bundles (sequence INTEGER PRIMARY KEY, name TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL, applied_at TEXT NOT NULL, run_id TEXT);
INSERT INTO zmonitor_migrated_bundles VALUES (1, 'zmonitor', 'ab', '2026-01-01', 'r1');
"""
ROWS = """\
INSERT INTO patients VALUES ('M1', 'Ann', 1), ('M2', 'Bob', 2);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200)
INSERT INTO vitals (patient_mrn, heart_rate) SELECT 'M' || (1 + i % 2), 60 + i % 40 FROM n;
"""
BASE = {"schema/0001_initial.sql": INIT,
        "rollback/0001_rollback.sql": "DROP TABLE vitals;\nDROP TABLE patients;\n",
        "seed/0002_rows.sql": ROWS,
        "rollback/0002_rollback.sql": "DELETE FROM vitals;\nDELETE FROM patients;\n"}


@pytest.fixture
def monitor(tmp_path: Path) -> Callable[[str], tuple[Path, Path]]:
    """``monitor(sql)``: a database at version 2 (200 vitals, 2 patients, one applied
    bundle), and a source whose migration 3 is ``sql``."""
    def make(sql: str, *, kind: str = "data") -> tuple[Path, Path]:
        src = make_source(tmp_path / "src", {**BASE, f"{kind}/0003_hostile.sql": sql,
                                             "rollback/0003_rollback.sql": "SELECT 1;\n"})
        db = tmp_path / "monitor.db"
        with Engine(db) as eng:
            eng.apply(load(src), target=2)
        conn = sqlite3.connect(db)
        conn.executescript(BUNDLES)  # test fixture only
        conn.close()
        return src, db
    return make


def refused(monitor: Callable[..., tuple[Path, Path]], sql: str, *, kind: str = "data",
            fast: bool = False) -> MigrationSqlError:
    """Apply migration 3 = ``sql``; it must be refused with the database unchanged."""
    src, db = monitor(sql, kind=kind)
    before = db.read_bytes()
    with pytest.raises(MigrationSqlError) as info, Engine(db, fast=fast) as eng:
        eng.apply(load(src))
    assert db.read_bytes() == before
    return info.value


@pytest.mark.parametrize("sql", [
    "CREATE TEMP TABLE vitals AS SELECT * FROM main.vitals;\nDELETE FROM main.vitals;\n",
    "CREATE TEMPORARY TABLE scratch (a);\n",
    "CREATE TABLE temp.scratch (a);\n",
    "CREATE TEMP VIEW v AS SELECT 1;\n",
    "CREATE TEMP TRIGGER t AFTER INSERT ON main.vitals BEGIN SELECT 1; END;\n",
    "CREATE TEMP TABLE schema_version AS SELECT * FROM main.schema_version;\n",
])
def test_temp_objects_are_refused(monitor: Callable[..., tuple[Path, Path]],
                                  sql: str) -> None:
    err = refused(monitor, sql)
    assert err.line == 1
    assert "TEMP" in err.sqlite_message and "use a regular table" in err.sqlite_message


@pytest.mark.parametrize("function", [
    "fts3_tokenizer('simple')", "sqlite_compileoption_get(0)", "sqlite_log(1, 'x')",
    "subtype(1)", "rtreenode(2, x'00')", "fts5_source_id()", "load_extension('x.so')",
])
def test_functions_outside_the_allow_list_are_refused(
        monitor: Callable[..., tuple[Path, Path]], function: str) -> None:
    name = function.split("(")[0]
    err = refused(monitor, f"UPDATE vitals SET heart_rate = heart_rate + 1;\n"
                           f"SELECT {function};\n")
    assert err.line == 2
    assert f"{name}()" in err.sqlite_message


def test_allow_listed_functions_still_work(monitor: Callable[..., tuple[Path, Path]]) -> None:
    sql = ("UPDATE vitals SET heart_rate = CAST(round(abs(heart_rate) * 1.0) AS INTEGER), "
           "patient_mrn = coalesce(upper(trim(patient_mrn)), printf('%s', 'x')) "
           "WHERE json_extract(json_object('a', id), '$.a') = id "
           "AND julianday(datetime('now')) > 0 AND length(hex(randomblob(2))) = 4;\n"
           "INSERT INTO patients (mrn, name) SELECT 'M' || (max(rowid) + 1), "
           "group_concat(name, '+') FROM patients;\n")
    src, db = monitor(sql)
    with Engine(db) as eng:
        assert eng.apply(load(src)) == [3]
    assert query(db, "SELECT name FROM patients WHERE mrn = 'M3'") == [("Ann+Bob",)]


@pytest.mark.parametrize("module", ["fts3", "fts4", "fts5", "rtree"])
def test_virtual_tables_are_refused(monitor: Callable[..., tuple[Path, Path]],
                                    module: str) -> None:
    err = refused(monitor, f"CREATE VIRTUAL TABLE vt USING {module}(a, b, c);\n",
                  kind="schema")
    assert f"USING {module}" in err.sqlite_message


def test_fts3_pointer_is_refused_before_it_reaches_sqlite(
        monitor: Callable[..., tuple[Path, Path]]) -> None:
    err = refused(monitor, FTS3_POINTER)
    assert err.line == 1 and "fts3_tokenizer()" in err.sqlite_message


@pytest.mark.parametrize("sql", [
    "UPDATE schema_version SET file_hash = NULL;",
    "UPDATE main.schema_version SET file_hash = NULL;",
    'UPDATE "main"."SCHEMA_VERSION" SET file_hash = NULL;',
    "UPDATE [schema_version] SET file_hash = NULL;",
    "UPDATE `Schema_Version` SET applied_by = 'me';",
    "INSERT INTO main.zmonitor_migrated_bundles VALUES (999999999, 'x', 'y', 'z', NULL);",
    "REPLACE INTO zmonitor_migrated_bundles VALUES (1, 'x', 'y', 'z', NULL);",
    "DELETE FROM Zmonitor_Migrated_Bundles;",
    "INSERT INTO main.schema_version (version, applied_at) VALUES (99, 'x');",
    "DROP TABLE zmonitor_migrated_bundles;",
    "ALTER TABLE schema_version ADD COLUMN evil TEXT;",
    "ALTER TABLE zmonitor_migrated_bundles RENAME TO old_bundles;",
    "CREATE INDEX sv_hash ON schema_version(file_hash);",
    "CREATE TRIGGER sv AFTER INSERT ON schema_version BEGIN SELECT 1; END;",
    "CREATE TABLE zmonitor_migrated_sequence (n INTEGER);",
    "CREATE VIEW zmonitor_migrated_view AS SELECT 1;",
])
def test_bookkeeping_is_out_of_reach(monitor: Callable[..., tuple[Path, Path]],
                                     sql: str) -> None:
    err = refused(monitor, "UPDATE vitals SET heart_rate = 0;\n" + sql + "\n", kind="schema")
    assert err.line == 2
    assert "bookkeeping" in err.sqlite_message


def test_a_table_renamed_into_a_bookkeeping_name_is_refused(
        monitor: Callable[..., tuple[Path, Path]], tmp_path: Path) -> None:
    # The authorizer sees only the old name of a RENAME; the schema comparison catches it.
    src, db = monitor("DROP TABLE zmonitor_migrated_bundles;\n", kind="schema")
    del src
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE zmonitor_migrated_bundles")  # a device that never had one
    conn.commit()
    conn.close()
    src2 = make_source(tmp_path / "src2", {
        **BASE, "schema/0003_hostile.sql":
            "CREATE TABLE fake (sequence INTEGER PRIMARY KEY, name TEXT, manifest_sha256 "
            "TEXT, applied_at TEXT, run_id TEXT);\n"
            "INSERT INTO fake VALUES (999999999, 'x', 'y', 'z', NULL);\n"
            "ALTER TABLE fake RENAME TO zmonitor_migrated_bundles;\n",
        "rollback/0003_rollback.sql": "SELECT 1;\n"})
    before = db.read_bytes()
    with pytest.raises(MigrationSqlError) as info, Engine(db) as eng:
        eng.apply(load(src2))
    assert "bookkeeping" in info.value.sqlite_message
    assert db.read_bytes() == before


@pytest.mark.parametrize("sql", [
    # fired during the migration itself
    "CREATE TRIGGER t AFTER UPDATE ON patients BEGIN "
    "UPDATE Schema_Version SET file_hash = NULL; END;\n"
    "UPDATE patients SET name = name;\n",
    # left behind for the app's next vitals row
    "CREATE TRIGGER t AFTER INSERT ON vitals BEGIN "
    "INSERT INTO zmonitor_migrated_bundles VALUES (999999999, 'x', 'y', 'z', NULL); END;\n",
    "CREATE TRIGGER t BEFORE DELETE ON patients BEGIN "
    "DELETE FROM \"SCHEMA_VERSION\"; END;\n",
    # a view with an INSTEAD OF trigger
    "CREATE VIEW pv AS SELECT mrn FROM patients;\n"
    "CREATE TRIGGER t INSTEAD OF INSERT ON pv BEGIN "
    "UPDATE schema_version SET applied_by = NEW.mrn; END;\n",
    # a trigger that calls an unreviewed function when the app writes
    "CREATE TRIGGER t AFTER INSERT ON vitals BEGIN SELECT sqlite_compileoption_get(0); END;\n",
])
def test_triggers_cannot_reach_the_bookkeeping_or_unreviewed_functions(
        monitor: Callable[..., tuple[Path, Path]], sql: str) -> None:
    err = refused(monitor, sql, kind="schema")
    assert "trigger t" in err.sqlite_message
    assert "bookkeeping" in err.sqlite_message or "sqlite_compileoption_get()" in \
        err.sqlite_message


def test_a_harmless_trigger_is_kept(monitor: Callable[..., tuple[Path, Path]]) -> None:
    src, db = monitor("CREATE TABLE audit (vitals_id INTEGER);\n"
                      "CREATE TRIGGER t AFTER INSERT ON vitals BEGIN "
                      "INSERT INTO audit VALUES (NEW.id); END;\n", kind="schema")
    with Engine(db) as eng:
        assert eng.apply(load(src)) == [3]
    assert query(db, "SELECT name FROM sqlite_master WHERE type='trigger'") == [("t",)]


BATCH = "-- zmonitor:batch table=vitals size=20\n"


@pytest.mark.parametrize(("sql", "why"), [
    # the header names vitals, the statement writes patients: ran once per batch
    ("UPDATE patients SET old_id = old_id + 1 "
     "WHERE :batch_start IS NOT NULL AND :batch_end IS NOT NULL;", "writes patients"),
    ("UPDATE vitals SET heart_rate = heart_rate + 1 "
     "WHERE :batch_start > 0 AND :batch_end > 0;", "does not bound"),
    ("UPDATE vitals SET heart_rate = heart_rate + 1; -- :batch_start :batch_end",
     "does not use both"),
    ("UPDATE vitals SET heart_rate = heart_rate + 1 "
     "WHERE rowid BETWEEN :batch_start AND :batch_end OR heart_rate > 0;", "does not bound"),
    ("UPDATE vitals SET heart_rate = heart_rate + 1 WHERE rowid >= :batch_start "
     "AND :batch_end > 0;", "does not bound"),
    ("UPDATE vitals SET heart_rate = heart_rate + 1 WHERE EXISTS (SELECT 1 FROM vitals v2 "
     "WHERE v2.rowid BETWEEN :batch_start AND :batch_end);", "does not bound"),
    ("INSERT INTO vitals (patient_mrn, heart_rate) SELECT patient_mrn, heart_rate "
     "FROM vitals WHERE rowid BETWEEN :batch_start AND :batch_end;", "UPDATE or DELETE"),
    ("SELECT COUNT(*) FROM vitals WHERE rowid BETWEEN :batch_start AND :batch_end;",
     "does not write"),
])
def test_a_batch_header_must_mean_what_it_says(monitor: Callable[..., tuple[Path, Path]],
                                               sql: str, why: str) -> None:
    err = refused(monitor, BATCH + sql + "\n", fast=True)
    assert err.line == 2
    assert why in err.sqlite_message, err.sqlite_message


def test_constant_bounds_are_caught_by_the_rows_per_batch(
        monitor: Callable[..., tuple[Path, Path]]) -> None:
    # Bounded by rowid, but not by the batch: more rows changed than the batch holds.
    src, db = monitor(BATCH + "UPDATE vitals SET heart_rate = heart_rate + 1 "
                      "WHERE rowid BETWEEN 1 AND 1000000 AND :batch_start <= :batch_end;\n")
    before = query(db, "SELECT * FROM vitals")
    with pytest.raises(MigrationSqlError) as info, Engine(db) as eng:
        eng.apply(load(src))
    assert "changed 200 rows in the batch of rowids 1..20" in info.value.sqlite_message
    assert query(db, "SELECT * FROM vitals") == before


@pytest.mark.parametrize("sql", [
    "UPDATE vitals SET heart_rate = heart_rate + 1 "
    "WHERE rowid BETWEEN :batch_start AND :batch_end AND heart_rate IS NOT NULL;",
    "UPDATE main.vitals AS v SET heart_rate = v.heart_rate + 1 "
    "WHERE v.id >= :batch_start AND v.id <= :batch_end;",
    "UPDATE \"vitals\" SET heart_rate = heart_rate + 1 "
    "WHERE patient_mrn IS NOT NULL AND rowid BETWEEN :batch_start AND :batch_end;",
])
def test_well_formed_batches_still_run_once_per_row(
        monitor: Callable[..., tuple[Path, Path]], sql: str) -> None:
    src, db = monitor(BATCH + sql + "\n")
    before = dict(query(db, "SELECT id, heart_rate FROM vitals"))
    with Engine(db) as eng:
        assert eng.apply(load(src)) == [3]
    after = dict(query(db, "SELECT id, heart_rate FROM vitals"))
    assert after == {k: v + 1 for k, v in before.items()}


def test_a_post_check_cannot_call_unreviewed_functions(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    sqlite3.connect(db).close()
    conn = sqlite3.connect(db)
    try:
        leak = run_check(conn, Check("leak", "SELECT fts3_tokenizer('simple')", 0))
        ok = run_check(conn, Check("ok", "SELECT abs(-1)", 1))
    finally:
        conn.close()
    assert leak is not None and leak.error is not None and "not authorized" in leak.error
    assert ok is None


def test_validation_stops_at_its_deadline(tmp_path: Path) -> None:
    from zmonitor_migrated.validate import ValidationInterrupted, validate

    root = tmp_path / "src"
    (root / "checks").mkdir(parents=True)
    (root / "checks" / "post.yaml").write_text(yaml.safe_dump([{
        "name": "forever", "expect": 0,
        "sql": "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
               "SELECT COUNT(*) FROM r"}]))
    db = tmp_path / "x.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (a)")
    conn.commit()
    t0 = time.monotonic()
    with pytest.raises(ValidationInterrupted) as info:
        validate(conn, target=0, last_version=0, counts_before={}, declared_loss=set(),
                 source_root=root, deadline=t0 + 1.0)
    conn.close()
    assert time.monotonic() - t0 < 6
    assert "forever" in info.value.message


# ---------------------------------------------------------------------------- lint


def lint_codes(tmp_path: Path, sql: str, *, kind: str = "data"
               ) -> list[tuple[str, str, int]]:
    src = make_source(tmp_path / "lint", {**BASE, f"{kind}/0003_hostile.sql": sql,
                                          "rollback/0003_rollback.sql": "SELECT 1;\n"})
    return [(p.code, p.path, p.line) for p in lint_source(src) if p.severity == "error"]


@pytest.mark.parametrize(("sql", "code", "line"), [
    ("UPDATE vitals SET heart_rate = 1;\nSELECT fts3_tokenizer('simple');\n", "function", 2),
    ("\nCREATE VIRTUAL TABLE vt USING fts5(a);\n", "virtual-table", 2),
    ("UPDATE vitals SET heart_rate = 1;\nUPDATE main.schema_version SET file_hash = NULL;\n",
     "bookkeeping", 2),
    ("CREATE TRIGGER t AFTER INSERT ON vitals BEGIN\n"
     "  UPDATE schema_version SET file_hash = NULL;\nEND;\n", "bookkeeping", 1),
    ("CREATE TEMP TABLE vitals AS SELECT * FROM main.vitals;\n", "temp-object", 1),
    (BATCH + "UPDATE patients SET old_id = old_id + 1\n"
     " WHERE :batch_start IS NOT NULL AND :batch_end IS NOT NULL;\n", "batch-bounds", 2),
    (BATCH + "\nUPDATE vitals SET heart_rate = heart_rate + 1\n"
     " WHERE :batch_start > 0 AND :batch_end > 0;\n", "batch-bounds", 3),
])
def test_lint_reports_what_the_device_refuses(tmp_path: Path, sql: str, code: str,
                                              line: int) -> None:
    assert (code, "migrations/data/0003_hostile.sql", line) in lint_codes(tmp_path, sql)


def test_lint_stops_a_runaway_query(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lint_mod, "SCRATCH_SECONDS", 1.0)
    t0 = time.monotonic()
    codes = lint_codes(tmp_path, "SELECT 1;\nINSERT INTO patients (mrn, name) "
                                 "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 "
                                 "FROM r) SELECT n, 'x' FROM r WHERE n < 0;\n")
    assert time.monotonic() - t0 < 10
    assert ("too-slow", "migrations/data/0003_hostile.sql", 2) in codes


def test_the_shipped_source_passes_the_compiled_lint() -> None:
    problems = lint_source(ROOT / "bundles" / "zmonitor")
    assert [p for p in problems if p.severity == "error"] == []


# ----------------------------------------------------------- the CLI, a real device


@pytest.fixture
def attacker(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Bundles signed without lint, as with a stolen key and one's own tooling."""
    monkeypatch.setattr(bundle_mod, "_lint", lambda src: sources.load(src))
    yield


def hostile_bundle(tmp_path: Path, key: Path, *, sql: str | None = None,
                   checks: list[dict[str, object]] | None = None) -> Path:
    def edit(src: Path) -> None:
        if sql is not None:
            add_migration(src, 15, sql)
        if checks is not None:
            post = src / "checks" / "post.yaml"
            post.write_text(post.read_text() + "\n" + yaml.safe_dump(checks))
    out = tmp_path / "bundles" / "hostile-2.zmb"
    out.parent.mkdir(parents=True, exist_ok=True)
    return build_variant(out, key, 2, edit=edit)


def version(db: Path) -> int:
    return int(query(db, "SELECT MAX(version) FROM main.schema_version")[0][0])


def run_refused(device: Device, bundle: Path, code: int = 4
                ) -> subprocess.CompletedProcess[str]:
    """Apply; it must end with ``code`` and every row the device had is still there."""
    upto = max_vitals_rowid(device.db)
    ref = table_rows(device.db, vitals_up_to=upto)
    proc = device.cli("apply", str(bundle), timeout=180)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert version(device.db) == 10
    assert table_rows(device.db, vitals_up_to=upto) == ref
    assert device.app_active()
    return proc


def test_cli_temp_shadow_of_vitals_is_refused(device: Device, tmp_path: Path,
                                              release_key: tuple[Path, Path],
                                              attacker: None) -> None:
    bundle = hostile_bundle(tmp_path, release_key[0], sql=(
        "CREATE TEMP TABLE vitals AS SELECT * FROM main.vitals;\n"
        "DELETE FROM main.vitals;\n"))
    proc = run_refused(device, bundle)
    assert "CREATE TEMP TABLE vitals" in proc.stderr
    assert not [c for c in device.calls() if c.startswith("stop")]


def test_cli_temp_schema_version_is_refused(device: Device, tmp_path: Path,
                                            release_key: tuple[Path, Path],
                                            attacker: None) -> None:
    bundle = hostile_bundle(tmp_path, release_key[0], sql=(
        "CREATE TEMP TABLE schema_version AS SELECT * FROM main.schema_version;\n"))
    proc = run_refused(device, bundle)
    assert "TEMP" in proc.stderr


def test_validation_does_not_trust_the_migrations_connection(
        device: Device, tmp_path: Path, release_key: tuple[Path, Path], attacker: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With TEMP objects let through on purpose, the shadowing migration is still caught:
    the validation reads the file on a connection of its own."""
    from zmonitor_migrated import config as config_mod
    from zmonitor_migrated import pipeline
    from zmonitor_migrated.engine import MigrationAuthorizer

    real = MigrationAuthorizer.check

    def lenient(action: int, *args: str | None) -> object:
        if action == sqlite3.SQLITE_CREATE_TEMP_TABLE or args[2] == "temp":
            return None
        return real(action, *args)
    monkeypatch.setattr(MigrationAuthorizer, "check", staticmethod(lenient))
    for key in ("FAKE_SYSTEMCTL_DIR", "FAKE_SYSTEMCTL_DB"):
        monkeypatch.setenv(key, device.env[key])
    bundle = hostile_bundle(tmp_path, release_key[0], sql=(
        "CREATE TEMP TABLE vitals AS SELECT * FROM main.vitals;\n"
        "DELETE FROM main.vitals;\n"))
    upto = max_vitals_rowid(device.db)
    ref = table_rows(device.db, vitals_up_to=upto)
    with pytest.raises(MigrateError) as info:
        pipeline.apply(bundle, config_mod.load(device.config_path))
    assert info.value.exit_code == 4
    assert "table vitals lost rows" in info.value.message
    assert table_rows(device.db, vitals_up_to=upto) == ref and version(device.db) == 10


def test_cli_fts3_tokenizer_pointer_is_a_clean_refusal(device: Device, tmp_path: Path,
                                                       release_key: tuple[Path, Path],
                                                       attacker: None) -> None:
    bundle = hostile_bundle(tmp_path, release_key[0], sql=FTS3_POINTER)
    proc = run_refused(device, bundle)  # exit 4, not -11 (SIGSEGV)
    assert "fts3_tokenizer()" in proc.stderr


def test_the_fts3_pointer_really_crashes_an_unprotected_connection() -> None:
    """Why the refusal matters: the same SQL on a plain connection kills the process."""
    code = ("import sqlite3\nc = sqlite3.connect(':memory:')\n"
            + "".join(f"c.execute({line!r})\n" for line in FTS3_POINTER.splitlines()))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    if proc.returncode == 1 and b"no such function" in proc.stderr:
        pytest.skip("this SQLite has no two-argument fts3_tokenizer")
    assert proc.returncode == -11, proc.stderr


def test_cli_load_extension_is_refused(device: Device, tmp_path: Path,
                                       release_key: tuple[Path, Path],
                                       attacker: None) -> None:
    evil = tmp_path / "evil.so"
    evil.write_bytes(b"\x7fELF")
    bundle = hostile_bundle(tmp_path, release_key[0],
                            sql=f"SELECT load_extension('{evil}');\n")
    proc = run_refused(device, bundle)
    assert "load_extension()" in proc.stderr


def test_cli_qualified_bookkeeping_write_is_refused(device: Device, tmp_path: Path,
                                                    release_key: tuple[Path, Path],
                                                    attacker: None) -> None:
    hashes = query(device.db, "SELECT version, file_hash FROM schema_version")
    bundle = hostile_bundle(tmp_path, release_key[0], sql=(
        'UPDATE "main"."SCHEMA_VERSION" SET file_hash = NULL;\n'))
    proc = run_refused(device, bundle)
    assert "bookkeeping" in proc.stderr
    assert query(device.db, "SELECT version, file_hash FROM schema_version") == hashes


def test_cli_trigger_on_the_apps_writes_is_refused_and_updates_still_apply(
        device: Device, tmp_path: Path, release_key: tuple[Path, Path],
        attacker: None) -> None:
    bundle = hostile_bundle(tmp_path, release_key[0], sql=(
        "CREATE TRIGGER lockout AFTER INSERT ON vitals BEGIN\n"
        "  UPDATE schema_version SET file_hash = NULL;\nEND;\n"))
    proc = run_refused(device, bundle)
    assert "trigger lockout" in proc.stderr and "bookkeeping" in proc.stderr
    # The next good bundle (a higher sequence: the refused one was admitted) applies.
    clean = build_variant(tmp_path / "bundles" / "clean-3.zmb", release_key[0], 3)
    ok = device.cli("apply", str(clean))
    assert ok.returncode == 0, ok.stderr
    assert version(device.db) == 14
    assert query(device.db, "SELECT name FROM sqlite_master WHERE type='trigger'") == []


def test_cli_batch_header_on_one_table_updating_another_is_refused(
        device: Device, tmp_path: Path, release_key: tuple[Path, Path],
        attacker: None) -> None:
    bundle = hostile_bundle(tmp_path, release_key[0], sql=(
        "-- zmonitor:batch table=vitals size=1000\n"
        "UPDATE patients SET old_id = old_id + 1\n"
        " WHERE :batch_start IS NOT NULL AND :batch_end IS NOT NULL;\n"))
    proc = run_refused(device, bundle)
    assert "writes patients" in proc.stderr


def test_cli_runaway_migration_ends_the_rehearsal_within_its_limit(
        device: Device, tmp_path: Path, release_key: tuple[Path, Path],
        attacker: None) -> None:
    from zmonitor_migrated.rehearsal import REHEARSAL_FACTOR, REHEARSAL_SLACK_S

    budget = 2.0
    device.set_config(max_downtime_s=budget)
    bundle = hostile_bundle(tmp_path, release_key[0], sql=(
        "INSERT INTO settings (key, value, updated_at)\n"
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r)\n"
        "SELECT 'k' || n, 'v', 'now' FROM r WHERE n < 0;\n"))
    t0 = time.monotonic()
    proc = run_refused(device, bundle)
    limit = max(REHEARSAL_FACTOR * budget, budget + REHEARSAL_SLACK_S)
    assert time.monotonic() - t0 < limit + 15
    assert "[too-slow]" in proc.stderr and "max_downtime_s=2" in proc.stderr
    assert "0015_data_extra.sql:1: the statement was interrupted" in proc.stderr


def test_cli_post_check_looping_in_the_rehearsal_is_too_slow(
        device: Device, tmp_path: Path, release_key: tuple[Path, Path],
        attacker: None) -> None:
    device.set_config(max_downtime_s=2)
    bundle = hostile_bundle(tmp_path, release_key[0], checks=[{
        "name": "forever", "expect": 0,
        "sql": "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
               "SELECT COUNT(*) FROM r"}])
    t0 = time.monotonic()
    proc = run_refused(device, bundle)
    assert time.monotonic() - t0 < 7 + 15
    assert "[too-slow]" in proc.stderr and "forever" in proc.stderr


def test_cli_post_check_looping_only_in_the_real_run_is_restored_within_the_budget(
        device: Device, tmp_path: Path, release_key: tuple[Path, Path],
        attacker: None) -> None:
    """The rehearsal never writes zmonitor_migrated_bundles; the real run does, and these
    checks loop for ever once that table exists. Two of them, so that both validation
    connections (the caller's and the helper thread's) get one."""
    budget = 8.0
    device.set_config(max_downtime_s=budget)
    bundle = hostile_bundle(tmp_path, release_key[0], checks=[{
        "name": f"only_after_the_stop_{i}", "expect": 1,
        "sql": "SELECT COUNT(*) FROM (WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL "
               "SELECT n + 1 FROM r WHERE EXISTS (SELECT 1 FROM sqlite_master "
               f"WHERE name = 'zmonitor_migrated_bundles')) SELECT n + {i} FROM r)"}
        for i in (1, 2)])
    proc = run_refused(device, bundle, code=5)
    assert "only_after_the_stop" in proc.stderr and "max_downtime_s=8" in proc.stderr
    [record] = device.history()
    assert record["outcome"] == "restored"
    # The stated margin: the app is back within the budget plus 5 s (stop + restart).
    assert float(record["downtime_s"]) < budget + 5  # type: ignore[arg-type]


def test_cli_post_check_calling_fts3_tokenizer_is_refused(
        device: Device, tmp_path: Path, release_key: tuple[Path, Path],
        attacker: None) -> None:
    bundle = hostile_bundle(tmp_path, release_key[0], checks=[{
        "name": "leak", "expect": 0, "sql": "SELECT fts3_tokenizer('simple')"}])
    proc = run_refused(device, bundle)
    assert "check leak" in proc.stderr and "not authorized" in proc.stderr
