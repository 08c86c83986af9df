"""The prerm's stop of the daemon (``zmonitor_migrated.package_stop``), without systemd:
a run is seen by the run lock it holds (held here by a real second process), the wait is
bounded, and the refusal says how to go on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from zmonitor_migrated import package_stop as ps
from zmonitor_migrated.journal import Journal, Phase

HOLD = """
import sys, time
from pathlib import Path
from zmonitor_migrated.lock import RunLock
with RunLock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_run_is_seen_by_its_lock_and_waited_for_then_refused(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    assert not ps.run_in_progress(lock)  # no lock file: no run ever
    journal = Journal.create(tmp_path / "journal.json", run_id="20260101T000000Z-abcdef")
    journal.advance(Phase.VERIFIED)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert ps.run_in_progress(lock)
        assert ps.run_in_progress(lock)  # probing takes no lock that stays
        assert ps.wait_for_run(lock, tmp_path / "journal.json", 0.2, "remove") is False
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not ps.run_in_progress(lock)
    assert ps.wait_for_run(lock, tmp_path / "journal.json", 0.0, "remove") is True
    what = ps._describe(tmp_path / "journal.json")
    assert what == "migration run 20260101T000000Z-abcdef (phase verified)"
    text = ps.refusal("upgrade", 600, what)
    assert "the package upgrade is refused and nothing was changed" in text
    assert "systemctl stop zmonitor-migrate.service" in text and ps.WAIT_ENV in text


@pytest.mark.parametrize("value, limit", [
    ("", ps.DEFAULT_WAIT_S), ("30", 30.0), ("0", 0.0), ("-1", ps.DEFAULT_WAIT_S),
    ("nan", ps.DEFAULT_WAIT_S), ("1e9", ps.DEFAULT_WAIT_S), ("soon", ps.DEFAULT_WAIT_S),
])
def test_the_wait_limit_from_the_environment(value: str, limit: float) -> None:
    assert ps.wait_limit({ps.WAIT_ENV: value} if value else {}) == limit


def test_other_prerm_calls_do_nothing() -> None:
    assert ps.main(["purge"]) == 0 and ps.main([]) == 0
