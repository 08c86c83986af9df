"""The one "table exists" and "current version" of the code base (zmonitor_migrated.dbinfo),
on real SQLite files: they answer for the file, never for a TEMP object of the same name."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from zmonitor_migrated import bookkeeping, dbinfo


def test_a_database_the_runner_never_touched_is_at_version_0(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "new.db")
    conn.execute("CREATE TABLE vitals (a)")
    assert not dbinfo.has_table(conn, "schema_version")
    assert dbinfo.has_table(conn, "vitals") and not dbinfo.has_table(conn, "VITALS")
    assert dbinfo.current_version(conn) == 0
    conn.close()
    assert dbinfo.version_of(tmp_path / "new.db") == 0
    assert dbinfo.version_of(tmp_path / "missing.db") is None


def test_the_file_answers_not_a_temp_table_of_the_same_name(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None)
    conn.execute(bookkeeping.SCHEMA_VERSION_DDL)
    conn.execute("INSERT INTO main.schema_version (version, applied_at) VALUES (1, 'x'), "
                 "(2, 'y')")
    conn.execute("CREATE TEMP TABLE schema_version (version INTEGER)")
    conn.execute("INSERT INTO temp.schema_version VALUES (99)")
    conn.execute("CREATE TEMP TABLE only_temp (a)")
    assert dbinfo.current_version(conn) == 2
    assert not dbinfo.has_table(conn, "only_temp")
    conn.close()


def test_the_bookkeeping_tables_are_one_list() -> None:
    assert all(bookkeeping.is_bookkeeping(t) for t in bookkeeping.INTERNAL_TABLES)
    assert bookkeeping.is_bookkeeping("ZMONITOR_MIGRATED_later")
    assert not bookkeeping.is_bookkeeping("vitals") and not bookkeeping.is_bookkeeping(None)
    for ddl in (bookkeeping.SCHEMA_VERSION_DDL, bookkeeping.BATCH_DDL, bookkeeping.BUNDLES_DDL):
        sqlite3.connect(":memory:").execute(ddl)
