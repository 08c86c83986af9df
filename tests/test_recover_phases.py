"""``recover`` from every journal phase, with the live file swapped and not swapped.

Each case builds, with real files, the state a run leaves when it dies at the start of a
phase: the journal written by ``Journal`` through the same legal transitions and with
the same data the pipeline records, the migrated private copy (a copy of the live file
migrated by the engine), the backup (a hard link to the original inode with its sha256
sidecar), and, for "swapped", the copy renamed over the live path. Then the real
``recover`` CLI runs, and the outcome must be what ``journal.RECOVERY`` says for that
phase, decided from the live file's inode:

- before the stop (received, verified, prechecked): abandoned, app still running;
- not swapped, any later phase: the old database, untouched (a closed forward run in
  ``swapped``/``app_started`` whose live inode is still the old one is not believed);
- swapped in swapping, swapped, app_started, committed: the migrated database, the run
  committed after the health gate;
- swapped before the journal said so (app_stopped … validated), or in failed/restoring:
  the backup restored;
- restored, app_started after a failure: whatever the restore put live, app started.

Every time: every row intact (old) or the valid migrated database, the journal closed,
no temporary file, the app running.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import SHIPPED, Device
from fault_helpers import Before, before, leftovers, old_or_migrated

from zmonitor_migrated import backup as backups
from zmonitor_migrated import fsutil, sources
from zmonitor_migrated.engine import Engine
from zmonitor_migrated.journal import RECOVERY, Journal, Phase

P = Phase
FORWARD = [P.RECEIVED, P.VERIFIED, P.PRECHECKED, P.APP_STOPPED, P.BACKED_UP, P.APPLYING,
           P.VALIDATED, P.SWAPPING, P.SWAPPED, P.APP_STARTED, P.COMMITTED]
PRE_STOP = {P.RECEIVED, P.VERIFIED, P.PRECHECKED}

# (phase the run died in, after a failure?, live file swapped?) -> expected database
CASES: list[tuple[str, bool, bool, str]] = [
    *[(p.value, False, False, "old") for p in FORWARD if p is not P.COMMITTED],
    *[(p.value, False, True, "old") for p in (P.BACKED_UP, P.APPLYING, P.VALIDATED)],
    *[(p.value, False, True, "migrated") for p in (P.SWAPPING, P.SWAPPED, P.APP_STARTED,
                                                     P.COMMITTED)],
    *[(p.value, True, swapped, "old") for p in (P.FAILED, P.RESTORING, P.RESTORED,
                                                P.APP_STARTED)
      for swapped in (False, True)],
]


def test_the_cases_cover_every_phase_of_the_recovery_table() -> None:
    covered = {Phase(p) for p, *_ in CASES}
    assert covered == set(RECOVERY)


def _stop_app(dev: Device) -> None:
    assert dev.systemctl("stop", "zmonitor.service").returncode == 0
    assert not dev.app_active()


def _swap(dev: Device, copy: Path) -> None:
    fsutil.remove_sidecars(dev.db)
    os.replace(copy, dev.db)
    fsutil.fsync_dir(dev.db.parent)


def _data(dev: Device, step: Phase, copy: Path) -> dict[str, object]:
    """What the pipeline records at the start of ``step``, after doing the work the
    previous phase ends with."""
    if step is P.VERIFIED:
        return {"bundle_name": "zmonitor", "sequence": 1, "manifest_sha256": "0" * 64}
    if step is P.PRECHECKED:
        return {"from_version": 10, "to_version": 14, "estimate_s": 0.5}
    if step is P.APP_STOPPED:
        return {"copy": str(copy), "live_inode": os.stat(dev.db).st_ino,
                "app_unit": "zmonitor.service"}
    if step is P.BACKED_UP:
        shutil.copyfile(dev.db, copy)
        bk = backups.take(dev.db, dev.root / "backups", 10)
        return {"backup": str(bk.path), "backup_sha256": bk.sha256,
                "backup_linked": bk.linked, "journal_mode": "wal"}
    if step is P.APPLYING:
        return {"migration": 11}
    if step is P.VALIDATED:
        with Engine(copy, fast=True) as eng:
            eng.apply(sources.load(SHIPPED))
    if step is P.APP_STARTED:
        assert dev.systemctl("start", "zmonitor.service").returncode == 0
    return {}


def _build(dev: Device, phase: Phase, after_failure: bool, swapped: bool) -> Before:
    """The files and the journal of a run that died at the start of ``phase``."""
    state = dev.root / "state"
    state.mkdir(exist_ok=True)
    if phase not in PRE_STOP:
        _stop_app(dev)
    ref = before(dev)
    j = Journal.create(state / "journal.json", bundle="zmonitor-1.zmb",
                       database=str(dev.db), dry_run=False, rollback_to=None)
    (state / "runs" / j.run_id).mkdir(parents=True)
    copy = dev.db.with_name(f"{dev.db.name}.migrating-{j.run_id}")
    last = phase
    if after_failure:  # the failure came after the swap, or before it
        last = P.APP_STARTED if swapped else P.VALIDATED
    for step in FORWARD[1:FORWARD.index(last) + 1]:
        if step is P.SWAPPED and swapped:
            _swap(dev, copy)  # the rename is between these two journal writes
        j.advance(step, **_data(dev, step, copy))
        if step is P.SWAPPING and swapped and last is P.SWAPPING:
            _swap(dev, copy)
    if swapped and FORWARD.index(last) < FORWARD.index(P.SWAPPING):
        _swap(dev, copy)  # the live file changed before the journal said so
    if after_failure:
        if dev.app_active():
            _stop_app(dev)  # it crashed in the health gate
        tail = [P.FAILED, P.RESTORING, P.RESTORED, P.APP_STARTED]
        for step in tail[:tail.index(phase) + 1]:
            if step is P.RESTORED:
                # What the restore did before recording it: the backup copied back over
                # the migrated file if it had gone live, the copy and a backup link to
                # the live inode discarded.
                bk = Path(str(j.data["backup"]))
                if swapped:
                    tmp = dev.db.with_name(dev.db.name + ".restoring")
                    fsutil.copy_durable(bk, tmp)
                    _swap(dev, tmp)
                else:
                    fsutil.remove(copy)
                    fsutil.remove(bk)
                    fsutil.remove(backups.checksum_path(bk))
            data: dict[str, object] = {}
            if step is P.FAILED:
                data = {"error": {"kind": "test", "message": "the health gate failed"}}
            elif step is P.RESTORED:
                data = {"restored_backup": swapped}
            elif step is P.APP_STARTED:
                assert dev.systemctl("start", "zmonitor.service").returncode == 0
            j.advance(step, **data)
    assert j.phase is phase and j.failed is after_failure
    return ref


@pytest.mark.parametrize(("phase", "after_failure", "swapped", "expected"), CASES,
                         ids=[f"{p}-{'after-fail-' if f else ''}"
                              f"{'swapped' if s else 'not-swapped'}" for p, f, s, _ in CASES])
def test_recover_finishes_the_run_from_its_phase(device: Device, phase: str,
                                                 after_failure: bool, swapped: bool,
                                                 expected: str) -> None:
    ref = _build(device, Phase(phase), after_failure, swapped)
    proc = device.cli("recover", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert old_or_migrated(device, ref) == expected
    journal = json.loads((device.root / "state" / "journal.json").read_text())
    assert journal.get("outcome"), journal
    if expected == "migrated":
        assert journal["outcome"] == "applied", journal
    elif Phase(phase) in PRE_STOP:
        assert journal["outcome"] == "abandoned", journal
    else:
        assert journal["outcome"] in ("restored", "recovered-old"), journal
    assert device.app_active(), "recover left the app stopped"
    assert leftovers(device) == []
    if expected == "old" and Phase(phase) not in PRE_STOP:
        # The backup of an unswapped run was a link to the live inode: not kept.
        live = os.stat(device.db)
        for bk in backups.list_backups(device.db, device.root / "backups"):
            st = os.stat(bk)
            assert (st.st_ino, st.st_dev) != (live.st_ino, live.st_dev), bk
