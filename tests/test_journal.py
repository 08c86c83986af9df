"""The run journal's state machine, its recovery table and its atomic rewrite."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from zmonitor_migrated import fsutil
from zmonitor_migrated.journal import (
    RECOVERY,
    TRANSITIONS,
    IllegalTransition,
    Journal,
    Phase,
)

FORWARD = [Phase.VERIFIED, Phase.PRECHECKED, Phase.APP_STOPPED, Phase.BACKED_UP,
           Phase.APPLYING, Phase.APPLYING, Phase.VALIDATED, Phase.SWAPPING, Phase.SWAPPED,
           Phase.APP_STARTED, Phase.COMMITTED]


def test_forward_path_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    j = Journal.create(path, bundle="b.zmb")
    for p in FORWARD:
        j.advance(p, last=p.value)
        again = Journal.load(path)
        assert again is not None and again.phase is p and again.data["last"] == p.value
    j.close("applied")
    loaded = Journal.load(path)
    assert loaded is not None and loaded.closed and loaded.outcome == "applied"
    assert loaded.recovery_action() is None


@pytest.mark.parametrize("src", list(Phase))
def test_illegal_transitions_refused(tmp_path: Path, src: Phase) -> None:
    for to in Phase:
        if to in TRANSITIONS[src]:
            continue
        j = Journal(path=tmp_path / "j.json", run_id="r", phase=src)
        with pytest.raises(IllegalTransition):
            j.advance(to)
        assert j.phase is src
        assert not (tmp_path / "j.json").exists(), "a refused transition writes nothing"


def test_no_skipping_the_stop_or_the_backup(tmp_path: Path) -> None:
    j = Journal.create(tmp_path / "j.json")
    for bad in (Phase.APPLYING, Phase.SWAPPED, Phase.COMMITTED, Phase.APP_STOPPED):
        with pytest.raises(IllegalTransition):
            j.advance(bad)
    on_disk = json.loads((tmp_path / "j.json").read_text())
    assert on_disk["phase"] == "received"


def test_closed_journal_refuses_everything(tmp_path: Path) -> None:
    j = Journal.create(tmp_path / "j.json")
    j.advance(Phase.VERIFIED)
    j.close("rejected")
    with pytest.raises(IllegalTransition):
        j.advance(Phase.PRECHECKED)


def test_cannot_close_with_the_app_stopped(tmp_path: Path) -> None:
    j = Journal.create(tmp_path / "j.json")
    for p in FORWARD[:4]:
        j.advance(p)
    with pytest.raises(IllegalTransition):
        j.close("applied")
    j.close("restore-failed")  # the one exception: leave it for the operator
    assert j.closed


def test_recovery_table_covers_every_phase() -> None:
    assert set(RECOVERY) == set(Phase)
    assert set(TRANSITIONS) == set(Phase)
    assert {RECOVERY[p] for p in (Phase.RECEIVED, Phase.VERIFIED, Phase.PRECHECKED)} == \
        {"abandon"}
    assert {RECOVERY[p] for p in (Phase.APP_STOPPED, Phase.BACKED_UP, Phase.APPLYING,
                                  Phase.VALIDATED)} == {"discard"}
    assert RECOVERY[Phase.SWAPPING] == "resolve-swap"
    assert RECOVERY[Phase.SWAPPED] == "finish"
    assert RECOVERY[Phase.FAILED] == RECOVERY[Phase.RESTORING] == "restore"


def test_recovery_action_after_failure(tmp_path: Path) -> None:
    j = Journal.create(tmp_path / "j.json")
    for p in FORWARD[:9]:
        j.advance(p)
    assert j.recovery_action() == "finish"
    j.advance(Phase.FAILED)
    assert j.recovery_action() == "restore"
    j.advance(Phase.RESTORING)
    j.advance(Phase.RESTORED)
    assert j.recovery_action() == "start-app"
    j.advance(Phase.APP_STARTED)
    assert j.recovery_action() == "start-app"  # not "finish": the run failed
    loaded = Journal.load(j.path)
    assert loaded is not None and loaded.failed and loaded.recovery_action() == "start-app"


def test_atomic_rewrite_leaves_no_temp_files(tmp_path: Path) -> None:
    j = Journal.create(tmp_path / "journal.json")
    for p in FORWARD:
        j.advance(p, blob="x" * 1000)
    j.close("applied")
    assert sorted(os.listdir(tmp_path)) == ["journal.json"]


def test_stale_temp_of_a_dead_writer_is_removed(tmp_path: Path) -> None:
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".journal.json.tmp-{dead}"
    live = tmp_path / f".journal.json.tmp-{os.getpid()}"
    stale.write_text("{")
    live.write_text("{")
    assert fsutil.remove_stale_temps(tmp_path) == [stale]
    assert live.exists() and not stale.exists()


def test_unreadable_journal_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "journal.json").write_text("{not json")
    with pytest.raises(Exception, match="unreadable"):
        Journal.load(tmp_path / "journal.json")


def test_phase_times(tmp_path: Path) -> None:
    j = Journal(path=tmp_path / "j.json", run_id="r")
    j.phases = [("received", 100.0), ("verified", 100.5), ("prechecked", 102.0),
                ("app_stopped", 102.25), ("backed_up", 103.0), ("applying", 103.5),
                ("applying", 104.0), ("validated", 106.0), ("closed", 106.1)]
    times = j.phase_times()
    assert times == {"received": 0.5, "verified": 1.5, "prechecked": 0.25,
                     "app_stopped": 0.75, "backed_up": 0.5, "applying": 2.5,
                     "validated": 0.1}


def test_a_journal_this_user_cannot_read_says_so_and_never_advises_moving_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES (a non-root ``status``) is not damage: the message names the permission and
    root, never "move it aside", since recovery relies on that file."""
    from zmonitor_migrated.errors import UsageError

    path = tmp_path / "journal.json"
    path.write_text("{}")

    def denied(*_a: object, **_k: object) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(UsageError) as err:
        Journal.load(path)
    assert "permission denied" in err.value.message and "root" in err.value.message
    assert "aside" not in err.value.message


@pytest.mark.parametrize("text", ["[]", '{"phase": "applying"}', '{"run_id": "r", "phase": 7}',
                                  '{"run_id": "r", "phase": "applying", "phases": 5}'])
def test_a_journal_of_the_wrong_shape_is_unreadable_not_a_crash(tmp_path: Path,
                                                                text: str) -> None:
    path = tmp_path / "journal.json"
    path.write_text(text)
    with pytest.raises(Exception, match="unreadable") as err:
        Journal.load(path)
    assert "aside" not in str(err.value)
