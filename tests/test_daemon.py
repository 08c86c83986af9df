"""``zmonitor-migrate daemon`` as a real subprocess with a real NOTIFY_SOCKET
(a unix datagram socket bound here), an inbox on disk and the simulated monitor."""

from __future__ import annotations

import json
import os
import re
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
    """``journal=True``: stderr is a file named by JOURNAL_STREAM (its st_dev:st_ino), as
    systemd names its stream socket, so the daemon writes syslog prefixes."""

    def __init__(self, dev: Device, sock_dir: Path, *, journal: bool = False) -> None:
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
        env.pop("JOURNAL_STREAM", None)
        self.err_file = None
        if journal:
            self.err_file = open(sock_dir / "daemon.stderr", "w+")  # noqa: SIM115
            st = os.fstat(self.err_file.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zmonitor_migrated.cli", "--config", str(dev.config_path),
             "daemon"], env=env, text=True, stdout=subprocess.PIPE,
            stderr=self.err_file or subprocess.PIPE)

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
        if self.err_file is not None:
            self.err_file.seek(0)
            err = self.err_file.read()
            self.err_file.close()
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
    d = Daemon(device, tmp_path, journal=True)
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
        # Both appear while the daemon is stopped, so its next scan sees both (a scan
        # between the two renames would rightly take seq 3 alone, and then refuse seq 2).
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            os.rename(part3, inbox / "a-seq3.zmb")
            os.rename(part2, inbox / "z-seq2.zmb")
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
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
        assert err.count("<6>") > 5  # journald priority prefixes: stderr is the journal
        # our own lines all carry one (the watchdog library may log its own at shutdown)
        assert all(re.match(r"<[0-7]>", line) for line in err.splitlines()
                   if ": " in line and not line.startswith("InotifyEmitter")), err
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
        # stderr is a pipe here, not the journal: plain lines, no syslog prefixes
        assert err and not re.search(r"(?m)^<[0-7]>", err), err
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


# -- units: the inbox listing, rejected/ names, the attempt records -----------------------

def _settled(path: Path, age: float) -> Path:
    t = time.time() - age
    os.utime(path, (t, t), follow_symlinks=False)
    return path


def _put(path: Path, age: float) -> Path:
    path.write_bytes(b"x")
    return _settled(path, age)


