"""The guards of the downtime path, each exercised by the case only it can refuse.

The rehearsal refuses every broken migration before the stop, so a migration that
breaks only *after* the stop is needed to reach the downtime's own guards: its
behaviour depends on what only the real run sees —

- a vitals row the app writes after the rehearsal (the test writes it as the app would,
  while the app still runs: the app unit takes 1.5 s to stop, as a real app flushing its
  buffers may), or
- the ``zmonitor_migrated_bundles`` row only the real run records before validating.

Then the writers the quiesce and the swap must catch, each in the one form no other
guard sees: a process that holds a write lock without writing (only ``BEGIN
IMMEDIATE`` sees it), a WAL writer that commits and keeps its connection (only the
``-wal`` size check sees it: the main file is untouched), a rollback-journal writer with
``synchronous=OFF`` holding an open transaction across the swap (only removing the old
file's ``-journal`` before the rename keeps it from being replayed into the migrated
database), and a downtime budget that runs out while the app takes its time to stop.

Every refusal: exit 5 with its kind, every row intact — the rows before the run
compared row by row, and every vitals row the app wrote up to the stop (ids have no
gap: nothing was deleted) — and the app running.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Device, add_migration, build_variant, make_device, mount_tmpfs
from fault_helpers import Before, before, journal_phase, leftovers, old_or_migrated

VITALS_COLUMNS = ("timestamp, patient_id, patient_mrn, heart_rate, spo2, respiration_rate, "
                  "temperature, blood_pressure_systolic, blood_pressure_diastolic, device_id, "
                  "device_label")


def copy_vitals_row_sql(marker: str) -> str:
    """A vitals row as the app records it (copied from the first one), labelled."""
    values = VITALS_COLUMNS.replace("device_id, device_label", f"'{marker}', '{marker}'")
    return (f"INSERT INTO vitals ({VITALS_COLUMNS}) SELECT {values} FROM vitals "
            "ORDER BY id LIMIT 1")


def slow_stop(dev: Device, seconds: float) -> None:
    """The app unit takes ``seconds`` to stop (before the stand-in stops the monitor)."""
    wrapper = dev.root / "systemctl"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do [ "$a" = stop ] && sleep {seconds}; done\n'
        f'exec {sys.executable} {ROOT / "tests" / "fake_systemctl.py"} "$@"\n')


def apply_json(dev: Device, bundle: Path, *args: str,
               timeout: float = 180) -> tuple[int, dict[str, object], str]:
    proc = dev.cli("apply", str(bundle), "--json", *args, timeout=timeout)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, (proc.stdout, proc.stderr[-3000:])
    return proc.returncode, json.loads(lines[0]), proc.stderr


def error_kind(out: dict[str, object]) -> str:
    err = out.get("error")
    assert isinstance(err, dict), out
    return str(err["kind"])


def vitals_ids_without_gap(db: Path) -> bool:
    conn = sqlite3.connect(db)
    try:
        n, top = conn.execute("SELECT COUNT(*), MAX(id) FROM vitals").fetchone()
    finally:
        conn.close()
    return bool(n == top)


def has_vitals_marker(db: Path, marker: str) -> bool:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT COUNT(*) FROM vitals WHERE device_id = ?",
                            (marker,)).fetchone()[0] == 1
    finally:
        conn.close()


def assert_old_and_whole(dev: Device, ref: Before, *, app: bool = True) -> None:
    """The old database with every row: those before the run row by row, and every vitals
    row written since (the ids have no gap); the run left nothing behind."""
    assert old_or_migrated(dev, ref) == "old"
    assert vitals_ids_without_gap(dev.db), "a vitals row written during the run was lost"
    assert leftovers(dev) == []
    journal = json.loads((dev.root / "state" / "journal.json").read_text())
    assert journal.get("outcome"), journal
    if app:
        assert dev.app_active(), "the app was left stopped"


def wait_for_phase(journal: Path, phases: set[str], proc: subprocess.Popen[str],
                   timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        phase = journal_phase(journal)
        if phase in phases:
            return phase
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) in {phase} before "
                                 f"reaching {phases}: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.001)
    raise AssertionError(f"the run never reached {phases}")


def popen_apply(dev: Device, bundle: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "zmonitor_migrated.cli", "--config", str(dev.config_path),
         "apply", str(bundle), "--json", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=dev.env, cwd=ROOT)


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> tuple[int, dict[str, object],
                                                                       str]:
    out, err = proc.communicate(timeout=timeout)
    lines = out.splitlines()
    assert len(lines) == 1, (out, err[-3000:])
    return proc.returncode, json.loads(lines[0]), err


def apply_stepping_at_applying(dev: Device, bundle: Path, writer: Helper
                                ) -> tuple[int, dict[str, object], str]:
    """``apply`` in a subprocess; ``writer`` takes its next step once the journal shows
    ``applying`` (while the copy is migrated, the live file untouched), then the run
    finishes. The step must land inside that phase, or the test proves nothing."""
    proc = popen_apply(dev, bundle)
    try:
        journal = dev.root / "state" / "journal.json"
        wait_for_phase(journal, {"applying"}, proc)
        writer.step()
        assert journal_phase(journal) == "applying", "the writer's step came too late"
        return finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()


class Helper:
    """A second process on the live database, driven line by line through stdin: each
    line sent runs the next step of its script, and it answers each with a line."""

    def __init__(self, db: Path, steps: list[str], env: dict[str, str]) -> None:
        body = "".join(
            f"sys.stdin.readline()\n{textwrap.dedent(step)}\nprint('ok', flush=True)\n"
            for step in steps)
        script = ("import os, sqlite3, sys\n"
                  f"conn = sqlite3.connect({str(db)!r}, isolation_level=None, timeout=10)\n"
                  f"{body}"
                  "sys.stdin.readline()\n"
                  "os._exit(0)  # gone without closing, like a killed process\n")
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def step(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer.strip() == "ok", f"helper failed: {answer!r}"

    def end(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write("end\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def helpers() -> Iterator[list[Helper]]:
    made: list[Helper] = []
    yield made
    for h in made:
        if h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait()




# -- the rehearsal's verdict ---------------------------------------------------------------

def test_a_migration_that_loses_rows_is_refused_by_the_rehearsal_before_the_stop(
        tmp_path: Path, device: Device, release_key: tuple[Path, Path]) -> None:
    bundle = build_variant(tmp_path / "loses.zmb", release_key[0], 1, edit=lambda s:
                           add_migration(s, 15, "DELETE FROM alarms;\n"))
    ref = before(device)
    code, out, err = apply_json(device, bundle)
    assert code == 4, err[-3000:]
    assert error_kind(out) == "rehearsal-validation"
    assert "table alarms lost rows" in str(out["error"])
    assert not [c for c in device.calls() if c.startswith("stop")], \
        "the app was stopped for a bundle the rehearsal had refused"
    assert_old_and_whole(device, ref)


def test_no_room_for_the_rehearsal_is_refused_by_name_before_the_stop(
        tmp_path: Path, sample_db_v10: Path, shipped_bundle: Path,
        release_key: tuple[Path, Path], mounts: list[Path]) -> None:
    """The state dir (where the rehearsal's snapshot goes) on a tmpfs with room for the
    bundle but not for a snapshot of the database: refused as ``disk-space`` naming the
    directory, before the snapshot is written and before the stop."""
    state = tmp_path / "statefs"
    mount_tmpfs(state, 2048, mounts)  # the bundle and its extraction fit, a snapshot not
    dev = make_device(tmp_path / "dev", sample_db_v10, release_key[1])
    dev.set_config(state_dir=str(state))
    assert dev.systemctl("start", "zmonitor.service").returncode == 0
    try:
        ref = before(dev)
        code, out, err = apply_json(dev, shipped_bundle)
        assert code == 4, err[-3000:]
        assert error_kind(out) == "disk-space", out
        assert "not enough space for the rehearsal" in str(out["error"])
        assert not [c for c in dev.calls() if c.startswith("stop")]
        assert old_or_migrated(dev, ref) == "old"
        assert dev.app_active()
    finally:
        dev.systemctl("stop", "zmonitor.service")


# -- the downtime validation's verdict, its post checks, its row counts ---------------------

def test_a_post_check_that_fails_only_after_the_stop_restores_the_old_database(
        tmp_path: Path, device: Device, release_key: tuple[Path, Path]) -> None:
    """The check passes on the rehearsal's snapshot and fails on the real copy, which
    records the bundle before it is validated."""
    def edit(src: Path) -> None:
        post = src / "checks" / "post.yaml"
        post.write_text(post.read_text() + textwrap.dedent("""
            - name: no_bundle_recorded_yet
              sql: >-
                SELECT COUNT(*) FROM sqlite_master
                WHERE name = 'zmonitor_migrated_bundles'
              expect: 0
            """))
    bundle = build_variant(tmp_path / "post.zmb", release_key[0], 1, edit=edit)
    ref = before(device)
    code, out, err = apply_json(device, bundle)
    assert code == 5, err[-3000:]
    assert error_kind(out) == "validation-failed"
    assert "no_bundle_recorded_yet" in str(out["error"])
    assert [c for c in device.calls() if c.startswith("stop")], "never reached the stop"
    assert_old_and_whole(device, ref)


def test_rows_lost_only_after_the_stop_are_refused_by_the_row_counts(
        tmp_path: Path, device: Device, release_key: tuple[Path, Path]) -> None:
    """Migration 15 deletes the alarms when a vitals row labelled GUARD-MARKER exists.
    The app records that row after the rehearsal (which saw no such row and passed),
    before the stop: only the real run loses the alarms, and only the row counts of the
    validation after the stop can see it (no post check looks at alarms)."""
    bundle = build_variant(tmp_path / "marker.zmb", release_key[0], 1, edit=lambda s:
                           add_migration(s, 15, "DELETE FROM alarms WHERE EXISTS (SELECT 1 "
                                         "FROM vitals WHERE device_id = 'GUARD-MARKER');\n"))
    slow_stop(device, 1.5)
    ref = before(device)
    proc = popen_apply(device, bundle)
    try:
        wait_for_phase(device.root / "state" / "journal.json", {"prechecked", "app_stopped"},
                       proc)
        conn = sqlite3.connect(device.db, isolation_level=None, timeout=10)
        try:
            conn.execute(copy_vitals_row_sql("GUARD-MARKER"))
        finally:
            conn.close()
        assert not [c for c in device.calls() if c.startswith("stop")], \
            "the marker came too late: the app was already stopping"
        code, out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 5, err[-3000:]
    assert error_kind(out) == "validation-failed"
    assert "table alarms lost rows" in str(out["error"])
    assert_old_and_whole(device, ref)
    assert has_vitals_marker(device.db, "GUARD-MARKER")


def test_rows_written_between_the_precheck_and_the_stop_are_protected_too(
        tmp_path: Path, device: Device, release_key: tuple[Path, Path]) -> None:
    """Migration 15 deletes the vitals labelled GUARD-LATE. The app records three such
    rows after the rehearsal, before the stop: only the real run deletes them, and the
    hundreds of rows the app recorded since the pre-check hide the loss from a count
    taken at the pre-check. Every row that existed when the app was stopped must
    survive."""
    bundle = build_variant(tmp_path / "late.zmb", release_key[0], 1, edit=lambda s:
                           add_migration(s, 15, "DELETE FROM vitals WHERE device_id = "
                                         "'GUARD-LATE';\n"))
    slow_stop(device, 1.5)
    ref = before(device)
    proc = popen_apply(device, bundle)
    try:
        wait_for_phase(device.root / "state" / "journal.json", {"prechecked", "app_stopped"},
                       proc)
        conn = sqlite3.connect(device.db, isolation_level=None, timeout=10)
        try:
            for _ in range(3):
                conn.execute(copy_vitals_row_sql("GUARD-LATE"))
        finally:
            conn.close()
        assert not [c for c in device.calls() if c.startswith("stop")], \
            "the rows came too late: the app was already stopping"
        code, _out, _err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 5, f"exit {code}: the run was accepted with the GUARD-LATE rows deleted"
    assert_old_and_whole(device, ref)


# -- the downtime budget --------------------------------------------------------------------

def test_the_downtime_budget_aborts_a_run_that_overruns_it_after_the_stop(
        tmp_path: Path, device: Device, shipped_bundle: Path) -> None:
    """The rehearsal fits the budget easily; the app then takes longer to stop than the
    whole budget: the run is aborted at its first safe point and restored."""
    device.set_config(max_downtime_s=3)
    slow_stop(device, 4)
    ref = before(device)
    code, out, err = apply_json(device, shipped_bundle)
    assert code == 5, err[-3000:]
    assert error_kind(out) == "interrupted"
    assert "max_downtime_s=3 ran out" in str(out["error"])
    assert_old_and_whole(device, ref)


# -- writers the quiesce and the swap must catch ------------------------------------------

@pytest.fixture
def quiet_device(tmp_path: Path, sample_db_v10: Path,
                 release_key: tuple[Path, Path]) -> Device:
    """No app unit: the database stays in rollback-journal mode, as the sample ships."""
    return make_device(tmp_path / "quiet", sample_db_v10, release_key[1], app_unit=None)


def test_a_write_lock_held_at_the_stop_is_refused_and_its_rows_kept(
        quiet_device: Device, shipped_bundle: Path, helpers: list[Helper]) -> None:
    """A process holds ``BEGIN IMMEDIATE`` (it has written nothing yet: no journal file,
    the file unchanged; readers are not blocked, so the pre-checks and the rehearsal
    pass). Only the quiesce's own ``BEGIN IMMEDIATE`` sees it. Its rows, committed after
    the refusal, are in the live database."""
    dev = quiet_device
    ref = before(dev)
    holder = Helper(dev.db, ["conn.execute('BEGIN IMMEDIATE')",
                             f"conn.execute({copy_vitals_row_sql('GUARD-HELD')!r})\n"
                             "conn.execute('COMMIT')"], dev.env)
    helpers.append(holder)
    holder.step()
    code, out, err = apply_json(dev, shipped_bundle)
    assert code == 5, err[-3000:]
    assert error_kind(out) == "database-locked"
    holder.step()
    holder.end()
    assert_old_and_whole(dev, ref, app=False)
    assert has_vitals_marker(dev.db, "GUARD-HELD")


def test_a_reader_holding_an_old_snapshot_at_the_stop_is_named_as_a_lock(
        device: Device, shipped_bundle: Path, helpers: list[Helper]) -> None:
    """A second process keeps a read transaction open on the WAL database (readers do
    not block the pre-checks, the rehearsal or ``BEGIN IMMEDIATE``). The quiesce's
    ``wal_checkpoint(TRUNCATE)`` cannot empty the WAL past its snapshot and reports
    busy: refused as ``database-locked``, naming the cause, nothing lost."""
    ref = before(device)
    reader = Helper(device.db, ["conn.execute('BEGIN')\n"
                                "conn.execute('SELECT COUNT(*) FROM vitals').fetchone()"],
                    device.env)
    helpers.append(reader)
    reader.step()
    time.sleep(0.2)  # the app commits more rows after the reader's snapshot
    code, out, err = apply_json(device, shipped_bundle)
    reader.end()
    assert code == 5, err[-3000:]
    assert error_kind(out) == "database-locked"
    assert "still locked by another process" in str(out["error"])
    assert_old_and_whole(device, ref)


def test_a_wal_commit_while_the_app_is_stopped_is_refused_and_its_row_kept(
        tmp_path: Path, big_db_v10: Path, slow_bundle: Path,
        release_key: tuple[Path, Path], helpers: list[Helper]) -> None:
    """While the copy is migrated, another process commits a row into the live WAL
    database and keeps its connection open: the main file is untouched (no checkpoint),
    only its ``-wal`` grew. The swap is refused; the row is in the database the app
    restarts on."""
    dev = make_device(tmp_path / "dev", big_db_v10, release_key[1])
    dev.set_config(batch_size=1)
    assert dev.systemctl("start", "zmonitor.service").returncode == 0
    try:
        ref = before(dev)
        writer = Helper(dev.db, [f"conn.execute({copy_vitals_row_sql('GUARD-WAL')!r})"],
                        dev.env)
        helpers.append(writer)
        code, out, err = apply_stepping_at_applying(dev, slow_bundle, writer)
        assert code == 5, err[-3000:]
        assert error_kind(out) == "concurrent-writer"
        writer.end()
        assert_old_and_whole(dev, ref)
        assert has_vitals_marker(dev.db, "GUARD-WAL")
    finally:
        dev.systemctl("stop", "zmonitor.service")


def test_an_open_rollback_journal_of_the_old_file_is_not_replayed_into_the_migrated_one(
        tmp_path: Path, big_db_v10: Path, slow_bundle: Path,
        release_key: tuple[Path, Path], helpers: list[Helper]) -> None:
    """A writer with ``synchronous=OFF`` opens a write transaction on the live file
    (rollback-journal mode) while the copy is migrated: its ``-journal`` holds old pages,
    the main file is untouched. It still holds the transaction at the swap and then dies.
    Had the ``-journal`` stayed beside the live path, the next open would take it for a
    hot journal of the migrated file and write the old pages into it."""
    dev = make_device(tmp_path / "dev", big_db_v10, release_key[1], app_unit=None)
    dev.set_config(batch_size=1)
    ref = before(dev)
    writer = Helper(dev.db, ["conn.execute('PRAGMA synchronous=OFF')\n"
                             "conn.execute('BEGIN')\n"
                             "conn.execute(\"UPDATE patients SET name = name || 'x'\")\n"
                             "conn.execute('UPDATE vitals SET heart_rate = heart_rate + 1 "
                             "WHERE id <= 200')\n"
                             f"assert os.path.getsize({str(dev.db) + '-journal'!r}) > 0"],
                    dev.env)
    helpers.append(writer)
    code, _out, err = apply_stepping_at_applying(dev, slow_bundle, writer)
    writer.end()  # dies holding the transaction, as a killed writer would
    assert code == 0, err[-3000:]
    # Opened read-write, as the app opens it: a hot journal would be rolled back now.
    conn = sqlite3.connect(dev.db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    assert old_or_migrated(dev, ref) == "migrated"
    assert leftovers(dev) == []
