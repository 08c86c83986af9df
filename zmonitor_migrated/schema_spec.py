"""The expected schema (``schema/database.yaml``), its DDL, and its difference from a live DB.

Guarantees:

- ``load_spec`` accepts only the format below; any unknown key, wrong type, dangling
  reference (a foreign key, index or primary key naming a column or table that is not
  there) or reserved table name is refused with ``BundleRejected(kind="malformed")``
  naming the file and the key path (``tables.patients.columns[2].nullable``).
- ``ddl(spec)`` is plain SQLite DDL (CREATE TABLE, then CREATE INDEX) that, run on an
  empty database, gives a schema ``diff`` reports no difference for.
- ``live_schema(conn)`` reads a database through ``PRAGMA table_info``,
  ``foreign_key_list``, ``index_list``, ``index_info`` and, for what no pragma reports
  (CHECK constraints, AUTOINCREMENT, a partial index's WHERE), the statements stored in
  ``sqlite_master``. It never writes.
- ``diff(expected, actual)`` lists every difference as one human-readable line; an empty
  list means the schemas agree. ``schema_version``, ``zmonitor_migrated_*`` (the runner's
  bookkeeping) and ``sqlite_*`` tables are ignored. Types compare case-insensitively;
  SQL expressions (DEFAULT, CHECK, WHERE) compare after normalising whitespace, comments,
  identifier quoting and keyword case (string literals are kept as written).

The ``database.yaml`` format::

    version: 14                    # optional: the migration version the schema is for
    tables:                        # mapping, table name -> table; order is kept
      patients:
        columns:                   # required, non-empty list, in table order
          - name: mrn              # required
            type: TEXT             # required (declared type, compared case-insensitively)
            nullable: false        # optional, default true
            primary_key: true      # optional, default false; several = composite key,
                                   #   in column order
            autoincrement: false   # optional, default false; only on a sole INTEGER key
            default: "'DISCHARGED'"  # optional: the SQL expression after DEFAULT, as
                                   #   written (a YAML number is taken as its literal)
            check: "length(mrn) <= 50"  # optional: the column CHECK expression
        foreign_keys:              # optional list
          - columns: [patient_mrn]
            ref_table: patients
            ref_columns: [mrn]
            on_delete: CASCADE     # optional, default NO ACTION
            on_update: NO ACTION   # optional, default NO ACTION
        indices:                   # optional list (explicit CREATE INDEX only)
          - name: idx_patients_bed_location
            columns: [bed_location]
            unique: false          # optional, default false
            where: "bed_location IS NOT NULL"   # optional: partial index condition
        checks: []                 # optional: table-level CHECK expressions
        unique: []                 # optional: table-level UNIQUE constraints (column lists)

A single ``INTEGER`` primary key is SQLite's rowid alias and never NULL: it is treated
as ``nullable: false`` whatever the file or ``PRAGMA table_info`` says. Not covered:
views, triggers, collations, index sort order, generated columns, WITHOUT ROWID.

Example::

    spec = load_spec(Path("bundles/zmonitor/schema/database.yaml"))
    conn.executescript(ddl(spec))          # on a scratch database
    assert diff(spec, live_schema(conn)) == []
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import yamlsafe
from .errors import BundleRejected
from .sqlscript import IDENT

YAML_MAX_EVENTS = 200_000  # the shipped file has ~1,000 nodes; a schema is not a data set

IGNORED_TABLES = ("schema_version",)
IGNORED_PREFIXES = ("zmonitor_migrated_", "sqlite_")
FK_ACTIONS = ("NO ACTION", "CASCADE", "SET NULL", "SET DEFAULT", "RESTRICT")
# Words that cannot be used bare as a column or table name in generated DDL.
_RESERVED = {
    "add", "all", "alter", "and", "as", "autoincrement", "between", "by", "case", "check",
    "collate", "commit", "constraint", "create", "default", "deferrable", "delete",
    "distinct", "drop", "else", "escape", "except", "exists", "foreign", "from", "group",
    "having", "in", "index", "insert", "intersect", "into", "is", "isnull", "join",
    "limit", "not", "notnull", "null", "on", "or", "order", "primary", "references",
    "select", "set", "table", "then", "to", "transaction", "union", "unique", "update",
    "using", "values", "when", "where",
}


def is_ignored_table(name: str) -> bool:
    low = name.lower()
    return low in IGNORED_TABLES or low.startswith(IGNORED_PREFIXES)


# -- value objects ------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool = True
    primary_key: bool = False
    autoincrement: bool = False
    default: str | None = None  # SQL expression text
    check: str | None = None  # SQL expression text


@dataclass(frozen=True)
class ForeignKey:
    columns: tuple[str, ...]
    ref_table: str
    ref_columns: tuple[str, ...]
    on_delete: str = "NO ACTION"
    on_update: str = "NO ACTION"

    def describe(self) -> str:
        text = (f"({', '.join(self.columns)}) -> {self.ref_table}"
                f"({', '.join(self.ref_columns)})")
        if self.on_delete != "NO ACTION":
            text += f" ON DELETE {self.on_delete}"
        if self.on_update != "NO ACTION":
            text += f" ON UPDATE {self.on_update}"
        return text


@dataclass(frozen=True)
class Index:
    name: str
    columns: tuple[str, ...]
    unique: bool = False
    where: str | None = None


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    foreign_keys: tuple[ForeignKey, ...] = ()
    indices: tuple[Index, ...] = ()
    checks: tuple[str, ...] = ()
    unique: tuple[tuple[str, ...], ...] = ()

    def column(self, name: str) -> Column | None:
        low = name.lower()
        return next((c for c in self.columns if c.name.lower() == low), None)

    @property
    def primary_key(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.primary_key)


@dataclass(frozen=True)
class SchemaSpec:
    tables: tuple[Table, ...]
    version: int | None = field(default=None, compare=False)

    def table(self, name: str) -> Table | None:
        low = name.lower()
        return next((t for t in self.tables if t.name.lower() == low), None)


# -- SQL expression normalisation -----------------------------------------------------------
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>--[^\n]*|/\*.*?(?:\*/|$))
  | (?P<str>'(?:[^']|'')*')
  | (?P<qid>"(?:[^"]|"")*"|`(?:[^`]|``)*`|\[[^\]]*\])
  | (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<op><=|>=|<>|!=|==|\|\||<<|>>|.)
""", re.VERBOSE | re.DOTALL)


