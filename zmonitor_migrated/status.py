"""``status``: what the device has, what is pending, how the last run went. Read-only.

``render`` cleans every line (``text.clean``): migration descriptions, paths and error
messages come from the database and the bundle source."""

from __future__ import annotations

import sqlite3
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
    """The shipped bundle source: in a checkout next to the package, else where the
    Debian package installs it."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "bundles" / "zmonitor",
                 Path("/usr/share/zmonitor-migrated/bundles/zmonitor")):
        if (cand / "bundle.yaml").is_file():
            return cand
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
            info["current_version"] = max((r.version for r in applied), default=0)
            info["applied"] = [r.to_dict() for r in applied]
            info["journal_mode"] = dbinfo.journal_mode(conn)
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
        lines.append(f"last run: {last.get('run_id')} {last.get('outcome')} "
                     f"downtime {last.get('downtime_s')}")
    lines.append(f"backups: {len(info['backups'])}")
    lines += [f"  {b}" for b in info["backups"]]
    # Descriptions, paths and messages come from the database and the bundle source.
    return [clean(line) for line in lines]
