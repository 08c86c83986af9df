"""``zmonitor-migrate new``: start a migration with the next free number.

Writes two files into a migration source and nothing else:

- ``migrations/<type>/NNNN_<type>_<slug>.sql`` with the header comment block the
  workflow uses (version, date, description, risk, estimated time; for a data migration
  the batching line, real when ``batch_table`` is given);
- ``migrations/rollback/NNNN_rollback.sql``, a stub.

Both carry a ``-- zmonitor:todo`` line. Lint refuses a file that still has one (code
``todo``), so an unwritten migration or rollback can be tried on a laptop database but
never built into a bundle.

The number is one above the highest number used anywhere under ``migrations/`` (every
type folder and the rollbacks), so a new migration can never take a number another type
already holds. A source whose numbers already collide (two files with one number, in one
folder or across types) is refused with the colliding files named: the collision must be
resolved first, or the new file would be numbered after a history that does not hold.
"""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .errors import UsageError
from .sources import KINDS, NAME_RE, ROLLBACK_RE

TODO_MARKER = "-- zmonitor:todo"
RISKS = ("LOW", "MEDIUM", "HIGH")
DEFAULT_RISK = {"schema": "MEDIUM", "data": "HIGH", "seed": "LOW"}
DEFAULT_BATCH_SIZE = 10_000
MAX_SLUG = 60
_NUMBER = re.compile(r"^(\d{4,})_")


@dataclass(frozen=True)
class NewMigration:
    version: int
    migration: Path
    rollback: Path


def slug(description: str) -> str:
    """The file-name part of a description: lower case, words joined by ``_``."""
    words = re.findall(r"[a-z0-9]+", description.lower())
    text = "_".join(words)[:MAX_SLUG].strip("_")
    if not text:
        raise UsageError(f"description {description!r} has no letters or digits to name the "
                         "file after; describe the change in a few words")
    return text


def numbered_files(root: Path) -> dict[int, list[str]]:
    """Every number used under ``migrations/`` → the files using it (relative paths).
    Rollbacks count: a rollback left behind by a deleted migration still holds its number."""
    used: dict[int, list[str]] = {}
    for folder in (*KINDS, "rollback"):
        directory = root / "migrations" / folder
        if not directory.is_dir():
            continue
        for f in sorted(directory.iterdir()):
            m = _NUMBER.match(f.name)
            if m and f.suffix == ".sql":
                used.setdefault(int(m.group(1)), []).append(f"migrations/{folder}/{f.name}")
    return used


def collisions(used: dict[int, list[str]]) -> dict[int, list[str]]:
    """Numbers held by more than one migration (a rollback beside its migration is fine)."""
    out: dict[int, list[str]] = {}
    for number, files in sorted(used.items()):
        migrations = [f for f in files if not f.startswith("migrations/rollback/")]
        rollbacks = [f for f in files if f.startswith("migrations/rollback/")]
        if len(migrations) > 1 or len(rollbacks) > 1:
            out[number] = files
    return out


def next_number(root: Path) -> int:
    used = numbered_files(root)
    clash = collisions(used)
    if clash:
        listed = "; ".join(f"{n:04d}: {', '.join(files)}" for n, files in clash.items())
        raise UsageError(f"{root}: migration numbers collide ({listed}); versions are one "
                         "sequence across schema, data and seed: renumber one of each pair "
                         "(the one not yet released) before adding a migration")
    return max(used, default=0) + 1


def _author() -> str:
    for var in ("GIT_AUTHOR_NAME", "USER", "LOGNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _header_title(kind: str) -> str:
    return {"schema": "Migration", "data": "Data Migration", "seed": "Seed Migration"}[kind]


def render_migration(kind: str, version: int, description: str, *, risk: str, date: str,
                     author: str, batch_table: str | None = None,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> str:
    """The new migration file's text (pure)."""
    lines: list[str] = []
    if batch_table is not None:
        # The runner reads this line: it must stay the first of the file's header lines.
        lines.append(f"-- zmonitor:batch table={batch_table} size={batch_size}")
    lines += [
        f"-- {_header_title(kind)}: {description}",
        f"-- Version: {version:04d}",
        f"-- Date: {date}",
        f"-- Author: {author}",
        f"-- Description: {description}",
        f"-- Risk: {risk} - say what it touches and what a failure would cost",
        "-- Estimated time: not measured yet ('zmonitor-migrate check SRC --timing-rows N' "
        "prints it)",
    ]
    if kind == "data" and batch_table is None:
        lines.append("-- Batching: none. For a table of many rows add the runner's batch "
                     "line as the first line (zmonitor:batch table=T size=N) and bound each "
                     "statement by rowid BETWEEN :batch_start AND :batch_end")
    lines += [
        "--",
        "-- No BEGIN/COMMIT and no INSERT INTO schema_version: the runner owns both.",
        f"{TODO_MARKER} write the statements of this migration, then delete this line",
        "",
    ]
    if batch_table is not None:
        lines += [f"-- UPDATE {batch_table} SET ...",
                  "-- WHERE rowid BETWEEN :batch_start AND :batch_end AND ...;", ""]
    return "\n".join(lines)


def render_rollback(version: int, description: str) -> str:
    """The rollback stub's text (pure)."""
    return "\n".join([
        f"-- Rollback: {description}",
        f"-- Rolling back version: {version:04d}",
        "-- Undo exactly what the migration did, keeping every row that existed before it",
        "-- (the check runs every migration up, down and up again and compares the tables).",
        f"{TODO_MARKER} write the statements that undo {version:04d}, then delete this line",
        "",
    ])


def create(root: Path, kind: str, description: str, *, risk: str | None = None,
           batch_table: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
           now: datetime | None = None) -> NewMigration:
    """Write the migration and its rollback stub; refuses to overwrite anything."""
    if kind not in KINDS:
        raise UsageError(f"migration type {kind!r}: use one of {', '.join(KINDS)}")
    if batch_table is not None and kind != "data":
        raise UsageError("--batch-table is for data migrations: schema changes cannot be "
                         "batched and seed data is small")
    if batch_table is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*\Z", batch_table):
        raise UsageError(f"--batch-table {batch_table!r} is not an SQL table name")
    description = " ".join(description.split())
    if not description or any(ord(c) < 32 or ord(c) == 127 for c in description):
        raise UsageError("the description must be one line of printable text")
    version = next_number(root)
    name = f"{version:04d}_{kind}_{slug(description)}.sql"
    if not NAME_RE.match(name):  # the slug rules above produce only valid names
        raise UsageError(f"cannot name a migration {name!r}")
    migration = root / "migrations" / kind / name
    rollback = root / "migrations" / "rollback" / f"{version:04d}_rollback.sql"
    assert ROLLBACK_RE.match(rollback.name)
    date = (now or datetime.now(UTC)).strftime("%Y-%m-%d")
    text = render_migration(kind, version, description, risk=risk or DEFAULT_RISK[kind],
                            date=date, author=_author(), batch_table=batch_table,
                            batch_size=batch_size)
    written: list[Path] = []
    try:
        for path, content in ((migration, text), (rollback, render_rollback(version,
                                                                            description))):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "x", encoding="utf-8") as f:  # never overwrite
                f.write(content)
            written.append(path)
    except FileExistsError as exc:
        for path in written:
            path.unlink()
        raise UsageError(f"{exc.filename} already exists; nothing was written") from None
    return NewMigration(version=version, migration=migration, rollback=rollback)
