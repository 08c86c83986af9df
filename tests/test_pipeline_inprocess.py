"""The run pipeline in this process: a fake app unit, real SQLite files, real journal.

The subprocess suites (test_run, test_recover_phases, the fault and crash suites) drive the
CLI and a stand-in ``systemctl``; these tests call ``pipeline.apply``, ``recovery.recover``
and ``maintenance.restore`` directly with a ``FakeApp`` service manager, so each case
takes a fraction of a second. What they pin:

- the happy path: the migrated database live, the app running, one history line, the
  journal closed ``applied``;
- a failure at each step of the downtime (stop, quiesce, copy, migrate, validate, seal,
  rename, start, health gate): the old database with every row, the app running, the
  journal closed ``restored``, no working copy left;
- every row of ``journal.RECOVERY``: the run "dies" (an exception no handler catches, and
  nothing of the dying process runs after it) right after the journal records a phase,
  then ``recover`` finishes it: abandoned before the stop, the old database before the
  rename, the migrated one after it (read from the live inode), the backup after a
  failure;
- an operator restore enters the journal in ``failed`` and is finished by ``recover``
  when it dies half-way;
- each kind of history line (applied, up-to-date, recovered, restore) has exactly the
  keys it had before the record was typed, and every key a run writes to the journal is
  a field of ``journal.RunFacts``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from conftest import table_rows

from zmonitor_migrated import config as config_mod
from zmonitor_migrated import dbinfo, maintenance, pipeline, recovery, swap
from zmonitor_migrated.errors import MigrateError, MigrationFailed
from zmonitor_migrated.journal import RECOVERY, Action, Journal, Outcome, Phase, RunFacts
from zmonitor_migrated.progress import Reporter
from zmonitor_migrated.sample import make_sample_db
from zmonitor_migrated.services import UnitError
from zmonitor_migrated.sources import Source


class FakeApp:
    """The app unit as a ServiceManager in memory: whether it runs, what was asked of
    it, and the step to fail on (``fail_on``: stop, start or health_gate)."""

    name = "zmonitor.service"

    def __init__(self) -> None:
        self.active = True
        self.calls: list[str] = []
        self.fail_on: set[str] = set()

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if what in self.fail_on:
            self.fail_on.discard(what)  # once: the restore's start must work
            raise UnitError(f"{self.name}: {what} failed (injected)")

    def stop(self, timeout: float, tick: Callable[[], None] | None = None) -> None:
        self._call("stop")
        self.active = False

    def start(self) -> None:
        self._call("start")
        self.active = True

    def is_active(self) -> bool:
        return self.active

    def health_gate(self, seconds: float, tick: Callable[[], None] | None = None) -> None:
        self._call("health_gate")


class Crash(BaseException):
    """The process dies here: no handler of the pipeline catches it."""


@pytest.fixture(scope="session")
def small_db_v10(tmp_path_factory: pytest.TempPathFactory, shipped_source: Source) -> Path:
    path = tmp_path_factory.mktemp("inprocess") / "zmonitor-v10.db"
    return make_sample_db(path, shipped_source, version=10, vitals=500, wal=True)


@pytest.fixture
def cfg(tmp_path: Path, small_db_v10: Path, release_key: tuple[Path, Path]) -> config_mod.Config:
    (tmp_path / "data").mkdir()
    db = tmp_path / "data" / "zmonitor.db"
    db.write_bytes(small_db_v10.read_bytes())
    trust = tmp_path / "trusted.d"
    trust.mkdir()
    (trust / release_key[1].name).write_bytes(release_key[1].read_bytes())
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "database": str(db), "device_type": "zmonitor-bedside",
        "app_unit": "zmonitor.service", "state_dir": str(tmp_path / "state"),
        "runtime_dir": str(tmp_path / "run"), "inbox": str(tmp_path / "inbox"),
        "backup_dir": str(tmp_path / "backups"), "trust_dir": str(trust),
        "health_check_s": 0.5, "max_downtime_s": 60,
    }))
    return config_mod.load(path)


@pytest.fixture
def app() -> FakeApp:
    return FakeApp()


def _apply(cfg: config_mod.Config, bundle: Path, app: FakeApp) -> pipeline.RunResult:
    return pipeline.apply(bundle, cfg, services=app, reporter=Reporter())


def _version(db: Path) -> int:
    conn = dbinfo.open_ro(db)
    try:
        return dbinfo.current_version(conn)
    finally:
        conn.close()


def _journal(cfg: config_mod.Config) -> Journal:
    j = Journal.load(cfg.journal_path)
    assert j is not None
    return j


def _history(cfg: config_mod.Config) -> list[dict[str, object]]:
    return [json.loads(line) for line in cfg.history_path.read_text().splitlines()]


def _typed(j: Journal) -> Journal:
    """Every key the run wrote to the journal is a field of its typed view."""
    assert set(j.data) <= {f.name for f in fields(RunFacts)}, set(j.data)
    return j


def _no_working_copy(cfg: config_mod.Config) -> bool:
    return not list(cfg.database.parent.glob("*.migrating-*"))


def _assert_old(cfg: config_mod.Config, before: dict[str, list[tuple[object, ...]]],
                app: FakeApp) -> None:
    """The invariant's first half: the old database, every row, and the app running."""
    assert table_rows(cfg.database) == before
    assert app.active
    assert _no_working_copy(cfg)


