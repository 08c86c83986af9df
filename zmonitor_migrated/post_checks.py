"""Post-migration validation queries (``checks/post.yaml``) and running them.

Guarantees:

- ``load_checks`` accepts only the format below and refuses anything else with
  ``BundleRejected(kind="malformed")`` naming the file and the entry.
- ``run_checks`` is pure over the connection it is given: it opens nothing, and the
  queries run under a read-only authorizer (reads, the reviewed core functions of
  ``engine.SAFE_FUNCTIONS`` and the read-only pragmas ``foreign_key_check``,
  ``integrity_check``, ``quick_check``, ``table_info``, ``index_list``, ``index_info``,
  ``foreign_key_list``), so a check can never change the database, and cannot call
  ``fts3_tokenizer``, ``load_extension`` or any other unreviewed function. sqlite3
  cannot read back an authorizer, so the connection is left with none; a caller relying
  on its own must reinstall it.
- Every check yields either nothing (passed) or one ``CheckFailure``; a query that
  errors is a failure naming the check and SQLite's message, never an exception.
- ``plan_scans`` answers several checks of the form ``SELECT COUNT(*) FROM t WHERE c``
  that each scan all of ``t`` with one scan: ``SELECT count(CASE WHEN (c1) THEN 1 END),
  … FROM t``, which counts exactly the rows where each ``c`` is true (one pass over a
  large table instead of one per check). A check whose own plan uses an index keeps its query;
  a merged query that SQLite refuses is run check by check, so the results and messages
  are those of running every check alone.

The ``post.yaml`` format, a list of checks::

    - name: no_null_patient_mrn                  # required, unique, [A-Za-z0-9_.-]+
      description: every vitals row has an MRN   # optional
      sql: SELECT COUNT(*) FROM vitals WHERE patient_mrn IS NULL   # required, one query
      expect: 0                                  # required: a number, a string or null

``expect`` is compared with the first column of the first row (no row at all is NULL):
numbers by value (``0`` matches ``0.0``), strings exactly, ``null`` with NULL only.
YAML booleans are refused (SQLite has none: write 1 or 0).
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from . import sqlscript, yamlsafe
from .engine import function_allowed
from .errors import BundleRejected

YAML_MAX_EVENTS = 200_000  # the shipped file has ~130 nodes; checks are not a data set

Scalar = int | float | str | None
_NAME = re.compile(r"^[A-Za-z0-9_.-]+\Z")
_KEYS = {"name", "description", "sql", "expect"}
_READ_ONLY_PRAGMAS = {"foreign_key_check", "integrity_check", "quick_check", "table_info",
                      "table_xinfo", "index_list", "index_info", "index_xinfo",
                      "foreign_key_list"}
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE}


@dataclass(frozen=True)
class Check:
    name: str
    sql: str
    expect: Scalar
    description: str = ""


@dataclass(frozen=True)
class CheckFailure:
    name: str
    sql: str
    expected: Scalar
    actual: Scalar = None
    error: str | None = None  # SQLite's message when the query itself failed

    def __str__(self) -> str:
        if self.error is not None:
            return f"check {self.name}: query failed: {self.error}"
        return f"check {self.name}: expected {self.expected!r}, got {self.actual!r}"

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "sql": self.sql, "expected": self.expected,
                "actual": self.actual, "error": self.error}


def parse_checks(text: str, path: str = "post.yaml") -> list[Check]:
    """Parse and validate the text of a ``post.yaml`` (``path`` names it in errors)."""

    def fail(where: str, message: str) -> BundleRejected:
        return BundleRejected(f"{path}: {where}: {message}", kind="malformed")

    # Bounded: the file comes from a bundle (a signing key is no proof of good intent).
    doc = yamlsafe.parse(text, path, max_events=YAML_MAX_EVENTS)
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise fail("top level", "must be a list of checks ({name, sql, expect})")
    checks: list[Check] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc):
        where = f"[{i}]"
        if not isinstance(raw, dict):
            raise fail(where, "must be a mapping with name, sql and expect")
        for key in raw:
            if key not in _KEYS:
                raise fail(where, f"unknown key {key!r} (allowed: {', '.join(sorted(_KEYS))})")
        for key in ("name", "sql", "expect"):
            if key not in raw:
                raise fail(where, f"missing required key {key!r}")
        name = raw["name"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise fail(f"{where}.name", f"must be a word of letters, digits, '_', '.', '-', "
                                        f"not {name!r}")
        where = f"{where} ({name})"
        if name in seen:
            raise fail(f"{where}.name", "duplicate check name")
        seen.add(name)
        sql = raw["sql"]
        if not isinstance(sql, str) or not sql.strip():
            raise fail(f"{where}.sql", "must be a non-empty SQL query")
        body = sql.strip()
        try:
            statements = sqlscript.split(body if body.endswith(";") else body + ";")
        except sqlscript.ScriptError:
            statements = []
        if len(statements) != 1:
            raise fail(f"{where}.sql", "must be exactly one SQL query")
        expect = raw["expect"]
        if isinstance(expect, bool) or not (expect is None or isinstance(
                expect, (int, float, str))):
            raise fail(f"{where}.expect", "must be a number, a string or null "
                                          "(write 1 or 0, not true or false)")
        description = raw.get("description", "")
        if not isinstance(description, str):
            raise fail(f"{where}.description", "must be a string")
        checks.append(Check(name, sql.strip(), expect, description))
    return checks


def load_checks(path: Path | str) -> list[Check]:
    """Read and validate a ``post.yaml``; see the module docstring for the format."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleRejected(f"{path}: cannot read: {exc}", kind="malformed") from None
    return parse_checks(text, str(path))


