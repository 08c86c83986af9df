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
- The version row (seed columns, with sha256 and execution time) is written in the same
  transaction as the migration, so a version is recorded iff its changes are.
- Batched migrations (``-- zmonitor:batch table=T size=N``) walk rowid ranges from the
  table's min to the max rowid taken when the migration started (keyset: every batch
  advances, whatever the SQL matches). Each batch commits together with the range it
  finished in ``zmonitor_migrated_batch``, so a killed process resumes after the last
  committed batch and never runs one twice. Batches run with foreign keys enforced,
  because batched migrations are pure DML (lint refuses DDL in them).
- An authorizer denies ATTACH, DETACH, extension loading, PRAGMAs that change state and
  transaction control inside migration SQL.
- ``should_stop`` is polled between migrations and between batches (the safe points);
  when it returns true the runner raises ``Interrupted`` with the database consistent.
"""

from __future__ import annotations

import contextlib
import getpass
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import sqlscript
from .errors import MigrateError, MigrationSqlError, PlanError
from .plan import AppliedRow, Plan, plan, rollback_plan
from .sources import Migration, Source

BATCH_TABLE = "zmonitor_migrated_batch"
SCHEMA_VERSION_DDL = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL,
    description TEXT,
    migration_type TEXT,
    file_hash TEXT,
    execution_time_ms INTEGER,
    applied_by TEXT DEFAULT 'migrate.py'
)"""
BATCH_DDL = f"""CREATE TABLE IF NOT EXISTS {BATCH_TABLE} (
    version INTEGER PRIMARY KEY,
    next_rowid INTEGER NOT NULL,
    max_rowid INTEGER NOT NULL,
    batches_done INTEGER NOT NULL,
    batches_total INTEGER NOT NULL,
    rows_changed INTEGER NOT NULL,
    elapsed_ms INTEGER NOT NULL,
    file_hash TEXT
)"""
# Read-only introspection a migration may use; every other PRAGMA is the runner's.
_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo",
                 "foreign_key_list"}


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
    return conn


def read_applied(conn: sqlite3.Connection) -> list[AppliedRow]:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
    if not exists:
        return []
    rows = conn.execute(
        "SELECT version, applied_at, description, migration_type, file_hash, "
        "execution_time_ms, applied_by FROM schema_version ORDER BY version").fetchall()
    return [AppliedRow(*r) for r in rows]