def _tokens(sql: str) -> list[str]:
    """SQL text → tokens without blanks or comments; quoted identifiers unquoted when
    they are plain words, keywords and bare identifiers lower-cased."""
    out: list[str] = []
    for m in _TOKEN.finditer(sql):
        kind = m.lastgroup
        text = m.group()
        if kind in ("ws", "comment"):
            continue
        if kind == "qid":
            inner = text[1:-1]
            if text[0] == '"':
                inner = inner.replace('""', '"')
            elif text[0] == "`":
                inner = inner.replace("``", "`")
            out.append(inner.lower() if IDENT.match(inner) else text)
        elif kind == "word":
            out.append(text.lower())
        else:
            out.append(text)
    return out


_SPACED = {"and", "or", "not", "in", "is", "exists", "when", "then", "else", "between",
           "like", "glob", "case", "on", "where", "select", "from"}


def _join(tokens: Sequence[str]) -> str:
    text = ""
    prev = ""
    for tok in tokens:
        if not text or tok in (")", ",") or text.endswith("("):
            text += tok
        elif tok == "(" and (prev[-1:].isalnum() or prev[-1:] == "_") and prev not in _SPACED:
            text += tok  # function call: length(mrn)
        else:
            text += " " + tok
        prev = tok
    return text


def _strip_outer_parens(tokens: list[str]) -> list[str]:
    while len(tokens) >= 2 and tokens[0] == "(" and _paren_body(tokens, 0)[1] == len(tokens):
        tokens = tokens[1:-1]
    return tokens


def normalize_sql(text: str | None) -> str | None:
    """Canonical form of an SQL expression for comparison; None stays None."""
    if text is None:
        return None
    tokens = _strip_outer_parens(_tokens(text))
    return _join(tokens) if tokens else None