def _assert_migrated(cfg: config_mod.Config, app: FakeApp) -> None:
    assert _version(cfg.database) == 14
    conn = dbinfo.open_ro(cfg.database)
    try:
        assert dbinfo.integrity_problems(conn) == []
    finally:
        conn.close()
    assert app.active
    assert _no_working_copy(cfg)


# The keys of each kind of history line (the format stays what it was before RunRecord).
COMMON = {"run_id", "outcome", "started_at", "finished_at", "duration_s", "phase_times",
          "downtime_s", "restored"}
APPLIED_KEYS = COMMON | {"bundle", "sequence", "error", "from_version", "to_version",
                         "estimate_s", "backup", "rows_before", "rows_after",
                         "db_size_before", "db_size_after"}
UP_TO_DATE_KEYS = COMMON | {"bundle", "sequence", "error"}
RECOVERY_KEYS = COMMON | {"bundle", "sequence", "error", "recovered", "recovery_action",
                          "from_version", "to_version", "backup", "replaced"}
RESTORE_KEYS = COMMON | {"operation", "backup", "replaced"}


# -- the happy path ---------------------------------------------------------------------

def test_apply_in_process(cfg: config_mod.Config, shipped_bundle: Path, app: FakeApp) -> None:
    rows = {t: len(r) for t, r in table_rows(cfg.database).items() if t != "sqlite_master"}
    result = _apply(cfg, shipped_bundle, app)
    assert result.outcome == Outcome.APPLIED and result.ok and result.exit_code == 0
    assert (result.from_version, result.to_version) == (10, 14)
    _assert_migrated(cfg, app)
    assert app.calls == ["stop", "start", "health_gate"]
    after = table_rows(cfg.database)
    assert all(len(after[t]) >= n for t, n in rows.items() if t in after)
    j = _typed(_journal(cfg))
    assert j.outcome == Outcome.APPLIED and j.phase is Phase.COMMITTED
    assert j.facts.backup == result.backup and j.facts.bundle_name == "zmonitor"
    [line] = _history(cfg)
    assert line["outcome"] == "applied" and line["restored"] is False
    assert line["backup"] == result.backup and Path(str(result.backup)).is_file()
    assert set(line) == APPLIED_KEYS
    # The same bundle again: nothing to do, one more line.
    again = _apply(cfg, shipped_bundle, app)
    assert again.outcome == Outcome.UP_TO_DATE
    assert _history(cfg)[-1]["outcome"] == "up-to-date"
    assert set(_history(cfg)[-1]) == UP_TO_DATE_KEYS


# -- a failure at each step of the downtime ---------------------------------------------

