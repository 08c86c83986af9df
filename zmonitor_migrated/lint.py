"""Lint a migration source: the migration workflow's best practices as checks with lines.

Errors (the source is refused by ``lint``, ``bundle build`` and the run):

- sequence/naming/layout problems found by discovery;
- ``missing-rollback``: a schema or data migration without a rollback script;
- ``destructive-without-rollback``: ``DROP TABLE`` / ``DROP COLUMN`` with no rollback;
- ``mixed-ddl-dml``: schema and data changes in one migration ("don't mix"); the
  ``INSERT … SELECT`` copy of a table rebuild and TEMP objects do not count;
- ``ddl-in-batch``: a batched migration must be pure DML (it commits per batch);
- ``rename-parent-first``: ``ALTER TABLE parent RENAME TO …`` rewrites the children's
  ``REFERENCES`` to the old name (create new, copy, drop, rename is the safe order);
- ``add-not-null``: ``ADD COLUMN … NOT NULL`` without a ``DEFAULT`` fails on a
  non-empty table;
- ``forbidden``: ATTACH, DETACH, PRAGMA, ROLLBACK, SAVEPOINT (the runner owns them),
  ``load_extension()``;
- ``temp-object``: ``CREATE TEMP …`` or anything in the ``temp`` schema: a TEMP table
  shadows the real one of the same name for the rest of the connection; use a regular
  table and drop it at the end of the migration;
- ``syntax``: text that does not split into complete statements;
- ``todo``: a ``-- zmonitor:todo`` line, left by ``zmonitor-migrate new`` in a migration
  or rollback that is not written yet (an empty rollback would pass every other check).

Errors found by compiling the SQL, as the device does (``engine``): the whole history is
applied in order to an empty in-memory database under the runner's authorizer, then
rolled back as far as rollback scripts exist. Each refusal is reported at its statement:

- ``function``: a function that is not one of the reviewed SQLite core functions
  (``engine.SAFE_FUNCTIONS``), e.g. ``fts3_tokenizer``;
- ``virtual-table``: ``CREATE VIRTUAL TABLE`` (names the module);
- ``bookkeeping``: a write, schema change, index or trigger on the runner's tables
  (``schema_version``, ``zmonitor_migrated_*``), however qualified, quoted or cased,
  directly or from a trigger (a hand-written runner's ``INSERT INTO schema_version …`` and
  ``DELETE FROM schema_version …`` lines are dropped, not refused);
- ``trigger``: a trigger the migration creates that cannot be compiled;
- ``batch-bounds``: a statement of a batched migration that writes another table than
  the header's, is not an UPDATE or DELETE of it, or whose WHERE clause does not bound
  its rowid with ``:batch_start`` and ``:batch_end``;
- ``too-slow``: a migration that does not finish within ``SCRATCH_SECONDS`` on the empty
  database (a runaway recursive query).

A history that fails on the empty database for another reason (a statement that needs
data) gets a ``scratch-apply`` warning at that statement, and the migrations after it are
not compiled.

Warnings (reported, not refused; a ``-- zmonitor:allow CODE`` line acknowledges one):

- ``missing-rollback`` for seed migrations;
- ``rebuild-with-children``: a table with foreign-key children is dropped (a rebuild):
  run with foreign keys on, as a hand-written runner does, ``DROP TABLE`` cascades and
  deletes every child row. Our runner turns enforcement off around each migration.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import sqlscript
from .engine import Engine, Interrupted, Refusal, watch
from .errors import MigrateError, MigrationSqlError
from .lint_meta import lint_meta
from .sources import Migration, Problem, Source, discover

SCRATCH_SECONDS = 20.0

_REF = re.compile(r"REFERENCES\s+[\"`\[]?(\w+)", re.IGNORECASE)
_CREATE_TABLE = re.compile(r"^CREATE\s+(?:(TEMP|TEMPORARY)\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?"
                           r"[\"`\[]?(\w+)", re.IGNORECASE)
_DROP_TABLE = re.compile(r"^DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?[\"`\[]?(\w+)", re.IGNORECASE)
_RENAME = re.compile(r"^ALTER\s+TABLE\s+[\"`\[]?(\w+)[\"`\]]?\s+RENAME\s+TO\s+[\"`\[]?(\w+)",
                     re.IGNORECASE)
_ADD_REF = re.compile(r"^ALTER\s+TABLE\s+[\"`\[]?(\w+)[\"`\]]?\s+ADD\b.*\bREFERENCES\b",
                      re.IGNORECASE | re.DOTALL)
_INSERT_INTO = re.compile(r"^(?:INSERT|REPLACE)(?:\s+OR\s+\w+)?\s+INTO\s+[\"`\[]?(\w+)",
                          re.IGNORECASE)
_TEMP = re.compile(r"^CREATE\s+(TEMP|TEMPORARY)\b")
_ALLOW = re.compile(r"--\s*zmonitor:allow\s+([\w-]+(?:[\s,]+[\w-]+)*)")
_DDL = ("CREATE", "ALTER", "DROP")
_DML = ("INSERT", "UPDATE", "DELETE", "REPLACE")
_TODO = re.compile(r"^[ \t]*--[ \t]*zmonitor:todo\b", re.MULTILINE)
_FORBIDDEN = ("ATTACH", "DETACH", "PRAGMA", "ROLLBACK", "SAVEPOINT", "RELEASE", "VACUUM")


def _allowed(text: str) -> set[str]:
    codes: set[str] = set()
    for m in _ALLOW.finditer(text):
        codes.update(c for c in re.split(r"[\s,]+", m.group(1)) if c)
    return codes


def fk_children(source: Source) -> dict[str, set[str]]:
    """parent table → tables whose CREATE TABLE references it, across the history."""
    children: dict[str, set[str]] = {}
    for mig in source.migrations:
        try:
            statements = sqlscript.split(source.text(mig.path))
        except (sqlscript.ScriptError, OSError, UnicodeDecodeError):
            continue
        renames = {m.group(1).lower(): m.group(2).lower()
                   for s in statements if (m := _RENAME.match(s.head))}
        for s in statements:
            ct = _CREATE_TABLE.match(s.head)
            if ct:
                child = renames.get(ct.group(2).lower(), ct.group(2).lower())
            elif add := _ADD_REF.match(s.head):
                # ALTER TABLE child ADD COLUMN … REFERENCES parent also makes a child
                child = add.group(1).lower()
            else:
                continue
            for parent in _REF.findall(s.sql):
                if parent.lower() != child:
                    children.setdefault(parent.lower(), set()).add(child)
    return children


_Report = Callable[[str, int, str, str], None]


@dataclass
class _FileFacts:
    """What a file's statements create and drop, and where it first changes the schema
    (``ddl_line``) and the data (``dml_line``)."""
    created: set[str]
    temp: set[str]
    dropped: set[str]
    created_so_far: set[str] = field(default_factory=set)
    ddl_line: int = 0
    dml_line: int = 0


def lint_file(source: Source, path: str, mig: Migration, *, is_rollback: bool,
              children: dict[str, set[str]]) -> list[Problem]:
    problems: list[Problem] = []
    text = source.text(path)
    allowed = _allowed(text)

    def report(severity: str, line: int, code: str, message: str) -> None:
        if severity == "warning" and code in allowed:
            return
        problems.append(Problem(severity, path, line, code, message))

    for todo in _TODO.finditer(text):
        report("error", text.count("\n", 0, todo.start()) + 1, "todo",
               "not written yet: this is still the stub 'zmonitor-migrate new' made; write "
               "the statements and delete the zmonitor:todo line")

    try:
        statements = sqlscript.executable(text)
    except sqlscript.ScriptError as exc:
        return [Problem("error", path, exc.line, "syntax", str(exc))]
    facts = _FileFacts(
        created={m.group(2).lower() for s in statements
                 if (m := _CREATE_TABLE.match(s.head))},
        temp={m.group(2).lower() for s in statements
              if (m := _CREATE_TABLE.match(s.head)) and m.group(1)},
        dropped={m.group(1).lower() for s in statements if (m := _DROP_TABLE.match(s.head))})
    for s in statements:
        _lint_statement(s, facts, mig, is_rollback, children, report)
    if not is_rollback and facts.ddl_line and facts.dml_line:
        report("error", max(facts.ddl_line, facts.dml_line), "mixed-ddl-dml",
               f"schema (line {facts.ddl_line}) and data (line {facts.dml_line}) changes in "
               "one migration; split them (a schema change and a data change are rolled "
               "back and batched apart)")
    if not is_rollback and mig.batch and facts.ddl_line:
        report("error", facts.ddl_line, "ddl-in-batch",
               "a batched migration commits per batch and must contain only DML; put schema "
               "changes in a migration of their own before it")
    return problems


def _lint_statement(s: sqlscript.Statement, facts: _FileFacts, mig: Migration,
                    is_rollback: bool, children: dict[str, set[str]], report: _Report) -> None:
    head = s.head
    word = head.split(" ", 1)[0].rstrip(";")
    if word in _FORBIDDEN:
        report("error", s.line, "forbidden",
               f"{word} is not allowed in a migration: the runner owns attached databases, "
               "pragmas and transactions")
        return
    if _TEMP.match(head):
        report("error", s.line, "temp-object",
               "TEMP objects are not allowed in a migration (a TEMP table shadows the "
               "real table of the same name); use a regular table and DROP it at the end")
    if word in _DDL and not re.match(r"^(CREATE|DROP)\s+(TEMP|TEMPORARY)\b", head) and not (
            (m := _DROP_TABLE.match(head)) and m.group(1).lower() in facts.temp):
        facts.ddl_line = facts.ddl_line or s.line
    if word in _DML:
        ins = _INSERT_INTO.match(head)
        if not (ins and ins.group(1).lower() in facts.created):
            facts.dml_line = facts.dml_line or s.line
    drop = _DROP_TABLE.match(head)
    _lint_parents(s, drop, facts, children, report)
    if (not is_rollback and mig.rollback is None
            and (drop or re.search(r"\bDROP\s+COLUMN\b", head))):
        report("error", s.line, "destructive-without-rollback",
               "DROP without a rollback script: the dropped data could never be brought "
               f"back; add migrations/rollback/{mig.version:04d}_rollback.sql")
    if re.search(r"\bADD\s+(COLUMN\s+)?\S+[^,]*\bNOT\s+NULL\b", head) and \
            word == "ALTER" and not re.search(r"\bDEFAULT\b", head):
        report("error", s.line, "add-not-null",
               "ADD COLUMN … NOT NULL needs a DEFAULT, or it fails on a table with rows")
    if ct := _CREATE_TABLE.match(head):
        facts.created_so_far.add(ct.group(2).lower())


def _lint_parents(s: sqlscript.Statement, drop: re.Match[str] | None, facts: _FileFacts,
                  children: dict[str, set[str]], report: _Report) -> None:
    """A DROP or RENAME of a table that has foreign-key children."""
    # Dropping a parent together with all its children (a rollback of the migration
    # that created them) loses nothing that is not dropped anyway.
    if drop and drop.group(1).lower() in children and drop.group(1).lower() not in facts.temp \
            and not children[drop.group(1).lower()] <= facts.dropped:
        table = drop.group(1).lower()
        kids = ", ".join(sorted(children[table]))
        report("warning", s.line, "rebuild-with-children",
               f"DROP TABLE {table}, which has foreign-key children ({kids}): with foreign "
               "keys on this deletes every child row; the zmonitor runner disables "
               "enforcement around migrations — acknowledge with "
               "'-- zmonitor:allow rebuild-with-children'")
    ren = _RENAME.match(s.head)
    # x_new (created above in this file) RENAME TO x is the safe last step of a
    # rebuild; renaming a parent that existed before this file is not.
    if ren and ren.group(1).lower() in children \
            and ren.group(1).lower() not in facts.created_so_far:
        report("error", s.line, "rename-parent-first",
               f"renaming {ren.group(1)} rewrites its children's REFERENCES to the new "
               "name; rebuild as CREATE TABLE x_new, INSERT … SELECT, DROP TABLE x, "
               "ALTER TABLE x_new RENAME TO x")


def lint_source(root: Path) -> list[Problem]:
    source, problems = discover(root)
    problems.extend(lint_meta(root))  # bundle.yaml keys, post.yaml, database.yaml
    children = fk_children(source)
    for mig in source.migrations:
        if mig.rollback is None:
            problems.append(Problem(
                "warning" if mig.kind == "seed" else "error", mig.path, 1, "missing-rollback",
                f"no rollback script: add migrations/rollback/{mig.version:04d}_rollback.sql"))
        problems.extend(lint_file(source, mig.path, mig, is_rollback=False, children=children))
        if mig.rollback:
            problems.extend(lint_file(source, mig.rollback, mig, is_rollback=True,
                                      children=children))
    if not any(p.severity == "error" and p.code in _DISCOVERY for p in problems):
        seen = {(p.path, p.line, p.code) for p in problems}
        problems.extend(p for p in scratch_problems(source)
                        if (p.path, p.line, p.code) not in seen)
    return sorted(problems, key=lambda p: (p.path, p.line, p.code))


# Problems that leave no ordered history to compile.
_DISCOVERY = {"sequence", "duplicate-version", "naming", "layout", "encoding", "batch-header",
              "duplicate-rollback", "orphan-rollback", "syntax"}


def scratch_problems(source: Source) -> list[Problem]:
    """Compile the history as the device would: apply it to an empty in-memory database
    under the runner's authorizer and checks, then roll back as far as rollback scripts
    exist. Reports the first failure (nothing after it can be compiled)."""
    if not source.migrations:
        return []
    deadline = time.monotonic() + SCRATCH_SECONDS
    with Engine(":memory:", applied_by="lint") as eng:
        watch(eng.conn, expired=lambda: time.monotonic() > deadline)
        try:
            eng.apply(source)
            keep = max((m.version for m in source.migrations if m.rollback is None),
                       default=0)
            eng.rollback(source, keep)
        except Refusal as exc:
            return [Problem("error", exc.path, exc.line, exc.code, exc.sqlite_message)]
        except MigrationSqlError as exc:
            return [Problem("warning", exc.path, exc.line, "scratch-apply",
                            f"fails on an empty database ({exc.sqlite_message}); the "
                            "migrations after it were not compiled against the runner's "
                            "checks")]
        except Interrupted as exc:
            where = exc.message.split(": ", 1)[0]
            path, _, line = where.rpartition(":")
            return [Problem("error", path or "migrations", int(line) if line.isdigit() else 1,
                            "too-slow", f"did not finish within {SCRATCH_SECONDS:g} s on an "
                            "empty database (a runaway recursive query?)")]
        except MigrateError:
            return []  # plan problems are reported by discovery
    return []
