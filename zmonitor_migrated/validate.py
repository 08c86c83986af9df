"""Post-migration validation (seed section 7.2, done for every run).

A migrated database is accepted only if all of these hold:

1. ``schema_version``'s highest version is the plan's target;
2. ``PRAGMA integrity_check`` (or ``quick_check`` by config) says ok;
3. ``PRAGMA foreign_key_check`` finds nothing;
4. no table lost rows, unless the bundle declares the loss for that table;
5. every query in ``checks/post.yaml`` gives its expected value;
6. the schema matches ``schema/database.yaml`` when the bundle has one.

Rules 5 and 6 describe the bundle's final state, so they apply only when the target is
the bundle's last version (a ``--target`` run stops short of it).

``validate`` returns every failed rule as a sentence; an empty list means valid.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from . import dbinfo


def validate(conn: sqlite3.Connection, *, target: int, last_version: int,
             counts_before: dict[str, int], declared_loss: set[str], source_root: Path,
             quick: bool = False) -> list[str]:
    problems: list[str] = []
    version = dbinfo.current_version(conn)
    if version != target:
        problems.append(f"schema version is {version}, expected {target}")
    problems += [f"integrity: {p}" for p in dbinfo.integrity_problems(conn, quick=quick)]
    problems += [f"foreign key: {p}" for p in dbinfo.fk_problems(conn)]
    after = dbinfo.row_counts(conn)
    for table, before in sorted(counts_before.items()):
        now = after.get(table)
        if table in declared_loss:
            continue
        if now is None:
            problems.append(f"table {table} ({before} rows) disappeared; declare the loss in "
                            "bundle.yaml 'declared_row_loss' if that is intended")
        elif now < before:
            problems.append(f"table {table} lost rows: {before} before, {now} after; declare "
                            "the loss in bundle.yaml 'declared_row_loss' if that is intended")
    if target != last_version:
        return problems
    checks_file = source_root / "checks" / "post.yaml"
    if checks_file.is_file():
        from .post_checks import load_checks, run_checks

        problems += [str(f) for f in run_checks(conn, load_checks(checks_file))]
    spec_file = source_root / "schema" / "database.yaml"
    if spec_file.is_file():
        from .schema_spec import diff, live_schema, load_spec

        problems += [f"schema: {d}" for d in diff(load_spec(spec_file), live_schema(conn))]
    return problems