def _fail_after(owner: object, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``owner.name`` do its work, then fail."""
    real = getattr(owner, name)

    def failing(*args: object, **kwargs: object) -> object:
        real(*args, **kwargs)
        raise MigrateError(f"{name} failed (injected)", kind="injected")
    monkeypatch.setattr(owner, name, failing)


STEPS: dict[str, Callable[[FakeApp, pytest.MonkeyPatch], None]] = {
    "stop": lambda app, mp: app.fail_on.add("stop"),
    "quiesce": lambda app, mp: _fail_after(swap, "quiesce", mp),
    "take": lambda app, mp: _fail_after(swap.WorkingCopy, "take", mp),
    "migrate": lambda app, mp: _fail_after(pipeline.Run, "_migrate", mp),
    "validate": lambda app, mp: _fail_after(pipeline.Run, "_validate_copy", mp),
    "seal": lambda app, mp: _fail_after(swap.WorkingCopy, "seal", mp),
    "swap_in": lambda app, mp: _fail_after(swap.WorkingCopy, "swap_in", mp),
    "start": lambda app, mp: app.fail_on.add("start"),
    "health_gate": lambda app, mp: app.fail_on.add("health_gate"),
}
AFTER_THE_RENAME = {"swap_in", "start", "health_gate"}


@pytest.mark.parametrize("step", list(STEPS))
def test_a_failure_at_each_step_of_the_downtime_restores_the_old_database(
        cfg: config_mod.Config, shipped_bundle: Path, app: FakeApp, step: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = table_rows(cfg.database)
    STEPS[step](app, monkeypatch)
    with pytest.raises(MigrationFailed) as failed:
        _apply(cfg, shipped_bundle, app)
    assert failed.value.exit_code == 5
    _assert_old(cfg, before, app)
    j = _typed(_journal(cfg))
    assert j.outcome == Outcome.RESTORED if step in AFTER_THE_RENAME else \
        j.outcome == Outcome.RECOVERED_OLD
    assert j.data["restored_backup"] is (step in AFTER_THE_RENAME)
    [line] = _history(cfg)
    assert line["outcome"] == "restored" and line["error"]
    if step in AFTER_THE_RENAME:
        assert line["replaced"], "the migrated database a restore replaced is kept"
    assert recovery.recover(cfg, services=app, reporter=Reporter()) is None  # nothing left


# -- every row of the recovery table ----------------------------------------------------

def _crash_when(phase: Phase, failed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dies right after the journal durably records ``phase`` (after a
    failure when ``failed``): nothing of it runs afterwards, not even the finally
    blocks that close the journal or write the history."""
    advance = Journal.advance

    def advance_then_die(self: Journal, to: Phase, **data: object) -> None:
        advance(self, to, **data)
        if to is phase and self.failed is failed:
            raise Crash(str(to))
    monkeypatch.setattr(Journal, "advance", advance_then_die)
    fail, finish = pipeline.Run.fail, pipeline._finish

    def fail_unless_dead(self: pipeline.Run, err: MigrateError) -> None:
        if isinstance(err.__context__, Crash) or "Crash" in err.message:
            raise Crash("dead")
        fail(self, err)
    monkeypatch.setattr(pipeline.Run, "fail", fail_unless_dead)
    monkeypatch.setattr(pipeline, "_finish", lambda run, result, error, *a: (
        None if error is not None and "Crash" in error.message else
        finish(run, result, error, *a)))


FORWARD = [Phase.VERIFIED, Phase.PRECHECKED, Phase.APP_STOPPED, Phase.BACKED_UP,
           Phase.APPLYING, Phase.VALIDATED, Phase.SWAPPING, Phase.SWAPPED,
           Phase.APP_STARTED, Phase.COMMITTED]
# (phase the run died in, after a failure?) -> (action, outcome of recover, database)
CASES: list[tuple[Phase, bool, Action, Outcome, str]] = [
    (Phase.VERIFIED, False, Action.ABANDON, Outcome.ABANDONED, "old"),
    (Phase.PRECHECKED, False, Action.ABANDON, Outcome.ABANDONED, "old"),
    *[(p, False, Action.DISCARD, Outcome.RECOVERED_OLD, "old")
      for p in (Phase.APP_STOPPED, Phase.BACKED_UP, Phase.APPLYING, Phase.VALIDATED)],
    (Phase.SWAPPING, False, Action.RESOLVE_SWAP, Outcome.RECOVERED_OLD, "old"),
    (Phase.SWAPPED, False, Action.FINISH, Outcome.APPLIED, "migrated"),
    (Phase.APP_STARTED, False, Action.FINISH, Outcome.APPLIED, "migrated"),
    (Phase.COMMITTED, False, Action.COMMIT, Outcome.APPLIED, "migrated"),
    (Phase.FAILED, True, Action.RESTORE, Outcome.RESTORED, "old"),
    (Phase.RESTORING, True, Action.RESTORE, Outcome.RESTORED, "old"),
    (Phase.RESTORED, True, Action.START_APP, Outcome.RESTORED, "old"),
    (Phase.APP_STARTED, True, Action.START_APP, Outcome.RESTORED, "old"),
]


def test_the_cases_cover_every_recovery_action() -> None:
    assert {c[2] for c in CASES} == set(Action) == set(recovery.ACTIONS)
    assert {c[0] for c in CASES} | {Phase.RECEIVED} == set(RECOVERY)


@pytest.mark.parametrize(("phase", "failed", "action", "outcome", "expected"), CASES,
                         ids=[f"{c[0]}{'-after-failure' if c[1] else ''}" for c in CASES])
def test_recover_carries_out_each_row_of_the_table(
        cfg: config_mod.Config, shipped_bundle: Path, app: FakeApp, phase: Phase,
        failed: bool, action: Action, outcome: Outcome, expected: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = table_rows(cfg.database)
    if failed:
        app.fail_on.add("health_gate")  # the migrated database went live, then failed
    _crash_when(phase, failed, monkeypatch)
    with pytest.raises(Crash):
        _apply(cfg, shipped_bundle, app)
    monkeypatch.undo()
    j = _journal(cfg)
    assert not j.closed and j.phase is phase and j.recovery_action() is action
    assert recovery.recover(cfg, services=app, reporter=Reporter()) == outcome
    if expected == "old":
        _assert_old(cfg, before, app)
    else:
        _assert_migrated(cfg, app)
    assert _journal(cfg).outcome == outcome
    line = _history(cfg)[-1]
    assert set(line) == RECOVERY_KEYS
    # The downtime runs from the journal's stop to the start the recovery made.
    assert (line["downtime_s"] is None) == (action is Action.ABANDON)
    assert line["recovered"] is True and line["recovery_action"] == action
    assert line["outcome"] == outcome and line["run_id"] == j.run_id
    assert recovery.recover(cfg, services=app, reporter=Reporter()) is None


def test_swapping_with_the_rename_done_is_finished_forward(
        cfg: config_mod.Config, shipped_bundle: Path, app: FakeApp,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Dead between rename(2) and the journal write after it: the live inode decides."""
    real = swap.WorkingCopy.swap_in

    def rename_then_die(self: swap.WorkingCopy) -> None:
        real(self)
        raise Crash("after the rename")
    monkeypatch.setattr(swap.WorkingCopy, "swap_in", rename_then_die)
    monkeypatch.setattr(pipeline.Run, "fail", lambda self, err: (_ for _ in ()).throw(
        Crash("dead")))
    monkeypatch.setattr(pipeline, "_finish", lambda *a: None)
    with pytest.raises(Crash):
        _apply(cfg, shipped_bundle, app)
    monkeypatch.undo()
    j = _journal(cfg)
    assert j.phase is Phase.SWAPPING and swap.went_live(cfg.database, j)
    assert recovery.recover(cfg, services=app, reporter=Reporter()) == Outcome.APPLIED
    _assert_migrated(cfg, app)


# -- operator restore -------------------------------------------------------------------

@pytest.fixture
def applied(cfg: config_mod.Config, shipped_bundle: Path, app: FakeApp) -> Path:
    """A device after one applied run: the path of the run's backup (version 10)."""
    result = _apply(cfg, shipped_bundle, app)
    return Path(str(result.backup))


def test_operator_restore_enters_the_journal_in_failed(
        cfg: config_mod.Config, applied: Path, app: FakeApp) -> None:
    backup_rows = table_rows(applied)
    assert maintenance.restore(cfg, backup=applied, services=app, reporter=Reporter()) \
        == applied
    assert table_rows(cfg.database) == backup_rows and app.active
    j = _typed(_journal(cfg))
    assert [p for p, _t in j.phases] == ["failed", "restoring", "restored", "app_started",
                                         "closed"]
    assert j.outcome == Outcome.RESTORED and j.data["operation"] == "restore"
    line = _history(cfg)[-1]
    assert set(line) == RESTORE_KEYS
    assert isinstance(line["downtime_s"], float)  # from its entry (the stop) to the start
    assert line["operation"] == "restore" and line["outcome"] == "restored"


def test_operator_restore_killed_half_way_is_finished_by_recover(
        cfg: config_mod.Config, applied: Path, app: FakeApp,
        monkeypatch: pytest.MonkeyPatch) -> None:
    backup_rows = table_rows(applied)
    _crash_when(Phase.RESTORING, True, monkeypatch)
    with pytest.raises(Crash):
        maintenance.restore(cfg, backup=applied, services=app, reporter=Reporter())
    monkeypatch.undo()
    assert _journal(cfg).phase is Phase.RESTORING
    assert recovery.recover(cfg, services=app, reporter=Reporter()) == Outcome.RESTORED
    assert table_rows(cfg.database) == backup_rows and app.active

