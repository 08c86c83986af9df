"""Power cuts during a whole run, checked state by state (``powercut.sweep``).

A seeded sample of the full sweep: every worst-case crash state (one per fsync of the
flow: the states where a missing or misplaced fsync shows) plus a draw of the others
(every op kept, seeded subsets of the unsynced ones, torn writes). The full sweep is run
by hand: ``python3 -m powercut.sweep --flows all`` (tests/powercut/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from powercut.fs import fuse_unavailable
from powercut.sweep import sweep

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(fuse_unavailable() is not None,
                                 reason=fuse_unavailable() or "")]
SEED = 20261203


def _assert_clean(tallies: dict[str, object]) -> None:
    report = []
    for flow, t in tallies.items():
        report += [f"{flow}: {f}" for f in t.failures]  # type: ignore[attr-defined]
        assert t.states > 0, flow  # type: ignore[attr-defined]
    assert report == []
    assert sum(t.rows_lost for t in tallies.values()) == 0  # type: ignore[attr-defined]
    assert sum(t.stuck_without_reason for t in tallies.values()) == 0  # type: ignore[attr-defined]


def test_apply_survives_a_power_cut_at_every_fsync(tmp_path: Path) -> None:
    """The migrated copy's fsync before the rename, the data directory's after it, the
    journal's and the backup checksum's: without any one of them some cut of this
    sample leaves a database that is not the old or the migrated one, or a journal or
    checksum that cannot be read."""
    _assert_clean(sweep(tmp_path, ["apply"], subsets=1, seed=SEED, sample=70,
                        log=lambda _line: None))


def test_restores_survive_a_power_cut(tmp_path: Path) -> None:
    """A restore after a failed health gate and an operator's restore."""
    _assert_clean(sweep(tmp_path, ["health-gate-restore", "operator-restore"], subsets=1,
                        seed=SEED, sample=35, log=lambda _line: None))


def test_recover_cut_again_and_the_daemon_survive_a_power_cut(tmp_path: Path) -> None:
    """``recover`` itself cut while it runs, and the daemon taking a bundle from the
    inbox (never lost, never applied twice). What the full sweep found here (a backup
    listed without its checksum) needs a reordering this small sample rarely draws:
    ``test_powercut_fs`` checks it over every crash state of the removal."""
    tallies = sweep(tmp_path, ["recover-cut", "daemon"], subsets=1, seed=SEED, sample=16,
                    log=lambda _line: None)
    _assert_clean(tallies)
