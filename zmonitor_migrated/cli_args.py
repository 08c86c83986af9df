"""Argument types for the command line: every value is checked while it is parsed.

A wrong value (zero, negative, huge, not a number, a missing file, a file where a
directory is expected or the other way round) becomes an ``argparse`` error, which the
CLI turns into exit 2 with the option named (``argument --vitals: …``), before any file
is opened or any journal or history written. The checks here are about the shape of a
value; what a file contains is judged by the command that reads it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

# The largest number any count or version on the command line may be: SQLite's INTEGER
# (and so schema_version and the bundle sequence) is a signed 64-bit value.
MAX_INT = 2**63 - 1


class ArgumentError(argparse.ArgumentTypeError):
    pass


def int_range(low: int, high: int = MAX_INT) -> Callable[[str], int]:
    """An integer in [low, high]; the message says the allowed range."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise ArgumentError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            top = "" if high == MAX_INT else f" and at most {high:,}"
            raise ArgumentError(f"{value} is out of range: it must be at least {low}{top}")
        return value

    parse.__name__ = "integer"
    return parse


def float_range(low: float, high: float, *, inclusive_low: bool = False
                ) -> Callable[[str], float]:
    """A finite number in (low, high] (or [low, high])."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ArgumentError(f"{text!r} is not a number") from None
        too_low = value < low if inclusive_low else value <= low
        if not math.isfinite(value) or too_low or value > high:
            bound = "at least" if inclusive_low else "above"
            raise ArgumentError(f"{text} is out of range: it must be {bound} {low:g} and at "
                                f"most {high:g}")
        return value

    parse.__name__ = "number"
    return parse


def _path(text: str) -> Path:
    if not text or "\x00" in text:
        raise ArgumentError(f"{text!r} is not a path")
    return Path(text)


def existing_file(text: str) -> Path:
    """A path to a regular file that exists (a directory is refused)."""
    path = _path(text)
    if path.is_dir():
        raise ArgumentError(f"{path} is a directory; a file is expected here")
    if not path.exists():
        raise ArgumentError(f"{path} not found")
    if not path.is_file():
        raise ArgumentError(f"{path} is not a regular file")
    return path


def existing_dir(text: str) -> Path:
    """A path to a directory that exists (a file is refused)."""
    path = _path(text)
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"{path} is a file; a directory is expected here")
    if not path.is_dir():
        raise ArgumentError(f"{path} not found (a directory is expected here)")
    return path


def source_dir(text: str) -> Path:
    """A migration source: a directory holding bundle.yaml."""
    path = existing_dir(text)
    if not (path / "bundle.yaml").is_file():
        raise ArgumentError(f"{path} is not a migration source: it has no bundle.yaml (a "
                            "source holds bundle.yaml, migrations/, schema/, checks/)")
    return path


def new_file(text: str) -> Path:
    """A file to write: its directory must exist, and it must not be a directory."""
    path = _path(text)
    if path.is_dir():
        raise ArgumentError(f"{path} is a directory; give the path of the file to write")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ArgumentError(f"{parent} is a file; the output's directory must be a directory")
    if not parent.is_dir():
        raise ArgumentError(f"directory {parent} not found; create it first")
    return path


def dir_or_new(text: str) -> Path:
    """A directory that may not exist yet (it is created); a file is refused."""
    path = _path(text)
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"{path} is a file; a directory is expected here")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ArgumentError(f"{parent} is a file; {path} cannot be created under it")
            break
    return path


def db_path(text: str) -> Path:
    """A database path (``--db``): it may be missing (each command says what that means
    for it), but never a directory."""
    path = _path(text)
    if path.is_dir():
        raise ArgumentError(f"{path} is a directory; give the path of the database file")
    return path


def sqlite_file(text: str) -> Path:
    """An existing SQLite database file (its 16-byte header is checked, nothing else)."""
    path = existing_file(text)
    try:
        with open(path, "rb") as f:
            header = f.read(16)
    except OSError as exc:
        raise ArgumentError(f"{path} cannot be read: {exc.strerror}") from None
    if header != b"SQLite format 3\x00":
        raise ArgumentError(f"{path} is not an SQLite database")
    return path


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised (as ``UsageError`` by the CLI's main),
    so ``--json`` still gets its one JSON object and no usage error is ever a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageFailure(f"{self.prog}: {message}")


class UsageFailure(Exception):
    """A command line that does not parse; ``main`` maps it to exit 2."""


__all__ = ["MAX_INT", "Parser", "UsageFailure", "db_path", "dir_or_new", "existing_dir",
           "existing_file", "float_range", "int_range", "new_file", "source_dir",
           "sqlite_file"]
