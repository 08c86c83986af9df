"""Progress and alerts: the pipeline emits ``Event``s, sinks turn them into outputs.

Sinks: ``LogSink`` (one stderr line per event; with a syslog ``<N>`` prefix only when
stderr is the journal, so journald keeps the severity), ``StatusFileSink``
(``status.json`` in the runtime dir, for the fleet agent), ``NotifySink`` (sd_notify
``STATUS=``, ``WATCHDOG=1``, ``EXTEND_TIMEOUT_USEC=``; a no-op without
``NOTIFY_SOCKET``), ``TtyBar`` (a progress bar when stderr is a terminal).

Every string an event carries may come from outside (an inbox file name, a manifest
field, SQLite's error text), so each sink passes it through ``text.clean``: a log event
is exactly one physical line, an sd_notify datagram holds only our own assignments,
``STATUS=`` is one line, ``status.json`` holds the cleaned text.

``WATCHDOG=1`` is only ever sent from ``Reporter.emit``/``Reporter.heartbeat``, which the
work itself calls (per batch, per migration, and from SQLite's progress handler while a
statement runs). No thread pings on its own: a hung run stops pinging and systemd's
watchdog catches it.

Alerts are log lines ``ALERT alert=<name> run=<id> msg="<text>"`` at priority 1: the
name and run id are bare words, the message a double-quoted value with ``\\`` and ``"``
escaped, so the line splits into exactly these three fields with POSIX shell (or
logfmt) rules whatever the message holds. Names: ``migration-slow``,
``migration-failed``, ``validation-failed``, ``restore-executed``, ``rollback-executed``,
``restore-failed``, ``precheck-failed``, ``backup-damaged``, ``app-start-failed``,
``history-unwritable``, ``replaced-not-kept`` (a restore could not keep the database it
replaced).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, TextIO

from .fsutil import atomic_write
from .text import clean, clean_tree, quoted, token

LEVELS = {"alert": 1, "error": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}
# A log line stays far below journald's LineMax (48 KiB, which splits a line into two
# entries) even at 4 bytes a character; status texts stay short for `systemctl status`.
MAX_LOG_CHARS = 4000
MAX_STATUS_CHARS = 512


@dataclass(frozen=True)
class Event:
    phase: str
    message: str
    level: str = "info"
    run_id: str | None = None
    version: int | None = None
    batch: int = 0
    batches: int = 0
    rows: int = 0
    percent: float | None = None
    eta_s: float | None = None
    alert: str | None = None
    time: float = 0.0

    def status_line(self) -> str:
        """Short text for ``systemctl status``: "applying 0011 batch 37/120 31% ETA 1m12s"."""
        parts = [clean(self.phase)]
        if self.version is not None:
            parts.append(f"{self.version:04d}")
        if self.batches:
            parts.append(f"batch {self.batch}/{self.batches}")
        if self.percent is not None:
            parts.append(f"{self.percent:.0f}%")
        if self.eta_s is not None and self.batches:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        if not self.batches:
            parts.append(clean(self.message))
        return clean(" ".join(parts), limit=MAX_STATUS_CHARS)


def format_duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...


def stream_is_journal(stream: object) -> bool:
    """True when ``stream`` is the journal's stream socket: ``$JOURNAL_STREAM`` is
    "<st_dev>:<st_ino>" of the fd systemd connected, the check systemd's own tools make
    (a terminal or a pipe, even under systemd-run --pipe, gets plain lines)."""
    m = re.fullmatch(r"([0-9]{1,20}):([0-9]{1,20})", os.environ.get("JOURNAL_STREAM", ""))
    if m is None:
        return False
    try:
        st = os.fstat(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False  # io.UnsupportedOperation (a StringIO) is an OSError and ValueError
    return (st.st_dev, st.st_ino) == (int(m.group(1)), int(m.group(2)))


def log_text(event: Event) -> str:
    """The text of one log line for ``event``: one line whatever the event holds."""
    if event.alert:
        return (f"ALERT alert={token(event.alert)} run={token(event.run_id or '-')} "
                f"msg={quoted(event.message, limit=MAX_LOG_CHARS)}")
    return clean(f"{clean(event.phase)}: {clean(event.message)}", limit=MAX_LOG_CHARS)


class LogSink:
    """One line per event; batch progress at most every 10 % or 5 s. The ``<N>`` prefix
    is written when ``prefix`` is true, by default when the stream is the journal."""

    def __init__(self, stream: TextIO | None = None, *, min_level: str = "info",
                 prefix: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.min = LEVELS[min_level]
        self.prefix = stream_is_journal(self.stream) if prefix is None else prefix
        self._last = (0.0, -1)

    def emit(self, event: Event) -> None:
        prio = LEVELS.get(event.level, 6)
        if prio > self.min:
            return
        if event.batches and 1 < event.batch < event.batches:
            step = event.batch * 10 // event.batches
            if step == self._last[1] and time.monotonic() - self._last[0] < 5:
                return
            self._last = (time.monotonic(), step)
        head = f"<{prio}>" if self.prefix else ""
        # One write of one line: the prefix can only ever stand at its start.
        self.stream.write(f"{head}{log_text(event)}\n")
        self.stream.flush()


class StatusFileSink:
    """The latest event as JSON, rewritten atomically, rate-limited for batch events.

    The file is for the fleet agent, which need not run as root: mode 0644 whatever the
    umask (the unit's is 0077), in a directory it can enter. It holds no secret: phase,
    version, progress and a message, every string cleaned."""

    MODE = 0o644
    DIR_MODE = 0o755

    def __init__(self, path: Path, *, min_interval: float = 0.5) -> None:
        self.path = path
        self.min_interval = min_interval
        self.last = 0.0

    def emit(self, event: Event) -> None:
        now = time.monotonic()
        if event.batches and event.batch < event.batches and now - self.last < self.min_interval:
            return
        self.last = now
        try:
            if not self.path.parent.is_dir():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(self.path.parent, self.DIR_MODE)  # ours: readable like the unit's
            body = {**clean_tree(asdict(event), limit=MAX_LOG_CHARS),
                    "status": event.status_line(), "pid": os.getpid()}
            atomic_write(self.path, json.dumps(body, sort_keys=True).encode(),
                         mode=self.MODE, exact_mode=True)
        except OSError:
            return  # status is advisory; never fail a run because /run is full


# The assignments we send, each with the values it may take. A datagram is refused whole
# when a line is anything else, so no text can add WATCHDOG=trigger, WATCHDOG_USEC=…,
# MAINPID=… or a second STATUS= to a message.
_NOTIFY_VALUES = {
    "READY": re.compile("1"), "STOPPING": re.compile("1"), "WATCHDOG": re.compile("1"),
    "EXTEND_TIMEOUT_USEC": re.compile("[0-9]{1,15}"),
    "STATUS": re.compile(f"[^\\x00-\\x1f\\x7f]{{0,{MAX_STATUS_CHARS + 40}}}"),
}
MAX_EXTEND_S = 86400.0


def notify_datagram(message: str) -> bytes | None:
    """The UTF-8 bytes of ``message`` if every line is one of our own assignments with a
    value it may take (``STATUS=`` text must already be clean), else None."""
    seen: set[str] = set()
    for line in message.split("\n"):
        key, sep, value = line.partition("=")
        pattern = _NOTIFY_VALUES.get(key)
        if not sep or pattern is None or key in seen or not pattern.fullmatch(value) \
                or (key == "STATUS" and clean(value) != value):
            return None
        seen.add(key)
    return message.encode("utf-8")


class NotifySink:
    """sd_notify through the ``sdnotify`` package; does nothing without NOTIFY_SOCKET.

    One datagram per message, built only by ``notify_datagram``: values from outside go
    into ``STATUS=`` alone, cleaned to one line first."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = None
        if self.enabled:
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()

    def send(self, message: str) -> bool:
        """Send ``message`` (``KEY=value`` lines) as one datagram; False, and nothing
        sent, when it is not made only of our own assignments."""
        data = notify_datagram(message)
        if data is None:
            return False
        if self._notifier is not None:
            # sdnotify 0.3 encodes with latin-1 and silently drops anything else (a
            # STATUS with a "→" would lose the WATCHDOG=1 beside it): hand it the UTF-8
            # bytes as latin-1 code points, which it turns back into the same bytes.
            self._notifier.notify(data.decode("latin-1"))
        return True

    def emit(self, event: Event) -> None:
        self.send(f"STATUS={event.status_line()}\nWATCHDOG=1")

    def heartbeat(self) -> None:
        self.send("WATCHDOG=1")

    def extend(self, seconds: float) -> None:
        bounded = min(max(seconds, 0.0), MAX_EXTEND_S) if math.isfinite(seconds) else MAX_EXTEND_S
        usec = int(bounded * 1_000_000)
        self.send(f"EXTEND_TIMEOUT_USEC={usec}")


class TtyBar:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.active = False

    def emit(self, event: Event) -> None:
        if event.batches:
            width = 30
            filled = int(width * event.batch / max(1, event.batches))
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] {event.status_line()}   ")
            self.active = event.batch < event.batches
            if not self.active:
                self.stream.write("\n")
            self.stream.flush()
        elif self.active:
            self.stream.write("\n")
            self.active = False


