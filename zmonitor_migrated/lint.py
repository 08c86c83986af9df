"""Lint a migration source: the seed's best practices (section 9) as checks with lines.

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
- ``forbidden``: ATTACH, DETACH, PRAGMA, ROLLBACK, SAVEPOINT (the runner owns them);
- ``syntax``: text that does not split into complete statements.

Warnings (reported, not refused; a ``-- zmonitor:allow CODE`` line acknowledges one):

- ``missing-rollback`` for seed migrations;
- ``rebuild-with-children``: a table with foreign-key children is dropped (a rebuild):
  run with foreign keys on, as the seed's runner does, ``DROP TABLE`` cascades and
  deletes every child row. Our runner turns enforcement off around each migration.
"""

from __future__ import annotations

import re
from pathlib import Path

from . import sqlscript
from .lint_meta import lint_meta
from .sources import Migration, Problem, Source, discover

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
_ALLOW = re.compile(r"--\s*zmonitor:allow\s+([\w-]+(?:[\s,]+[\w-]+)*)")
_DDL = ("CREATE", "ALTER", "DROP")
_DML = ("INSERT", "UPDATE", "DELETE", "REPLACE")
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


def lint_file(source: Source, path: str, mig: Migration, *, is_rollback: bool,
              children: dict[str, set[str]]) -> list[Problem]:
    problems: list[Problem] = []
    text = source.text(path)
    allowed = _allowed(text)

    def report(severity: str, line: int, code: str, message: str) -> None:
        if severity == "warning" and code in allowed:
            return
        problems.append(Problem(severity, path, line, code, message))

    try:
        statements = sqlscript.executable(text)
    except sqlscript.ScriptError as exc:
        return [Problem("error", path, exc.line, "syntax", str(exc))]
    created = {m.group(2).lower() for s in statements if (m := _CREATE_TABLE.match(s.head))}
    temp = {m.group(2).lower() for s in statements
            if (m := _CREATE_TABLE.match(s.head)) and m.group(1)}
    dropped = {m.group(1).lower() for s in statements if (m := _DROP_TABLE.match(s.head))}
    created_so_far: set[str] = set()
    ddl_line = dml_line = 0
    for s in statements:
        head = s.head
        word = head.split(" ", 1)[0].rstrip(";")
        if word in _FORBIDDEN:
            report("error", s.line, "forbidden",
                   f"{word} is not allowed in a migration: the runner owns attached databases, "
                   "pragmas and transactions")
            continue
        if word in _DDL and not re.match(r"^(CREATE|DROP)\s+(TEMP|TEMPORARY)\b", head) and not (
                (m := _DROP_TABLE.match(head)) and m.group(1).lower() in temp):
            ddl_line = ddl_line or s.line
        if word in _DML:
            ins = _INSERT_INTO.match(head)
            if not (ins and ins.group(1).lower() in created):
                dml_line = dml_line or s.line
        drop = _DROP_TABLE.match(head)
        # Dropping a parent together with all its children (a rollback of the migration
        # that created them) loses nothing that is not dropped anyway.
        if drop and drop.group(1).lower() in children and drop.group(1).lower() not in temp \
                and not children[drop.group(1).lower()] <= dropped:
            table = drop.group(1).lower()
            kids = ", ".join(sorted(children[table]))
            report("warning", s.line, "rebuild-with-children",
                   f"DROP TABLE {table}, which has foreign-key children ({kids}): with foreign "
                   "keys on this deletes every child row; the zmonitor runner disables "
                   "enforcement around migrations — acknowledge with "
                   "'-- zmonitor:allow rebuild-with-children'")
        ren = _RENAME.match(head)
        # x_new (created above in this file) RENAME TO x is the safe last step of a
        # rebuild; renaming a parent that existed before this file is not.
        if ren and ren.group(1).lower() in children \
                and ren.group(1).lower() not in created_so_far:
            report("error", s.line, "rename-parent-first",
                   f"renaming {ren.group(1)} rewrites its children's REFERENCES to the new "
                   "name; rebuild as CREATE TABLE x_new, INSERT … SELECT, DROP TABLE x, "
                   "ALTER TABLE x_new RENAME TO x")
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
            created_so_far.add(ct.group(2).lower())
    if not is_rollback and ddl_line and dml_line:
        report("error", max(ddl_line, dml_line), "mixed-ddl-dml",
               f"schema (line {ddl_line}) and data (line {dml_line}) changes in one "
               "migration; split them (seed section 9: don't mix schema and data changes)")
    if not is_rollback and mig.batch and ddl_line:
        report("error", ddl_line, "ddl-in-batch",
               "a batched migration commits per batch and must contain only DML; put schema "
               "changes in a migration of their own before it")
    return problems


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
    return sorted(problems, key=lambda p: (p.path, p.line, p.code))
