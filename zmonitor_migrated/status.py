"""``status``: what the device has, what is pending, how the last run went. Read-only.

``render`` cleans every line (``text.clean``): migration descriptions, paths and error
messages come from the database and the bundle source."""

from __future__ import annotations

import sqlite3
from importlib import resources
from pathlib import Path
from typing import Any

from . import backup as backups
from . import dbinfo, history, sources
from .config import Config
from .engine import read_applied
from .errors import MigrateError, UsageError
from .journal import Journal
from .plan import plan
from .text import clean


def default_source() -> Path | None:
    """The shipped bundle source, which travels inside the package as package data
    (``zmonitor_migrated/data/bundles/zmonitor``): found the same way from a checkout, an
    editable install, a wheel, pipx or the .deb, whatever the working directory.

    Only a package imported from the file system has a directory to hand out; a zipped
    import (never how pip, pipx or the .deb install it) yields None and the caller says so.
    """
    shipped = resources.files(__package__) / "data" / "bundles" / "zmonitor"
    if isinstance(shipped, Path) and (shipped / "bundle.yaml").is_file():
        return shipped
    return None


def collect(config: Config, source: Path | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"ok": True, "database": str(config.database)}
    if not config.database.is_file():
        raise UsageError(f"database {config.database} does not exist; check 'database' in "
                         "the config or pass --db")
    try:
        conn = dbinfo.open_ro(config.database)
        try:
            applied = read_applied(conn)
            info["current_version"] = dbinfo.current_version(conn)
            info["applied"] = [r.to_dict() for r in applied]
            info["journal_mode"] = dbinfo.file_journal_mode(config.database, conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise UsageError(f"database {config.database} cannot be read: {exc}") from None
    info["db_size"] = dbinfo.file_size(config.database)
    src_path = source or default_source()
    info["source"] = str(src_path) if src_path else None
    if src_path is not None:
        try:
            p = plan(sources.load(src_path).migrations, applied)
            info["pending"] = [m.to_dict() for m in p.pending]
        except MigrateError as exc:
            info["pending"] = None
            info["pending_error"] = exc.to_dict()
    journal = Journal.load(config.journal_path)
    info["journal"] = None if journal is None else {
        "run_id": journal.run_id, "phase": journal.phase.value, "outcome": journal.outcome,
        "open": not journal.closed}
    runs = history.read(config.history_path)
    info["last_run"] = runs[-1] if runs else None
    info["backups"] = [str(b) for b in backups.list_backups(config.database,
                                                            config.backup_dir)]
    # A restore keeps the database it replaced beside the backups: an operator who
    # looks for lost rows must see them here.
    info["replaced"] = [str(p) for p in backups.list_replaced(config.database,
                                                              config.backup_dir,
                                                              config.database.parent)]
    return info


def render(info: dict[str, Any]) -> list[str]:
    lines = [f"database {info['database']}: version {info['current_version']} "
             f"({info['db_size'] / 1e6:.1f} MB, journal {info['journal_mode']})"]
    lines.append("applied:")
    for r in info["applied"]:
        lines.append(f"  {r['version']:04d} {r['migration_type'] or '-':6s} {r['applied_at']}  "
                     f"{(r['file_hash'] or 'no hash')[:12]}  {r['execution_time_ms'] or 0} ms"
                     f"  {r['description'] or ''}")
    if info.get("pending") is not None:
        lines.append(f"pending (against {info['source']}): {len(info['pending'])}")
        for m in info["pending"]:
            lines.append(f"  {m['version']:04d} {m['type']:6s} {m['path']}")
    elif info.get("pending_error"):
        lines.append(f"pending: unknown ({info['pending_error']['message']})")
    j = info.get("journal")
    if j:
        state = f"OPEN in phase {j['phase']}" if j["open"] else f"{j['outcome']}"
        lines.append(f"journal: run {j['run_id']} {state}")
    last = info.get("last_run")
    if last:
        lines.append(f"last run: {history.summary(last)}")
    lines.append(f"backups: {len(info['backups'])}")
    lines += [f"  {b}" for b in info["backups"]]
    replaced = info.get("replaced") or []
    if replaced:
        lines.append(f"replaced databases kept by restores: {len(replaced)}")
        lines += [f"  {p}" for p in replaced]
    # Descriptions, paths and messages come from the database and the bundle source.
    return [clean(line) for line in lines]
