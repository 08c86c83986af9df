"""The disk fills up during a run. The run fails cleanly (exit 4 or 5), nothing
is lost, the app runs on the old database.

Real tmpfs mounts (root only; skipped with the reason otherwise):

- the database directory (with the backup dir on the same filesystem, so the backup is
  a hard link) on a tmpfs with room for the run; once the journal shows the phase, a
  "log writer" fills the filesystem: during the working copy, and during the apply;
- the backup dir alone on a tiny tmpfs, so the cross-filesystem backup copy cannot fit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Device, make_device, max_vitals_rowid, table_rows

from zmonitor_migrated import fsutil


def _mount(path: Path, size_kb: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}"
        print(reason)
        pytest.skip(reason)


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        reason = "mounting a tmpfs needs root and mount(8)"
        print(reason)
        pytest.skip(reason)
    done: list[Path] = []
    yield done
    for m in reversed(done):
        subprocess.run(["umount", "-l", str(m)], check=False)


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
    _mount(fs, (4 * size + 4 * 1024 * 1024) // 1024)
    mounts.append(fs)
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
    _mount(bfs, 256)
    mounts.append(bfs)
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
    _mount(fs, (2 * size + size // 2 + 2 * 1024 * 1024) // 1024)
    mounts.append(fs)
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
