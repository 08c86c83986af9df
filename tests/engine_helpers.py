"""Helpers for the engine, lint and crash tests: real migration sources and real SQLite
files on disk (no mocks), plus ways to compare databases exactly."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

from zmonitor_migrated.engine import Engine
from zmonitor_migrated.sources import Source, load

BUNDLE_YAML = "name: test-bundle\napp: zmonitor\ndevice_types: [zm-test]\n"


def make_source(root: Path, files: Mapping[str, str], *, bundle_yaml: str = BUNDLE_YAML
                ) -> Path:
    """Write a migration source. ``files`` maps paths under ``migrations/`` (for example
    ``"schema/0001_init.sql"`` or ``"rollback/0001_rollback.sql"``) to their text."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "bundle.yaml").write_text(bundle_yaml, encoding="utf-8")
    (root / "migrations").mkdir(exist_ok=True)
    for rel, text in files.items():
        path = root / "migrations" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def source(root: Path, files: Mapping[str, str]) -> Source:
    return load(make_source(root, files))


def make_db(path: Path, sql: str = "", rows: Iterable[tuple[str, Iterable[tuple]]] = ()
            ) -> Path:
    """A real database file built with plain sqlite3 (not the runner)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        if sql:
            conn.executescript(sql)  # test fixture only; the runner never does this
        for insert, values in rows:
            conn.execute("BEGIN")
            conn.executemany(insert, values)
            conn.execute("COMMIT")
    finally:
        conn.close()
    return path


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def query(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def table_hash(path: Path, table: str, order: str = "rowid") -> str:
    """sha256 over every row (with its rowid) of one table, in a fixed order."""
    conn = sqlite3.connect(path)
    try:
        h = hashlib.sha256()
        for row in conn.execute(f'SELECT rowid, * FROM "{table}" ORDER BY {order}'):
            h.update(repr(row).encode())
        return h.hexdigest()
    finally:
        conn.close()


def apply(db: Path, src: Source, **kwargs: object) -> list[int]:
    target = kwargs.pop("target", None)
    with Engine(db, **kwargs) as engine:  # type: ignore[arg-type]
        return engine.apply(src, target=target)  # type: ignore[arg-type]


def versions(db: Path) -> list[int]:
    return [r[0] for r in query(db, "SELECT version FROM schema_version ORDER BY version")]
