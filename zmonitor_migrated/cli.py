"""``zmonitor-migrate``: a thin command line over the library.

Command functions parse arguments, call one library function and print; none opens
SQLite itself. Every ``MigrateError`` becomes its documented exit code here, in one
place (``main``); with ``--json`` stdout carries exactly one JSON object.

Exit codes: 0 applied or up to date · 1 internal error · 2 usage or config error ·
3 bundle rejected · 4 pre-check or rehearsal failed (app never stopped) · 5 migration
failed, backup restored · 6 restore failed (manual action) · 7 another run holds the lock.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, cli_author, cli_bundle, cli_sample, cli_schema, inventory
from . import config as config_mod
from .cli_args import (
    Parser,
    UsageFailure,
    db_path,
    dir_or_new,
    existing_file,
    int_range,
    source_dir,
    sqlite_file,
)
from .config import Config
from .errors import MigrateError, UsageError
from .progress import Reporter, default_sinks
from .text import clean

# A bigger sample takes minutes to build and gigabytes of disk: not a demo any more.
DEMO_MAX_VITALS = 5_000_000


def _common() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help="config file (default /etc/zmonitor-migrated/config.yaml, "
                             "or $ZMONITOR_MIGRATE_CONFIG)")
    common.add_argument("--db", default=argparse.SUPPRESS, metavar="PATH", type=db_path,
                        help="database path, overriding the config")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON object on stdout and nothing else there")
    return common


class StopFlag:
    """Set by SIGTERM/SIGINT; the run polls it at safe points."""

    def __init__(self) -> None:
        self.set = False

    def __call__(self) -> bool:
        return self.set

    def install(self) -> None:
        def handler(_signum: int, _frame: object) -> None:
            self.set = True
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def _reporter(args: argparse.Namespace, config: Config) -> Reporter:
    return Reporter(default_sinks(config.status_path, tty=None if not _json(args) else False))


def _json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def print_result(args: argparse.Namespace, obj: dict[str, Any], lines: list[str]) -> None:
    if _json(args):
        print(json.dumps(obj, sort_keys=True, default=str))
    else:
        for line in lines:
            print(clean(line))  # names and messages from outside: one printable line each


# -- commands ---------------------------------------------------------------------------
def cmd_lint(args: argparse.Namespace, config: Config) -> int:
    from .lint import lint_source

    problems = lint_source(args.source)
    errors = [p for p in problems if p.severity == "error"]
    print_result(args, {"ok": not errors, "problems": [p.__dict__ for p in problems]},
           [str(p) for p in problems] + [f"{len(errors)} error(s), "
                                         f"{len(problems) - len(errors)} warning(s)"])
    return 3 if errors else 0


def _preflight(config: Config) -> None:
    """Configuration a run needs, checked before the run exists: a run that cannot start
    creates no directory, journal or history entry (it would become the 'last run')."""
    from .trust import TrustStore

    TrustStore.from_config(config)  # ConfigError (exit 2) naming the trust directory


def _check_rollback_target(config: Config, to: int) -> None:
    from .dbinfo import version_of

    version = version_of(config.database)
    if version is None:
        return  # no readable database: the run's pre-check reports it (exit 4)
    if version == 0:
        raise UsageError(f"--to {to}: {config.database} has no migration applied; there is "
                         "nothing to roll back")
    if to >= version:
        raise UsageError(f"--to {to}: {config.database} is at version {version}; roll back "
                         f"to a version below it (0 to {version - 1})")


def _archived_bundle(config: Config) -> Path:
    """The bundle that was last applied to the database, as the daemon archived it
    (``state_dir/archive/``): its rollback scripts are the ones that match the database.
    Only its manifest is read here; the run verifies the whole bundle again."""
    from .archive import Caps, open_bundle
    from .device_state import device_state
    from .verify import manifest_sha256

    archive_dir = config.state_dir / "archive"
    wanted = device_state(config.database).last_manifest_sha256
    if wanted and archive_dir.is_dir():
        caps = Caps.from_config(config)
        for path in sorted(archive_dir.iterdir(), reverse=True):  # newest run id first
            try:
                if path.is_file() and manifest_sha256(open_bundle(path, caps)[0]) == wanted:
                    return path
            except (MigrateError, OSError):
                continue  # not a readable bundle: not the one
    raise UsageError(f"rollback needs --bundle B.zmb or --source DIR: no bundle in "
                     f"{archive_dir} is the one last applied to {config.database} (only "
                     "bundles the daemon applied from its inbox are archived)")


def cmd_apply(args: argparse.Namespace, config: Config) -> int:
    from . import pipeline

    _preflight(config)
    stop = StopFlag()
    stop.install()
    result = pipeline.apply(args.bundle, config, reporter=_reporter(args, config),
                            dry_run=args.dry_run, target=args.target,
                            allow_long=args.allow_long, wait=args.wait, stop_requested=stop)
    lines = []
    if result.plan is not None and args.dry_run:
        lines += result.plan.describe()
        lines.append(f"rehearsal passed; estimated downtime {result.estimate_s:.2f} s")
    lines.append(f"{result.outcome}: run {result.run_id}"
                 + (f", version {result.from_version} → {result.to_version}"
                    if result.to_version is not None else "")
                 + (f", downtime {result.downtime_s:.2f} s" if result.downtime_s else ""))
    print_result(args, result.to_dict(), lines)
    return result.exit_code


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from .status import collect, render

    info = collect(config, source=args.source)
    print_result(args, info, render(info))
    return 0


def cmd_history(args: argparse.Namespace, config: Config) -> int:
    from .history import read, render

    records = read(config.history_path)
    print_result(args, {"ok": True, "runs": records}, render(records) or ["no runs yet"])
    return 0


def cmd_recover(args: argparse.Namespace, config: Config) -> int:
    from .lock import RunLock
    from .recovery import recover
    from .services import for_unit

    with RunLock(config.lock_path, wait=True):
        outcome = recover(config, services=for_unit(config.app_unit, config.systemctl),
                          reporter=_reporter(args, config))
    print_result(args, {"ok": True, "outcome": outcome},
           [f"recovered: {outcome}" if outcome else "nothing to recover"])
    return 0


def cmd_gate(args: argparse.Namespace, config: Config) -> int:
    from .maintenance import gate

    ok, message = gate(config, Reporter(default_sinks(None, tty=False)))
    print_result(args, {"ok": ok, "message": message}, [message])
    return 0 if ok else 1


def cmd_restore(args: argparse.Namespace, config: Config) -> int:
    from .maintenance import pick_backup, restore

    # Which backup, decided read-only before the lock is taken: an unknown --run or an
    # empty backup dir is a usage error that creates nothing (restore decides again
    # under the lock, after finishing any interrupted run).
    pick_backup(config, args.backup, args.run)
    path = restore(config, backup=args.backup, run_id=args.run, wait=args.wait,
                   reporter=_reporter(args, config))
    print_result(args, {"ok": True, "restored": str(path)}, [f"restored {path}"])
    return 0


def cmd_rollback(args: argparse.Namespace, config: Config) -> int:
    from .maintenance import rollback

    if args.source is not None and args.bundle is not None:
        raise UsageError("rollback needs exactly one of --bundle B.zmb (verified first) or "
                         "--source DIR (holding migrations/rollback/), not both")
    _check_rollback_target(config, args.to)
    if args.source is None and args.bundle is None:
        args.bundle = _archived_bundle(config)
    if args.bundle is not None:
        _preflight(config)
    result = rollback(config, to=args.to, source_dir=args.source, bundle=args.bundle,
                      unsigned_source=args.unsigned_source, wait=args.wait,
                      reporter=_reporter(args, config))
    print_result(args, result, [f"rolled back to version {args.to}: run {result['run_id']}"])
    return 0


def cmd_daemon(args: argparse.Namespace, config: Config) -> int:
    from .daemon import run_daemon

    return run_daemon(config)


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    from .demo import run_demo

    return run_demo(workdir=args.workdir, vitals=args.vitals)


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = Parser(
        prog="zmonitor-migrate", parents=[common],
        description="Verify signed migration bundles and apply them to the Z Monitor "
                    "database safely: back up, migrate, validate, restore on any failure.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    _add_lint_and_apply(sub, common)
    _add_state_commands(sub, common)
    _add_restore_and_rollback(sub, common)
    _add_service_commands(sub, common)
    cli_bundle.register(sub, common)
    cli_schema.register(sub, common)
    cli_sample.register(sub, common)
    inventory.register(sub, common)
    cli_author.register(sub)
    return parser




def _add_lint_and_apply(sub: Any, common: argparse.ArgumentParser) -> None:
    """lint and apply, the author's check and the run itself."""
    p = sub.add_parser("lint", parents=[common], help="check a migration source")
    p.add_argument("source", type=source_dir, metavar="SRC")
    p.set_defaults(func=cmd_lint)

    p = sub.add_parser("apply", parents=[common], help="apply a signed bundle (one full run)")
    p.add_argument("bundle", type=existing_file, metavar="BUNDLE")
    p.add_argument("--dry-run", action="store_true",
                   help="verify, pre-check and rehearse only; print the plan")
    p.add_argument("--target", type=int_range(0), metavar="N", help="stop at version N")
    p.add_argument("--allow-long", action="store_true",
                   help="accept a downtime estimate above max_downtime_s")
    p.add_argument("--wait", action="store_true", help="wait for another run's lock")
    p.set_defaults(func=cmd_apply)


