"""The disk fills up during a run. The run fails cleanly (exit 4 or 5), nothing is lost,
the app runs on the old database.

Real tmpfs mounts (root only; skipped with the reason otherwise), filled by the test
when the run's journal reaches a phase, so the next write of that phase fails with
ENOSPC:

- the database directory (with the backup dir on the same filesystem, so the backup is
  a hard link) on a tmpfs with room for the run, filled by a "log writer" during the
  working copy and during the apply (``_filler`` leaves a little room and gives the
  space back once the run has failed, before it restarts the app);
- the backup dir alone on a tiny tmpfs, so the cross-filesystem backup copy cannot fit;
  and on its own tmpfs filled right after the stop, while the backup is being written;
- the journal: the state dir on its own tmpfs, filled as the app is being stopped (the
  app unit takes 1 s to stop, as a real app flushing its buffers may: a window no
  scheduler can close), so the next journal write (the one naming the backup just
  taken) and every one after it fail; and filled while the copy is migrated, so the
  ``validated`` write (just before the swap) fails (``Filler`` fills to the last byte
  and frees nothing until the run has exited);
- no room to restore: refused before the stop.

Every time: exit 4 or 5, the old data intact, the app running, no temp files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, Device, make_device, max_vitals_rowid, mount_tmpfs, table_rows
from fault_helpers import TALLY, before, journal_phase, leftovers, old_or_migrated, run_cli

from zmonitor_migrated import fsutil


def _device_on(root: Path, data_fs: Path, template: Path, pub: Path,
               backups_on_data_fs: bool = True) -> Device:
    dev = make_device(root, template, pub)
    # Move the database onto the small filesystem.
    shutil.move(str(dev.db), data_fs / "zmonitor.db")
    dev.db = data_fs / "zmonitor.db"
    dev.env["FAKE_SYSTEMCTL_DB"] = str(dev.db)
    # batch_size 1: the bundle's 25-row batches, so "applying" lasts long enough to fill
    # the disk in it.
    changes: dict[str, object] = {"database": str(dev.db), "batch_size": 1}
    if backups_on_data_fs:
        changes["backup_dir"] = str(data_fs / "backups")
    dev.set_config(**changes)
    return dev


def _filler(jpath: Path, phase: str, fs: Path, leave: int, log: list[str]) -> None:
    """When the journal reaches ``phase``, fill ``fs`` up to ``leave`` bytes free; give
    the space back once the run has failed (before it restarts the app)."""
    junk = fs / "app-logs.bin"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if json.loads(jpath.read_text())["phase"] == phase:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.001)
    # The run keeps writing while this fills, so the free space measured here shrinks
    # under us: write unbuffered in chunks until only ``leave`` is free or the
    # filesystem refuses, either of which is "full" for the run.
    with open(junk, "wb", buffering=0) as f:
        while (free := fsutil.free_bytes(fs)) > leave:
            try:
                f.write(b"\0" * min(free - leave, 4 * 1024 * 1024))
            except OSError as exc:
                log.append(f"filler: {exc}")
                break
    log.append(f"filled at {phase}: {fsutil.free_bytes(fs)} bytes left")
    while time.monotonic() < deadline:
        try:
            j = json.loads(jpath.read_text())
            if j.get("failed") or j.get("outcome"):
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.001)
    junk.unlink()


def _assert_intact(dev: Device, ref: dict[str, list[tuple[object, ...]]], upto: int) -> None:
    assert dev.app_active()
    assert table_rows(dev.db, vitals_up_to=upto) == ref
    left = [p.name for p in dev.db.parent.iterdir()
            if ".migrating-" in p.name or p.name.endswith(".restoring")]
    assert left == []


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["app_stopped", "applying"])
def test_database_filesystem_fills(tmp_path: Path, mounts: list[Path], big_db_v10: Path,
                                   slow_bundle: Path, release_key: tuple[Path, Path],
                                   phase: str) -> None:
    size = big_db_v10.stat().st_size
    fs = tmp_path / "datafs"
    # Room for the DB, its migrated copy with growth, the room the pre-check keeps to
    # restore the backup, and its margin.
    mount_tmpfs(fs, (4 * size + 4 * 1024 * 1024) // 1024, mounts)
    dev = _device_on(tmp_path / "dev", fs, big_db_v10, release_key[1])
    assert dev.systemctl("start", "zmonitor.service").returncode == 0
    try:
        upto = max_vitals_rowid(dev.db)
        ref = table_rows(dev.db, vitals_up_to=upto)
        log: list[str] = []
        # app_stopped: the working copy (written in that phase, before the backup link)
        # cannot be written; applying: the copy grows.
        leave = size // 2 if phase == "app_stopped" else 32 * 1024
        t = threading.Thread(target=_filler, args=(dev.root / "state" / "journal.json", phase,
                                                    fs, leave, log), daemon=True)
        t.start()
        proc = dev.cli("apply", str(slow_bundle))
        t.join(timeout=30)
        print(log, proc.stderr[-600:])
        assert any(line.startswith("filled") for line in log), log
        assert proc.returncode in (4, 5), proc.stderr
        assert any(w in proc.stderr for w in ("No space left", "full", "disk I/O error"))
        _assert_intact(dev, ref, upto)
        rec = dev.history()[-1]
        assert rec["outcome"] in ("restored", "precheck-failed")
    finally:
        dev.systemctl("stop", "zmonitor.service")


def test_backup_filesystem_too_small(tmp_path: Path, mounts: list[Path], sample_db_v10: Path,
                                     shipped_bundle: Path,
                                     release_key: tuple[Path, Path]) -> None:
    bfs = tmp_path / "backupfs"
    mount_tmpfs(bfs, 256, mounts)
    dev = make_device(tmp_path / "dev", sample_db_v10, release_key[1])
    dev.set_config(backup_dir=str(bfs))
    assert dev.systemctl("start", "zmonitor.service").returncode == 0
    try:
        upto = max_vitals_rowid(dev.db)
        ref = table_rows(dev.db, vitals_up_to=upto)
        proc = dev.cli("apply", str(shipped_bundle))
        assert proc.returncode in (4, 5), proc.stderr
        _assert_intact(dev, ref, upto)
        assert [p for p in bfs.iterdir() if p.suffix == ".db"] == []
        # Nothing here needs the app stopped to find out: it must be refused before.
        assert proc.returncode == 4, proc.stderr
        assert not any(c.startswith("stop") for c in dev.calls()[1:]), dev.calls()
        assert "[disk-space]" in proc.stderr and str(bfs) in proc.stderr
    finally:
        dev.systemctl("stop", "zmonitor.service")


def test_no_room_to_restore_is_refused_before_the_stop(tmp_path: Path, mounts: list[Path],
                                                       sample_db_v10: Path,
                                                       shipped_bundle: Path,
                                                       release_key: tuple[Path, Path]) -> None:
    """Room for the migrated copy but not for copying the backup back: a failure after
    the swap could not be undone, so the run is refused while the app still runs."""
    size = sample_db_v10.stat().st_size
    fs = tmp_path / "datafs"
    mount_tmpfs(fs, (2 * size + size // 2 + 2 * 1024 * 1024) // 1024, mounts)
    dev = _device_on(tmp_path / "dev", fs, sample_db_v10, release_key[1])
    assert dev.systemctl("start", "zmonitor.service").returncode == 0
    try:
        upto = max_vitals_rowid(dev.db)
        ref = table_rows(dev.db, vitals_up_to=upto)
        proc = dev.cli("apply", str(shipped_bundle))
        assert proc.returncode == 4, proc.stderr
        assert "[disk-space]" in proc.stderr and "room to restore" in proc.stderr
        assert "stop zmonitor.service" not in dev.calls()
        _assert_intact(dev, ref, upto)
    finally:
        dev.systemctl("stop", "zmonitor.service")


# -- the backup and the journal's filesystem ---------------------------------------------

class Filler:
    """Fills ``fs`` when ``journal`` shows ``phase``; frees it when told to."""

    def __init__(self, journal: Path, phase: str, fs: Path) -> None:
        self.journal, self.phase, self.fs = journal, phase, fs
        self.junk = fs / "junk.bin"
        self.filled_at: str | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.done.is_set() and time.monotonic() < deadline:
            if journal_phase(self.journal) == self.phase:
                free = fsutil.free_bytes(self.fs)
                try:
                    fd = os.open(self.junk, os.O_WRONLY | os.O_CREAT, 0o600)
                except OSError:
                    fd = -1  # already full
                if fd >= 0:
                    for chunk in (1 << 20, 4096):
                        try:
                            while True:
                                os.write(fd, b"\0" * chunk)
                        except OSError:
                            pass
                    os.close(fd)
                self.filled_at = f"{self.phase} ({free} B free before filling)"
                self.filled_at = f"{self.phase} ({fsutil.free_bytes(self.fs)} B free)"
                return
            time.sleep(0.0005)

    def release(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)
        self.junk.unlink(missing_ok=True)


def _device(tmp: Path, template: Path, pub: Path, **config: object) -> Device:
    dev = make_device(tmp / "dev", template, pub)
    if config:
        dev.set_config(**config)
    assert dev.systemctl("start", "zmonitor.service").returncode == 0
    return dev


def _slow_stop(dev: Device, seconds: float) -> None:
    """The app unit takes ``seconds`` to stop, then the stand-in stops the monitor."""
    (dev.root / "systemctl").write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do [ "$a" = stop ] && sleep {seconds}; done\n'
        f'exec {sys.executable} {ROOT / "tests" / "fake_systemctl.py"} "$@"\n')


def _run_filled(dev: Device, bundle: Path, fs: Path, phase: str, label: str) -> None:
    ref = before(dev)
    filler = Filler(dev.root / "state" / "journal.json", phase, fs)
    try:
        proc = run_cli(dev, "apply", str(bundle))
    finally:
        filler.release()
    print(label, filler.filled_at, proc.returncode)
    print(proc.stderr[-1500:])
    assert filler.filled_at, f"{label}: the run never reached {phase}"
    TALLY.faults[f"ENOSPC {label}"] += 1
    TALLY.outcomes[f"exit {proc.returncode}"] += 1
    assert proc.returncode in (4, 5), proc.stderr
    if not dev.app_active():
        TALLY.app_left_stopped.append(label)
    assert dev.app_active(), f"{label}: app left stopped"
    try:
        assert old_or_migrated(dev, ref) == "old"
    except AssertionError as exc:
        TALLY.data_lost.append(f"{label}: {exc}")
        raise
    assert leftovers(dev) == []


@pytest.mark.slow
def test_backup_filesystem_fills_during_backup(tmp_path: Path, mounts: list[Path],
                                               big_db_v10: Path, shipped_bundle: Path,
                                               release_key: tuple[Path, Path]) -> None:
    size = big_db_v10.stat().st_size
    bfs = tmp_path / "backupfs"
    mount_tmpfs(bfs, (2 * size) // 1024, mounts)
    dev = _device(tmp_path, big_db_v10, release_key[1], backup_dir=str(bfs))
    try:
        _run_filled(dev, shipped_bundle, bfs, "app_stopped", "backup")
    finally:
        dev.systemctl("stop", "zmonitor.service")


@pytest.mark.slow
@pytest.mark.parametrize(("phase", "label"), [("app_stopped", "journal write (backup taken)"),
                                              ("applying", "journal write (validated)")])
def test_state_filesystem_fills(tmp_path: Path, mounts: list[Path], sample_db_v10: Path,
                                big_db_v10: Path, shipped_bundle: Path, slow_bundle: Path,
                                release_key: tuple[Path, Path], phase: str,
                                label: str) -> None:
    sfs = tmp_path / "statefs"
    if phase == "applying":
        # The big database with the bundle's 25-row batches (batch_size 1): "applying"
        # lasts seconds, so the filler cannot miss it on a loaded machine. Room for the
        # rehearsal's snapshot.
        mount_tmpfs(sfs, 4 * big_db_v10.stat().st_size // 1024, mounts)
        dev = _device(tmp_path, big_db_v10, release_key[1], state_dir=str(sfs),
                      batch_size=1)
        bundle = slow_bundle
    else:
        mount_tmpfs(sfs, 24 * 1024, mounts)
        dev = _device(tmp_path, sample_db_v10, release_key[1], state_dir=str(sfs))
        bundle = shipped_bundle
        # The journal shows app_stopped from before the stop until the backup is taken;
        # a slow stop makes that window a second long. (Aiming at backed_up instead
        # missed about one run in 15: its window, up to the next journal write, is
        # microseconds.)
        _slow_stop(dev, 1.0)
    # the device helpers look for the state under root/state
    (dev.root / "state").symlink_to(sfs)
    try:
        _run_filled(dev, bundle, sfs, phase, label)
        rec = run_cli(dev, "recover")
        assert rec.returncode == 0, rec.stderr
        assert dev.app_active()
    finally:
        dev.systemctl("stop", "zmonitor.service")
