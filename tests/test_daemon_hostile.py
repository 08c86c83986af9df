"""The daemon against a hostile inbox: the real ``zmonitor-migrate daemon`` as a
subprocess, a NOTIFY_SOCKET bound here with every datagram timed, WATCHDOG_USEC set.
Whatever is dropped, the daemon stays alive, keeps the watchdog fed, sets every bad
entry aside with its reason and still applies the good bundle after them.

Also the bounded, total reader of ``bundle.yaml`` (``sources.load_info``) and of the
manifest's JSON, which the daemon reaches for every signed bundle."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import itertools
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
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import NOW, SHIPPED, Device, build_variant
from test_daemon import archived, drop, rejected
from test_run import tamper, version

from zmonitor_migrated import bundle, manifest, sources
from zmonitor_migrated.daemon import escape_name
from zmonitor_migrated.errors import BundleRejected
from zmonitor_migrated.keys import load_private_key
from zmonitor_migrated.manifest import FileEntry
from zmonitor_migrated.verify import sign_manifest_bytes, signatures_to_json

WATCHDOG_S = 8.0  # the daemon must ping at least every WATCHDOG_S / 2
ALLOWED_KEYS = ("READY=1", "STATUS=", "WATCHDOG=1", "STOPPING=1", "EXTEND_TIMEOUT_USEC=",
                "MAINPID=")


class NotifyDaemon:
    """The daemon with a notify socket whose datagrams are kept whole, with arrival times."""

    def __init__(self, dev: Device, sock_dir: Path, *, watchdog_s: float = WATCHDOG_S) -> None:
        self.dev = dev
        self.path = sock_dir / "notify.sock"
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.datagrams: list[tuple[float, bytes]] = []
        self._stop = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        env = {**dev.env, "NOTIFY_SOCKET": str(self.path),
               "WATCHDOG_USEC": str(int(watchdog_s * 1_000_000))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zmonitor_migrated.cli", "--config", str(dev.config_path),
             "daemon"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.stderr = b""
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.datagrams.append((time.monotonic(), data))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr += line

    def lines(self) -> list[str]:
        return [line for _t, d in self.datagrams
                for line in d.decode("utf-8", "replace").split("\n") if line]

    def wait_for(self, what: Callable[[], bool], timeout: float = 90, label: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {label}; daemon exit {self.proc.poll()}; "
                             f"stderr tail {self.stderr[-2000:]!r}")

    def ready(self) -> None:
        self.wait_for(lambda: "READY=1" in self.lines(), label="READY=1")

    def watchdog_gaps(self) -> list[float]:
        """Seconds between consecutive WATCHDOG=1, from READY=1 on."""
        times: list[float] = []
        started = False
        for t, d in self.datagrams:
            lines = d.decode("utf-8", "replace").split("\n")
            started = started or "READY=1" in lines
            if started and "WATCHDOG=1" in lines:
                times.append(t)
        return [b - a for a, b in itertools.pairwise(times)]

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._err_reader.join(timeout=5)
        time.sleep(0.2)
        self.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()

    def close(self) -> None:
        self._stop = True
        self._reader.join(timeout=2)
        self.sock.close()


def signed_with_yaml(out: Path, key: Path, yaml_bytes: bytes) -> Path:
    """A correctly signed bundle (trusted key) whose bundle.yaml is ``yaml_bytes``:
    ``bundle.build`` would refuse to lint such a source, so the manifest is re-made."""
    src = out.parent / (out.stem + "-src")
    shutil.copytree(SHIPPED, src)
    built = bundle.build(src, out, [key], 1, created=NOW, expires=NOW + timedelta(days=3650))
    (src / "bundle.yaml").write_bytes(yaml_bytes)
    files = tuple(FileEntry(f.path, hashlib.sha256(yaml_bytes).hexdigest(), len(yaml_bytes))
                  if f.path == "bundle.yaml" else f for f in built.files)
    changed = dataclasses.replace(built, files=files)
    data = changed.to_json()
    sigs = signatures_to_json([sign_manifest_bytes(data, load_private_key(key))])
    bundle._write_bundle(out, data, sigs, changed, src)
    return out


def reasons(dev: Device) -> dict[str, dict[str, object]]:
    """original inbox name (escaped) -> reason, for every reason file in rejected/."""
    out: dict[str, dict[str, object]] = {}
    for p in (dev.root / "state" / "rejected").iterdir():
        if p.name.endswith(".reason.json") and p.is_file() and not p.is_symlink():
            body = json.loads(p.read_text())
            body["_file"] = p.name
            out[str(body["original_name"])] = body
    return out


def _stage(stage: Path, name: str, data: bytes) -> Path:
    p = stage / name.replace("/", "_").encode("utf-8", "surrogateescape").hex()[:40]
    p.write_bytes(data)
    return p


@pytest.mark.slow
def test_hostile_inbox_corpus(device: Device, shipped_bundle: Path, tmp_path: Path,
                              release_key: tuple[Path, Path]) -> None:
    inbox = device.root / "inbox"
    inbox.mkdir(exist_ok=True)
    stage = tmp_path / "stage"  # same filesystem as the inbox: delivered by rename(2)
    stage.mkdir()
    key = release_key[0]
    gz_member = gzip.compress(b"", mtime=0)
    long_name = "L" * 240 + ".zmb"
    newline_name = "evil\nWATCHDOG=trigger\nSTATUS=owned\nREADY=1\n.zmb"
    bad_utf8_name = os.fsdecode(b"bad-\xff\xfe-name.zmb")
    wrong_device = build_variant(
        tmp_path / "dev" / "other-device.zmb", key, 1,
        edit=lambda s: (s / "bundle.yaml").write_text(
            (s / "bundle.yaml").read_text().replace("zmonitor-bedside", "other-device")))
    deep = b"name: zmonitor\ndevice_types: [zmonitor-bedside]\nx: " + b"[" * 5000 \
        + b"]" * 5000 + b"\n"
    laughs = b"name: zmonitor\ndevice_types: [zmonitor-bedside]\na: &a [x, x, x, x]\n" + b"".join(
        b"%c: &%c [*%c, *%c, *%c, *%c]\n" % ((98 + i,) * 2 + (97 + i,) * 4) for i in range(20))
    valid = shipped_bundle.read_bytes()

    # name -> (content or builder, expected kinds). Regular files first.
    files: dict[str, bytes] = {
        "empty.zmb": b"",
        "random.zmb": os.urandom(64 * 1024),
        "zeros-50m.zmb": bytes(50 * 1024 * 1024),
        "gzip-members.zmb": gz_member * (2 * 1024 * 1024 // len(gz_member)),
        "truncated.zmb": valid[: len(valid) // 2],
        newline_name: os.urandom(1024),
        bad_utf8_name: valid,  # even a good bundle: the name alone refuses it
        long_name: os.urandom(1024),
        "tampered.zmb": tamper(shipped_bundle, tmp_path / "t.zmb",
                               "migrations/schema/0011_schema_add_vitals_early_warning_score.sql"
                               ).read_bytes(),
        "other-device.zmb": wrong_device.read_bytes(),
        "yaml-not-utf8.zmb": signed_with_yaml(tmp_path / "y1" / "b.zmb", key,
                                              b"name: zmonitor\ndescription: \xff\xfe\n"
                                              b"device_types: [zmonitor-bedside]\n"
                                              ).read_bytes(),
        "yaml-deep.zmb": signed_with_yaml(tmp_path / "y2" / "b.zmb", key, deep).read_bytes(),
        "yaml-laughs.zmb": signed_with_yaml(tmp_path / "y3" / "b.zmb", key, laughs).read_bytes(),
        "first.reason.json": b"junk one",
        "first": b"junk two",
    }
    expected: dict[str, set[str]] = {
        "empty.zmb": {"malformed"}, "random.zmb": {"malformed"},
        "zeros-50m.zmb": {"malformed", "too-large"}, "gzip-members.zmb": {"malformed", "too-large"},
        "truncated.zmb": {"malformed"}, newline_name: {"bad-name"},
        bad_utf8_name: {"bad-name"}, long_name: {"bad-name"},
        "tampered.zmb": {"hash-mismatch"}, "other-device.zmb": {"wrong-device"},
        "yaml-not-utf8.zmb": {"malformed"}, "yaml-deep.zmb": {"malformed"},
        "yaml-laughs.zmb": {"malformed"}, "first.reason.json": {"malformed"},
        "first": {"malformed"}, "sparse-huge.zmb": {"too-large"},
        "passwd.zmb": {"not-a-file"}, "x.zmb": {"not-a-file"}, "pipe.zmb": {"not-a-file"},
    }

    d = NotifyDaemon(device, tmp_path)
    try:
        d.ready()
        base = time.time() - 300  # arrival order: one second apart, in this order
        order = 0

        def deliver(staged: Path, name: str) -> None:
            nonlocal order
            order += 1
            os.utime(staged, (base + order, base + order), follow_symlinks=False)
            os.rename(staged, inbox / name)

        for name, data in files.items():
            deliver(_stage(stage, name, data), name)
        sparse = stage / "sparse"
        with open(sparse, "wb") as f:
            f.truncate(600 * 1024 * 1024)  # over the 512 MiB max_bundle_bytes, no blocks
        deliver(sparse, "sparse-huge.zmb")
        link = stage / "link"
        link.symlink_to("/etc/passwd")
        deliver(link, "passwd.zmb")
        directory = stage / "dir"
        (directory / "inside").mkdir(parents=True)
        (directory / "inside" / "f").write_bytes(b"kept")
        deliver(directory, "x.zmb")
        os.mkfifo(inbox / "pipe.zmb")  # made in the inbox itself; nobody ever writes it
        os.utime(inbox / "pipe.zmb", (base + 99, base + 99))
        # Files that vanish right after they appear, at varying instants.
        for i in range(12):
            p = _stage(stage, f"vanish-{i}", os.urandom(4096))
            deliver(p, f"vanish-{i}.zmb")
            time.sleep(0.004 * i)
            with contextlib.suppress(FileNotFoundError):
                (inbox / f"vanish-{i}.zmb").unlink()
        time.sleep(0.05)
        drop(shipped_bundle, inbox, "valid.zmb")  # the newest arrival: handled last

        d.wait_for(lambda: any(n.endswith("-valid.zmb") for n in archived(device)),
                   timeout=240, label="the valid bundle archived")
        d.wait_for(lambda: not any(not n.startswith(".") for n in os.listdir(inbox)),
                   label="inbox empty")
        assert d.proc.poll() is None, "the daemon died"
        assert version(device.db) == 14 and device.app_active()

        got = reasons(device)
        for name, kinds in expected.items():
            key_name = escape_name(name)
            assert key_name in got, (name, sorted(got))
            r = got[key_name]
            assert r["kind"] in kinds, (name, r)
            assert r["message"] and "Traceback" not in str(r["message"])
        stored = {n for n in rejected(device) if not n.endswith(".reason.json")}
        # Regular files and the symlink/directory are kept, each under its own name.
        assert "first" in stored and "first.reason.json.bundle" in stored, stored
        rej = device.root / "state" / "rejected"
        assert (rej / "first").read_bytes() == b"junk two"
        assert (rej / "first.reason.json.bundle").read_bytes() == b"junk one"
        assert json.loads((rej / "first.reason.json").read_text())["original_name"] == "first"
        assert (rej / "passwd.zmb").is_symlink()
        assert os.readlink(rej / "passwd.zmb") == "/etc/passwd"
        assert got["passwd.zmb"]["link_target"] == "/etc/passwd"
        assert (rej / "x.zmb" / "inside" / "f").read_bytes() == b"kept"
        assert not os.path.lexists(rej / "pipe.zmb")  # a FIFO is removed, its reason kept
        assert got["pipe.zmb"]["entry_type"] == "fifo"
        assert got[escape_name(newline_name)]["_file"] == \
            "evil_WATCHDOG=trigger_STATUS=owned_READY=1_.zmb.reason.json"
        assert got[escape_name(bad_utf8_name)]["original_name_hex"] == \
            b"bad-\xff\xfe-name.zmb".hex()
        assert "not UTF-8" in str(got["yaml-not-utf8.zmb"]["message"])
        # Our depth bound, or libyaml's own flow-depth limit (newer libyaml builds stop at
        # 1,000 levels before our walk sees the 33rd): refused either way, never a crash.
        assert re.search(DEEP, str(got["yaml-deep.zmb"]["message"]))
        assert "alias" in str(got["yaml-laughs.zmb"]["message"])
        for i in range(12):  # a vanished file is either gone or set aside with its reason
            name = f"vanish-{i}.zmb"
            assert not os.path.lexists(inbox / name)
            if name in stored:
                assert name in got
        assert not [r for r in got.values() if r["kind"] == "internal"], got

        code = d.terminate()
        assert code == 0, d.stderr[-3000:]
        assert "STOPPING=1" in d.lines()
        gaps = d.watchdog_gaps()
        assert gaps and max(gaps) <= WATCHDOG_S / 2, f"longest watchdog gap {max(gaps):.2f} s"
        # Every line of every datagram is exactly a key we send, STATUS= text included:
        # a name with newlines and "WATCHDOG=trigger" in it cannot add a line.
        grammar = re.compile(r"READY=1|STOPPING=1|WATCHDOG=1|EXTEND_TIMEOUT_USEC=\d+"
                             r"|MAINPID=\d+|STATUS=[^\x00-\x1f\x7f-\x9f\u2028\u2029]*")
        bad = [line for line in d.lines() if not grammar.fullmatch(line)]
        assert not bad, bad
        assert "WATCHDOG=trigger" not in d.lines()
        assert b"Traceback" not in d.stderr
        # What an operator sees in the journal: every refusal a warning with its kind and
        # reason, a refusal for a security reason an alert.
        log = d.stderr.decode("utf-8", "replace")
        assert "ALERT alert=bundle-rejected" in log and "[hash-mismatch]" in log, log[-3000:]
        assert "[wrong-device]" in log, log[-3000:]
        assert "rejected [malformed]" in log, log[-3000:]
    finally:
        d.kill()


@pytest.mark.slow
def test_crash_loop_breaker(device: Device, release_key: tuple[Path, Path],
                            slow_bundle: Path, tmp_path: Path) -> None:
    """A bundle that kills the daemon every time it is handled (simulated with SIGKILL
    while the attempt record names it) is set aside on the third start; the valid bundle
    behind it is applied."""
    inbox = device.root / "inbox"
    attempts = device.root / "state" / "inbox-attempts.json"
    drop(slow_bundle, inbox, "killer.zmb")
    old = time.time() - 100
    os.utime(inbox / "killer.zmb", (old, old))
    # A later release than the killer (sequence 1): a kill that lands after the killer was
    # admitted has raised the anti-rollback floor to it, as it must.
    drop(build_variant(tmp_path / "valid.zmb", release_key[0], 2), inbox, "valid.zmb")

    def attempt_count() -> int:
        try:
            records = json.loads(attempts.read_text())["attempts"]
        except (FileNotFoundError, ValueError, KeyError):
            return 0
        return max((r["count"] for r in records if r["name"] == "killer.zmb"), default=0)

    for n in (1, 2):
        d = NotifyDaemon(device, tmp_path)
        try:
            d.wait_for(lambda n=n: attempt_count() == n, label=f"attempt {n} recorded")
            d.proc.kill()  # dies while handling killer.zmb
            d.proc.wait()
        finally:
            d.kill()
        assert (inbox / "killer.zmb").exists()
    d = NotifyDaemon(device, tmp_path)
    try:
        d.wait_for(lambda: any(n.endswith("-valid.zmb") for n in archived(device)),
                   timeout=180, label="valid bundle archived")
        r = reasons(device)["killer.zmb"]
        assert r["kind"] == "repeated-interruption", r
        assert "interrupted the daemon 2 times" in str(r["message"])
        assert version(device.db) == 14 and device.app_active()
        assert attempt_count() == 0
        assert d.terminate() == 0
    finally:
        d.kill()


@pytest.mark.slow
def test_bundle_larger_than_state_free_space(device: Device, shipped_bundle: Path,
                                             tmp_path: Path) -> None:
    """The state dir on a small filesystem of its own: a bundle that does not fit is
    rejected with its reason (and kept in the inbox as a dotfile, since rejected/ cannot
    take it either); the daemon stays up and applies the next bundle."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    state = device.root / "state"
    state.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(state)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        inbox = device.root / "inbox"
        d = NotifyDaemon(device, tmp_path)
        try:
            d.ready()
            big = tmp_path / "big.zmb"
            big.write_bytes(os.urandom(40 * 1024 * 1024))
            drop(big, inbox, "bigger-than-state.zmb")
            old = time.time() - 100
            os.utime(inbox / "bigger-than-state.zmb", (old, old))
            drop(shipped_bundle, inbox, "valid.zmb")
            d.wait_for(lambda: any(n.endswith("-valid.zmb") for n in archived(device)),
                       timeout=180, label="valid bundle archived")
            r = reasons(device)["bigger-than-state.zmb"]
            message = str(r["message"])
            assert r["kind"] != "internal" and "Traceback" not in message, r
            # Unsigned junk is refused before it is copied (no space used at all); a signed
            # bundle too big for the state dir is exit 4 disk-space, tested in
            # test_hostile_archive.py with the real CLI.
            assert r["kind"] == "malformed", r
            aside = [n for n in os.listdir(inbox) if n.endswith("bigger-than-state.zmb")]
            assert aside and aside[0].startswith(".rejected-"), os.listdir(inbox)
            assert r["kept_in_inbox_as"] == aside[0]
            assert (inbox / aside[0]).stat().st_size == 40 * 1024 * 1024
            assert version(device.db) == 14
            assert d.proc.poll() is None
            assert d.terminate() == 0
        finally:
            d.kill()
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