def _add_state_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """The commands that read or finish a run's state: status, history, recover, gate."""
    p = sub.add_parser("status", parents=[common], help="version, applied, pending, last run")
    p.add_argument("--source", type=source_dir, metavar="SRC",
                   help="migration source to compute pending migrations against")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("history", parents=[common], help="past runs")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("recover", parents=[common], help="finish an interrupted run")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("gate", parents=[common],
                       help="exit 0 if the app may start now (the app unit's ExecStartPre)")
    p.set_defaults(func=cmd_gate)


def _add_restore_and_rollback(sub: Any, common: argparse.ArgumentParser) -> None:
    """The operator's ways back: restore a backup, roll back to a version."""
    p = sub.add_parser("restore", parents=[common], help="put a backup back")
    p.add_argument("backup", type=sqlite_file, nargs="?", metavar="BACKUP",
                   help="backup file (default: the newest, or the one of --run)")
    p.add_argument("--run", metavar="RUN_ID", help="restore the backup taken by this run")
    p.add_argument("--wait", action="store_true", help="wait for another run's lock")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("rollback", parents=[common], help="run rollback scripts down to N")
    p.add_argument("--to", type=int_range(0), required=True, metavar="N",
                   help="version to roll back to (below the current one)")
    p.add_argument("--bundle", type=existing_file, metavar="BUNDLE",
                   help="signed bundle holding the rollback scripts (admitted like apply: "
                        "signature, device type, anti-rollback, expiry); default: the "
                        "bundle last applied, from state_dir/archive/")
    p.add_argument("--source", type=source_dir, metavar="SRC",
                   help="unsigned migration source directory (developer machines only: "
                        "needs --unsigned-source and allow_unsigned_source: true)")
    p.add_argument("--unsigned-source", action="store_true",
                   help="accept the unsigned --source (also needs the config key "
                        "allow_unsigned_source: true, which a device never sets)")
    p.add_argument("--wait", action="store_true", help="wait for another run's lock")
    p.set_defaults(func=cmd_rollback)