def _authorizer(action: int, arg1: str | None, arg2: str | None, _db: str | None,
                _trigger: str | None) -> int:
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH,
                  sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() not in _READ_PRAGMAS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() == "load_extension":
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _explain_denied(stmt: sqlscript.Statement, message: str) -> str:
    head = stmt.head.replace(";", " ").split(" ", 1)[0]
    if "LOAD_EXTENSION" in stmt.head:
        head = "load_extension()"
    if "not authorized" in message:
        return (f"{head} is not allowed in a migration ({message}): ATTACH/DETACH, "
                "extension loading, state-changing PRAGMAs and transaction control belong "
                "to the runner")
    return message


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
    held every original page a batch touched: 61 MB at 1M rows, 72 MB at 10M).

    ``min_batch`` raises a batched migration's size to at least that many rows. The
    pipeline passes ``batch_size`` from the config (50,000) for its private copy: a
    header's size bounds how long a live table is locked and how much a resumed run
    repeats, and a private copy is neither shared nor resumed; fewer, larger
    transactions rewrite shared index pages less often (measured: 1M-row backfill
    1.35 s → 1.00 s). The fast page cache is 16 MiB, which with 50,000-row transactions
    keeps the peak RSS of a run well under 80 MB.
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
        return max((r.version for r in self.applied()), default=0)

    def plan(self, source: Source, target: int | None = None) -> Plan:
        return plan(source.migrations, self.applied(), target)

    def batch_state(self, version: int) -> tuple[int, int] | None:
        """(batches_done, batches_total) of an unfinished batched migration, if any."""
        if not self._has_table(BATCH_TABLE):
            return None
        row = self.conn.execute(
            f"SELECT batches_done, batches_total FROM {BATCH_TABLE} WHERE version=?",
            (version,)).fetchone()
        return (row[0], row[1]) if row else None

    def _has_table(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                                 (name,)).fetchone() is not None

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
        if self._has_table(BATCH_TABLE):
            half = self.conn.execute(
                f"SELECT version, batches_done, batches_total FROM {BATCH_TABLE} "
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
                    "DELETE FROM schema_version WHERE version=?", (v,)))
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
            "INSERT INTO schema_version (version, applied_at, description, migration_type, "
            "file_hash, execution_time_ms, applied_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (mig.version, _now(), mig.description, mig.kind, mig.sha256, ms, self.applied_by))

    def _statements(self, path: str, version: int, text: str) -> list[sqlscript.Statement]:
        try:
            return sqlscript.executable(text)
        except sqlscript.ScriptError as exc:
            raise MigrationSqlError(path, exc.line, str(exc), version=version) from None

    def _execute(self, path: str, version: int, stmt: sqlscript.Statement,
                 params: dict[str, int] | None = None) -> int:
        self.conn.set_authorizer(_authorizer)
        try:
            cur = self.conn.execute(stmt.sql, params or {})
            for _row in cur:
                pass
            return max(cur.rowcount, 0)
        except sqlite3.Error as exc:
            raise MigrationSqlError(path, stmt.line, _explain_denied(stmt, str(exc)),
                                    version=version) from None
        finally:
            self.conn.set_authorizer(None)

    def _fk_violations(self, path: str, version: int, table: str | None = None) -> None:
        sql = f"PRAGMA foreign_key_check({table})" if table else "PRAGMA foreign_key_check"
        rows = self.conn.execute(sql).fetchmany(6)
        if rows:
            shown = "; ".join(f"{t} rowid {r} references {p}" for t, r, p, _ in rows[:5])
            raise MigrationSqlError(path, 1, f"foreign key violations after the migration: "
                                    f"{shown}{' …' if len(rows) > 5 else ''}", version=version)

    def _sequences(self) -> dict[str, int]:
        if not self._has_table("sqlite_sequence"):
            return {}
        return {name: seq for name, seq in
                self.conn.execute("SELECT name, seq FROM sqlite_sequence")
                if isinstance(name, str) and isinstance(seq, int)}

    def _keep_sequences(self, before: dict[str, int]) -> None:
        """AUTOINCREMENT promises ids are never reused. A rebuild (create x_new, copy, drop
        x, rename) leaves x_new's sequence at the highest *copied* id, below the old one
        when the newest rows had been deleted; put every surviving AUTOINCREMENT table's
        sequence back to at least what it was."""
        for name, seq in before.items():
            row = self.conn.execute(
                "SELECT sql FROM sqlite_master WHERE type='table' AND name=?",
                (name,)).fetchone()
            if row is None or "AUTOINCREMENT" not in (row[0] or "").upper():
                continue  # dropped for good, or no longer AUTOINCREMENT
            cur = self.conn.execute(
                "UPDATE sqlite_sequence SET seq=? WHERE name=? AND seq<?", (seq, name, seq))
            if cur.rowcount == 0 and self.conn.execute(
                    "SELECT 1 FROM sqlite_sequence WHERE name=?", (name,)).fetchone() is None:
                self.conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)",
                                  (name, seq))

    def _run_transaction(self, path: str, version: int, text: str,
                         after: Callable[[], object]) -> None:
        statements = self._statements(path, version, text)
        fk_before = self.conn.execute("PRAGMA foreign_keys").fetchone()[0]
        self.conn.execute("PRAGMA foreign_keys=OFF")
        try:
            with self._transaction():
                sequences = self._sequences()
                for stmt in statements:
                    self._execute(path, version, stmt)
                self._keep_sequences(sequences)
                self._fk_violations(path, version)
                after()
        finally:
            self.conn.execute(f"PRAGMA foreign_keys={int(fk_before)}")

    def _apply_batched(self, mig: Migration, text: str, index: int, count: int) -> None:
        assert mig.batch is not None
        table, size = mig.batch.table, mig.batch.size
        size = max(size, self.min_batch)
        statements = self._statements(mig.path, mig.version, text)
        row = self.conn.execute(
            f"SELECT next_rowid, max_rowid, batches_done, batches_total, rows_changed, "
            f"elapsed_ms, file_hash FROM {BATCH_TABLE} WHERE version=?",
            (mig.version,)).fetchone()
        state: tuple[int, int, int, int, int, int] | None = None
        if row is not None:
            if row[6] != mig.sha256:
                # Resuming with other SQL would mix two migrations in one table.
                raise PlanError(
                    f"migration {mig.version} ({mig.path}) is half applied "
                    f"(batch {row[2]}/{row[3]}) with sha256 {str(row[6])[:12]}… but the "
                    f"source now has {mig.sha256[:12]}…: a started migration must not be "
                    "modified; restore the backup",
                    kind="applied-migration-changed")
            state = row[:6]
        if state is None:
            with self._transaction():
                try:
                    lo, hi = self.conn.execute(
                        f'SELECT min(rowid), max(rowid) FROM "{table}"').fetchone()
                except sqlite3.Error as exc:
                    raise MigrationSqlError(mig.path, 1, f"batch table {table!r}: {exc}",
                                            version=mig.version) from None
                # Not ``lo or 1``: rowid 0 (and negative rowids) are valid and are walked.
                lo, hi = (1, 0) if lo is None else (lo, hi)
                total = max(0, (hi - lo) // size + 1) if hi >= lo else 0
                state = (lo, hi, 0, total, 0, 0)
                self.conn.execute(
                    f"INSERT INTO {BATCH_TABLE} (version, next_rowid, max_rowid, batches_done, "
                    f"batches_total, rows_changed, elapsed_ms, file_hash) "
                    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (mig.version, *state, mig.sha256))
        next_rowid, max_rowid, batches_done, total, rows_changed, elapsed_ms = state
        fk_before = self.conn.execute("PRAGMA foreign_keys").fetchone()[0]
        self.conn.execute("PRAGMA foreign_keys=ON")
        run_started = time.perf_counter()
        first_batch = batches_done
        try:
            while next_rowid <= max_rowid:
                if self.should_stop():
                    raise Interrupted(f"stopped in migration {mig.version} after batch "
                                      f"{batches_done}/{total} at a safe point")
                end = min(next_rowid + size - 1, max_rowid)
                with self._transaction():
                    changed = 0
                    for stmt in statements:
                        changed += self._execute(mig.path, mig.version, stmt,
                                                 {"batch_start": next_rowid, "batch_end": end})
                    self.conn.execute(
                        f"UPDATE {BATCH_TABLE} SET next_rowid=?, batches_done=?, "
                        f"rows_changed=?, elapsed_ms=? WHERE version=?",
                        (end + 1, batches_done + 1, rows_changed + changed,
                         elapsed_ms + int((time.perf_counter() - run_started) * 1000),
                         mig.version))
                batches_done += 1
                rows_changed += changed
                next_rowid = end + 1
                spent = time.perf_counter() - run_started
                per_batch = spent / max(1, batches_done - first_batch)
                self.on_progress(Progress(
                    mig.version, mig.path, index, count, batch=batches_done, batches=total,
                    rows=rows_changed, eta_s=per_batch * (total - batches_done)))
            with self._transaction():
                self._record_version(mig, run_started, elapsed_ms)
                self.conn.execute(f"DELETE FROM {BATCH_TABLE} WHERE version=?", (mig.version,))
        finally:
            self.conn.execute(f"PRAGMA foreign_keys={int(fk_before)}")
        self.on_progress(Progress(mig.version, mig.path, index, count, batch=batches_done,
                                  batches=total, rows=rows_changed, eta_s=0.0, done=True))


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
