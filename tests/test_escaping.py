"""Strings from outside never become control lines: sd_notify datagrams (a real unix
datagram socket bound here), log lines, status.json, alerts, the history, Prometheus
labels. Property tests feed arbitrary text (controls, separators, bidi characters,
bytes that are not UTF-8) through the real sinks and parse every output back."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import socket
import time
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmonitor_migrated import history
from zmonitor_migrated.progress import (
    MAX_LOG_CHARS,
    Event,
    LogSink,
    NotifySink,
    Reporter,
    StatusFileSink,
    stream_is_journal,
)
from zmonitor_migrated.text import clean, prom_label, quoted

NOTIFY_KEYS = {"READY", "STOPPING", "STATUS", "WATCHDOG", "EXTEND_TIMEOUT_USEC"}
NASTY = [
    "evil\nWATCHDOG=trigger\nWATCHDOG_USEC=1\nSTATUS=pwned",
    'x.zmb\n<1>ALERT alert=restore-failed run=fake msg="database gone"',
    '" run=evil alert=restore-failed msg="x',
    "a\rb\x00c\x7fd\x85e\x9b31m\x1b[2J\x1b]0;title\x07",
    "line\u2028sep\u2029para\x0bvt\x0cff\x1c\x1d\x1e",
    "\u202eexe.zmb\u2066\u2069\u200e\u200f\u061c",
    b"bad-\xff\xfe-utf8\n.zmb".decode("utf-8", "surrogateescape"),
    "back\\slash \\n not a newline",
    "",
]

# Arbitrary text: any code point but surrogates, text decoded from arbitrary bytes with
# surrogateescape (as Python decodes file names), and the known-nasty ones mixed in.
hostile = st.one_of(
    st.text(),
    st.binary().map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.sampled_from(NASTY),
    st.lists(st.sampled_from(NASTY) | st.text(max_size=5)).map("".join),
)


def plain_line(text: str) -> bool:
    """One line of printable text, checked against Python's own notion of a line."""
    return (len(text.splitlines()) <= 1 and "\n" not in text
            and not any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in text))


# -- the cleaning function ---------------------------------------------------------------

@pytest.mark.parametrize(("raw", "shown"), [
    ("a\nb", "a\\nb"), ("a\rb", "a\\rb"), ("a\tb", "a\\tb"), ("\x00", "\\x00"),
    ("\x1b[31m", "\\x1b[31m"), ("\x7f", "\\x7f"), ("\x85", "\\x85"), ("\x9b", "\\x9b"),
    ("\u2028", "\\u2028"), ("\u2029", "\\u2029"), ("\u202e", "\\u202e"),
    ("\u2066", "\\u2066"), ("\udcff", "\\xff"), ("\ud800", "\\ud800"),
    ("é 中 🙂 a=b \"q\" \\", "é 中 🙂 a=b \"q\" \\"),
])
def test_clean_shows_controls_as_visible_escapes(raw: str, shown: str) -> None:
    assert clean(raw) == shown
    assert clean(shown) == shown  # idempotent
    clean(raw).encode("utf-8")  # always encodable


def test_clean_escapes_every_character_splitlines_breaks_on() -> None:
    breakers = [chr(c) for c in range(0x110000) if len(("a" + chr(c) + "b").splitlines()) > 1]
    assert "\u2028" in breakers and "\x1c" in breakers
    for ch in breakers:
        assert plain_line(clean(f"a{ch}b")), repr(ch)


def test_clean_bounds_length_and_says_so() -> None:
    out = clean("x" * 10_000, limit=100)
    assert out.startswith("x" * 100) and "9900 more characters" in out and len(out) < 130


@settings(max_examples=300, deadline=None)
@given(hostile)
def test_clean_property(raw: str) -> None:
    out = clean(raw)
    assert plain_line(out)
    assert clean(out) == out
    out.encode("utf-8")
    assert shlex.split(f"msg={quoted(raw)}") == [f"msg={out}"]


# -- the sinks, fed through a real Reporter ----------------------------------------------

class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    def drain(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(1 << 20))
            except BlockingIOError:
                return out


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    ns = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    yield ns
    ns.sock.close()