def _normalize_default(text: str | None) -> str | None:
    norm = normalize_sql(text)
    return None if norm in (None, "null") else norm


# -- loading database.yaml -----------------------------------------------------------------
class _Reader:
    """Strict typed access to a parsed YAML document, naming file and key on error."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> BundleRejected:
        return BundleRejected(f"{self.path}: {where}: {message}", kind="malformed")

    def mapping(self, value: object, where: str, allowed: Iterable[str],
                required: Iterable[str] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, not {type(value).__name__}")
        allowed = set(allowed)
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                raise self.fail(where, f"unknown key {key!r} (allowed: "
                                       f"{', '.join(sorted(allowed))})")
        for key in required:
            if key not in value:
                raise self.fail(where, f"missing required key {key!r}")
        return value

    def ident(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not IDENT.match(value):
            raise self.fail(where, f"must be an SQL identifier (letters, digits, _), "
                                   f"not {value!r}")
        return value

    def text(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"must be a non-empty string, not {value!r}")
        return value

    def flag(self, value: object, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"must be true or false, not {value!r}")
        return value

    def names(self, value: object, where: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, "must be a non-empty list of column names")
        return tuple(self.ident(v, f"{where}[{i}]") for i, v in enumerate(value))

    def items(self, value: object, where: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list, not {type(value).__name__}")
        return value


def _is_rowid_alias(columns: Sequence[Column]) -> bool:
    pk = [c for c in columns if c.primary_key]
    return len(pk) == 1 and pk[0].type.strip().upper() == "INTEGER"


def _with_rowid_rule(columns: Sequence[Column]) -> tuple[Column, ...]:
    if not _is_rowid_alias(columns):
        return tuple(columns)
    return tuple(Column(c.name, c.type, False, c.primary_key, c.autoincrement, c.default,
                        c.check) if c.primary_key else c for c in columns)


def parse_spec(text: str, path: str = "database.yaml") -> SchemaSpec:
    """Parse and validate the text of a ``database.yaml`` (``path`` names it in errors)."""
    r = _Reader(path)
    # Bounded: the file comes from a bundle (a signing key is no proof of good intent).
    doc = yamlsafe.parse(text, path, max_events=YAML_MAX_EVENTS)
    doc = r.mapping(doc, "top level", ("version", "tables"), ("tables",))
    version = doc.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or version < 0):
        raise r.fail("version", f"must be a non-negative integer, not {version!r}")
    raw_tables = doc["tables"]
    if not isinstance(raw_tables, dict):
        raise r.fail("tables", "must be a mapping of table name to table")
    if not raw_tables:
        raise r.fail("tables", "must list at least one table")
    index_names: dict[str, str] = {}  # every index name in the file -> where it is
    tables = [_parse_table(r, tname, raw, index_names) for tname, raw in raw_tables.items()]
    _check_references(r, tables)
    return SchemaSpec(tuple(tables), version)


def _parse_table(r: _Reader, tname: Any, raw: Any, index_names: dict[str, str]) -> Table:
    where = f"tables.{tname}"
    r.ident(tname, where)
    if is_ignored_table(tname):
        raise r.fail(where, "schema_version, sqlite_* and zmonitor_migrated_* tables "
                            "belong to SQLite and the runner; do not list them")
    t = r.mapping(raw, where, ("columns", "foreign_keys", "indices", "checks", "unique"),
                  ("columns",))
    columns = _parse_columns(r, where, t["columns"])
    table_cols = {c.name.lower() for c in columns}

    def known(names: tuple[str, ...], w: str) -> tuple[str, ...]:
        for j, n in enumerate(names):
            if n.lower() not in table_cols:
                raise r.fail(f"{w}[{j}]", f"no column {n!r} in table {tname}")
        return names

    fks = [_parse_foreign_key(r, f"{where}.foreign_keys[{i}]", rf, known)
           for i, rf in enumerate(r.items(t.get("foreign_keys"), f"{where}.foreign_keys"))]
    indices = [_parse_index(r, f"{where}.indices[{i}]", ri, known, index_names)
               for i, ri in enumerate(r.items(t.get("indices"), f"{where}.indices"))]
    checks = tuple(r.text(v, f"{where}.checks[{i}]")
                   for i, v in enumerate(r.items(t.get("checks"), f"{where}.checks")))
    unique = tuple(known(r.names(v, f"{where}.unique[{i}]"), f"{where}.unique[{i}]")
                   for i, v in enumerate(r.items(t.get("unique"), f"{where}.unique")))
    return Table(tname, _with_rowid_rule(columns), tuple(fks), tuple(indices), checks, unique)


def _parse_columns(r: _Reader, where: str, raw: Any) -> list[Column]:
    columns: list[Column] = []
    raw_cols = r.items(raw, f"{where}.columns")
    if not raw_cols:
        raise r.fail(f"{where}.columns", "must list at least one column")
    for i, rc in enumerate(raw_cols):
        cw = f"{where}.columns[{i}]"
        c = r.mapping(rc, cw, ("name", "type", "nullable", "primary_key", "autoincrement",
                               "default", "check"), ("name", "type"))
        name = r.ident(c["name"], f"{cw}.name")
        if any(col.name.lower() == name.lower() for col in columns):
            raise r.fail(f"{cw}.name", f"duplicate column {name!r}")
        default = c.get("default")
        if isinstance(default, bool) or not (default is None or isinstance(
                default, (str, int, float))):
            raise r.fail(f"{cw}.default", "must be an SQL expression (string) or a number")
        check = c.get("check")
        columns.append(Column(
            name=name,
            type=r.text(c["type"], f"{cw}.type"),
            nullable=r.flag(c.get("nullable", True), f"{cw}.nullable"),
            primary_key=r.flag(c.get("primary_key", False), f"{cw}.primary_key"),
            autoincrement=r.flag(c.get("autoincrement", False), f"{cw}.autoincrement"),
            default=None if default is None else str(default),
            check=None if check is None else r.text(check, f"{cw}.check"),
        ))
    for i, col in enumerate(columns):
        if col.autoincrement and not (col.primary_key and _is_rowid_alias(columns)):
            raise r.fail(f"{where}.columns[{i}].autoincrement",
                         "AUTOINCREMENT needs the column to be the table's only primary "
                         "key, of type INTEGER")
    return columns


_Known = Callable[[tuple[str, ...], str], tuple[str, ...]]


def _parse_foreign_key(r: _Reader, fw: str, raw: Any, known: _Known) -> ForeignKey:
    f = r.mapping(raw, fw, ("columns", "ref_table", "ref_columns", "on_delete",
                            "on_update"), ("columns", "ref_table", "ref_columns"))
    cols = known(r.names(f["columns"], f"{fw}.columns"), f"{fw}.columns")
    refs = r.names(f["ref_columns"], f"{fw}.ref_columns")
    if len(refs) != len(cols):
        raise r.fail(f"{fw}.ref_columns", "must name as many columns as 'columns'")
    actions = []
    for key in ("on_delete", "on_update"):
        action = " ".join(str(f.get(key, "NO ACTION")).upper().split())
        if action not in FK_ACTIONS:
            raise r.fail(f"{fw}.{key}", f"must be one of {', '.join(FK_ACTIONS)}")
        actions.append(action)
    return ForeignKey(cols, r.ident(f["ref_table"], f"{fw}.ref_table"), refs,
                      actions[0], actions[1])


def _parse_index(r: _Reader, iw: str, raw: Any, known: _Known,
                 index_names: dict[str, str]) -> Index:
    ix = r.mapping(raw, iw, ("name", "columns", "unique", "where"), ("name", "columns"))
    iname = r.ident(ix["name"], f"{iw}.name")
    if iname.lower() in index_names:
        raise r.fail(f"{iw}.name", f"index {iname!r} is also defined in "
                                   f"{index_names[iname.lower()]}")
    index_names[iname.lower()] = iw
    cond = ix.get("where")
    return Index(iname, known(r.names(ix["columns"], f"{iw}.columns"), f"{iw}.columns"),
                 r.flag(ix.get("unique", False), f"{iw}.unique"),
                 None if cond is None else r.text(cond, f"{iw}.where"))


def _check_references(r: _Reader, tables: list[Table]) -> None:
    """Every foreign key names a table and columns of the spec."""
    by_name = {t.name.lower(): t for t in tables}
    for t in tables:
        for i, fk in enumerate(t.foreign_keys):
            fw = f"tables.{t.name}.foreign_keys[{i}]"
            parent = by_name.get(fk.ref_table.lower())
            if parent is None:
                raise r.fail(f"{fw}.ref_table", f"no table {fk.ref_table!r} in the schema")
            for j, n in enumerate(fk.ref_columns):
                if parent.column(n) is None:
                    raise r.fail(f"{fw}.ref_columns[{j}]",
                                 f"no column {n!r} in table {parent.name}")


def load_spec(path: Path | str) -> SchemaSpec:
    """Read and validate a ``database.yaml``; see the module docstring for the format."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleRejected(f"{path}: cannot read: {exc}", kind="malformed") from None
    return parse_spec(text, str(path))


