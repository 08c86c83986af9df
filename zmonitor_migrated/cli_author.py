"""The migration author's commands: ``new``, ``dev apply|status|rollback``, ``check``,
``codegen``.

They run on a developer's laptop and in CI, never on a device: none of them reads a
device configuration (``--config``, ``$ZMONITOR_MIGRATE_CONFIG`` or the default file),
and none of them needs a key, a trust directory, a state directory or an app unit.
Their parsers set ``no_config``; the main CLI then hands them ``None`` for a config and
refuses a ``--config`` given before the command. Each handler parses, calls one library
module (``author_new``, ``devdb``, ``check``, ``codegen``) and prints; failures are
``MigrateError`` subclasses that the main CLI maps to exit codes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import author_new
from .cli_args import db_path, int_range, source_dir
from .sources import KINDS
from .text import clean


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout and nothing else there")


def _emit(args: argparse.Namespace, obj: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False) is True:
        print(json.dumps(obj, sort_keys=True, default=str))
    else:
        for line in lines:
            print(clean(line))


def register(subparsers: Any) -> None:
    """Add the author commands to the main parser's subcommands."""
    p = subparsers.add_parser(
        "new", help="start a migration: next free number, header block, rollback stub",
        description="Create migrations/TYPE/NNNN_TYPE_<slug>.sql with the header comment "
                    "block and migrations/rollback/NNNN_rollback.sql, NNNN being one above "
                    "every number in use. Both are stubs marked zmonitor:todo, which lint "
                    "refuses until they are written.")
    p.add_argument("kind", choices=KINDS, metavar="TYPE", help="schema, data or seed")
    p.add_argument("description", metavar="DESCRIPTION",
                   help="one line, e.g. \"Add notes field to patients\"")
    p.add_argument("--source", type=source_dir, default=Path("."), metavar="SRC",
                   help="the migration source (default: the current directory)")
    p.add_argument("--risk", choices=author_new.RISKS, default=None,
                   help="the header's risk (default: schema MEDIUM, data HIGH, seed LOW)")
    p.add_argument("--batch-table", metavar="TABLE", default=None,
                   help="data migrations: walk TABLE in rowid batches (writes the runner's "
                        "batch line)")
    p.add_argument("--batch-size", type=_batch_size, default=author_new.DEFAULT_BATCH_SIZE,
                   metavar="N", help=f"rows per batch (default "
                                     f"{author_new.DEFAULT_BATCH_SIZE:,})")
    _json_flag(p)
    p.set_defaults(func=handle_new, no_config=True)

    dev = subparsers.add_parser(
        "dev", help="apply, inspect or roll back a plain database file (laptop, no device)",
        description="The laptop path: the device's lint, planner, engine and validation on "
                    "a plain database file, with no signature, key, trust directory, "
                    "configuration, state directory or app unit. The file is replaced only "
                    "by a validated copy.")
    actions = dev.add_subparsers(dest="dev_command", metavar="{apply,status,rollback}")
    actions.required = True
    a = actions.add_parser("apply", help="apply pending migrations (like migrate.py --db)")
    _dev_common(a)
    a.add_argument("--target", type=int_range(0), metavar="N", help="stop at version N")
    a.add_argument("--dry-run", action="store_true",
                   help="print the plan, rehearse it on a copy and validate; change nothing")
    a.set_defaults(func=handle_dev_apply, no_config=True)
    s = actions.add_parser("status", help="version, applied (hash checked), pending")
    _dev_common(s)
    s.set_defaults(func=handle_dev_status, no_config=True)
    r = actions.add_parser("rollback", help="run rollback scripts down to a version")
    _dev_common(r)
    r.add_argument("--to", type=int_range(0), metavar="N",
                   help="version to roll back to (default: one below the current)")
    r.add_argument("--dry-run", action="store_true",
                   help="rehearse the rollback on a copy and validate; change nothing")
    r.set_defaults(func=handle_dev_rollback, no_config=True)


def _dev_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", type=db_path, required=True, metavar="FILE",
                        help="the database file (apply creates it when missing)")
    parser.add_argument("--source", type=source_dir, required=True, metavar="SRC",
                        help="the migration source")
    _json_flag(parser)


def handle_dev_apply(args: argparse.Namespace, config: None) -> int:
    from . import devdb

    run = devdb.apply(args.db, args.source, target=args.target, dry_run=args.dry_run)
    _emit(args, run.to_dict(), devdb.render_run(run))
    return 0


def handle_dev_rollback(args: argparse.Namespace, config: None) -> int:
    from . import devdb

    run = devdb.rollback(args.db, args.source, to=args.to, dry_run=args.dry_run)
    _emit(args, run.to_dict(), devdb.render_run(run))
    return 0


def handle_dev_status(args: argparse.Namespace, config: None) -> int:
    from . import devdb

    info = devdb.status(args.db, args.source)
    _emit(args, info, devdb.render_status(info))
    return 0


def _batch_size(text: str) -> int:
    return int_range(1, 100_000_000)(text)


_batch_size.__name__ = "integer"


def handle_new(args: argparse.Namespace, config: None) -> int:
    if args.batch_size != author_new.DEFAULT_BATCH_SIZE and args.batch_table is None:
        from .errors import UsageError

        raise UsageError("--batch-size needs --batch-table TABLE")
    made = author_new.create(args.source, args.kind, args.description, risk=args.risk,
                             batch_table=args.batch_table, batch_size=args.batch_size)
    _emit(args, {"ok": True, "version": made.version, "migration": str(made.migration),
                 "rollback": str(made.rollback)},
          [f"created {made.migration}",
           f"created {made.rollback}",
           f"version {made.version:04d}: write both files (delete their zmonitor:todo "
           "lines), then try them on a copy of a database:",
           f"  zmonitor-migrate dev apply --db test.db --source {args.source}"])
    return 0


__all__ = ["register"]
