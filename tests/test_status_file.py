"""``status.json`` is for the fleet agent, which need not be root: readable by all
(0644) whatever the umask (the daemon's unit sets UMask=0077), and it holds no secret."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from zmonitor_migrated.progress import Reporter, StatusFileSink


@pytest.fixture
def unit_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_status_json_is_world_readable_under_the_units_umask(tmp_path: Path,
                                                            unit_umask: None) -> None:
    status = tmp_path / "run" / "zmonitor-migrated" / "status.json"
    reporter = Reporter([StatusFileSink(status, min_interval=0)], run_id="r1")
    reporter.emit("applying", "0012 batch 3/9", version=12, batch=3, batches=9)
    assert _mode(status) == 0o644
    assert _mode(status.parent) == 0o755  # created here: the agent can enter it
    reporter.emit("idle", "ready")  # rewritten: still 0644
    assert _mode(status) == 0o644
    body = json.loads(status.read_text())
    assert set(body) == {"phase", "message", "level", "run_id", "version", "batch",
                         "batches", "rows", "percent", "eta_s", "alert", "time", "status",
                         "pid"}