def check_datagram(data: bytes) -> dict[str, str]:
    text = data.decode("utf-8")  # strict: systemd ignores a STATUS that is not UTF-8
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        assert sep and key in NOTIFY_KEYS and key not in fields, text
        assert plain_line(value), text
        fields[key] = value
    if "WATCHDOG" in fields:
        assert fields["WATCHDOG"] == "1"
    return fields


def parse_alert(line: str) -> dict[str, str]:
    words = shlex.split(line)
    assert words[0] == "ALERT"
    fields = dict(w.split("=", 1) for w in words[1:])
    assert len(fields) == len(words) - 1
    return fields


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=hostile, message=hostile)
def test_reporter_sinks_property(tmp_path: Path, notify_socket: NotifySocket, name: str,
                                 message: str) -> None:
    notify_socket.drain()
    buf = io.StringIO()
    status = tmp_path / "run" / "status.json"
    reporter = Reporter([LogSink(buf, prefix=True), StatusFileSink(status, min_interval=0),
                         NotifySink()], run_id=name)
    reporter.emit("idle", f"{name}: rejected")
    reporter.emit("applying", message, version=12, batch=3, batches=10, rows=30,
                  percent=30.0, eta_s=4.0)
    reporter.alert("migration-failed", message)
    reporter.emit(name, message)
    reporter.heartbeat()
    reporter.extend(float("inf"))

    # stderr: exactly one line per event, the prefix only at its start
    lines = buf.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 5, lines
    for line in lines[:-1]:
        assert re.match(r"<[16]>", line) and plain_line(line), line
    alerts = [line for line in lines[:-1] if line.startswith("<1>")]
    assert len(alerts) == 1
    assert parse_alert(alerts[0][3:]) == {"alert": "migration-failed",
                                          "run": clean(name or "-", limit=200),
                                          "msg": clean(message, limit=MAX_LOG_CHARS)}

    # sd_notify: one datagram per message, only our keys, STATUS a single clean line
    grams = [check_datagram(d) for d in notify_socket.drain()]
    assert [sorted(g) for g in grams] == [["STATUS", "WATCHDOG"]] * 4 + [["WATCHDOG"]] + \
        [["EXTEND_TIMEOUT_USEC"]]
    assert grams[0]["STATUS"].startswith("idle " + clean(name)[:100])
    assert grams[1]["STATUS"].startswith("applying 0012 batch 3/10 30% ETA 4s")

    # status.json: the last event, parsed back as the cleaned text
    body = json.loads(status.read_text(encoding="utf-8"))
    assert body["message"] == clean(message, limit=MAX_LOG_CHARS)
    assert body["phase"] == clean(name, limit=MAX_LOG_CHARS)
    assert body["run_id"] == clean(name, limit=MAX_LOG_CHARS)
    assert plain_line(body["status"]) and body["status"] == grams[3]["STATUS"]


@pytest.mark.parametrize("bad", [
    "STATUS=x\nWATCHDOG=trigger", "STATUS=x\nWATCHDOG_USEC=1", "WATCHDOG=trigger",
    "STATUS=a\nSTATUS=b", "MAINPID=1", "READY=1\n", "STATUS=\x1b[2J", "STATUS=a\u2028b",
    "EXTEND_TIMEOUT_USEC=1e9", "FDSTORE=1", "",
])
def test_notify_refuses_anything_but_our_own_assignments(notify_socket: NotifySocket,
                                                         bad: str) -> None:
    sink = NotifySink()
    assert sink.send(bad) is False
    assert sink.send("WATCHDOG=1") is True
    assert notify_socket.drain() == [b"WATCHDOG=1"]


def test_notify_status_with_any_unicode_keeps_its_watchdog_ping(
        notify_socket: NotifySocket) -> None:
    """sdnotify 0.3 encodes latin-1 and silently drops what does not fit: a file name
    with "→" or a byte that is not UTF-8 in STATUS= would lose the WATCHDOG=1 beside it."""
    sink = NotifySink()
    sink.emit(Event(phase="idle", message="v10→v14 \u4e2d " +
                    b"\xff.zmb".decode("utf-8", "surrogateescape")))
    (data,) = notify_socket.drain()
    fields = check_datagram(data)
    assert fields == {"STATUS": "idle v10→v14 \u4e2d \\xff.zmb", "WATCHDOG": "1"}