def _add_service_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """The systemd service and the embedded demo."""
    p = sub.add_parser("daemon", parents=[common],
                       help="recover, process the inbox, watch it (the systemd service)")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("demo", parents=[common],
                       help="a full run on a sample database with a throw-away key")
    p.add_argument("--workdir", type=dir_or_new, default=None,
                   help="where to put the demo files, an empty or new directory (default: a "
                        "new temporary directory)")
    p.add_argument("--vitals", type=int_range(1, DEMO_MAX_VITALS), default=300_000,
                   help=f"vitals rows in the sample DB (1 to {DEMO_MAX_VITALS:,})")
    p.set_defaults(func=cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0) if exc.code in (0, None) else 2
    except UsageFailure as exc:
        return _usage_failure(str(exc), as_json="--json" in argv)
    as_json = _json(args)
    try:
        if as_json and getattr(args, "func", None) in _NO_JSON:
            raise UsageError(f"{args.command} does not support --json: it prints a guided "
                             "tour for a person (demo) or logs for journald (daemon); run it "
                             "without --json")
        if getattr(args, "no_config", False):
            # The author's commands (cli_author) never read a device configuration.
            if getattr(args, "config", None) is not None:
                raise UsageError(f"{args.command} does not read a configuration: it works "
                                 "on a source and a plain database file; drop --config")
            return int(args.func(args, None))
        config = config_mod.load(getattr(args, "config", None))
        if getattr(args, "db", None):
            config = config.with_overrides(database=args.db.absolute())
        return int(args.func(args, config))
    except MigrateError as exc:
        if as_json:
            print(json.dumps({"ok": False, "error": exc.to_dict()}, sort_keys=True))
        print(clean(f"zmonitor-migrate: error [{exc.kind}]: {exc.message}"), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("zmonitor-migrate: interrupted", file=sys.stderr)
        return 1
    except Exception as exc:  # the one place an unexpected error becomes exit 1
        if as_json:
            print(json.dumps({"ok": False, "error": {"kind": "internal",
                                                     "message": repr(exc)}}))
        traceback.print_exc()
        print(f"zmonitor-migrate: internal error: {exc!r}", file=sys.stderr)
        return 1


def _usage_failure(message: str, *, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": False, "error": {"kind": "usage", "message": message,
                                                 "exit_code": 2}}, sort_keys=True))
    print(f"{message}\n(see '{message.split(':')[0]} --help')", file=sys.stderr)
    return 2


_NO_JSON = (cmd_demo, cmd_daemon)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