# -- DDL ---------------------------------------------------------------------------------------
def _q(name: str) -> str:
    if IDENT.match(name) and name.lower() not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


def _cols(names: Iterable[str]) -> str:
    return ", ".join(_q(n) for n in names)


_LITERAL = re.compile(r"""^(?:'(?:[^']|'')*'|[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|"""
                      r"""NULL|TRUE|FALSE|CURRENT_TIME|CURRENT_DATE|CURRENT_TIMESTAMP)\Z""",
                      re.IGNORECASE)


def _default_sql(expr: str) -> str:
    """DEFAULT takes a literal as is; any other expression must be parenthesised."""
    text = expr.strip()
    if _LITERAL.match(text) or _strip_outer_parens(_tokens(text)) != _tokens(text):
        return text
    return f"({text})"


def table_ddl(table: Table) -> str:
    pk = table.primary_key
    lines: list[str] = []
    for c in table.columns:
        parts = [_q(c.name), c.type]
        if c.primary_key and len(pk) == 1:
            parts.append("PRIMARY KEY")
            if c.autoincrement:
                parts.append("AUTOINCREMENT")
        rowid = c.primary_key and _is_rowid_alias(table.columns)
        if not c.nullable and not rowid:
            parts.append("NOT NULL")
        if c.default is not None:
            parts.append(f"DEFAULT {_default_sql(c.default)}")
        if c.check is not None:
            parts.append(f"CHECK ({c.check})")
        lines.append(" ".join(parts))
    if len(pk) > 1:
        lines.append(f"PRIMARY KEY ({_cols(pk)})")
    lines.extend(f"UNIQUE ({_cols(u)})" for u in table.unique)
    lines.extend(f"CHECK ({expr})" for expr in table.checks)
    for fk in table.foreign_keys:
        line = (f"FOREIGN KEY ({_cols(fk.columns)}) REFERENCES {_q(fk.ref_table)}"
                f"({_cols(fk.ref_columns)})")
        if fk.on_delete != "NO ACTION":
            line += f" ON DELETE {fk.on_delete}"
        if fk.on_update != "NO ACTION":
            line += f" ON UPDATE {fk.on_update}"
        lines.append(line)
    body = ",\n".join(f"    {line}" for line in lines)
    return f"CREATE TABLE {_q(table.name)} (\n{body}\n);"


