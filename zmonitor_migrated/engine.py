"""The migration runner: executes a Plan against one SQLite file, one transaction each.

Guarantees:

- The runner owns transactions (``isolation_level=None`` and explicit ``BEGIN IMMEDIATE``
  / ``COMMIT``; never ``executescript``). A failing statement rolls its whole migration
  back and ``MigrationSqlError`` names the file, the statement's line and SQLite's text.
- SQLite's 12-step ALTER procedure around every migration and rollback:
  ``PRAGMA foreign_keys=OFF`` *outside* the transaction (inside one it is a silent
  no-op), ``PRAGMA foreign_key_check`` before ``COMMIT`` (a violation aborts the
  migration), the previous setting restored afterwards. With enforcement off a
  ``DROP TABLE`` cannot cascade into child tables, so a rebuild never loses child rows.
- The version row (the reference runner's columns, with sha256 and execution time) is
  written in the same transaction as the migration, so a version is recorded iff its changes are.
- Batched migrations (``-- zmonitor:batch table=T size=N``) walk rowid ranges from the
  table's min to the max rowid taken when the migration started (keyset: every batch
  advances, whatever the SQL matches). Each batch commits together with the range it
  finished in ``zmonitor_migrated_batch``, so a killed process resumes after the last
  committed batch and never runs one twice. Batches run with foreign keys enforced,
  because batched migrations are pure DML (lint refuses DDL in them).
- Migration SQL (migrations and rollbacks alike) runs under ``MigrationAuthorizer``, an
  allow-list: a signed migration may be wrong, or signed with a stolen key, and must not
  crash the runner, fool the validation or reach the runner's bookkeeping. Refused, each
  with a ``Refusal`` naming the statement's line and what was refused:

  * functions other than the reviewed SQLite core functions (``SAFE_FUNCTIONS``: scalar,
    aggregate, window, date/time, math, JSON). ``fts3_tokenizer`` (its two-argument form
    hands SQLite a function pointer: a SIGSEGV in a root process; its one-argument form
    leaks an address), ``load_extension`` (never), FTS/R-tree helpers, ``sqlite_log``
    and anything unknown are refused by name;
  * TEMP objects (``CREATE TEMP …``, ``CREATE TABLE temp.x``, any write to the temp
    schema). Decision: a migration may not create them at all. A TEMP table shadows the
    main table of the same name for every unqualified name on that connection (a ``TEMP
    vitals`` copy made a migration that emptied ``main.vitals`` look valid); a migration
    that needs scratch space creates a regular table and drops it at the end;
  * virtual tables (``CREATE VIRTUAL TABLE … USING module``: native code parsing the
    migration's arguments), named by module;
  * ATTACH, DETACH, transaction control, PRAGMAs other than read-only introspection;
  * the runner's bookkeeping (``schema_version``, ``zmonitor_migrated_*``: version rows,
    batch progress, applied bundles): any INSERT/UPDATE/DELETE, DROP, ALTER, CREATE
    INDEX/TRIGGER/TABLE/VIEW on them, however qualified, quoted or cased (SQLite hands
    the authorizer the canonical name and database), directly or from a trigger;
  * anything else the authorizer does not know.

  The authorizer is installed once per migration (installing one expires every cached
  statement, so doing it per statement would recompile each batch's SQL thousands of
  times) and checks only while a migration statement runs; the runner's own statements
  in between pass, and name ``main.`` explicitly. SQLite asks an authorizer only when it
  compiles, and Python caches compiled statements by their text, so every migration
  statement is executed with the engine's nonce (a comment after its ``;``) appended:
  its text can never be the runner's, and nothing compiled unchecked is reused for it.
  Two checks cover what an authorizer cannot see at the statement that causes it: after
  each migration every new or changed trigger is compiled (by compiling, not running, an
  INSERT, UPDATE and DELETE of its table) under the same authorizer, because it will run
  later on the app's connection; and the schema rows of the bookkeeping tables must be
  unchanged (``ALTER TABLE x RENAME TO zmonitor_migrated_bundles`` shows the authorizer
  only ``x``).
- A batch header must mean what it says. Before a batched migration records anything,
  each statement is compiled under a recording authorizer: it must write the declared
  table and no other (directly), be an UPDATE or DELETE of it, use ``:batch_start`` and
  ``:batch_end``, and, compiled with its target ``NOT INDEXED``, be planned as a rowid
  range search of the table (``rowid>? AND rowid<?``), which SQLite only does when the
  WHERE clause bounds the rowid from both sides. While the batches run, a statement that
  changes more rows than the batch's rowid range holds is refused (bounds written as
  constants instead of the parameters). Lint runs the same checks on a scratch database.
- A statement interrupted by a progress handler (the caller's deadline, see ``watch``)
  raises ``Interrupted`` naming the file and line.
- ``should_stop`` is polled between migrations and between batches (the safe points);
  when it returns true the runner raises ``Interrupted`` with the database consistent.
"""

from __future__ import annotations

import contextlib
import getpass
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import dbinfo, sqlscript
from .bookkeeping import BATCH_DDL, BATCH_TABLE, SCHEMA_VERSION_DDL, is_bookkeeping
from .errors import MigrateError, MigrationSqlError, PlanError
from .plan import AppliedRow, Plan, plan, rollback_plan
from .sources import Migration, Source

# Read-only introspection a migration may use; every other PRAGMA is the runner's.
_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo",
                 "foreign_key_list"}