def test_candidates_lstat_only_in_arrival_order(tmp_path: Path) -> None:
    from zmonitor_migrated.daemon import candidates, scan_inbox

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outside = tmp_path / "outside.zmb"
    outside.write_bytes(b"x")
    # Arrival (mtime) order differs from name order and from creation order; a tie in
    # mtime goes by name.
    base = time.time() - 100
    arrivals = {f"f{(i * 7) % 24:02d}.zmb": base + i // 2 for i in range(24)}
    for name, t in arrivals.items():
        (inbox / name).write_bytes(b"x")
        os.utime(inbox / name, (t, t))
    expected = sorted(arrivals, key=lambda n: (arrivals[n], n))
    assert expected != sorted(arrivals) and expected != list(arrivals)
    (inbox / "link.zmb").symlink_to(outside)
    _settled(inbox / "link.zmb", 40)
    os.mkfifo(inbox / "pipe.zmb")
    _settled(inbox / "pipe.zmb", 40)
    (inbox / "dir.zmb").mkdir()
    _settled(inbox / "dir.zmb", 40)
    _put(inbox / ".hidden.zmb", 40)
    _put(inbox / "up.zmb.partial", 40)
    (inbox / "fresh.zmb").write_bytes(b"x")  # not settled yet

    assert [p.name for p in candidates(inbox)] == expected
    kinds = {e.name: e.kind for e in scan_inbox(inbox)}
    assert kinds == {**{n: "file" for n in arrivals},
                     "link.zmb": "symlink", "pipe.zmb": "fifo", "dir.zmb": "directory"}
    assert len(candidates(inbox, limit=2)) <= 2
    assert len(scan_inbox(inbox, limit=3)) == 3


def test_candidates_survive_entries_vanishing(tmp_path: Path) -> None:
    """Files appear and disappear as fast as possible while the inbox is listed: no
    listing fails, none returns a file that never existed."""
    from zmonitor_migrated.daemon import candidates

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    old = time.time() - 60
    stop = threading.Event()

    def churn(prefix: str) -> None:
        i = 0
        while not stop.is_set():
            p = inbox / f"v{prefix}{i % 64}.zmb"
            p.write_bytes(b"x")
            os.utime(p, (old, old))
            p.unlink()
            i += 1

    threads = [threading.Thread(target=churn, args=(k,)) for k in "ab"]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 3
        listings = 0
        while time.monotonic() < deadline:
            for p in candidates(inbox):
                assert p.name.startswith("v")
            listings += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert listings > 10


def _stored(rejected_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in rejected_dir.iterdir()}


def test_rejected_never_overwrites_earlier_evidence(tmp_path: Path) -> None:
    from zmonitor_migrated.daemon import REASON_SUFFIX, _reject
    from zmonitor_migrated.errors import BundleRejected

    inbox, rej = tmp_path / "inbox", tmp_path / "rejected"
    inbox.mkdir()
    exc = BundleRejected("bad", kind="malformed")
    for name, data in (("first.reason.json", b"one"), ("first", b"two"), ("first", b"three"),
                       ("first.1", b"four")):
        (inbox / name).write_bytes(data)
        before = _stored(rej) if rej.exists() else {}
        summary = _reject(inbox / name, rej, exc)
        assert summary["outcome"] == "rejected"
        after = _stored(rej)
        for k, v in before.items():  # nothing earlier changed or vanished
            assert after[k] == v, k
        assert len(after) == len(before) + 2
        stored = Path(summary["stored"])
        assert stored.read_bytes() == data
        reason = json.loads(Path(summary["reason_file"]).read_text())
        assert reason["original_name"] == name and reason["kind"] == "malformed"
        assert Path(summary["reason_file"]).name == stored.name + REASON_SUFFIX
    # A FIFO leaves only its reason file; a later regular file of the same name must
    # not take that reason file's name.
    os.mkfifo(inbox / "p")
    _reject(inbox / "p", rej, exc)
    fifo_reason = (rej / "p.reason.json").read_bytes()
    (inbox / "p").write_bytes(b"regular")
    summary = _reject(inbox / "p", rej, exc)
    assert (rej / "p.reason.json").read_bytes() == fifo_reason
    assert Path(summary["stored"]).name == "p.1"
    # No stored bundle is named like a reason file.
    reasons = {n for n in _stored(rej) if n.endswith(REASON_SUFFIX)}
    assert all(json.loads((rej / n).read_text())["kind"] == "malformed" for n in reasons)


def test_rejected_names_are_cleaned_and_fit(tmp_path: Path) -> None:
    from zmonitor_migrated.daemon import _reject, escape_name
    from zmonitor_migrated.errors import BundleRejected

    inbox, rej = tmp_path / "inbox", tmp_path / "rejected"
    inbox.mkdir()
    names = ["a\nWATCHDOG=1\nb.zmb", os.fsdecode(b"x\xff\x01y.zmb"), "n" * 255,
             ".dot\tname", "\u2028sep.zmb"]
    for name in names:
        (inbox / name).write_bytes(b"data")
        summary = _reject(inbox / name, rej, BundleRejected("bad"))
        stored = Path(summary["stored"])
        assert stored.name.isprintable() and not stored.name.startswith(".")
        assert len(os.fsencode(stored.name + ".reason.json")) <= 255
        reason = json.loads(Path(summary["reason_file"]).read_text())
        assert reason["original_name"] == escape_name(name)
        assert bytes.fromhex(reason["original_name_hex"]) == os.fsencode(name)
    assert sorted(os.listdir(inbox)) == []


def test_rejected_symlink_is_moved_not_followed(tmp_path: Path) -> None:
    from zmonitor_migrated.daemon import _reject
    from zmonitor_migrated.errors import BundleRejected

    inbox, rej = tmp_path / "inbox", tmp_path / "rejected"
    inbox.mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    (inbox / "l.zmb").symlink_to(secret)
    summary = _reject(inbox / "l.zmb", rej, BundleRejected("bad"))
    stored = Path(summary["stored"])
    assert stored.is_symlink() and os.readlink(stored) == str(secret)
    assert os.stat(secret).st_nlink == 1  # not hard-linked through the symlink


def test_rejected_across_filesystems_is_an_exclusive_copy(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import errno as errno_mod

    from zmonitor_migrated import daemon as daemon_mod
    from zmonitor_migrated.errors import BundleRejected

    inbox, rej = tmp_path / "inbox", tmp_path / "rejected"
    inbox.mkdir()
    real_link = os.link

    def no_cross_link(src: object, dst: object, **kw: object) -> None:
        if Path(str(dst)).parent == rej and not Path(str(dst)).name.endswith(".reason.json"):
            raise OSError(errno_mod.EXDEV, "Invalid cross-device link")
        real_link(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(daemon_mod.os, "link", no_cross_link)
    rej.mkdir()
    (rej / "b.zmb").write_bytes(b"earlier")
    (inbox / "b.zmb").write_bytes(b"later")
    summary = daemon_mod._reject(inbox / "b.zmb", rej, BundleRejected("bad"))
    assert Path(summary["stored"]).name == "b.zmb.1"
    assert (rej / "b.zmb").read_bytes() == b"earlier"
    assert (rej / "b.zmb.1").read_bytes() == b"later"
    assert not (inbox / "b.zmb").exists()


def _worker(tmp_path: Path) -> tuple[object, Path]:
    from zmonitor_migrated import config as config_mod
    from zmonitor_migrated.daemon import InboxWorker, _Stop
    from zmonitor_migrated.progress import Reporter

    cfg = config_mod.from_mapping({
        "database": str(tmp_path / "db.sqlite"), "state_dir": str(tmp_path / "state"),
        "inbox": str(tmp_path / "inbox"), "trust_dir": str(tmp_path / "trust"),
        "runtime_dir": str(tmp_path / "run"), "backup_dir": str(tmp_path / "backups")})
    (tmp_path / "inbox").mkdir(exist_ok=True)
    (tmp_path / "state").mkdir(exist_ok=True)
    return InboxWorker(cfg, Reporter([]), _Stop(), lambda: None), tmp_path / "inbox"


def test_any_error_of_one_bundle_is_its_rejection(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from zmonitor_migrated import pipeline
    from zmonitor_migrated.daemon import scan_inbox

    worker, inbox = _worker(tmp_path)
    for name in ("boom.zmb", "recursion.zmb"):
        _put(inbox / name, 10)

    def explode(path: Path, *_a: object, **_k: object) -> None:
        if path.name == "boom.zmb":
            raise RuntimeError("kaboom\nsecond line")
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(pipeline, "apply", explode)
    for entry in scan_inbox(inbox):
        summary = worker.handle(entry)  # type: ignore[attr-defined]
        assert summary["outcome"] == "rejected", summary
        reason = summary["reason"]
        assert reason["kind"] == "internal"
        assert "Traceback" not in reason["message"] and "\n" not in reason["message"]
    rej = tmp_path / "state" / "rejected"
    boom = json.loads((rej / "boom.zmb.reason.json").read_text())
    assert "RuntimeError: kaboom second line" in boom["message"]
    assert "RecursionError" in json.loads((rej / "recursion.zmb.reason.json").read_text()
                                          )["message"]
    assert os.listdir(inbox) == []


def test_rejection_that_cannot_be_written_does_not_stop_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zmonitor_migrated import pipeline
    from zmonitor_migrated.daemon import scan_inbox
    from zmonitor_migrated.errors import BundleRejected

    worker, inbox = _worker(tmp_path)
    (tmp_path / "state" / "rejected").write_text("a file where rejected/ should be")
    _put(inbox / "a.zmb", 10)

    def refuse(*_a: object, **_k: object) -> None:
        raise BundleRejected("bad", kind="malformed")

    monkeypatch.setattr(pipeline, "apply", refuse)
    (entry,) = scan_inbox(inbox)
    summary = worker.handle(entry)  # type: ignore[attr-defined]
    assert summary["outcome"] == "rejected"
    # Set aside as a dotfile the scan ignores: kept, and never handled again.
    aside = summary["kept_in_inbox_as"]
    assert Path(aside).name.startswith(".rejected-") and Path(aside).read_bytes() == b"x"
    assert scan_inbox(inbox) == []


def test_an_error_outside_the_run_is_still_a_rejection(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's own bookkeeping around a bundle (here: the attempt record cannot be
    written, as on a state dir with the wrong permissions) fails: that bundle is rejected with
    kind internal and the loop goes on; nothing escapes to kill the daemon."""
    from zmonitor_migrated.daemon import scan_inbox

    worker, inbox = _worker(tmp_path)
    _put(inbox / "a.zmb", 10)

    def broken(*_a: object, **_k: object) -> None:
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(worker.attempts, "begin", broken)  # type: ignore[attr-defined]
    (entry,) = scan_inbox(inbox)
    summary = worker.handle(entry)  # type: ignore[attr-defined]
    assert summary["outcome"] == "rejected", summary
    assert summary["reason"]["kind"] == "internal", summary
    assert "Permission denied" in summary["reason"]["message"]


_DIE_WHILE_HANDLING = """
import os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_daemon import _worker
from zmonitor_migrated import pipeline
from zmonitor_migrated.daemon import scan_inbox
worker, inbox = _worker(Path({root!r}))
pipeline.apply = lambda *a, **k: os._exit(9)  # the process dies mid-bundle
for entry in scan_inbox(inbox):
    worker.handle(entry)
"""


def test_attempt_records_break_a_crash_loop(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle whose handling kills the process (a real os._exit in a child) is
    attempted MAX_ATTEMPTS times, then rejected without touching the pipeline."""
    from zmonitor_migrated import pipeline
    from zmonitor_migrated.daemon import ATTEMPTS_FILE, MAX_ATTEMPTS, Attempts, scan_inbox

    worker, inbox = _worker(tmp_path)
    _put(inbox / "killer.zmb", 10)
    script = _DIE_WHILE_HANDLING.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)
           + os.pathsep + os.environ.get("PYTHONPATH", "")}
    (entry,) = scan_inbox(inbox)
    for n in range(1, MAX_ATTEMPTS + 1):
        child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                               text=True, timeout=60)
        assert child.returncode == 9, child.stderr
        assert Attempts(tmp_path / "state" / ATTEMPTS_FILE, inbox).count(entry) == n
        assert (inbox / "killer.zmb").exists()

    def must_not_run(*_a: object, **_k: object) -> None:
        raise AssertionError("the pipeline ran a third time")

    monkeypatch.setattr(pipeline, "apply", must_not_run)
    worker, _ = _worker(tmp_path)  # a new daemon start
    summary = worker.handle(entry)  # type: ignore[attr-defined]
    assert summary["outcome"] == "rejected"
    assert summary["reason"]["kind"] == "repeated-interruption"
    assert f"interrupted the daemon {MAX_ATTEMPTS} times" in summary["reason"]["message"]
    assert Attempts(tmp_path / "state" / ATTEMPTS_FILE, inbox).records == []


def test_attempt_record_cleared_when_handling_returns(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from zmonitor_migrated import pipeline
    from zmonitor_migrated.daemon import ATTEMPTS_FILE, Attempts, scan_inbox
    from zmonitor_migrated.errors import InterruptedBeforeStop

    worker, inbox = _worker(tmp_path)
    _put(inbox / "a.zmb", 10)
    seen: list[int] = []

    def interrupted(*_a: object, **_k: object) -> None:
        seen.append(Attempts(tmp_path / "state" / ATTEMPTS_FILE, inbox).count(entry))
        worker.stop.requested = True  # type: ignore[attr-defined]
        raise InterruptedBeforeStop("SIGTERM")

    monkeypatch.setattr(pipeline, "apply", interrupted)
    (entry,) = scan_inbox(inbox)
    for _ in range(3):  # SIGTERM is not the file's fault: never counts up
        assert worker.handle(entry)["outcome"] == "interrupted"  # type: ignore[attr-defined]
    assert seen == [1, 1, 1]  # durable before the pipeline started, cleared after
    assert Attempts(tmp_path / "state" / ATTEMPTS_FILE, inbox).count(entry) == 0


def test_idle_wait_inside_the_watchdog_interval() -> None:
    from zmonitor_migrated.daemon import IDLE_WAKE_S, idle_wait_s

    assert idle_wait_s({}) == IDLE_WAKE_S
    assert idle_wait_s({"WATCHDOG_USEC": "6000000"}) == 1.5
    assert idle_wait_s({"WATCHDOG_USEC": "60000000"}) == IDLE_WAKE_S
    assert idle_wait_s({"WATCHDOG_USEC": "6000000", "WATCHDOG_PID": "1"}) == IDLE_WAKE_S
    assert idle_wait_s({"WATCHDOG_USEC": "junk"}) == IDLE_WAKE_S