def index_ddl(table: Table, index: Index) -> str:
    unique = "UNIQUE " if index.unique else ""
    text = f"CREATE {unique}INDEX {_q(index.name)} ON {_q(table.name)}({_cols(index.columns)})"
    if index.where is not None:
        text += f" WHERE {index.where}"
    return text + ";"


def ddl(spec: SchemaSpec) -> str:
    """CREATE TABLE statements, then CREATE INDEX statements, for an empty database."""
    out = ["-- Generated from database.yaml by zmonitor-migrate schema ddl; do not edit.",
           f"-- Schema version: {spec.version if spec.version is not None else 'unspecified'}",
           "", "-- Tables"]
    for t in spec.tables:
        out.extend([table_ddl(t), ""])
    out.append("-- Indices")
    out.extend(index_ddl(t, ix) for t in spec.tables for ix in t.indices)
    return "\n".join(out) + "\n"


# -- reading a live database ------------------------------------------------------------------
def _split_top(tokens: Sequence[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    depth = 0
    for tok in tokens:
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
        if tok == "," and depth == 0:
            parts.append([])
        else:
            parts[-1].append(tok)
    return [p for p in parts if p]


def _paren_body(tokens: Sequence[str], start: int) -> tuple[list[str], int]:
    """Tokens inside the parenthesis opening at ``start``, and the index after it."""
    depth = 0
    for i in range(start, len(tokens)):
        if tokens[i] == "(":
            depth += 1
        elif tokens[i] == ")":
            depth -= 1
            if depth == 0:
                return list(tokens[start + 1:i]), i + 1
    return list(tokens[start + 1:]), len(tokens)


def _checks_in(tokens: Sequence[str]) -> list[str]:
    found: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i] == "check" and i + 1 < len(tokens) and tokens[i + 1] == "(":
            body, i = _paren_body(tokens, i + 1)
            found.append(_join(body))
        else:
            i += 1
    return found


@dataclass
class _Parsed:
    checks: dict[str, str] = field(default_factory=dict)  # column (lower) → expression
    autoincrement: set[str] = field(default_factory=set)
    table_checks: list[str] = field(default_factory=list)


def _parse_create_table(sql: str) -> _Parsed:
    """What PRAGMAs do not tell: CHECKs and AUTOINCREMENT, from the stored CREATE TABLE."""
    out = _Parsed()
    tokens = _tokens(sql)
    try:
        start = tokens.index("(")
    except ValueError:
        return out
    body, _ = _paren_body(tokens, start)
    for part in _split_top(body):
        head = part[0]
        if head in ("constraint", "primary", "unique", "check", "foreign"):
            out.table_checks.extend(_checks_in(part))
            continue
        name = head.strip('"`[]') if not IDENT.match(head) else head
        checks = _checks_in(part)
        if checks:
            out.checks[name.lower()] = " and ".join(f"({c})" for c in checks) \
                if len(checks) > 1 else checks[0]
        if "autoincrement" in part:
            out.autoincrement.add(name.lower())
    return out


def _index_where(sql: str | None) -> str | None:
    if not sql:
        return None
    tokens = _tokens(sql)
    depth = 0
    for i, tok in enumerate(tokens):
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
        elif tok == "where" and depth == 0:
            return _join([t for t in tokens[i + 1:] if t != ";"])
    return None


def live_schema(conn: sqlite3.Connection) -> SchemaSpec:
    """The schema of the ``main`` database behind ``conn``, in the spec's terms."""
    masters = conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master "
        "WHERE type IN ('table', 'index') ORDER BY rowid").fetchall()
    index_sql = {name: sql for kind, name, _t, sql in masters if kind == "index"}
    names = [(name, sql) for kind, name, _t, sql in masters
             if kind == "table" and not is_ignored_table(name)]
    pks: dict[str, tuple[str, ...]] = {}
    infos: dict[str, list[tuple[Any, ...]]] = {}
    for name, _sql in names:
        infos[name] = conn.execute(f"PRAGMA main.table_info({_q(name)})").fetchall()
        pks[name.lower()] = tuple(r[1] for r in sorted(
            (r for r in infos[name] if r[5]), key=lambda r: r[5]))
    tables: list[Table] = []
    for name, sql in names:
        parsed = _parse_create_table(sql or "")
        columns = tuple(Column(
            name=cname, type=ctype or "", nullable=not notnull, primary_key=bool(pk),
            autoincrement=cname.lower() in parsed.autoincrement,
            default=dflt, check=parsed.checks.get(cname.lower()),
        ) for _cid, cname, ctype, notnull, dflt, pk in infos[name])
        fk_rows = conn.execute(f"PRAGMA main.foreign_key_list({_q(name)})").fetchall()
        groups: dict[int, list[tuple[Any, ...]]] = {}
        for row in fk_rows:
            groups.setdefault(row[0], []).append(row)
        fks = []
        for _id, rows in sorted(groups.items()):
            rows.sort(key=lambda row: row[1])
            ref_table = rows[0][2]
            refs = tuple(row[4] for row in rows)
            if any(ref is None for ref in refs):  # REFERENCES parent, with no columns
                refs = pks.get(ref_table.lower(), refs)
            fks.append(ForeignKey(tuple(row[3] for row in rows), ref_table,
                                  tuple(str(ref) for ref in refs),
                                  rows[0][6].upper(), rows[0][5].upper()))
        indices: list[Index] = []
        unique: list[tuple[str, ...]] = []
        for _seq, iname, is_unique, origin, _partial in conn.execute(
                f"PRAGMA main.index_list({_q(name)})").fetchall():
            if origin == "pk":
                continue
            cols = tuple(r[2] if r[2] is not None else "<expression>" for r in sorted(
                conn.execute(f"PRAGMA main.index_info({_q(iname)})").fetchall()))
            if origin == "u":
                unique.append(cols)
            else:
                indices.append(Index(iname, cols, bool(is_unique),
                                     _index_where(index_sql.get(iname))))
        indices.sort(key=lambda ix: ix.name)
        tables.append(Table(name, _with_rowid_rule(columns), tuple(fks), tuple(indices),
                            tuple(parsed.table_checks), tuple(sorted(unique))))
    return SchemaSpec(tuple(tables))