# Core SQL functions reviewed for migration and check SQL: pure scalar, aggregate, window,
# date/time, math and JSON functions of SQLite 3.40. Anything else (fts3_tokenizer, whose
# two-argument form hands SQLite a function pointer; load_extension; FTS/R-tree helpers;
# sqlite_log; application functions) is refused by name.
_SAFE_FUNCTION_NAMES = """
    abs changes char coalesce format glob hex ifnull iif instr last_insert_rowid length like
    likelihood likely lower ltrim max min nullif printf quote random randomblob replace round
    rtrim sign soundex sqlite_version substr substring total_changes trim typeof unicode
    unlikely upper zeroblob
    avg count group_concat sum total
    row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value
    nth_value
    date time datetime julianday unixepoch strftime current_date current_time
    current_timestamp
    acos acosh asin asinh atan atan2 atanh ceil ceiling cos cosh degrees exp floor ln log
    log10 log2 mod pi pow power radians sin sinh sqrt tan tanh trunc
    json json_array json_array_length json_extract json_insert json_object json_patch
    json_quote json_remove json_replace json_set json_type json_valid json_group_array
    json_group_object -> ->>
"""
SAFE_FUNCTIONS = frozenset(_SAFE_FUNCTION_NAMES.split())
# SQLite's own helpers for ALTER TABLE RENAME/DROP COLUMN, called by the SQL it generates
# itself; they are internal, so a migration naming them gets "no such function".
_ALTER_FUNCTIONS = frozenset({"sqlite_rename_table", "sqlite_rename_test",
                              "sqlite_rename_column", "sqlite_rename_quotefix",
                              "sqlite_drop_column"})
_SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_temp_master", "sqlite_schema",
                            "sqlite_temp_schema"})
_TEMP_ACTIONS = {
    sqlite3.SQLITE_CREATE_TEMP_TABLE: "CREATE TEMP TABLE",
    sqlite3.SQLITE_CREATE_TEMP_INDEX: "CREATE TEMP INDEX",
    sqlite3.SQLITE_CREATE_TEMP_TRIGGER: "CREATE TEMP TRIGGER",
    sqlite3.SQLITE_CREATE_TEMP_VIEW: "CREATE TEMP VIEW",
    sqlite3.SQLITE_DROP_TEMP_TABLE: "DROP TEMP TABLE",
    sqlite3.SQLITE_DROP_TEMP_INDEX: "DROP TEMP INDEX",
    sqlite3.SQLITE_DROP_TEMP_TRIGGER: "DROP TEMP TRIGGER",
    sqlite3.SQLITE_DROP_TEMP_VIEW: "DROP TEMP VIEW",
}
_WRITES = {sqlite3.SQLITE_INSERT: "INSERT INTO", sqlite3.SQLITE_UPDATE: "UPDATE",
           sqlite3.SQLITE_DELETE: "DELETE FROM"}
# Schema actions whose first argument names the object and second its table (if any).
_SCHEMA_ACTIONS = {
    sqlite3.SQLITE_CREATE_TABLE: "CREATE TABLE", sqlite3.SQLITE_CREATE_VIEW: "CREATE VIEW",
    sqlite3.SQLITE_CREATE_INDEX: "CREATE INDEX", sqlite3.SQLITE_CREATE_TRIGGER:
    "CREATE TRIGGER", sqlite3.SQLITE_DROP_TABLE: "DROP TABLE",
    sqlite3.SQLITE_DROP_VIEW: "DROP VIEW", sqlite3.SQLITE_DROP_INDEX: "DROP INDEX",
    sqlite3.SQLITE_DROP_TRIGGER: "DROP TRIGGER",
}
_HARMLESS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE,
             sqlite3.SQLITE_REINDEX, sqlite3.SQLITE_ANALYZE}


def function_allowed(name: str | None) -> bool:
    return (name or "").lower() in SAFE_FUNCTIONS


class Refusal(MigrationSqlError):
    """A statement the runner refuses to run, whatever it would do (``code`` is the lint
    code that reports the same thing in a source)."""

    kind = "refused-sql"

    def __init__(self, path: str, line: int, message: str, *, version: int,
                 code: str) -> None:
        super().__init__(path, line, message, version=version)
        self.code = code


@dataclass
class _Denial:
    code: str
    reason: str


class MigrationAuthorizer:
    """The authorizer migration SQL runs under (see the module docstring). It remembers
    why it said no, so the error names the function, table or module."""

    def __init__(self) -> None:
        self.denied: _Denial | None = None

    def __call__(self, action: int, arg1: str | None, arg2: str | None, db: str | None,
                 trigger: str | None) -> int:
        denial = self.check(action, arg1, arg2, db, trigger)
        if denial is None:
            return sqlite3.SQLITE_OK
        if self.denied is None:
            self.denied = denial
        return sqlite3.SQLITE_DENY

    @staticmethod
    def check(action: int, arg1: str | None, arg2: str | None, db: str | None,
              trigger: str | None) -> _Denial | None:
        """Why migration SQL may not do ``action`` (None: it may), by kind of action."""
        via = f" (in trigger {trigger})" if trigger else ""
        if action in _HARMLESS:
            return None
        if action == sqlite3.SQLITE_FUNCTION:
            return _function_denial(arg2, via)
        if action in _WRITES:
            return _write_denial(action, arg1, db, via)
        if action in _TEMP_ACTIONS or action in _SCHEMA_ACTIONS \
                or action == sqlite3.SQLITE_ALTER_TABLE:
            return _schema_denial(action, arg1, arg2, db, via)
        return _control_denial(action, arg1, arg2, via)


