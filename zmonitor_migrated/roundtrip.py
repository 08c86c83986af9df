"""One migration up, down and up again, compared: the round trip of ``check``.

Starting at version ``v - 1``: apply ``v``, roll it back, apply it again, and compare
snapshots (schema, every table's row count, an order-independent digest of every
table's content; the runner's bookkeeping and SQLite's own tables left out):

- after the first up, tables that neither the migration nor its rollback names (as a
  word, any case) have the content they had before;
- after the rollback, the schema (compared both ways) and every row count are what they
  were before, and unnamed tables have their content;
- after the second up, the same against the first up.

A rollback that keeps derived values in a table it names is allowed to (the counts and
the schema still have to match); one that loses rows anywhere is not.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from dataclasses import dataclass

from .engine import Engine
from .errors import MigrateError
from .schema_spec import SchemaSpec, diff, is_ignored_table, live_schema
from .sources import Source


class RoundTripFailed(Exception):
    """A migration or rollback failed outright; ``message`` names it and the phase."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Snapshot:
    schema: SchemaSpec
    counts: dict[str, int]
    digests: dict[str, str]


def _tables(conn: sqlite3.Connection) -> list[str]:
    return [n for (n,) in conn.execute("SELECT name FROM main.sqlite_master WHERE "
                                       "type='table' ORDER BY name")
            if not is_ignored_table(n)]


def _digest(conn: sqlite3.Connection, table: str) -> str:
    """Order-independent digest of a table's content (a rebuild may renumber rowids)."""
    cols = [r[1] for r in conn.execute(f'PRAGMA main.table_info("{table}")')]
    quoted = ", ".join(f'"{c}"' for c in cols)
    h = hashlib.sha256(repr(cols).encode())
    for row in sorted(repr(r) for r in conn.execute(f'SELECT {quoted} FROM main."{table}"')):
        h.update(row.encode())
    return h.hexdigest()


def snapshot(conn: sqlite3.Connection) -> Snapshot:
    tables = _tables(conn)
    return Snapshot(live_schema(conn),
                    {t: conn.execute(f'SELECT COUNT(*) FROM main."{t}"').fetchone()[0]
                     for t in tables},
                    {t: _digest(conn, t) for t in tables})


def named_tables(source: Source, version: int) -> set[str]:
    """Tables the migration or its rollback names (as a word, any case)."""
    mig = source.by_version()[version]
    text = source.text(mig.path) + (source.text(mig.rollback) if mig.rollback else "")
    return {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)}


def compare(label: str, want: Snapshot, got: Snapshot, named: set[str], *,
            shape: bool) -> list[str]:
    """Differences of ``got`` from ``want``: content of tables not ``named``; with
    ``shape`` also the schema (both ways) and every table's row count."""
    out: list[str] = []
    if shape:
        out += [f"{label}: schema: {d}" for d in diff(want.schema, got.schema)
                + diff(got.schema, want.schema)]
        for table, n in sorted(want.counts.items()):
            now = got.counts.get(table)
            if now is None:
                out.append(f"{label}: table {table} ({n} rows) is gone")
            elif now != n:
                out.append(f"{label}: table {table} has {now} rows, {n} expected"
                           + (" (rows lost)" if now < n else ""))
    for table, digest in sorted(want.digests.items()):
        if table.lower() not in named and got.digests.get(table, digest) != digest:
            out.append(f"{label}: the content of {table} changed, a table this migration "
                       "and its rollback do not name")
    return out


def roundtrip_one(eng: Engine, source: Source, version: int) -> list[str]:
    """From version - 1: up, down, up again, comparing after each. A migration or
    rollback that fails is reported with the phase it failed in."""
    named = named_tables(source, version)
    tag = f"{version:04d}"
    phase = "up"
    try:
        before = snapshot(eng.conn)
        eng.apply(source, target=version)
        up = snapshot(eng.conn)
        problems = compare(f"{tag} up", before, up, named, shape=False)
        phase = "down"
        eng.rollback(source, version - 1)
        problems += compare(f"{tag} down", before, snapshot(eng.conn), named, shape=True)
        phase = "up again"
        eng.apply(source, target=version)
        problems += compare(f"{tag} up again", up, snapshot(eng.conn), named, shape=True)
    except MigrateError as exc:
        raise RoundTripFailed(f"{tag} {phase} failed: {exc.message}") from None
    return problems