# -- comparing -------------------------------------------------------------------------------
def _type(text: str) -> str:
    return " ".join(text.upper().split())


def _diff_table(e: Table, a: Table) -> list[str]:
    return (_diff_columns(e, a) + _diff_keys(e, a) + _diff_constraints(e, a)
            + _diff_indices(e, a))


def _diff_columns(e: Table, a: Table) -> list[str]:
    """Columns missing or extra, then each common column's definition."""
    out: list[str] = []
    t = e.name
    for col in e.columns:
        if a.column(col.name) is None:
            out.append(f"{t}: missing column {col.name} ({col.type})")
    for col in a.columns:
        if e.column(col.name) is None:
            out.append(f"{t}: extra column {col.name} ({col.type})")
    for ec in e.columns:
        ac = a.column(ec.name)
        if ac is None:
            continue
        where = f"{t}.{ec.name}"
        if _type(ec.type) != _type(ac.type):
            out.append(f"{where}: type {ec.type or '(none)'} expected, found "
                       f"{ac.type or '(none)'}")
        if ec.nullable != ac.nullable:
            out.append(f"{where}: expected {'nullable' if ec.nullable else 'NOT NULL'}, found "
                       f"{'nullable' if ac.nullable else 'NOT NULL'}")
        if ec.primary_key != ac.primary_key:
            out.append(f"{where}: expected {'' if ec.primary_key else 'not '}part of the "
                       f"primary key, found {'' if ac.primary_key else 'not '}part of it")
        if ec.autoincrement != ac.autoincrement:
            out.append(f"{where}: expected {'' if ec.autoincrement else 'no '}AUTOINCREMENT, "
                       f"found {'' if ac.autoincrement else 'no '}AUTOINCREMENT")
        ed, ad = _normalize_default(ec.default), _normalize_default(ac.default)
        if ed != ad:
            out.append(f"{where}: default {ec.default if ed else '(none)'} expected, found "
                       f"{ac.default if ad else '(none)'}")
        if normalize_sql(ec.check) != normalize_sql(ac.check):
            want = f"CHECK ({ec.check})" if ec.check else "no CHECK"
            got = f"CHECK ({ac.check})" if ac.check else "no CHECK"
            out.append(f"{where}: {want} expected, found {got}")
    return out


