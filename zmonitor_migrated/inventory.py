"""``zmonitor-migrate inventory``: this device's migration state as Mender inventory lines.

mender-client runs every executable ``mender-inventory-*`` in ``/usr/share/mender/inventory``
and reads ``name=value`` lines from its stdout; the fleet server shows them per device.
The .deb installs ``mender-inventory-zmonitor-migrated``, a wrapper around this command,
so a biomed team sees from the server which monitors are at which schema version, how the
last migration ended and which ones need a person.

Printed (every key prefixed, always in this order, the ones that cannot be known left out)::

    zmonitor_migrate_version=0.9.0           the installed zmonitor-migrated
    zmonitor_db_schema_version=14            highest applied migration in the database
    zmonitor_migrate_last_sequence=3         anti-rollback floor (state file, else the
                                             database's record a first run would seed)
    zmonitor_migrate_last_outcome=applied    last run in the history
    zmonitor_migrate_last_run_at=2026-11-29T21:00:00Z
    zmonitor_migrate_last_run_id=…  zmonitor_migrate_last_bundle=…  zmonitor_migrate_last_error=…
    zmonitor_migrate_run_in_progress=no      yes: a run journal is open (a run is going on,
    zmonitor_migrate_run_phase=applying      or was cut and is finished at the next start)
    zmonitor_migrate_operator_needed=no      yes: see zmonitor_migrate_operator_reason
    zmonitor_migrate_operator_reason=…       one line per reason
    zmonitor_migrate_inventory_error=…       one line per source that could not be read

Guarantees:

- read-only: the database through ``dbinfo.open_ro``, the floor without seeding it, the
  journal without recovering it (``gate`` would finish an interrupted run, and take the
  run lock a real run may be waiting for); nothing is written, no lock is taken;
- never fails: each source is read on its own and any failure of it becomes an
  ``…_inventory_error`` line, the rest is still printed and the exit status is 0
  (mender-client 3.4 drops a script's whole output when one of its lines has no ``=``,
  older clients also when it exits non-zero);
- one ``name=value`` per line: names are fixed here; values (bundle names and error
  texts come from outside) are ``text.clean``ed to one printable line, bounded, and
  ``%`` and ``=`` are percent-encoded as Mender's inventory format suggests, so no value
  can start a second attribute or carry a second ``=``.

"Operator needed" means a person must act before this device migrates again or while it
is unsafe: the last restore failed (the app is kept stopped), the run journal or the
anti-rollback state cannot be read (every bundle is refused), the database is missing or
unreadable. A failed run that was restored is reported by its outcome, not as operator
needed: the device runs on its old database and accepts the next bundle.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Any

from . import __version__, dbinfo, history
from .config import Config
from .device_state import DeviceState, current_floor, device_state, read_floor
from .journal import Journal
from .text import clean

PREFIX = "zmonitor_migrate_"
SCHEMA_KEY = "zmonitor_db_schema_version"
ERROR_KEY = PREFIX + "inventory_error"
# Long enough for a run id, a bundle name or the gist of an error; the full text is in
# `zmonitor-migrate status` and the journal.
MAX_VALUE_CHARS = 300


def value(text: object) -> str:
    """One printable, bounded value that holds no ``=`` (percent-encoded, with ``%``)."""
    return clean(text, limit=MAX_VALUE_CHARS).replace("%", "%25").replace("=", "%3D")


@dataclass
class Inventory:
    pairs: list[tuple[str, str]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, key: str, val: object) -> None:
        self.pairs.append((key, value(val)))

    def operator(self, reason: str) -> None:
        self.reasons.append(reason)

    def error(self, source: str, exc: BaseException) -> None:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        self.errors.append(f"{source}: {message}")

    def lines(self) -> list[str]:
        pairs = list(self.pairs)
        pairs.append((PREFIX + "operator_needed", "yes" if self.reasons else "no"))
        pairs += [(PREFIX + "operator_reason", value(r)) for r in self.reasons]
        pairs += [(ERROR_KEY, value(e)) for e in self.errors]
        return [f"{k}={v}" for k, v in pairs]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for line in self.lines():
            key, val = line.split("=", 1)
            if key in out:  # repeated names: a list, as mender-client merges them
                out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [val]
            else:
                out[key] = val
        return out


def _utc(epoch: object) -> str | None:
    if isinstance(epoch, bool) or not isinstance(epoch, int | float):
        return None
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    except (OverflowError, OSError, ValueError):
        return None


def _database(inv: Inventory, config: Config) -> None:
    """Schema version and the anti-rollback floor (which falls back on the database)."""
    state: DeviceState | None = DeviceState(exists=False)
    if not config.database.is_file():
        inv.operator(f"database {config.database} does not exist")
    else:
        try:
            state = device_state(config.database)
            conn = dbinfo.open_ro(config.database, timeout=2.0)
            try:
                inv.add(SCHEMA_KEY, int(dbinfo.current_version(conn)))
            finally:
                conn.close()
        except Exception as exc:  # whatever it is: report it, go on
            state = None
            inv.error("database", exc)
            inv.operator(f"database {config.database} cannot be read")
    try:
        # Without the database's record only a stored floor is known (no seed value).
        floor = current_floor(config.state_dir, state) if state else \
            read_floor(config.state_dir)
    except Exception as exc:
        inv.error("anti-rollback state", exc)
        inv.operator("the anti-rollback state cannot be read: every bundle is refused")
        return
    if floor is not None:
        inv.add(PREFIX + "last_sequence", floor.sequence)


def _last_run(inv: Inventory, config: Config) -> None:
    try:
        runs = history.read(config.history_path)
    except Exception as exc:
        inv.error("history", exc)
        return
    if not runs:
        inv.add(PREFIX + "last_outcome", "none")
        return
    last = runs[-1]
    inv.add(PREFIX + "last_outcome", last.get("outcome") or "unknown")
    when = _utc(last.get("finished_at"))
    if when:
        inv.add(PREFIX + "last_run_at", when)
    for key in ("run_id", "bundle"):
        if last.get(key):
            inv.add(PREFIX + "last_" + key, last[key])
    error = last.get("error")
    if isinstance(error, dict) and error.get("kind"):
        inv.add(PREFIX + "last_error", error["kind"])


def _journal(inv: Inventory, config: Config) -> None:
    try:
        journal = Journal.load(config.journal_path)
    except Exception as exc:
        inv.error("run journal", exc)
        inv.operator(f"the run journal {config.journal_path} cannot be read")
        return
    if journal is not None and not journal.closed:
        inv.add(PREFIX + "run_in_progress", "yes")
        inv.add(PREFIX + "run_phase", journal.phase.value)
        return
    inv.add(PREFIX + "run_in_progress", "no")
    if journal is not None and journal.outcome == "restore-failed":
        inv.operator(f"run {journal.run_id} could not restore its backup; the app is kept "
                     "stopped: restore a backup by hand ('zmonitor-migrate restore')")


def collect(config: Config) -> Inventory:
    inv = Inventory()
    inv.add(PREFIX + "version", __version__)
    for part in (_database, _last_run, _journal):
        try:
            part(inv, config)
        except Exception as exc:  # a bug in one part hides no other
            inv.error(part.__name__.strip("_"), exc)
    return inv


def cmd_inventory(args: argparse.Namespace, config: Config) -> int:
    inv = collect(config)
    if getattr(args, "json", False):
        print(json.dumps({"ok": True, "inventory": inv.to_dict()}, sort_keys=True))
    else:
        print("\n".join(inv.lines()))
    return 0


def register(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "inventory", parents=[common_parent],
        help="migration state as Mender inventory lines (name=value); always exits 0")
    p.set_defaults(func=cmd_inventory)
