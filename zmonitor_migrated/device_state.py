"""What the device's database says it already has: the input of ``verify.check_policy``.

Guarantees:

- the database is opened read-only (``file:…?mode=ro``): reading the state never writes
  a byte of the database, so a refused bundle leaves it identical. A WAL-mode database
  with no ``-wal`` file has no open writer (a WAL connection always has one), and a
  read-only connection would *create* ``-wal``/``-shm`` next to it, owned by us, which
  could lock the app's user out; such a database is opened ``immutable=1`` instead, so
  not a single file in its directory changes;
- a missing database is ``DeviceState(exists=False)`` (nothing applied yet), a missing
  ``zmonitor_migrated_bundles`` or ``schema_version`` table is "nothing recorded";
- a file that is not a readable SQLite database is a ``PrecheckFailed``.

Tables read::

    zmonitor_migrated_bundles(sequence INTEGER PRIMARY KEY, name TEXT,
                              manifest_sha256 TEXT, applied_at TEXT)
    schema_version(version INTEGER PRIMARY KEY, …, file_hash TEXT, …)

Example::

    state = device_state(Path("/var/lib/zmonitor/zmonitor.db"))
    state.last_sequence, state.applied   # 4, {1: "ab…", 2: "cd…"}
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from .dbinfo import open_ro
from .errors import PrecheckFailed

BUNDLES_TABLE = "zmonitor_migrated_bundles"


@dataclass(frozen=True)
class DeviceState:
    exists: bool
    last_sequence: int | None = None
    last_manifest_sha256: str | None = None
    applied: dict[int, str | None] = field(default_factory=dict)


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def device_state(db_path: Path | str) -> DeviceState:
    path = Path(db_path)
    if not path.exists():
        return DeviceState(exists=False)
    try:
        conn = open_ro(path)
    except sqlite3.Error as exc:
        raise PrecheckFailed(f"cannot open the database {path} read-only: {exc}") from None
    try:
        tables = _tables(conn)
        last_seq: int | None = None
        last_sha: str | None = None
        if BUNDLES_TABLE in tables:
            row = conn.execute(f"SELECT sequence, manifest_sha256 FROM {BUNDLES_TABLE} "
                               "ORDER BY sequence DESC LIMIT 1").fetchone()
            if row is not None:
                last_seq, last_sha = int(row[0]), row[1]
        applied: dict[int, str | None] = {}
        if "schema_version" in tables:
            for version, file_hash in conn.execute(
                    "SELECT version, file_hash FROM schema_version ORDER BY version"):
                applied[int(version)] = file_hash
        return DeviceState(exists=True, last_sequence=last_seq, last_manifest_sha256=last_sha,
                           applied=applied)
    except sqlite3.Error as exc:
        raise PrecheckFailed(f"cannot read the applied versions from {path}: {exc}; check "
                             "that it is the monitor's database and not corrupt") from None
    finally:
        conn.close()
