"""``zmonitor-migrate dev apply|status|rollback``: the device's lint, plan, engine and
validation on a plain database file, with no config, key, trust dir or app unit; the file
is replaced only by a validated copy."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from author_helpers import FIXTURE_SQL, copy_source, run

from zmonitor_migrated import sources


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fixture_db(tmp_path: Path, name: str = "test.db") -> Path:
    db = tmp_path / name
    conn = sqlite3.connect(db)
    conn.executescript(FIXTURE_SQL.read_text(encoding="utf-8"))  # set-up: version 4
    conn.close()
    return db


def counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        tables = [n for (n,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
            "AND name NOT LIKE 'zmonitor_migrated_%'")]
        return {t: conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}
    finally:
        conn.close()


def dev(*argv: str) -> tuple[int, dict, str]:
    code, out, err = run(["dev", *argv, "--json"])
    return code, json.loads(out) if out.strip() else {}, err


def test_dry_run_then_apply_then_status_on_a_new_file(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    db = tmp_path / "test.db"
    code, out, err = dev("apply", "--db", str(db), "--source", str(src), "--dry-run")
    assert code == 0, err
    assert out["versions"] == list(range(1, 15)) and out["dry_run"] is True
    assert not db.exists()  # a dry run never creates or changes the file

    code, out, err = dev("apply", "--db", str(db), "--source", str(src))
    assert code == 0, err
    assert (out["from_version"], out["to_version"], out["created"]) == (0, 14, True)
    # the device's bookkeeping: one schema_version row per migration with its sha256
    source = sources.load(src)
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT version, migration_type, file_hash, applied_by FROM "
                        "schema_version ORDER BY version").fetchall()
    conn.close()
    assert [(v, t, h) for v, t, h, _ in rows] == [(m.version, m.kind, m.sha256)
                                                 for m in source.migrations]
    assert all(by.startswith("zmonitor-migrate dev") for *_, by in rows)
    code, info, _ = dev("status", "--db", str(db), "--source", str(src))
    assert code == 0 and info["current_version"] == 14 and info["pending"] == []
    assert {r["hash"] for r in info["applied"]} == {"ok"}
    code, out, _ = dev("apply", "--db", str(db), "--source", str(src))
    assert code == 0 and out["versions"] == []  # up to date


def test_field_database_up_and_rollback_keeps_every_row_and_the_wal_mode(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    db = fixture_db(tmp_path)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    before = counts(db)
    code, out, err = dev("apply", "--db", str(db), "--source", str(src), "--target", "10")
    assert code == 0, err
    assert (out["from_version"], out["to_version"]) == (4, 10)
    after = counts(db)
    assert all(after[t] >= n for t, n in before.items() if t != "schema_version")
    code, out, err = dev("rollback", "--db", str(db), "--source", str(src))
    assert code == 0, err
    assert (out["from_version"], out["to_version"], out["versions"]) == (10, 9, [10])
    code, out, err = dev("rollback", "--db", str(db), "--source", str(src), "--to", "4")
    assert code == 0, err
    assert counts(db) == before
    with open(db, "rb") as f:
        assert f.read(20)[18:20] == b"\x02\x02"  # still a WAL database
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0


def test_an_edited_applied_migration_is_refused_like_on_the_device(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    db = fixture_db(tmp_path)
    mig = next(src.glob("migrations/schema/0004_*.sql"))
    mig.write_text(mig.read_text() + "\n-- edited after release\n")
    digest = sha(db)
    code, _, err = dev("apply", "--db", str(db), "--source", str(src))
    assert code == 4
    assert "applied-migration-changed" in err
    assert sha(db) == digest


def test_a_failing_validation_leaves_the_file_unchanged(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    db = fixture_db(tmp_path)
    rb = src / "migrations/rollback/0015_rollback.sql"
    (src / "migrations/data/0015_data_drop_old_events.sql").write_text(
        "DELETE FROM admission_events WHERE id > 1;\n")
    rb.write_text("-- rows deleted by 0015 cannot come back\nSELECT 1;\n")
    digest = sha(db)
    code, _, err = dev("apply", "--db", str(db), "--source", str(src))
    assert code == 4
    assert "validation-failed" in err and "admission_events lost rows" in err
    assert sha(db) == digest
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["test.db"]


def test_a_failing_migration_leaves_the_file_unchanged(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    db = fixture_db(tmp_path)
    (src / "migrations/schema/0015_schema_unique_device.sql").write_text(
        "CREATE UNIQUE INDEX ux_vitals_device ON vitals(device_id);\n")
    (src / "migrations/rollback/0015_rollback.sql").write_text("DROP INDEX ux_vitals_device;\n")
    digest = sha(db)
    code, _, err = dev("apply", "--db", str(db), "--source", str(src))
    assert code == 4
    assert "UNIQUE constraint failed" in err and "was not changed" in err
    assert sha(db) == digest


def test_stubs_block_only_what_would_run(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    db = tmp_path / "test.db"
    assert run(["new", "schema", "Add bed notes", "--source", str(src)])[0] == 0
    code, _, err = dev("apply", "--db", str(db), "--source", str(src))
    assert code == 3 and "not written yet" in err and "0015_schema_add_bed_notes" in err
    mig = src / "migrations/schema/0015_schema_add_bed_notes.sql"
    mig.write_text(mig.read_text().replace("-- zmonitor:todo", "--")
                   + "ALTER TABLE patients ADD COLUMN bed_notes TEXT;\n")
    code, _, err = dev("apply", "--db", str(db), "--source", str(src), "--target", "15")
    assert code == 4 and "extra column bed_notes" in err  # database.yaml not updated yet
    spec = src / "schema/database.yaml"
    spec.write_text(spec.read_text().replace(
        "      - {name: notes, type: TEXT}\n",
        "      - {name: notes, type: TEXT}\n      - {name: bed_notes, type: TEXT}\n", 1))
    code, out, err = dev("apply", "--db", str(db), "--source", str(src), "--target", "15")
    assert code == 0, err
    assert out["to_version"] == 15
    assert any("0015_rollback.sql" in w and "[todo]" in w for w in out["warnings"])
    code, _, err = dev("rollback", "--db", str(db), "--source", str(src))
    assert code == 3 and "0015_rollback.sql" in err


def test_no_configuration_is_ever_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = copy_source(tmp_path)
    bad = tmp_path / "device.yaml"
    bad.write_text("database: [not, a, path\n")  # a device command would stop at exit 2
    monkeypatch.setenv("ZMONITOR_MIGRATE_CONFIG", str(bad))
    assert run(["status", "--db", str(tmp_path / "x.db")])[0] == 2
    code, _, err = dev("apply", "--db", str(tmp_path / "t.db"), "--source", str(src))
    assert code == 0, err
    code, _, err = run(["--config", str(bad), "dev", "status", "--db", str(tmp_path / "t.db"),
                        "--source", str(src)])
    assert code == 2 and "does not read a configuration" in err


def test_the_device_database_path_is_refused(tmp_path: Path) -> None:
    src = copy_source(tmp_path)
    code, _, err = dev("apply", "--db", "/var/lib/zmonitor/zmonitor.db", "--source", str(src))
    assert code == 2 and "device's database" in err


@pytest.mark.parametrize(("argv", "named"), [
    (["dev", "apply", "--source", "SRC"], "--db"),
    (["dev", "apply", "--db", "T"], "--source"),
    (["dev", "apply", "--db", "T", "--source", "SRC", "--target", "-1"], "--target"),
    (["dev", "apply", "--db", "T", "--source", "SRC", "--target", "x"], "--target"),
    (["dev", "rollback", "--db", "T", "--source", "SRC", "--to", "1e3"], "--to"),
    (["dev", "status", "--db", "DIR", "--source", "SRC"], "--db"),
    (["dev", "status", "--db", "T", "--source", "DIR"], "--source"),
    (["dev", "rollback", "--db", "MISSING", "--source", "SRC"], "no such database"),
    (["dev", "wipe", "--db", "T", "--source", "SRC"], "wipe"),
    (["dev", "apply", "--db", "NOPARENT", "--source", "SRC"], "--db"),
    (["dev", "apply", "--db", "NOTDB", "--source", "SRC"], "not a readable SQLite"),
])
def test_bad_arguments_are_exit_2_naming_the_option(tmp_path: Path, argv: list[str],
                                                    named: str) -> None:
    src = copy_source(tmp_path)
    subst = {"SRC": str(src), "T": str(tmp_path / "t.db"), "DIR": str(tmp_path),
             "MISSING": str(tmp_path / "missing.db"),
             "NOPARENT": str(tmp_path / "no" / "dir" / "t.db"),
             "NOTDB": str(tmp_path / "notdb.db")}
    (tmp_path / "notdb.db").write_text("not a database\n")
    code, _, err = run([subst.get(a, a) for a in argv])
    assert code == 2, err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "t.db").exists()


def test_the_library_refuses_the_device_database_too(tmp_path: Path) -> None:
    from zmonitor_migrated import devdb
    from zmonitor_migrated.errors import UsageError

    src = copy_source(tmp_path)
    for call in (devdb.apply, devdb.rollback, devdb.status):
        with pytest.raises(UsageError, match="device's database"):
            call(devdb.DEVICE_DATABASE, src)