def _function_denial(name: str | None, via: str) -> _Denial | None:
    lowered = (name or "").lower()
    if lowered in SAFE_FUNCTIONS or lowered in _ALTER_FUNCTIONS:
        return None
    if lowered == "load_extension":
        return _Denial("forbidden", "load_extension() is not allowed in a migration, "
                                    "ever: it would load native code into the runner")
    return _Denial("function", f"function {name}(){via} is not on the list of "
                               "reviewed SQLite core functions a migration may call")


def _write_denial(action: int, table: str | None, db: str | None, via: str) -> _Denial | None:
    if is_bookkeeping(table):
        return _Denial("bookkeeping", f"{_WRITES[action]} {db}.{table}{via} writes "
                                      "the runner's bookkeeping; the runner records "
                                      "versions, batches and bundles itself")
    if (db or "").lower() == "temp" and (table or "").lower() not in _SCHEMA_TABLES:
        return _Denial("temp-object", f"{_WRITES[action]} temp.{table}{via}: "
                                      "migrations may not use the temp schema")
    return None


def _schema_denial(action: int, arg1: str | None, arg2: str | None, db: str | None,
                   via: str) -> _Denial | None:
    """CREATE/DROP of TEMP and regular objects, and ALTER TABLE."""
    if action in _TEMP_ACTIONS:
        return _Denial("temp-object", f"{_TEMP_ACTIONS[action]} {arg1}{via}: TEMP objects "
                                      "are not allowed in a migration (they would shadow "
                                      "real tables for the rest of the connection); use a "
                                      "regular table and DROP it at the end")
    if action in _SCHEMA_ACTIONS:
        if (db or "").lower() == "temp":  # CREATE TABLE temp.x is no CREATE_TEMP_TABLE
            return _Denial("temp-object", f"{_SCHEMA_ACTIONS[action]} temp.{arg1}{via}: "
                                          "TEMP objects are not allowed in a migration "
                                          "(they would shadow real tables for the rest "
                                          "of the connection); use a regular table and "
                                          "DROP it at the end")
        if is_bookkeeping(arg1) or is_bookkeeping(arg2):
            return _Denial("bookkeeping", f"{_SCHEMA_ACTIONS[action]} {arg1}"
                                          f"{' ON ' + arg2 if arg2 else ''}{via} touches "
                                          "the runner's bookkeeping tables")
        return None
    # ALTER TABLE: arg1 is the database, arg2 the table
    if is_bookkeeping(arg2):
        return _Denial("bookkeeping", f"ALTER TABLE {arg2}{via} touches the runner's "
                                      "bookkeeping tables")
    return None


def _control_denial(action: int, arg1: str | None, arg2: str | None, via: str
                    ) -> _Denial | None:
    """PRAGMAs, virtual tables, ATTACH/DETACH, transactions and anything unknown."""
    if action == sqlite3.SQLITE_PRAGMA:
        if (arg1 or "").lower() in _READ_PRAGMAS:
            return None
        return _Denial("forbidden", f"PRAGMA {arg1}{via} is not allowed in a migration: "
                                    "state-changing PRAGMAs belong to the runner")
    if action == sqlite3.SQLITE_CREATE_VTABLE:
        return _Denial("virtual-table", f"CREATE VIRTUAL TABLE {arg1} USING {arg2}: "
                                        "virtual tables are not allowed in a migration "
                                        f"(module {arg2} runs native code on its "
                                        "arguments)")
    if action == sqlite3.SQLITE_DROP_VTABLE:
        return _Denial("virtual-table", f"DROP VIRTUAL TABLE {arg1}: virtual tables are "
                                        "not allowed in a migration")
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        word = "ATTACH" if action == sqlite3.SQLITE_ATTACH else "DETACH"
        return _Denial("forbidden", f"{word} is not allowed in a migration: the runner "
                                    "owns the attached databases")
    if action in (sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT):
        word = (arg1 or "").upper()
        if action == sqlite3.SQLITE_SAVEPOINT:
            word = {"BEGIN": "SAVEPOINT", "ROLLBACK": "ROLLBACK TO"}.get(word, word)
        return _Denial("forbidden", f"{word} is not allowed in a migration: the runner "
                                    "owns transactions")
    return _Denial("forbidden", f"SQLite action {action}{via} is not allowed in a "
                                "migration")


def harden(conn: sqlite3.Connection) -> None:
    """No extension loading on a connection that runs bundle SQL, whatever the
    authorizer says (it is off while the runner's own statements run)."""
    with contextlib.suppress(AttributeError):  # Python built without extension loading
        conn.enable_load_extension(False)


def watch(conn: sqlite3.Connection, *, expired: Callable[[], bool],
          tick: Callable[[], None] | None = None, every: int = 100_000) -> None:
    """SQLite calls this while a statement runs: real progress for the watchdog, and the
    end of a statement (``interrupted``) as soon as ``expired`` says the time is up."""
    def handler() -> int:
        if tick is not None:
            tick()
        return int(expired())
    conn.set_progress_handler(handler, every)


