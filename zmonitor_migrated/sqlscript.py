"""Migration SQL text → the statements the runner executes, each with its line number.

Rules, in order:

1. Statements are split with ``sqlite3.complete_statement``, so a trigger body
   (``CREATE TRIGGER … BEGIN …; …; END;``) stays one statement.
2. Top-level transaction control written the reference runner's way (``BEGIN [TRANSACTION]``,
   ``COMMIT``, ``END``) is dropped: the runner owns transactions.
3. Version bookkeeping written the reference runner's way (``INSERT INTO schema_version …``,
   ``DELETE FROM schema_version …``, unqualified) is dropped: the runner writes the
   version row once, with hash and timing. Any other statement on the runner's tables
   (``UPDATE schema_version``, ``main.schema_version``, ``zmonitor_migrated_*``) is kept,
   so that the engine's authorizer refuses it loudly instead of it vanishing.
4. Anything left that is only comments or blanks is not a statement; text after the
   last ``;`` that is not a complete statement is an error naming its line.

The module is pure: text in, statements out.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass

_TX = re.compile(r"^(BEGIN(\s+(DEFERRED|IMMEDIATE|EXCLUSIVE))?(\s+TRANSACTION)?|"
                 r"COMMIT(\s+TRANSACTION)?|END(\s+TRANSACTION)?)\s*;?\Z", re.IGNORECASE)
_VERSION_ROW = re.compile(
    r"^(INSERT(\s+OR\s+\w+)?\s+INTO|DELETE\s+FROM|REPLACE\s+INTO)\s+"
    r"[\"`\[]?schema_version[\"`\]]?[\s(]",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Statement:
    sql: str
    line: int  # 1-based line of the statement's first token in the file

    @property
    def head(self) -> str:
        """The statement with leading comments removed, upper-cased words collapsed."""
        return " ".join(strip_comments(self.sql).split()).upper()


class ScriptError(ValueError):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


def strip_comments(sql: str) -> str:
    """Remove ``--`` and ``/* */`` comments outside string literals."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`[":
            close = "]" if c == "[" else c
            j = sql.find(close, i + 1)
            while j != -1 and close != "]" and j + 1 < n and sql[j + 1] == close:
                j = sql.find(close, j + 2)
            j = n - 1 if j == -1 else j
            out.append(sql[i:j + 1])
            i = j + 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j == -1 else j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j == -1 else j + 2
            out.append(" ")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _first_code_offset(chunk: str) -> int | None:
    """Offset of the first character that is not blank or comment, or None."""
    i, n = 0, len(chunk)
    while i < n:
        if chunk[i].isspace():
            i += 1
        elif chunk.startswith("--", i):
            j = chunk.find("\n", i)
            if j == -1:
                return None
            i = j + 1
        elif chunk.startswith("/*", i):
            j = chunk.find("*/", i + 2)
            if j == -1:
                return None
            i = j + 2
        else:
            return i
    return None


def split(text: str) -> list[Statement]:
    """Every statement of the file, in order, with its line; nothing dropped."""
    if text.startswith("\ufeff"):
        # A byte-order mark (editors on Windows) is not SQL: blank it, keeping offsets.
        text = " " + text[1:]
    statements: list[Statement] = []
    start = 0
    pos = 0
    line_at_start = 1
    while True:
        semi = text.find(";", pos)
        if semi == -1:
            break
        chunk = text[start:semi + 1]
        if sqlite3.complete_statement(chunk):
            off = _first_code_offset(chunk)
            if off is not None:
                line = line_at_start + chunk.count("\n", 0, off)
                body = chunk[off:].strip()
                if body != ";":
                    statements.append(Statement(body, line))
            line_at_start += chunk.count("\n")
            start = semi + 1
        pos = semi + 1
    rest = text[start:]
    off = _first_code_offset(rest)
    if off is not None:
        line = line_at_start + rest.count("\n", 0, off)
        raise ScriptError(line, "incomplete statement at end of file (missing ';'?)")
    return statements


def is_transaction_control(stmt: Statement) -> bool:
    return bool(_TX.match(stmt.head))


def is_version_bookkeeping(stmt: Statement) -> bool:
    return bool(_VERSION_ROW.match(stmt.head + " "))


def executable(text: str) -> list[Statement]:
    """The statements the runner executes: split, minus transaction control and
    version-row bookkeeping (rules 2 and 3)."""
    return [s for s in split(text)
            if not is_transaction_control(s) and not is_version_bookkeeping(s)]


# A bare SQL identifier: a name that needs no quoting anywhere in a statement.
IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_PARAM = re.compile(r"[:@$][A-Za-z_][A-Za-z0-9_]*")


def code_only(sql: str) -> str:
    """``sql`` without comments and with every string literal and quoted identifier
    blanked out: what is left are keywords, bare names, operators and parameters."""
    out: list[str] = []
    text = strip_comments(sql)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "'\"`[":
            close = "]" if c == "[" else c
            j = text.find(close, i + 1)
            while j != -1 and close != "]" and j + 1 < n and text[j + 1] == close:
                j = text.find(close, j + 2)
            j = n - 1 if j == -1 else j
            out.append(" ")
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parameters(sql: str) -> set[str]:
    """The named parameters (``:name``, ``@name``, ``$name``) a statement uses."""
    return set(_PARAM.findall(code_only(sql)))
