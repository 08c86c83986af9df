"""Progress and alerts: the pipeline emits ``Event``s, sinks turn them into outputs.

Sinks: ``LogSink`` (stderr lines with syslog ``<N>`` prefixes, so journald keeps the
severity), ``StatusFileSink`` (``status.json`` in the runtime dir, for the fleet agent),
``NotifySink`` (sd_notify ``STATUS=``, ``WATCHDOG=1``, ``EXTEND_TIMEOUT_USEC=``; a no-op
without ``NOTIFY_SOCKET``), ``TtyBar`` (a progress bar when stderr is a terminal).

``WATCHDOG=1`` is only ever sent from ``Reporter.emit``/``Reporter.heartbeat``, which the
work itself calls (per batch, per migration, and from SQLite's progress handler while a
statement runs). No thread pings on its own: a hung run stops pinging and systemd's
watchdog catches it.

Alerts (seed section 13) are log lines starting with ``ALERT`` and a stable
``alert=<name>`` field: ``migration-slow``, ``migration-failed``, ``validation-failed``,
``restore-executed``, ``rollback-executed``, ``restore-failed``, ``precheck-failed``,
``replaced-not-kept`` (a restore could not keep the database it replaced).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, TextIO

from .fsutil import atomic_write

LEVELS = {"alert": 1, "error": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}


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
        parts = [self.phase]
        if self.version is not None:
            parts.append(f"{self.version:04d}")
        if self.batches:
            parts.append(f"batch {self.batch}/{self.batches}")
        if self.percent is not None:
            parts.append(f"{self.percent:.0f}%")
        if self.eta_s is not None and self.batches:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        if not self.batches:
            parts.append(self.message)
        return " ".join(parts)


def format_duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...


class LogSink:
    """Journald-friendly lines; batch progress at most every 10 % or 5 s."""

    def __init__(self, stream: TextIO | None = None, *, min_level: str = "info") -> None:
        self.stream = stream or sys.stderr
        self.min = LEVELS[min_level]
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
        if event.alert:
            text = f"ALERT alert={event.alert} run={event.run_id} {event.message}"
        else:
            text = f"{event.phase}: {event.message}"
        print(f"<{prio}>{text}", file=self.stream, flush=True)


class StatusFileSink:
    """The latest event as JSON, rewritten atomically, rate-limited for batch events."""

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
            self.path.parent.mkdir(parents=True, exist_ok=True)
            body = {**asdict(event), "status": event.status_line(), "pid": os.getpid()}
            atomic_write(self.path, json.dumps(body, sort_keys=True).encode())
        except OSError:
            return  # status is advisory; never fail a run because /run is full


class NotifySink:
    """sd_notify through the ``sdnotify`` package; does nothing without NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = None
        if self.enabled:
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()

    def send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def emit(self, event: Event) -> None:
        self.send(f"STATUS={event.status_line()}\nWATCHDOG=1")

    def heartbeat(self) -> None:
        self.send("WATCHDOG=1")

    def extend(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


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