# -- bundle.yaml and manifest JSON: bounded, and every failure a typed rejection ----------

DEEP = r"deeper|maximum nesting depth"
YAML_CASES = {
    "not-utf8": (b"name: a\ndevice_types: [x]\ndescription: \xff\n", "not UTF-8"),
    "deep-flow": (b"name: a\nx: " + b"[" * 20000 + b"]" * 20000, DEEP),
    "deep-block": (b"".join(b"  " * i + b"k:\n" for i in range(100)), "deeper"),
    "alias": (b"name: a\ndevice_types: &d [x]\nother: *d\n", "alias"),
    "two-docs": (b"name: a\n---\nname: b\n", "more than one"),
    "too-big": (b"# padding\n" * 7000, "over"),
    "many-nodes": (b"x: [" + b", ".join([b"1"] * 12000) + b"]\n", "nodes"),
    "bad-date": (b"name: a\ndevice_types: [x]\nwhen: 2024-13-45\n", "month"),
    "huge-int": (b"name: a\ndevice_types: [x]\nn: " + b"9" * 5000 + b"\n", "ValueError"),
    "unhashable-key": (b"? [1]\n: 2\n", "unhashable"),
    "not-yaml": (b"name: [unclosed\n", "not valid YAML"),
    "description-list": (b"name: a\ndevice_types: [x]\ndescription: [1, 2]\n", "description"),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_load_info_refuses_hostile_yaml(tmp_path: Path, case: str) -> None:
    data, words = YAML_CASES[case]
    (tmp_path / "bundle.yaml").write_bytes(data)
    started = time.monotonic()
    with pytest.raises(BundleRejected) as err:
        sources.load_info(tmp_path)
    assert re.search(words, err.value.message) and "bundle.yaml" in err.value.message
    assert "\n" not in err.value.message
    assert time.monotonic() - started < 5


def test_load_info_does_not_block_on_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "bundle.yaml")
    with pytest.raises(BundleRejected, match="not a regular file"):
        sources.load_info(tmp_path)


def test_load_info_accepts_the_shipped_source() -> None:
    info = sources.load_info(SHIPPED)
    assert info.name and info.device_types


@pytest.mark.parametrize("data", [b"[" * 100_000 + b"]" * 100_000,
                                  b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
                                  b'{"sequence": ' + b"9" * 5000 + b"}",
                                  b'{"a": "\xff"}'], ids=["deep-list", "deep-object",
                                                         "huge-int", "not-utf8"])
def test_manifest_json_refuses_hostile(data: bytes) -> None:
    with pytest.raises(BundleRejected) as err:
        manifest.parse_json(data, "manifest.json")
    assert err.value.kind == "malformed"
