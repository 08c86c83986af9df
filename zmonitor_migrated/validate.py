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

Rule 2 is the most expensive (it reads every page and, in full, every index entry), so
when the database is a file it runs on its own read-only connection in a thread, in
parallel with rules 3 to 6 (SQLite releases the GIL while a statement runs). Nothing
writes the database while ``validate`` runs, so both connections see the same content;
the result is the same list, in the same order, as checking one rule after another.
``checks/post.yaml`` and ``schema/database.yaml`` are parsed once per file version, so
the real run reuses what the rehearsal (before the app stop) parsed.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
from pathlib import Path
from typing import Any

from . import dbinfo


class _IntegrityCheck:
    """Rule 2 in a thread on its own read-only connection (inline for a database that
    is not a file)."""

    def __init__(self, conn: sqlite3.Connection, quick: bool) -> None:
        self.quick = quick
        self.problems: list[str] = []
        self.error: BaseException | None = None
        row = conn.execute("PRAGMA database_list").fetchone()
        path = row[2] if row else ""
        self.thread: threading.Thread | None = None
        if path:
            self.thread = threading.Thread(target=self._run, args=(Path(path),),
                                           name="integrity-check", daemon=True)
            self.thread.start()
        else:
            self.problems = dbinfo.integrity_problems(conn, quick=quick)

    def _run(self, path: Path) -> None:
        try:
            conn = dbinfo.open_ro(path)
            try:
                self.problems = dbinfo.integrity_problems(conn, quick=self.quick)
            finally:
                conn.close()
        except BaseException as exc:  # handed to the caller's thread by result()
            self.error = exc

    def result(self) -> list[str]:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error
        return self.problems


@functools.lru_cache(maxsize=8)
def _parsed(kind: str, path: str, _mtime_ns: int, _size: int) -> Any:
    if kind == "checks":
        from .post_checks import load_checks

        return load_checks(Path(path))
    from .schema_spec import load_spec

    return load_spec(Path(path))


def _load(kind: str, path: Path) -> Any:
    st = path.stat()
    return _parsed(kind, str(path), st.st_mtime_ns, st.st_size)


def validate(conn: sqlite3.Connection, *, target: int, last_version: int,
             counts_before: dict[str, int], declared_loss: set[str], source_root: Path,
             quick: bool = False) -> list[str]:
    head: list[str] = []
    version = dbinfo.current_version(conn)
    if version != target:
        head.append(f"schema version is {version}, expected {target}")
    integrity = _IntegrityCheck(conn, quick)
    try:
        rest = _other_rules(conn, target=target, last_version=last_version,
                            counts_before=counts_before, declared_loss=declared_loss,
                            source_root=source_root)
    finally:
        checked = integrity.result()
    return head + [f"integrity: {p}" for p in checked] + rest


def _other_rules(conn: sqlite3.Connection, *, target: int, last_version: int,
                 counts_before: dict[str, int], declared_loss: set[str],
                 source_root: Path) -> list[str]:
    """Rules 3 to 6."""
    problems = [f"foreign key: {p}" for p in dbinfo.fk_problems(conn)]
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
        from .post_checks import run_checks

        problems += [str(f) for f in run_checks(conn, _load("checks", checks_file))]
    spec_file = source_root / "schema" / "database.yaml"
    if spec_file.is_file():
        from .schema_spec import diff, live_schema

        problems += [f"schema: {d}" for d in diff(_load("spec", spec_file), live_schema(conn))]
    return problems