def _diff_keys(e: Table, a: Table) -> list[str]:
    """The order of the common columns and of the primary key."""
    out: list[str] = []
    t = e.name
    common_e = [c.name.lower() for c in e.columns if a.column(c.name) is not None]
    common_a = [c.name.lower() for c in a.columns if e.column(c.name) is not None]
    if common_e != common_a:
        out.append(f"{t}: column order ({', '.join(common_e)}) expected, found "
                   f"({', '.join(common_a)})")
    if [n.lower() for n in e.primary_key] != [n.lower() for n in a.primary_key] and \
            {n.lower() for n in e.primary_key} == {n.lower() for n in a.primary_key}:
        out.append(f"{t}: primary key order ({', '.join(e.primary_key)}) expected, found "
                   f"({', '.join(a.primary_key)})")
    return out


def _diff_constraints(e: Table, a: Table) -> list[str]:
    """Foreign keys, table CHECKs and UNIQUE constraints missing or extra."""
    out: list[str] = []
    t = e.name

    def fk_key(fk: ForeignKey) -> tuple[object, ...]:
        return (tuple(c.lower() for c in fk.columns), fk.ref_table.lower(),
                tuple(c.lower() for c in fk.ref_columns), fk.on_delete, fk.on_update)

    a_fks = {fk_key(fk) for fk in a.foreign_keys}
    e_fks = {fk_key(fk) for fk in e.foreign_keys}
    out.extend(f"{t}: missing foreign key {fk.describe()}"
               for fk in e.foreign_keys if fk_key(fk) not in a_fks)
    out.extend(f"{t}: extra foreign key {fk.describe()}"
               for fk in a.foreign_keys if fk_key(fk) not in e_fks)
    e_checks = {normalize_sql(c) for c in e.checks}
    a_checks = {normalize_sql(c) for c in a.checks}
    out.extend(f"{t}: missing table CHECK ({c})" for c in e.checks
               if normalize_sql(c) not in a_checks)
    out.extend(f"{t}: extra table CHECK ({c})" for c in a.checks
               if normalize_sql(c) not in e_checks)
    e_uniq = {tuple(c.lower() for c in u) for u in e.unique}
    a_uniq = {tuple(c.lower() for c in u) for u in a.unique}
    out.extend(f"{t}: missing UNIQUE ({', '.join(u)})" for u in sorted(e_uniq - a_uniq))
    out.extend(f"{t}: extra UNIQUE ({', '.join(u)})" for u in sorted(a_uniq - e_uniq))
    return out