class Interrupted(MigrateError):
    """Stopped at a safe point on request (SIGTERM, time budget); the DB is consistent."""

    kind = "interrupted"


@dataclass(frozen=True)
class Progress:
    version: int
    path: str
    index: int  # 1-based position of this migration in the run
    count: int  # migrations in the run
    batch: int = 0
    batches: int = 0
    rows: int = 0
    eta_s: float | None = None
    done: bool = False


ProgressFn = Callable[[Progress], None]


def connect(path: Path | str, *, timeout: float = 5.0) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=timeout)
    harden(conn)
    return conn


def read_applied(conn: sqlite3.Connection) -> list[AppliedRow]:
    if not dbinfo.has_table(conn, "schema_version"):
        return []
    rows = conn.execute(
        "SELECT version, applied_at, description, migration_type, file_hash, "
        "execution_time_ms, applied_by FROM main.schema_version ORDER BY version").fetchall()
    return [AppliedRow(*r) for r in rows]


def _bookkeeping_schema(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
    """Every schema object that is, or hangs on, a bookkeeping table (a table renamed
    into a bookkeeping name included)."""
    rows = conn.execute("SELECT type, name, tbl_name, sql FROM main.sqlite_master "
                        "ORDER BY type, name").fetchall()
    return [r for r in rows if is_bookkeeping(str(r[1])) or is_bookkeeping(str(r[2]))]


_RANGE_SEARCH = re.compile(r"^SEARCH (?P<t>\S+) USING (?:INTEGER PRIMARY KEY|(?:COVERING )?"
                           r"INDEX \S+) \((?:.* AND )?rowid>\? AND rowid<\?\)\Z", re.IGNORECASE)


class _Recorder(MigrationAuthorizer):
    """The migration authorizer, also keeping every call (action, arg1, arg2, db,
    trigger) for a structural look at a statement."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, str | None, str | None, str | None, str | None]] = []

    def __call__(self, action: int, arg1: str | None, arg2: str | None, db: str | None,
                 trigger: str | None) -> int:
        self.calls.append((action, arg1, arg2, db, trigger))
        return super().__call__(action, arg1, arg2, db, trigger)


class _Guard(MigrationAuthorizer):
    """The migration authorizer as installed for a whole migration: it checks only while
    ``checking`` is set (a migration statement runs) and lets the runner's own pass."""

    def __init__(self) -> None:
        super().__init__()
        self.checking = False

    def __call__(self, action: int, arg1: str | None, arg2: str | None, db: str | None,
                 trigger: str | None) -> int:
        if not self.checking:
            return sqlite3.SQLITE_OK
        return super().__call__(action, arg1, arg2, db, trigger)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _line_of(statements: list[sqlscript.Statement], pattern: str) -> int:
    rx = re.compile(pattern, re.IGNORECASE)
    return next((s.line for s in statements if rx.match(s.head)), 1)


def _sql_error(path: str, version: int, line: int, exc: sqlite3.Error,
               auth: MigrationAuthorizer) -> MigrateError:
    """The error for a failed migration statement: a refusal names what was refused and
    why; an interrupt (the progress handler saw the time run out) is ``Interrupted``."""
    if auth.denied is not None:
        return Refusal(path, line, f"{auth.denied.reason} ({exc})", version=version,
                       code=auth.denied.code)
    if str(exc) == "interrupted":
        return Interrupted(f"{path}:{line}: the statement was interrupted while it ran")
    return MigrationSqlError(path, line, str(exc), version=version)


_NAME = r'(?:"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\]|[A-Za-z_][A-Za-z0-9_$]*)'
_BATCH_DML = re.compile(
    rf"^\s*(?P<verb>UPDATE(?:\s+OR\s+\w+)?|DELETE\s+FROM)\s+"
    rf"(?P<name>(?:{_NAME}\s*\.\s*)?(?P<table>{_NAME}))"
    rf"(?P<alias>\s+(?:AS\s+)?(?!(?:SET|WHERE|INDEXED|NOT|RETURNING|ORDER|LIMIT)\b)"
    rf"(?P<alias_name>{_NAME}))?(?P<rest>.*)\Z", re.IGNORECASE | re.DOTALL)


def _unquote(name: str) -> str:
    if name[:1] in "\"`[" and len(name) >= 2:
        inner = name[1:-1]
        return inner.replace('""', '"') if name[0] == '"' else inner
    return name


def unindexed(sql: str) -> tuple[str, str] | None:
    """``sql`` (an UPDATE or DELETE) with ``NOT INDEXED`` on its target, and the name the
    query plan calls the target (its alias, or its table). Without any index the planner
    can narrow the target only by a rowid range written in the WHERE clause itself, so
    the plan shows whether the statement is bounded by one. None for other statements."""
    m = _BATCH_DML.match(sqlscript.strip_comments(sql))
    if m is None or re.match(r"\s*(INDEXED|NOT)\b", m["rest"], re.IGNORECASE):
        return None
    shown = _unquote(m["alias_name"] if m["alias"] else m["table"])
    return (f"{m['verb']} {m['name']}{m['alias'] or ''} NOT INDEXED{m['rest']}", shown)


def batch_problem(table: str, sql: str,
                  calls: list[tuple[int, str | None, str | None, str | None, str | None]],
                  plan_rows: list[tuple[int, str]] | None, shown: str) -> str | None:
    """Why a statement of a migration batched over ``table`` is not bounded by the batch,
    from what SQLite compiled: the authorizer's calls (tables written directly, not by
    triggers) and the top-level loops of the plan of the statement with its target
    ``NOT INDEXED`` (``None`` when it is no UPDATE/DELETE). None when it is bounded."""
    written = sorted({str(a1) for action, a1, _a2, _db, trig in calls
                      if action in _WRITES and trig is None
                      and (a1 or "").lower() not in _SCHEMA_TABLES})
    fix = (f"write it as UPDATE or DELETE of {table} with WHERE rowid BETWEEN :batch_start "
           "AND :batch_end AND …, or drop the batch header")
    if not written:
        return (f"the migration is batched over {table} but this statement does not write "
                f"it; every statement of a batched migration runs once per batch: {fix}")
    others = [t for t in written if t.lower() != table.lower()]
    if others:
        return (f"the batch header declares table={table} but this statement writes "
                f"{', '.join(others)}: it would run once per batch over rows outside the "
                f"batch; {fix}")
    if plan_rows is None:
        return f"a batched statement must be an UPDATE or DELETE of {table}: {fix}"
    if not {":batch_start", ":batch_end"} <= sqlscript.parameters(sql):
        return f"the statement does not use both :batch_start and :batch_end: {fix}"
    top = [detail for parent, detail in plan_rows if parent == 0]
    bounded = any((m := _RANGE_SEARCH.match(d)) and m["t"].lower() == shown.lower()
                  for d in top)
    if not bounded:
        return (f"the WHERE clause does not bound {table}'s rowid from both sides: without "
                f"indexes SQLite plans {'; '.join(top) or 'no loop'} (a batch needs SEARCH "
                f"{shown} USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)); {fix}")
    return None


@dataclass
class _Walk:
    """A batched migration's progress, as its ``zmonitor_migrated_batch`` row holds it."""
    next_rowid: int
    max_rowid: int
    done: int
    total: int
    rows: int
    elapsed_ms: int  # spent by earlier (killed) runs of this migration


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


FAST_CACHE_KIB = 16 * 1024


class Engine:
    """Runs plans against one database file.

    ``fast=True`` is for a private copy that is not live yet (the swap design): there is
    no rollback journal and nothing is fsynced per commit, because a crash or any failed
    statement discards the whole copy (a ``ROLLBACK`` without a journal may leave it
    inconsistent, and nothing ever reads it again). The caller makes the file durable
    before it goes live. Without a journal a batch's memory is the page cache alone, so
    the peak RSS does not grow with the batch size or the table (an in-memory journal
    would hold every original page a batch touched).

    ``min_batch`` raises a batched migration's size to at least that many rows. The
    pipeline passes ``batch_size`` from the config (50,000) for its private copy: a
    header's size bounds how long a live table is locked and how much a resumed run
    repeats, and a private copy is neither shared nor resumed; fewer, larger
    transactions rewrite shared index pages less often. The fast page cache is 16 MiB,
    which bounds the memory a run's transactions use (bench/ measures time and peak RSS).
    """

    def __init__(self, db_path: Path | str, *, applied_by: str | None = None,
                 on_progress: ProgressFn | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 fast: bool = False, busy_timeout: float = 5.0, min_batch: int = 1) -> None:
        self.path = Path(db_path)
        self.conn = connect(self.path, timeout=busy_timeout)
        self.applied_by = applied_by or f"zmonitor-migrate ({_user()})"
        self.on_progress = on_progress or (lambda _p: None)
        self.should_stop = should_stop or (lambda: False)
        self.fast = fast
        self.min_batch = min_batch
        self._guard: _Guard | None = None
        self._nonce = f"\n/* zmonitor-migrated {secrets.token_hex(8)} */"
        if fast:
            self.conn.execute(f"PRAGMA cache_size=-{FAST_CACHE_KIB}")
            self.conn.execute("PRAGMA synchronous=OFF")
            mode = self.conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode.lower() != "wal":
                self.conn.execute("PRAGMA journal_mode=OFF")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------
    def applied(self) -> list[AppliedRow]:
        return read_applied(self.conn)

    def current_version(self) -> int:
        return dbinfo.current_version(self.conn)

    def plan(self, source: Source, target: int | None = None) -> Plan:
        return plan(source.migrations, self.applied(), target)

    def batch_state(self, version: int) -> tuple[int, int] | None:
        """(batches_done, batches_total) of an unfinished batched migration, if any."""
        if not dbinfo.has_table(self.conn, BATCH_TABLE):
            return None
        row = self.conn.execute(
            f"SELECT batches_done, batches_total FROM main.{BATCH_TABLE} WHERE version=?",
            (version,)).fetchone()
        return (row[0], row[1]) if row else None

    # -- applying -------------------------------------------------------------------
    def apply(self, source: Source, *, target: int | None = None,
              the_plan: Plan | None = None) -> list[int]:
        """Apply every pending migration up to ``target``; returns the versions applied."""
        p = the_plan or self.plan(source, target)
        self._ensure_bookkeeping()
        done: list[int] = []
        for index, mig in enumerate(p.pending, start=1):
            if self.should_stop():
                raise Interrupted(f"stopped before migration {mig.version} at a safe point")
            text = source.text(mig.path)
            if mig.batch:
                self._apply_batched(mig, text, index, len(p.pending))
            else:
                self.on_progress(Progress(mig.version, mig.path, index, len(p.pending)))
                started = time.perf_counter()
                self._run_transaction(mig.path, mig.version, text, after=lambda m=mig, t0=started:
                                      self._record_version(m, t0))
                self.on_progress(Progress(mig.version, mig.path, index, len(p.pending),
                                          done=True))
            done.append(mig.version)
        return done

    def rollback(self, source: Source, to: int) -> list[int]:
        """Run rollback scripts newest first down to version ``to`` (exclusive)."""
        undo = rollback_plan(source.migrations, self.applied(), to)
        if dbinfo.has_table(self.conn, BATCH_TABLE):
            half = self.conn.execute(
                f"SELECT version, batches_done, batches_total FROM main.{BATCH_TABLE} "
                "ORDER BY version").fetchone()
            if half is not None:
                # Its committed batches have no version row, so no rollback script would
                # undo them, and a later apply would resume from a stale range.
                raise PlanError(
                    f"migration {half[0]} is half applied (batch {half[1]}/{half[2]}); "
                    "finish it with apply or restore a backup before rolling back",
                    kind="batch-in-progress")
        undone: list[int] = []
        for index, mig in enumerate(undo, start=1):
            assert mig.rollback is not None  # rollback_plan guarantees it
            self.on_progress(Progress(mig.version, mig.rollback, index, len(undo)))
            self._run_transaction(
                mig.rollback, mig.version, source.text(mig.rollback),
                after=lambda v=mig.version: self.conn.execute(
                    "DELETE FROM main.schema_version WHERE version=?", (v,)))
            undone.append(mig.version)
        return undone

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; any exception rolls the whole block back."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def _ensure_bookkeeping(self) -> None:
        with self._transaction():
            self.conn.execute(SCHEMA_VERSION_DDL)
            self.conn.execute(BATCH_DDL)

    def _record_version(self, mig: Migration, started: float, elapsed_ms: int = 0) -> None:
        ms = elapsed_ms + int((time.perf_counter() - started) * 1000)
        self.conn.execute(
            "INSERT INTO main.schema_version (version, applied_at, description, migration_type, "
            "file_hash, execution_time_ms, applied_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (mig.version, _now(), mig.description, mig.kind, mig.sha256, ms, self.applied_by))

    def _statements(self, path: str, version: int, text: str) -> list[sqlscript.Statement]:
        try:
            return sqlscript.executable(text)
        except sqlscript.ScriptError as exc:
            raise MigrationSqlError(path, exc.line, str(exc), version=version) from None

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """The migration authorizer installed for one migration's statements."""
        self._guard = _Guard()
        self.conn.set_authorizer(self._guard)
        try:
            yield
        finally:
            self._guard = None
            self.conn.set_authorizer(None)

    def _execute(self, path: str, version: int, stmt: sqlscript.Statement,
                 params: dict[str, int] | None = None) -> int:
        """Run one migration statement (inside ``_guarded``) under the authorizer."""
        guard = self._guard
        assert guard is not None, "migration SQL runs only inside _guarded()"
        guard.denied = None
        guard.checking = True
        try:
            cur = self.conn.execute(stmt.sql + self._nonce, params or {})
            for _row in cur:
                pass
            return max(cur.rowcount, 0)
        except sqlite3.Error as exc:
            raise _sql_error(path, version, stmt.line, exc, guard) from None
        finally:
            guard.checking = False

    def _prepare_only(self, rec: _Recorder, sql: str, params: dict[str, int] | None = None
                      ) -> list[tuple[object, ...]]:
        """Compile ``sql`` under the migration authorizer (``rec`` records what it saw)
        without running it: EXPLAIN compiles the whole statement, trigger programs
        included, and only lists them."""
        self.conn.set_authorizer(rec)
        try:
            return self.conn.execute(sql, params or {}).fetchall()
        finally:
            self.conn.set_authorizer(self._guard)

    def _triggers(self) -> set[tuple[str, str, str]]:
        return {(str(n), str(t), str(q)) for n, t, q in self.conn.execute(
            "SELECT name, tbl_name, sql FROM main.sqlite_master WHERE type='trigger'")}

    def _check_triggers(self, path: str, version: int, statements: list[sqlscript.Statement],
                        before: set[tuple[str, str, str]]) -> None:
        """A trigger a migration leaves behind runs later under the app's connection, not
        under our authorizer: compile every new or changed one now (by compiling an
        INSERT, UPDATE and DELETE of its table) under the migration authorizer."""
        for name, table, _sql in sorted(self._triggers() - before):
            line = _line_of(statements, rf"CREATE\s+TRIGGER\s+(IF\s+NOT\s+EXISTS\s+)?"
                                        rf"(MAIN\s*\.\s*)?[\"`\[]?{re.escape(name)}\b")
            cols = [str(r[1]) for r in self.conn.execute(
                f"PRAGMA main.table_info({_quote(table)})")]
            sets = ", ".join(f"{_quote(c)}={_quote(c)}" for c in cols)
            seen = False
            errors: list[str] = []
            for firing in (f"INSERT INTO main.{_quote(table)} DEFAULT VALUES",
                           f"UPDATE main.{_quote(table)} SET {sets}",
                           f"DELETE FROM main.{_quote(table)}"):
                rec = _Recorder()
                try:
                    self._prepare_only(rec, "EXPLAIN " + firing)
                except sqlite3.Error as exc:
                    if rec.denied is not None:
                        raise _sql_error(path, version, line, exc, rec) from None
                    errors.append(str(exc))
                    continue
                seen = seen or any(c[4] == name for c in rec.calls)
            if not seen:
                raise Refusal(path, line, f"trigger {name} on {table} cannot be compiled for "
                              f"checking ({'; '.join(errors) or 'it never fires'}); a trigger "
                              "a migration creates must compile", version=version,
                              code="trigger")

    def _check_batched(self, mig: Migration, statements: list[sqlscript.Statement]) -> None:
        """A batch header must mean what it says: every statement writes only the declared
        table and only inside the batch's rowid range (checked from what SQLite compiles,
        before the first batch runs: in the rehearsal, before the app is stopped)."""
        assert mig.batch is not None
        try:  # the walk itself needs the table and its rowid
            self.conn.execute(f"SELECT rowid FROM main.{_quote(mig.batch.table)} LIMIT 0")
        except sqlite3.Error as exc:
            raise MigrationSqlError(mig.path, 1, f"batch table {mig.batch.table!r}: {exc}",
                                    version=mig.version) from None
        bounds = {"batch_start": 0, "batch_end": 0}
        for stmt in statements:
            rec = _Recorder()
            try:
                self._prepare_only(rec, "EXPLAIN QUERY PLAN " + stmt.sql, bounds)
            except sqlite3.Error as exc:
                raise _sql_error(mig.path, mig.version, stmt.line, exc, rec) from None
            plan_rows: list[tuple[int, str]] | None = None
            variant = unindexed(stmt.sql)
            if variant is not None:
                try:
                    plan_rows = [(int(str(r[1])), str(r[3])) for r in self._prepare_only(
                        _Recorder(), "EXPLAIN QUERY PLAN " + variant[0], bounds)]
                except sqlite3.Error:
                    plan_rows = None  # e.g. a form the rewrite does not know: refused
            problem = batch_problem(mig.batch.table, stmt.sql, rec.calls, plan_rows,
                                    variant[1] if variant else mig.batch.table)
            if problem:
                raise Refusal(mig.path, stmt.line, problem, version=mig.version,
                              code="batch-bounds")

    def _fk_violations(self, path: str, version: int, table: str | None = None) -> None:
        sql = f"PRAGMA foreign_key_check({table})" if table else "PRAGMA foreign_key_check"
        rows = self.conn.execute(sql).fetchmany(6)
        if rows:
            shown = "; ".join(f"{t} rowid {r} references {p}" for t, r, p, _ in rows[:5])
            raise MigrationSqlError(path, 1, f"foreign key violations after the migration: "
                                    f"{shown}{' …' if len(rows) > 5 else ''}", version=version)

    def _sequences(self) -> dict[str, int]:
        if not dbinfo.has_table(self.conn, "sqlite_sequence"):
            return {}
        return {name: seq for name, seq in
                self.conn.execute("SELECT name, seq FROM main.sqlite_sequence")
                if isinstance(name, str) and isinstance(seq, int)}

    def _keep_sequences(self, before: dict[str, int]) -> None:
        """AUTOINCREMENT promises ids are never reused. A rebuild (create x_new, copy, drop
        x, rename) leaves x_new's sequence at the highest *copied* id, below the old one
        when the newest rows had been deleted; put every surviving AUTOINCREMENT table's
        sequence back to at least what it was."""
        for name, seq in before.items():
            row = self.conn.execute(
                "SELECT sql FROM main.sqlite_master WHERE type='table' AND name=?",
                (name,)).fetchone()
            if row is None or "AUTOINCREMENT" not in (row[0] or "").upper():
                continue  # dropped for good, or no longer AUTOINCREMENT
            cur = self.conn.execute(
                "UPDATE main.sqlite_sequence SET seq=? WHERE name=? AND seq<?", (seq, name, seq))
            if cur.rowcount == 0 and self.conn.execute(
                    "SELECT 1 FROM main.sqlite_sequence WHERE name=?", (name,)).fetchone() is None:
                self.conn.execute("INSERT INTO main.sqlite_sequence (name, seq) VALUES (?, ?)",
                                  (name, seq))

    def _run_transaction(self, path: str, version: int, text: str,
                         after: Callable[[], object]) -> None:
        statements = self._statements(path, version, text)
        fk_before = self.conn.execute("PRAGMA foreign_keys").fetchone()[0]
        self.conn.execute("PRAGMA foreign_keys=OFF")
        try:
            with self._guarded(), self._transaction():
                sequences = self._sequences()
                triggers = self._triggers()
                guarded = _bookkeeping_schema(self.conn)
                for stmt in statements:
                    self._execute(path, version, stmt)
                self._check_triggers(path, version, statements, triggers)
                if _bookkeeping_schema(self.conn) != guarded:
                    # e.g. ALTER TABLE x RENAME TO zmonitor_migrated_bundles: the
                    # authorizer sees only the old name.
                    raise Refusal(path, 1, "the migration changed the schema of the "
                                  "runner's bookkeeping tables (schema_version, "
                                  "zmonitor_migrated_*); it may not create, rename, alter "
                                  "or index them", version=version, code="bookkeeping")
                self._keep_sequences(sequences)
                self._fk_violations(path, version)
                after()
        finally:
            self.conn.execute(f"PRAGMA foreign_keys={int(fk_before)}")

    def _apply_batched(self, mig: Migration, text: str, index: int, count: int) -> None:
        assert mig.batch is not None
        size = max(mig.batch.size, self.min_batch)
        statements = self._statements(mig.path, mig.version, text)
        self._check_batched(mig, statements)  # before anything is recorded
        walk = self._resumed_walk(mig) or self._start_walk(mig, size)
        elapsed_before = walk.elapsed_ms
        fk_before = self.conn.execute("PRAGMA foreign_keys").fetchone()[0]
        self.conn.execute("PRAGMA foreign_keys=ON")
        run_started = time.perf_counter()
        try:
            with self._guarded():
                self._walk_batches(mig, statements, size, walk, run_started, index, count)
            with self._transaction():
                self._record_version(mig, run_started, elapsed_before)
                self.conn.execute(f"DELETE FROM main.{BATCH_TABLE} WHERE version=?", (mig.version,))
        finally:
            self.conn.execute(f"PRAGMA foreign_keys={int(fk_before)}")
        self.on_progress(Progress(mig.version, mig.path, index, count, batch=walk.done,
                                  batches=walk.total, rows=walk.rows, eta_s=0.0, done=True))

    def _resumed_walk(self, mig: Migration) -> _Walk | None:
        """The walk a killed run left in the batch table, if it ran the same SQL."""
        row = self.conn.execute(
            f"SELECT next_rowid, max_rowid, batches_done, batches_total, rows_changed, "
            f"elapsed_ms, file_hash FROM main.{BATCH_TABLE} WHERE version=?",
            (mig.version,)).fetchone()
        if row is None:
            return None
        if row[6] != mig.sha256:
            # Resuming with other SQL would mix two migrations in one table.
            raise PlanError(
                f"migration {mig.version} ({mig.path}) is half applied "
                f"(batch {row[2]}/{row[3]}) with sha256 {str(row[6])[:12]}… but the "
                f"source now has {mig.sha256[:12]}…: a started migration must not be "
                "modified; restore the backup",
                kind="applied-migration-changed")
        return _Walk(*row[:6])

    def _start_walk(self, mig: Migration, size: int) -> _Walk:
        """Record a new walk from the table's min rowid to its max rowid now."""
        assert mig.batch is not None
        table = mig.batch.table
        with self._transaction():
            try:
                lo, hi = self.conn.execute(
                    f'SELECT min(rowid), max(rowid) FROM main.{_quote(table)}').fetchone()
            except sqlite3.Error as exc:
                raise MigrationSqlError(mig.path, 1, f"batch table {table!r}: {exc}",
                                        version=mig.version) from None
            # Not ``lo or 1``: rowid 0 (and negative rowids) are valid and are walked.
            lo, hi = (1, 0) if lo is None else (lo, hi)
            total = max(0, (hi - lo) // size + 1) if hi >= lo else 0
            walk = _Walk(lo, hi, 0, total, 0, 0)
            self.conn.execute(
                f"INSERT INTO main.{BATCH_TABLE} (version, next_rowid, max_rowid, "
                f"batches_done, batches_total, rows_changed, elapsed_ms, file_hash) "
                f"VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (mig.version, walk.next_rowid, walk.max_rowid, walk.done, walk.total,
                 walk.rows, walk.elapsed_ms, mig.sha256))
        return walk

    def _walk_batches(self, mig: Migration, statements: list[sqlscript.Statement], size: int,
                      walk: _Walk, run_started: float, index: int, count: int) -> None:
        """Run the remaining batches, each committed with the range it finished."""
        first_batch = walk.done
        while walk.next_rowid <= walk.max_rowid:
            if self.should_stop():
                raise Interrupted(f"stopped in migration {mig.version} after batch "
                                  f"{walk.done}/{walk.total} at a safe point")
            end = min(walk.next_rowid + size - 1, walk.max_rowid)
            with self._transaction():
                changed = self._run_batch(mig, statements, walk.next_rowid, end)
                self.conn.execute(
                    f"UPDATE main.{BATCH_TABLE} SET next_rowid=?, batches_done=?, "
                    f"rows_changed=?, elapsed_ms=? WHERE version=?",
                    (end + 1, walk.done + 1, walk.rows + changed,
                     walk.elapsed_ms + int((time.perf_counter() - run_started) * 1000),
                     mig.version))
            walk.done += 1
            walk.rows += changed
            walk.next_rowid = end + 1
            spent = time.perf_counter() - run_started
            per_batch = spent / max(1, walk.done - first_batch)
            self.on_progress(Progress(
                mig.version, mig.path, index, count, batch=walk.done, batches=walk.total,
                rows=walk.rows, eta_s=per_batch * (walk.total - walk.done)))

    def _run_batch(self, mig: Migration, statements: list[sqlscript.Statement],
                   start: int, end: int) -> int:
        """Every statement once over rowids ``start..end``; the rows they changed."""
        changed = 0
        for stmt in statements:
            n = self._execute(mig.path, mig.version, stmt,
                              {"batch_start": start, "batch_end": end})
            if n > end - start + 1:
                # More rows than rowids in the range: not bounded by the batch.
                raise Refusal(mig.path, stmt.line, f"changed {n} rows in the "
                              f"batch of rowids {start}..{end}, which holds "
                              f"at most {end - start + 1}: the statement "
                              "is not bounded by :batch_start/:batch_end",
                              version=mig.version, code="batch-bounds")
            changed += n
        return changed

def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
