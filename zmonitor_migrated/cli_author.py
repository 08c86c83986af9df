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
from .cli_args import ArgumentError, db_path, existing_file, int_range, new_file, source_dir
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
    _add_new(subparsers)
    _add_dev(subparsers)
    _add_check(subparsers)
    _add_codegen(subparsers)


def _add_new(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "new", help="start a migration: next free number, header block, rollback stub",
        description="Create migrations/TYPE/NNNN_TYPE_<slug>.sql with the header comment "
                    "block and migrations/rollback/NNNN_rollback.sql, NNNN being one above "
                    "every number in use. Both are stubs marked zmonitor:todo, which lint "
                    "refuses until they are written.")
    p.add_argument("kind", choices=KINDS, metavar="TYPE", help="schema, data or seed")
    p.add_argument("description", metavar="DESCRIPTION",
                   help="one line, e.g. \"Add notes field to patients\"")
    p.add_argument("--source", type=source_dir, default=".", metavar="SRC",
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


def _add_dev(subparsers: Any) -> None:
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


def _add_check(subparsers: Any) -> None:
    c = subparsers.add_parser(
        "check", help="the migration repository's CI check: lint, empty and fixture "
                      "databases, up/down/up, generated header, timing",
        description="Run every check a migrations repository's CI runs, one line per step; "
                    "exit 3 if any step fails.")
    c.add_argument("source", type=source_dir, metavar="SRC", help="the migration source")
    c.add_argument("--json", dest="json_file", type=new_file, metavar="FILE",
                   help="also write the result as JSON to FILE")
    c.add_argument("--junit", type=new_file, metavar="FILE",
                   help="also write the result as JUnit XML to FILE")
    c.add_argument("--fixture", type=existing_file, metavar="DB",
                   help="sample-data fixture at an older version: an SQL dump or an SQLite "
                        "file (default: generated sample data)")
    c.add_argument("--fixture-version", type=int_range(0), metavar="N",
                   help="version of the generated fixture (default: half the history)")
    c.add_argument("--timing-rows", type=int_range(1, 50_000_000), metavar="N",
                   help="time each migration on a generated database of N vitals rows")
    c.add_argument("--header", type=existing_file, metavar="HEADER",
                   help="committed SchemaInfo.h to compare (default: "
                        "SRC/generated/SchemaInfo.h when it exists)")
    c.set_defaults(func=handle_check, no_config=True)


def _add_codegen(subparsers: Any) -> None:
    g = subparsers.add_parser(
        "codegen", help="generate the app's SchemaInfo.h from schema/database.yaml",
        description="C++ constants for every table and column of SRC/schema/database.yaml, "
                    "byte for byte the same for the same schema.")
    g.add_argument("source", type=source_dir, metavar="SRC", help="the migration source")
    g.add_argument("-o", "--output", type=new_file, metavar="HEADER", default=None,
                   help="file to write (default: print it)")
    g.add_argument("--check", action="store_true",
                   help="write nothing; exit 3 if HEADER (default: SRC/generated/SchemaInfo.h) "
                        "is missing or stale")
    _json_flag(g)
    g.set_defaults(func=handle_codegen, no_config=True)


def _dev_db(text: str) -> Path:
    """A database file that may not exist yet, in a directory that does."""
    from .devdb import DEVICE_DATABASE

    path = db_path(text)
    if path.absolute() == DEVICE_DATABASE:
        raise ArgumentError(f"{path} is the device's database; the laptop path works on a "
                            "copy (cp it to another path first)")
    if not path.absolute().parent.is_dir():
        raise ArgumentError(f"directory {path.parent} not found; create it first")
    return path


_dev_db.__name__ = "path"


def _dev_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", type=_dev_db, required=True, metavar="FILE",
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


def handle_check(args: argparse.Namespace, config: None) -> int:
    from . import check, check_report
    from .errors import UsageError

    if args.fixture is not None and args.fixture_version is not None:
        raise UsageError("--fixture-version is for the generated fixture; a --fixture file "
                         "has its own version")
    if args.fixture_version is not None:
        from .sources import discover

        last = discover(args.source)[0].last_version
        if args.fixture_version >= last:
            raise UsageError(f"--fixture-version {args.fixture_version}: the fixture must be "
                             f"older than the source's last version {last}")
    options = check.Options(fixture=args.fixture, fixture_version=args.fixture_version,
                            timing_rows=args.timing_rows, header=args.header)

    def show(step: check.Step) -> None:
        print(clean(step.line()), flush=True)
        if step.failed or step.name == "timing":
            for line in step.details:
                print(clean(f"      {line}"))

    steps = check.run_check(args.source, options, on_step=show)
    if args.json_file is not None:
        args.json_file.write_text(json.dumps(check_report.to_dict(args.source, steps),
                                             indent=2, sort_keys=True) + "\n",
                                  encoding="utf-8")
    if args.junit is not None:
        args.junit.write_bytes(check_report.junit_xml(args.source, steps))
    failed = [s.name for s in steps if s.failed]
    print(f"check {'FAILED: ' + ', '.join(failed) if failed else 'passed'} "
          f"({len(steps)} steps, {sum(s.seconds for s in steps):.1f} s)")
    return 3 if failed else 0


def handle_codegen(args: argparse.Namespace, config: None) -> int:
    from . import codegen

    if args.output is None and args.check:
        # The header `check` compares: the one committed in the source.
        args.output = args.source / codegen.DEFAULT_HEADER
    if args.output is None:
        text = codegen.generate(args.source)
        if args.json:
            print(json.dumps({"ok": True, "header": text}))
        else:
            print(text, end="")
        return 0
    if args.check:
        codegen.check(args.source, args.output)
        _emit(args, {"ok": True, "header": str(args.output), "current": True},
              [f"{args.output} is current"])
        return 0
    changed = codegen.write(args.source, args.output)
    _emit(args, {"ok": True, "header": str(args.output), "written": changed},
          [f"wrote {args.output}" if changed else f"{args.output} is already current"])
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