class Reporter:
    """Fans events out to sinks; stamps run id and time; rate-limits heartbeats."""

    def __init__(self, sinks: list[Sink] | None = None, run_id: str | None = None) -> None:
        self.sinks = list(sinks or [])
        self.run_id = run_id
        self.events: list[Event] = []
        self._last_beat = 0.0

    def emit(self, phase: str, message: str, **fields: object) -> Event:
        event = Event(phase=phase, message=message, run_id=self.run_id, time=time.time(),
                      **fields)  # type: ignore[arg-type]
        if not event.batches or event.batch in (1, event.batches):
            self.events.append(event)
        for sink in self.sinks:
            sink.emit(event)
        return event

    def alert(self, name: str, message: str, phase: str = "alert") -> Event:
        return self.emit(phase, message, level="alert", alert=name)

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat < 1.0:
            return
        self._last_beat = now
        for sink in self.sinks:
            beat = getattr(sink, "heartbeat", None)
            if beat:
                beat()

    def extend(self, seconds: float) -> None:
        for sink in self.sinks:
            ext = getattr(sink, "extend", None)
            if ext:
                ext(seconds)

    def notify(self, message: str) -> None:
        for sink in self.sinks:
            send = getattr(sink, "send", None)
            if send:
                send(message)


def default_sinks(status_path: Path | None, *, tty: bool | None = None,
                  quiet: bool = False) -> list[Sink]:
    sinks: list[Sink] = [] if quiet else [LogSink()]
    if status_path is not None:
        sinks.append(StatusFileSink(status_path))
    sinks.append(NotifySink())
    if tty if tty is not None else sys.stderr.isatty():
        sinks.append(TtyBar())
    return sinks