def _read_only(action: int, arg1: str | None, arg2: str | None, _db: str | None,
               _trigger: str | None) -> int:
    if action in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:
        # The same reviewed core functions as migrations (engine.SAFE_FUNCTIONS).
        return sqlite3.SQLITE_OK if function_allowed(arg2) else sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _READ_ONLY_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def matches(expected: Scalar, actual: object) -> bool:
    if expected is None or actual is None:
        return expected is None and actual is None
    if isinstance(expected, (int, float)):
        return isinstance(actual, (int, float)) and not isinstance(actual, bool) \
            and float(actual) == float(expected)
    return isinstance(actual, str) and actual == expected


def run_check(conn: sqlite3.Connection, check: Check) -> CheckFailure | None:
    """Run one check under the read-only authorizer; its failure, or None if it passed."""
    conn.set_authorizer(_read_only)
    try:
        row = conn.execute(check.sql).fetchone()
    except (sqlite3.Error, sqlite3.Warning) as exc:
        return CheckFailure(check.name, check.sql, check.expect, error=str(exc))
    finally:
        conn.set_authorizer(None)
    actual = row[0] if row else None
    if isinstance(actual, bytes):
        actual = actual.hex()
    if not matches(check.expect, actual):
        return CheckFailure(check.name, check.sql, check.expect, actual)
    return None


def run_checks(conn: sqlite3.Connection, checks: list[Check]) -> list[CheckFailure]:
    """Run every check; returns the failures (empty when all passed), in check order."""
    failures: dict[int, CheckFailure] = {}
    for job in plan_scans(conn, checks):
        failures.update(run_job(conn, job))
    return [failures[i] for i in sorted(failures)]


# One check as a job, or several counting checks over one table answered by one scan.
Job = list[tuple[int, Check]]

_COUNT_WHERE = re.compile(
    r'^\s*SELECT\s+COUNT\s*\(\s*\*\s*\)\s+FROM\s+("?)([A-Za-z_][A-Za-z0-9_]*)\1'
    r"\s+WHERE\s+(?P<cond>.+?)[\s;]*\Z", re.IGNORECASE | re.DOTALL)


def _scans_whole_table(conn: sqlite3.Connection, sql: str, table: str) -> bool:
    full = re.compile(rf"^SCAN (TABLE )?{re.escape(table)}\Z", re.IGNORECASE)
    conn.set_authorizer(_read_only)
    try:
        rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
    except (sqlite3.Error, sqlite3.Warning):
        return False  # run alone, where the failure gets its own message
    finally:
        conn.set_authorizer(None)
    return any(parent == 0 and full.match(str(detail)) for _id, parent, _n, detail in rows)


def plan_scans(conn: sqlite3.Connection, checks: list[Check]) -> list[Job]:
    """The checks as jobs, in check order; whole-table counts of one table share a job."""
    jobs: list[Job] = []
    by_table: dict[str, Job] = {}
    for index, check in enumerate(checks):
        m = _COUNT_WHERE.match(check.sql)
        if m and _scans_whole_table(conn, check.sql, m.group(2)):
            table = m.group(2).lower()
            if table not in by_table:
                by_table[table] = []
                jobs.append(by_table[table])
            by_table[table].append((index, check))
        else:
            jobs.append([(index, check)])
    return jobs


def _merged_sql(job: Job) -> str:
    first = _COUNT_WHERE.match(job[0][1].sql)
    assert first is not None
    # A newline after each condition ends a trailing "--" comment inside it.
    counts = ",\n".join(f"count(CASE WHEN ({_COUNT_WHERE.match(c.sql)['cond']}\n) THEN 1 END)"
                        for _i, c in job)
    return f'SELECT {counts}\nFROM "{first.group(2)}"'


def run_job(conn: sqlite3.Connection, job: Job) -> dict[int, CheckFailure]:
    """The failures of one job, by check index."""
    if len(job) > 1:
        conn.set_authorizer(_read_only)
        try:
            row = conn.execute(_merged_sql(job)).fetchone()
        except (sqlite3.Error, sqlite3.Warning):
            row = None  # answered check by check below, each with its own message
        finally:
            conn.set_authorizer(None)
        if row is not None:
            return {i: CheckFailure(c.name, c.sql, c.expect, actual)
                    for (i, c), actual in zip(job, row, strict=True)
                    if not matches(c.expect, actual)}
    return {i: f for i, c in job if (f := run_check(conn, c)) is not None}
