"""``zmonitor-migrate sample OUT.db``: a sample monitor database at an older version, for
a trial run on a device or a laptop (the demo makes the same one, but keeps it only as
a backup file).

The database is generated beside OUT.db under a temporary name and linked into place
only when it is complete: OUT.db is never overwritten (an existing one is exit 2), and an
interrupted or failed generation leaves no half-made database behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

from .cli_args import ArgumentError, int_range, new_file, source_dir
from .config import Config
from .errors import UsageError

DEFAULT_VERSION = 10
DEFAULT_VITALS = 300_000
MAX_VITALS = 5_000_000  # as the demo's --vitals


def absent_file(text: str) -> Path:
    """A new file to create: its directory exists, nothing is at the path yet."""
    path = new_file(text)
    if os.path.lexists(path):
        raise ArgumentError(f"{path} already exists; it is never overwritten: give a new "
                            "name, or move the file away first")
    return path


def cmd_sample(args: argparse.Namespace, config: Config) -> int:
    from . import sources
    from .cli import print_result
    from .sample import make_sample_db
    from .status import default_source

    src = args.source or default_source()
    if src is None:
        raise UsageError("the shipped bundle source is not available from this install; "
                         "give one with --source SRC")
    source = sources.load(src)
    last = source.last_version
    if args.version > last:
        raise UsageError(f"argument --version: {args.version} is out of range: the source "
                         f"{src} goes up to version {last}")
    out: Path = args.out
    tmp = out.with_name(f".{out.name}.sample-{os.getpid()}")
    try:
        make_sample_db(tmp, source, version=args.version, vitals=args.vitals)
        try:
            os.link(tmp, out)  # fails if OUT appeared meanwhile: never overwritten
        except FileExistsError:
            raise UsageError(f"{out} appeared while the sample was made; it is left as "
                             "it is") from None
    finally:
        for leftover in (tmp, *(tmp.with_name(tmp.name + s) for s in ("-wal", "-shm"))):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    info: dict[str, Any] = {"ok": True, "database": str(out), "version": args.version,
                            "vitals": args.vitals, "source": str(src)}
    print_result(args, info, [f"sample database {out}: version {args.version}, "
                        f"{args.vitals:,} vitals rows (from {src})"])
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sample", parents=[common],
                       help="make a sample monitor database at an older version, for trials")
    p.add_argument("out", type=absent_file, metavar="OUT.db",
                   help="the database file to create (refused if it exists)")
    p.add_argument("--version", type=int_range(1), default=DEFAULT_VERSION, metavar="N",
                   help=f"schema version of the sample (default {DEFAULT_VERSION}; at most "
                        "the source's last version)")
    p.add_argument("--vitals", type=int_range(1, MAX_VITALS), default=DEFAULT_VITALS,
                   metavar="N", help=f"vitals rows (1 to {MAX_VITALS:,}; default "
                                     f"{DEFAULT_VITALS:,})")
    p.add_argument("--source", type=source_dir, metavar="SRC",
                   help="migration source to build it with (default: the shipped one)")
    p.set_defaults(func=cmd_sample)
