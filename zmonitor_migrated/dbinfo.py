"""Read-only facts about a database: integrity, foreign keys, row counts, size, content.

Every function takes a connection or a path and changes nothing; ``open_ro`` opens a
file read-only through a URI so even a bug here cannot write to the patient database.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .bookkeeping import INTERNAL_TABLES, SCHEMA_VERSION_TABLE


def closed_wal(path: Path) -> bool:
    """A WAL-mode file with no ``-wal`` next to it: nobody has it open (a WAL connection
    always keeps one). A ``mode=ro`` connection would *create* ``-wal``/``-shm`` next to
    it, owned by us (locking the app's user out of the live DB, littering the backup
    dir), so such a file is opened ``immutable=1`` instead."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return False
    is_wal = header.startswith(b"SQLite format 3\x00") and header[18:20] == b"\x02\x02"
    return is_wal and not Path(f"{path}-wal").exists()


def open_ro(path: Path, *, timeout: float = 5.0) -> sqlite3.Connection:
    uri = f"{Path(path).absolute().as_uri()}?mode=ro"
    if closed_wal(Path(path)):
        uri += "&immutable=1"
    return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=timeout)


def snapshot(db: Path, dst: Path | sqlite3.Connection) -> None:
    """An online copy of ``db`` into ``dst`` (a file, or an open connection) with
    SQLite's backup API in one step: one read snapshot, never restarted by writes to
    ``db`` meanwhile."""
    out = sqlite3.connect(dst) if isinstance(dst, Path) else dst
    try:
        src = open_ro(db)
        try:
            src.backup(out)
        finally:
            src.close()
    finally:
        if out is not dst:
            out.close()


def integrity_problems(conn: sqlite3.Connection, *, quick: bool = False,
                       limit: int = 20) -> list[str]:
    pragma = "quick_check" if quick else "integrity_check"
    rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}({limit})").fetchall()]
    return [] if rows == ["ok"] else rows


def fk_problems(conn: sqlite3.Connection, limit: int = 20) -> list[str]:
    out = []
    for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check").fetchmany(limit):
        out.append(f"{table} rowid {rowid} references a missing row in {parent}")
    return out


def user_tables(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name")]


def row_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {t: conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]
            for t in user_tables(conn) if t not in INTERNAL_TABLES}


def row_counts_of(path: Path) -> dict[str, int]:
    """``row_counts`` of the database file at ``path``, on a connection of its own."""
    conn = open_ro(path)
    try:
        return row_counts(conn)
    finally:
        conn.close()


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    """Whether the database file has table ``name`` (``main.`` explicitly: a temp object
    of the same name must never answer for the file)."""
    return conn.execute("SELECT 1 FROM main.sqlite_master WHERE type='table' AND name=?",
                        (name,)).fetchone() is not None


def current_version(conn: sqlite3.Connection) -> int:
    """The highest applied version, 0 for a database the runner never touched."""
    if not has_table(conn, SCHEMA_VERSION_TABLE):
        return 0
    return int(conn.execute(f"SELECT COALESCE(MAX(version), 0) FROM main.{SCHEMA_VERSION_TABLE}"
                            ).fetchone()[0])


def version_of(path: Path) -> int | None:
    """The schema version of the database file at ``path``; None when there is no
    readable SQLite database there (the caller's run reports that in its own terms)."""
    if not Path(path).is_file():
        return None
    try:
        conn = open_ro(path)
        try:
            return int(current_version(conn))
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def journal_mode(conn: sqlite3.Connection) -> str:
    return str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()


def file_journal_mode(path: Path, conn: sqlite3.Connection) -> str:
    """The journal mode of the file at ``path``, whichever way ``conn`` opened it.

    An ``immutable=1`` connection (``open_ro`` of a closed WAL file) never uses the WAL
    and answers ``delete`` to ``PRAGMA journal_mode``; the file header's read/write
    version bytes (2 = WAL) are what the file really is."""
    if closed_wal(Path(path)):
        return "wal"
    return journal_mode(conn)


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0
