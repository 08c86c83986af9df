"""Issue 4: ``zmonitor-migrate daemon`` as a real subprocess with a real NOTIFY_SOCKET
(a unix datagram socket bound here), an inbox on disk and the simulated monitor."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Device, add_migration, build_variant, make_device, max_vitals_rowid, table_rows
from test_run import tamper, version


class Daemon:
    def __init__(self, dev: Device, sock_dir: Path) -> None:
        self.dev = dev
        self.path = sock_dir / "notify.sock"
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        env = {**dev.env, "NOTIFY_SOCKET": str(self.path)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zmonitor_migrated.cli", "--config", str(dev.config_path),
             "daemon"], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.extend(data.decode().splitlines())

    def wait_for(self, what: Callable[[], bool], timeout: float = 60, label: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {label}; daemon exit "
                             f"{self.proc.poll()}; messages {self.messages[-5:]}")

    def ready(self) -> None:
        self.wait_for(lambda: "READY=1" in self.messages, label="READY=1")

    def terminate(self, timeout: float = 60) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=timeout)
        time.sleep(0.2)
        self._stop = True
        self._reader.join(timeout=2)
        self.sock.close()
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self._stop = True
        self.sock.close()


def drop(src: Path, inbox: Path, name: str | None = None) -> Path:
    """Write as a .partial, rename into place (the documented inbox contract)."""
    inbox.mkdir(parents=True, exist_ok=True)
    name = name or src.name
    part = inbox / (name + ".partial")
    shutil.copyfile(src, part)
    os.utime(part, (time.time() - 5, time.time() - 5))  # settled: no SETTLE_S wait
    dest = inbox / name
    os.rename(part, dest)
    return dest


def phase(dev: Device) -> str | None:
    try:
        return str(json.loads((dev.root / "state" / "journal.json").read_text())["phase"])
    except (FileNotFoundError, ValueError):
        return None


def journal(dev: Device) -> dict[str, object]:
    return json.loads((dev.root / "state" / "journal.json").read_text())


def archived(dev: Device) -> list[str]:
    d = dev.root / "state" / "archive"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def rejected(dev: Device) -> list[str]:
    d = dev.root / "state" / "rejected"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _noop_migration(v: int) -> Callable[[Path], None]:
    def edit(src: Path) -> None:
        for k in range(15, v + 1):
            add_migration(src, k, f"UPDATE patients SET name = name WHERE rowid < -{k};\n",
                          f"UPDATE patients SET name = name WHERE rowid < -{k};\n",
                          name=f"noop_{k}")
    return edit


@pytest.mark.slow
def test_daemon_inbox(device: Device, shipped_bundle: Path, tmp_path: Path,
                      release_key: tuple[Path, Path]) -> None:
    inbox = device.root / "inbox"
    d = Daemon(device, tmp_path)
    try:
        d.ready()
        assert "READY=1" in d.messages

        # A bundle renamed into the inbox is applied and archived with its run id.
        drop(shipped_bundle, inbox)
        d.wait_for(lambda: len(archived(device)) == 1, label="archive")
        assert version(device.db) == 14 and device.app_active()
        rec = device.history()[-1]
        assert archived(device) == [f"{rec['run_id']}-{shipped_bundle.name}"]
        assert list(inbox.iterdir()) == []
        status = [m for m in d.messages if m.startswith("STATUS=")]
        assert any(m.startswith("STATUS=applying 0012 batch ") and "%" in m for m in status), \
            status
        assert any("app_stopped" in m for m in status) and any("swapped" in m for m in status)
        assert "WATCHDOG=1" in d.messages

        # Tampered: rejected with a reason.
        bad = tamper(shipped_bundle, tmp_path / "bad.zmb",
                     "migrations/schema/0011_schema_add_vitals_early_warning_score.sql")
        drop(bad, inbox, "tampered.zmb")
        d.wait_for(lambda: "tampered.zmb.reason.json" in rejected(device), label="reject")
        reason = json.loads((device.root / "state" / "rejected" / "tampered.zmb.reason.json"
                             ).read_text())
        assert reason["kind"] == "hash-mismatch" and reason["message"] and reason["time"]
        assert "tampered.zmb" in rejected(device)

        # The same bundle again: archived as a no-op; the app is not stopped.
        (device.systemctl_dir / "calls.log").unlink()
        drop(shipped_bundle, inbox)
        d.wait_for(lambda: len(archived(device)) == 2, label="second archive")
        assert device.history()[-1]["outcome"] == "up-to-date"
        assert not any(c.startswith("stop") for c in device.calls())

        # Dotfiles and .partial files are not bundles.
        (inbox / ".hidden.zmb").write_bytes(shipped_bundle.read_bytes())
        (inbox / "coming.zmb.partial").write_bytes(shipped_bundle.read_bytes())

        # Two bundles together: processed in arrival order (mtime, then name), not by
        # name, and neither is opened before its turn.
        b2 = build_variant(tmp_path / "v2" / "b2.zmb", release_key[0], 2,
                           edit=_noop_migration(15))
        b3 = build_variant(tmp_path / "v3" / "b3.zmb", release_key[0], 3,
                           edit=_noop_migration(16))
        part3, part2 = inbox / "a-seq3.zmb.partial", inbox / "z-seq2.zmb.partial"
        shutil.copyfile(b3, part3)
        shutil.copyfile(b2, part2)
        os.utime(part2, (time.time() - 6, time.time() - 6))  # arrived first
        os.utime(part3, (time.time() - 5, time.time() - 5))
        os.rename(part3, inbox / "a-seq3.zmb")
        os.rename(part2, inbox / "z-seq2.zmb")
        d.wait_for(lambda: len(archived(device)) == 4, label="two archived")
        seqs = [r["sequence"] for r in device.history()[-2:]]
        assert seqs == [2, 3], device.history()[-2:]
        assert version(device.db) == 16
        assert sorted(p.name for p in inbox.iterdir()) == [".hidden.zmb", "coming.zmb.partial"]
        assert len(rejected(device)) == 2  # only the tampered one and its reason

        # An older bundle arriving after a newer one was applied is refused as a
        # rollback: every bundle carries the whole history, so it has nothing to add.
        drop(b2, inbox, "late-seq2.zmb")
        d.wait_for(lambda: "late-seq2.zmb.reason.json" in rejected(device), label="rollback")
        reason = json.loads((device.root / "state" / "rejected" / "late-seq2.zmb.reason.json"
                             ).read_text())
        assert reason["kind"] == "rollback", reason
        assert version(device.db) == 16

        code, err = d.terminate()
        assert code == 0, err
        assert "STOPPING=1" in d.messages
        assert err.count("<6>") > 5  # journald priority prefixes
    finally:
        d.kill()


def test_daemon_bad_config(device: Device) -> None:
    device.set_config(max_downtime_s="soon")
    proc = device.cli("daemon", timeout=30)
    assert proc.returncode == 2
    assert "max_downtime_s" in proc.stderr and "number" in proc.stderr


def test_daemon_unparsable_key(device: Device) -> None:
    (device.root / "trusted.d" / "broken.pub").write_text("not a key\n")
    proc = device.cli("daemon", timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "broken.pub" in proc.stderr


@pytest.mark.slow
def test_daemon_recovers_and_stops_safely(tmp_path: Path, big_db_v10: Path,
                                          slow_bundle: Path,
                                          release_key: tuple[Path, Path]) -> None:
    dev = make_device(tmp_path / "dev", big_db_v10, release_key[1])
    # The bundle's 25-row batches on the private copy too: seconds of "applying" to aim
    # kills and SIGTERMs at (50,000-row batches pass in a blink on a loaded machine).
    dev.set_config(batch_size=1)
    assert dev.systemctl("start", "zmonitor.service").returncode == 0
    inbox = dev.root / "inbox"
    try:
        upto = max_vitals_rowid(dev.db)
        ref = table_rows(dev.db, vitals_up_to=upto)

        # 1. An apply killed mid-migration: the app is left stopped, the journal open.
        apply = subprocess.Popen(
            [sys.executable, "-m", "zmonitor_migrated.cli", "--config", str(dev.config_path),
             "apply", str(slow_bundle)], env=dev.env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while phase(dev) != "applying" and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(0.3)
        apply.kill()
        apply.wait()
        assert phase(dev) == "applying" and journal(dev)["outcome"] is None
        assert not dev.app_active()

        # 2. The daemon recovers it before READY=1, then takes the inbox bundle; SIGTERM
        #    during its rehearsal (before any stop) leaves the app alone.
        killed_run = journal(dev)["run_id"]
        drop(slow_bundle, inbox)
        d = Daemon(dev, tmp_path)
        try:
            d.ready()
            assert dev.app_active()
            recovered = [r for r in dev.history() if r["run_id"] == killed_run]
            assert recovered and recovered[-1]["outcome"] == "recovered-old"
            d.wait_for(lambda: journal(dev)["run_id"] != killed_run and phase(dev) == "verified",
                       label="second run rehearsing")
            (dev.systemctl_dir / "calls.log").unlink()
            code, err = d.terminate()
        finally:
            d.kill()
        assert code == 0, err
        assert journal(dev)["outcome"] is not None
        assert not any(c.startswith("stop") for c in dev.calls()), \
            "SIGTERM before the stop must not cause downtime"
        assert dev.app_active()
        assert [p.name for p in inbox.iterdir()] == [slow_bundle.name]
        assert table_rows(dev.db, vitals_up_to=upto) == ref

        # 3. Next start: SIGTERM between batches: restored, consistent, bundle kept.
        d = Daemon(dev, tmp_path)
        try:
            d.ready()
            first = journal(dev)["run_id"]
            d.wait_for(lambda: journal(dev)["run_id"] != first and phase(dev) == "applying",
                       label="third run applying")
            time.sleep(0.3)
            code, err = d.terminate()
        finally:
            d.kill()
        assert code == 0, err
        assert "STOPPING=1" in d.messages
        j = journal(dev)
        assert j["outcome"] in ("recovered-old", "restored"), j
        assert dev.app_active()
        assert [p.name for p in inbox.iterdir()] == [slow_bundle.name]
        assert table_rows(dev.db, vitals_up_to=upto) == ref
        assert [p.name for p in dev.db.parent.iterdir() if ".migrating-" in p.name] == []

        # 4. The next start finishes the job.
        d = Daemon(dev, tmp_path)
        try:
            d.ready()
            d.wait_for(lambda: len(archived(dev)) == 1, label="archived")
            code, err = d.terminate()
        finally:
            d.kill()
        assert code == 0, err
        assert version(dev.db) == 14 and dev.app_active()
        assert list(inbox.iterdir()) == []
    finally:
        dev.systemctl("stop", "zmonitor.service")
