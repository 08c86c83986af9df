"""``zmonitor-migrate schema …``: the expected schema as DDL, and a live database against it.

- ``schema ddl PATH`` prints the DDL of a ``database.yaml`` (the app's generated
  ``create_tables.sql`` + ``create_indices.sql``).
- ``schema diff PATH [--db DB]`` compares the database (``--db``, else the configured
  one) with ``PATH`` and prints one line per difference; exit 0 when there is none, 4
  when there is any. The database is opened read-only and never created.

Both print one JSON object with ``--json``. A malformed ``database.yaml`` raises
``BundleRejected`` (exit 3) and a missing database ``UsageError`` (exit 2); the main CLI
maps them. The command functions parse, call ``schema_spec`` and print, nothing more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from . import dbinfo, schema_spec
from .cli_args import existing_file
from .errors import UsageError

EXIT_DIFFERENT = 4


def register(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``schema ddl`` and ``schema diff`` to the main parser's subcommands."""
    schema = subparsers.add_parser(
        "schema", help="print database.yaml as DDL, or compare a database with it",
        description="The expected schema of a bundle (schema/database.yaml).")
    actions = schema.add_subparsers(dest="schema_command", metavar="{ddl,diff}")
    actions.required = True

    ddl = actions.add_parser("ddl", parents=[common_parent],
                             help="print the CREATE TABLE / CREATE INDEX statements")
    ddl.add_argument("spec", metavar="PATH", type=existing_file, help="a database.yaml")
    ddl.set_defaults(func=handle_ddl)

    diff = actions.add_parser("diff", parents=[common_parent],
                              help="list differences between a database and database.yaml "
                                   "(exit 4 if any)")
    diff.add_argument("spec", metavar="PATH", type=existing_file, help="a database.yaml")
    # The common options may already provide --db (every command takes it).
    with contextlib.suppress(argparse.ArgumentError):
        diff.add_argument("--db", type=Path, default=None,
                          help="database to compare (default: the configured one)")
    diff.set_defaults(func=handle_diff)


def handle_ddl(args: argparse.Namespace, config: Any) -> int:
    spec = schema_spec.load_spec(args.spec)
    text = schema_spec.ddl(spec)
    if getattr(args, "json", False):
        print(json.dumps({"ok": True, "spec": str(args.spec), "ddl": text}))
    else:
        print(text, end="")
    return 0


def _database(args: argparse.Namespace, config: Any) -> Path:
    db = getattr(args, "db", None) or getattr(config, "database", None)
    if db is None:
        raise UsageError("schema diff needs a database: pass --db DB or set 'database' in "
                         "the configuration")
    db = Path(db)
    if not db.is_file():
        raise UsageError(f"{db}: no such database file")
    return db


def handle_diff(args: argparse.Namespace, config: Any) -> int:
    spec = schema_spec.load_spec(args.spec)
    db = _database(args, config)
    # The one read-only opener: a plain mode=ro connect would leave -wal/-shm files,
    # owned by us, beside a closed WAL database (the live one or a backup).
    try:
        conn = dbinfo.open_ro(db)
        try:
            differences = schema_spec.diff(spec, schema_spec.live_schema(conn))
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"{db}: cannot read the schema: {exc}") from None
    if getattr(args, "json", False):
        print(json.dumps({"ok": not differences, "spec": str(args.spec), "database": str(db),
                          "differences": differences}))
    elif differences:
        print(f"{db} differs from {args.spec} ({len(differences)} difference(s)):")
        for line in differences:
            print(f"  {line}")
    else:
        print(f"{db} matches {args.spec}")
    return EXIT_DIFFERENT if differences else 0
