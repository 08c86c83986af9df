"""Post-migration validation, done for every run.

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

The expensive rules read whole tables: rule 2 every page (and, in full, every index
entry), and rule 5's checks may each scan a large table. When the database is a file,
a helper thread on its own read-only connection runs rule 2 and then takes rule-5 checks
from a shared queue, while the caller's thread runs rules 3 and 4 and then takes from the
same queue (SQLite releases the GIL while a statement runs, so both cores work). Nothing
writes the database while ``validate`` runs, so both connections see the same content;
the result is the same list, in the same order, as checking one rule after another.
``checks/post.yaml`` and ``schema/database.yaml`` are parsed once per file version, so
the real run reuses what the rehearsal (before the app stop) parsed.

The caller gives ``validate`` a connection of its own to the migrated file, never the
one the migrations ran on: a connection's temp schema (a ``CREATE TEMP TABLE vitals``
shadowing ``main.vitals``) and its other state must not answer for the file. The
helper's connection is always a fresh read-only one.

With a ``deadline`` (``time.monotonic()`` value) every connection ``validate`` uses gets
a progress handler that interrupts the running statement once it has passed, and
``validate`` raises ``ValidationInterrupted`` naming what was cut short instead of
returning a verdict.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import dbinfo
from .engine import Interrupted, watch
from .fsutil import InBackground
from .post_checks import CheckFailure, Job, load_checks, plan_scans, run_job
from .schema_spec import diff, live_schema, load_spec


class ValidationInterrupted(Interrupted):
    """The deadline passed while the validation ran; no verdict was reached."""

    kind = "too-slow"


class _Clock:
    """The deadline as the progress handlers and the checks see it."""

    def __init__(self, deadline: float | None, tick: Callable[[], None] | None) -> None:
        self.deadline = deadline
        self.tick = tick

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def watch(self, conn: sqlite3.Connection, *, ticks: bool = True) -> None:
        """The helper thread's connection does not tick: the watchdog is fed from the
        caller's thread only."""
        if self.deadline is not None or (ticks and self.tick is not None):
            watch(conn, expired=self.expired, tick=self.tick if ticks else None)


class _CheckQueue:
    """Rule-5 jobs handed out one at a time to whichever connection is free."""

    def __init__(self, jobs: list[Job]) -> None:
        self._next = iter(jobs)
        self._lock = threading.Lock()
        self._failures: dict[int, CheckFailure] = {}

    def drain(self, conn: sqlite3.Connection) -> None:
        while True:
            with self._lock:
                job = next(self._next, None)
            if job is None:
                return
            self._failures.update(run_job(conn, job))

    def failures(self) -> list[str]:
        return [str(self._failures[i]) for i in sorted(self._failures)]


def _start_helper(conn: sqlite3.Connection, quick: bool, queue: _CheckQueue,
                  clock: _Clock) -> Callable[[], list[str]]:
    """Rule 2, then a share of the rule-5 queue, in a thread on its own read-only
    connection (rule 2 inline for a database that is not a file). Returns the call that
    waits for the thread and gives rule 2's problems (or re-raises the thread's error)."""
    row = conn.execute("PRAGMA database_list").fetchone()
    path = row[2] if row else ""
    if not path:
        problems = dbinfo.integrity_problems(conn, quick=quick)
        return lambda: problems

    def helper(db: Path) -> list[str]:
        ro = dbinfo.open_ro(db)
        try:
            clock.watch(ro, ticks=False)
            found = dbinfo.integrity_problems(ro, quick=quick)
            queue.drain(ro)
            return found
        finally:
            ro.close()

    return InBackground(helper, Path(path), name="validate-helper").result


@functools.lru_cache(maxsize=8)
def _parsed(kind: str, path: str, _mtime_ns: int, _size: int) -> Any:
    return load_checks(Path(path)) if kind == "checks" else load_spec(Path(path))


def _load(kind: str, path: Path) -> Any:
    st = path.stat()
    return _parsed(kind, str(path), st.st_mtime_ns, st.st_size)


def validate(conn: sqlite3.Connection, *, target: int, last_version: int,
             counts_before: dict[str, int], declared_loss: set[str], source_root: Path,
             quick: bool = False, deadline: float | None = None,
             tick: Callable[[], None] | None = None) -> list[str]:
    clock = _Clock(deadline, tick)
    clock.watch(conn)
    try:
        problems = _validate(conn, clock, target=target, last_version=last_version,
                             counts_before=counts_before, declared_loss=declared_loss,
                             source_root=source_root, quick=quick)
    except sqlite3.OperationalError as exc:
        if clock.expired():
            raise ValidationInterrupted("the time ran out during the validation "
                                        f"({exc})") from None
        raise
    if clock.expired():
        cut = [p for p in problems if p.endswith("query failed: interrupted")
               or p.startswith("integrity: ")]
        raise ValidationInterrupted("the time ran out during the validation"
                                    + (f" ({'; '.join(cut[:3])})" if cut else ""))
    return problems


def _validate(conn: sqlite3.Connection, clock: _Clock, *, target: int, last_version: int,
              counts_before: dict[str, int], declared_loss: set[str], source_root: Path,
              quick: bool) -> list[str]:
    head: list[str] = []
    version = dbinfo.current_version(conn)
    if version != target:
        head.append(f"schema version is {version}, expected {target}")
    # Rules 5 and 6 describe the bundle's final state (module docstring).
    final = target == last_version
    checks_file = source_root / "checks" / "post.yaml"
    checks = _load("checks", checks_file) if final and checks_file.is_file() else []
    queue = _CheckQueue(plan_scans(conn, checks))
    helper_result = _start_helper(conn, quick, queue, clock)
    try:
        rest = _row_rules(conn, counts_before=counts_before, declared_loss=declared_loss)
        queue.drain(conn)
        schema = _schema_rule(conn, source_root) if final else []
    finally:
        checked = helper_result()
    return (head + [f"integrity: {p}" for p in checked] + rest + queue.failures()
            + schema)


def _row_rules(conn: sqlite3.Connection, *, counts_before: dict[str, int],
               declared_loss: set[str]) -> list[str]:
    """Rules 3 and 4."""
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
    return problems


def _schema_rule(conn: sqlite3.Connection, source_root: Path) -> list[str]:
    """Rule 6."""
    spec_file = source_root / "schema" / "database.yaml"
    if not spec_file.is_file():
        return []
    return [f"schema: {d}" for d in diff(_load("spec", spec_file), live_schema(conn))]