def _diff_indices(e: Table, a: Table) -> list[str]:
    """Indices missing or extra, and each common one's columns, uniqueness and WHERE."""
    out: list[str] = []
    t = e.name
    a_ix = {ix.name.lower(): ix for ix in a.indices}
    e_ix = {ix.name.lower(): ix for ix in e.indices}
    for ix in e.indices:
        got = a_ix.get(ix.name.lower())
        if got is None:
            out.append(f"{t}: missing index {ix.name} on ({', '.join(ix.columns)})")
            continue
        if [c.lower() for c in ix.columns] != [c.lower() for c in got.columns]:
            out.append(f"{t}: index {ix.name}: columns ({', '.join(ix.columns)}) expected, "
                       f"found ({', '.join(got.columns)})")
        if ix.unique != got.unique:
            out.append(f"{t}: index {ix.name}: expected {'' if ix.unique else 'not '}UNIQUE, "
                       f"found {'' if got.unique else 'not '}UNIQUE")
        if normalize_sql(ix.where) != normalize_sql(got.where):
            out.append(f"{t}: index {ix.name}: WHERE {ix.where or '(none)'} expected, found "
                       f"{got.where or '(none)'}")
    out.extend(f"{t}: extra index {ix.name} on ({', '.join(ix.columns)})"
               for ix in a.indices if ix.name.lower() not in e_ix)
    return out


def diff(expected: SchemaSpec, actual: SchemaSpec) -> list[str]:
    """Every difference between two schemas, one line each; [] when they agree."""
    out: list[str] = []
    e_tables = [t for t in expected.tables if not is_ignored_table(t.name)]
    a_tables = [t for t in actual.tables if not is_ignored_table(t.name)]
    a_names = {t.name.lower() for t in a_tables}
    e_names = {t.name.lower() for t in e_tables}
    out.extend(f"missing table {t.name}" for t in e_tables if t.name.lower() not in a_names)
    out.extend(f"extra table {t.name}" for t in a_tables if t.name.lower() not in e_names)
    for et in e_tables:
        at = actual.table(et.name)
        if at is not None:
            out.extend(_diff_table(et, at))
    return out
