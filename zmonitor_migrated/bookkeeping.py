"""The runner's own tables in the monitor database: their names and DDL, in one place.

- ``schema_version``: one row per applied migration (the reference runner's columns,
  with sha256 and execution time), written in the migration's own transaction.
- ``zmonitor_migrated_batch``: a batched migration's progress, one row while it runs.
- ``zmonitor_migrated_bundles``: one row per applied bundle (sequence, manifest sha256).

Any table named ``schema_version`` or ``zmonitor_migrated_*`` is bookkeeping: migration
SQL may not touch it, validation does not count its rows, the schema spec ignores it.
"""

from __future__ import annotations

SCHEMA_VERSION_TABLE = "schema_version"
BATCH_TABLE = "zmonitor_migrated_batch"
BUNDLES_TABLE = "zmonitor_migrated_bundles"
INTERNAL_TABLES = (SCHEMA_VERSION_TABLE, BATCH_TABLE, BUNDLES_TABLE)

SCHEMA_VERSION_DDL = f"""CREATE TABLE IF NOT EXISTS main.{SCHEMA_VERSION_TABLE} (
    version INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL,
    description TEXT,
    migration_type TEXT,
    file_hash TEXT,
    execution_time_ms INTEGER,
    applied_by TEXT DEFAULT 'migrate.py'
)"""
BATCH_DDL = f"""CREATE TABLE IF NOT EXISTS main.{BATCH_TABLE} (
    version INTEGER PRIMARY KEY,
    next_rowid INTEGER NOT NULL,
    max_rowid INTEGER NOT NULL,
    batches_done INTEGER NOT NULL,
    batches_total INTEGER NOT NULL,
    rows_changed INTEGER NOT NULL,
    elapsed_ms INTEGER NOT NULL,
    file_hash TEXT
)"""
BUNDLES_DDL = f"""CREATE TABLE IF NOT EXISTS {BUNDLES_TABLE} (
    sequence INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    applied_at TEXT NOT NULL,
    run_id TEXT
)"""


def is_bookkeeping(name: str | None) -> bool:
    """The runner's own tables: the version rows, batch progress, applied bundles, and
    any later ``zmonitor_migrated_*`` table. Whatever the case or quoting: SQLite hands
    the authorizer the name as the schema spells it, and compares names case-blind."""
    n = (name or "").lower()
    return n == SCHEMA_VERSION_TABLE or n.startswith("zmonitor_migrated_")