# -- syslog prefixes only on the journal --------------------------------------------------

def _emit_to(stream: object) -> None:
    LogSink(stream).emit(Event(phase="idle", message="hello"))  # type: ignore[arg-type]


def test_prefix_when_stderr_is_the_journal(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "journal", "w+") as f:
        st_ = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st_.st_dev}:{st_.st_ino}")
        assert stream_is_journal(f)
        _emit_to(f)
        f.seek(0)
        assert f.read() == "<6>idle: hello\n"


@pytest.mark.parametrize("journal_stream", [None, "1:2", "garbage", "", ":", "12:",
                                            "1:2:3", " 1:2"])
def test_plain_lines_when_stderr_is_not_the_journal(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    journal_stream: str | None) -> None:
    if journal_stream is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream)
    with open(tmp_path / "log", "w+") as f:
        _emit_to(f)
        f.seek(0)
        assert f.read() == "idle: hello\n"
    buf = io.StringIO()
    _emit_to(buf)
    assert buf.getvalue() == "idle: hello\n"


def test_a_pipe_gets_plain_lines_from_a_real_cli(device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The CLI's stderr is a pipe: no prefixes, even with a JOURNAL_STREAM inherited from
    a service that named another stream; a hostile bundle name stays on its line."""
    bad = tmp_path / "x\n<1>ALERT alert=restore-failed run=fake msg=y.zmb"
    bad.write_bytes(b"not a bundle")
    device.env["JOURNAL_STREAM"] = "8:12345"
    proc = device.cli("apply", str(bad))
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr and not re.search(r"(?m)^<[0-7]>", proc.stderr), proc.stderr
    assert not re.search(r"(?m)^ALERT", proc.stderr), proc.stderr
    assert "x\\n<1>ALERT" in proc.stderr, proc.stderr


# -- the history and the metrics ---------------------------------------------------------

@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bundles=st.lists(hostile, min_size=1, max_size=4), error=hostile)
def test_history_lines_property(tmp_path: Path, bundles: list[str], error: str) -> None:
    path = tmp_path / "history.jsonl"
    path.unlink(missing_ok=True)
    for i, name in enumerate(bundles):
        history.append(path, {"run_id": f"r{i}", "bundle": name, "outcome": "rejected",
                              "error": {"kind": "malformed", "message": error},
                              "downtime_s": None})
    raw = path.read_bytes().decode("utf-8")  # strict: valid UTF-8
    assert raw.endswith("\n") and raw.count("\n") == len(bundles)
    for line, name in zip(raw.split("\n")[:-1], bundles, strict=True):
        rec = json.loads(line)
        assert rec["bundle"] == clean(name, limit=history.MAX_FIELD_CHARS)
        assert rec["error"]["message"] == clean(error, limit=history.MAX_FIELD_CHARS)
    records = history.read(path)
    assert [r["bundle"] for r in records] == [clean(b, limit=history.MAX_FIELD_CHARS)
                                              for b in bundles]
    printed = history.render(records)
    assert all(plain_line(p) for p in printed)
    printed = [p for p in printed if not p.startswith("  ")]  # one summary line a run
    assert len(printed) == len(bundles)
    assert all(p.startswith(f"r{i}  rejected") for i, p in enumerate(printed))


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], str]]:
    """The text exposition format, parsed independently of the writer."""
    sample = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)')
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)",?')
    out = []
    for line in text.split("\n")[:-1]:
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) \S+ .*", line), line
            continue
        m = sample.fullmatch(line)
        assert m, repr(line)
        labels: dict[str, str] = {}
        rest = m.group(2) or ""
        while rest:
            lm = label.match(rest)
            assert lm, repr(line)
            labels[lm.group(1)] = re.sub(r'\\([\\"n])', lambda x: {"n": "\n"}.get(
                x.group(1), x.group(1)), lm.group(2))
            rest = rest[lm.end():]
        float(m.group(3))
        out.append((m.group(1), labels, m.group(3)))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(hostile, min_size=1, max_size=6))
def test_prometheus_labels_parse_back(outcomes: list[str]) -> None:
    records = [{"outcome": o, "finished_at": 1.0, "duration_s": 2.0, "downtime_s": None}
               for o in outcomes]
    text = history.render_metrics(records, current_version=14, db_size=1000)
    text.encode("utf-8")
    samples = parse_prometheus(text)
    runs = {lab["outcome"]: int(v) for name, lab, v in samples
            if name == "zmonitor_migrate_runs_total"}
    expected: dict[str, int] = {}
    for o in outcomes:
        key = clean(o, limit=200)
        expected[key] = expected.get(key, 0) + 1
    assert runs == expected


def test_prometheus_label_escapes_per_the_format() -> None:
    assert prom_label('a"b\\c\nd') == 'a\\"b\\\\c\\\\nd'
    text = history.render_metrics([{"outcome": 'x"} 1\nzmonitor_db_schema_version 99'}],
                                  current_version=14, db_size=None)
    versions = [v for name, _, v in parse_prometheus(text)
                if name == "zmonitor_db_schema_version"]
    assert versions == ["14"]


def test_history_read_survives_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_bytes(b'{"run_id": "a", "outcome": "applied", "finished_at": "soon"}\n'
                     b'\xff\xfe not utf-8\n5\n[1, 2]\n"text"\nnull\n'
                     b'{"run_id": "b\\u2028\\u001b[2J", "outcome": "rejected"}\n{"torn')
    records = history.read(path)
    assert [r["run_id"] for r in records] == ["a", "b\\u2028\\x1b[2J"]
    text = history.render_metrics(records, current_version=None, db_size=None)
    assert parse_prometheus(text)
    assert all(plain_line(line) for line in history.render(records))


# -- the whole daemon, with the file name that started this -------------------------------

EVIL_NAME = (b"evil\nWATCHDOG=trigger\nWATCHDOG_USEC=1\nSTATUS=pwned\n"
             b'<1>ALERT alert=restore-failed run=fake msg="gone"\n\xff\x1b[2J.zmb')


@pytest.mark.slow
def test_daemon_with_a_hostile_inbox_file_name(device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from test_daemon import Daemon

    inbox = device.root / "inbox"
    inbox.mkdir(exist_ok=True)
    evil = os.path.join(os.fsencode(inbox), EVIL_NAME)
    with open(evil, "wb") as f:
        f.write(b"not a bundle at all")
    os.utime(evil, (time.time() - 5, time.time() - 5))
    d = Daemon(device, tmp_path, journal=True)
    try:
        d.ready()
        d.wait_for(lambda: not os.path.exists(evil), label="rejected")
        time.sleep(0.3)
        code, err = d.terminate()
    finally:
        d.kill()
    assert code == 0, err
    # every notify line one of ours (the test's reader split datagrams into lines)
    for m in d.messages:
        key, _, value = m.partition("=")
        assert key in NOTIFY_KEYS and plain_line(value), d.messages
    assert "WATCHDOG=trigger" not in d.messages and not any(
        m.startswith("WATCHDOG_USEC") for m in d.messages)
    ours = [line for line in err.splitlines() if not line.startswith("InotifyEmitter")]
    assert ours and all(re.match(r"<[0-7]>", line) for line in ours), err
    assert not any(line.startswith("<1>") for line in ours), err  # no alert was faked
    assert any("evil\\nWATCHDOG=trigger" in line for line in ours)
    status = json.loads((device.root / "run" / "status.json").read_text(encoding="utf-8"))
    assert plain_line(status["message"]) and plain_line(status["status"])
    # The daemon refuses such a name before any run (kind bad-name): a warning with the
    # name shown escaped, no run and so no history line; the history's own escaping is
    # test_history_lines_property's.
    assert any(line.startswith("<4>") and "bad-name" in line for line in ours), err
    history = device.root / "state" / "history.jsonl"
    raw = history.read_bytes().decode("utf-8") if history.exists() else ""
    for line in raw.splitlines():
        assert plain_line(json.dumps(json.loads(line), ensure_ascii=False))
