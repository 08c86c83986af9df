"""Shared by the author-side tests: a private copy of the shipped source and the real
entry point run in process (no subprocess: these tests stay fast)."""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Sequence
from pathlib import Path

from zmonitor_migrated import cli

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "bundles" / "zmonitor"
FIXTURE_SQL = ROOT / "tests" / "fixtures" / "sample_data.sql"


def copy_source(tmp_path: Path, name: str = "src") -> Path:
    """A writable copy of bundles/zmonitor (regular files, no symlinks)."""
    target = tmp_path / name
    shutil.copytree(SHIPPED, target)
    return target


def run(argv: Sequence[str]) -> tuple[int, str, str]:
    """``zmonitor-migrate ARGV`` through ``cli.main``: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()
