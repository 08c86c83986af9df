"""``zmonitor-migrate daemon``: the systemd service's main loop.

Start-up: config and trust store are validated (a bad one exits 2 before anything
else), an interrupted run is recovered, then ``READY=1``. Bundles already in the inbox
are processed, then the inbox is watched with ``watchdog``.

Inbox contract: a bundle counts once it is complete. Put it there with ``rename(2)``
(write ``name.zmb.partial`` or a dotfile in the same directory, then rename); files
named ``.*`` or ``*.partial`` are ignored, and a file modified less than
``SETTLE_S`` seconds ago waits for the next pass (a plain ``cp`` into the inbox is
picked up once it has been quiet that long). Bundles are processed one at a time, in
manifest sequence order.

After a run the bundle leaves the inbox: to ``archive/<run-id>-<name>`` when applied or
already applied, to ``rejected/<name>`` with ``<name>.reason.json`` otherwise. A run
interrupted by SIGTERM leaves its bundle in the inbox, so the next start retries it.

The watchdog is fed from this loop (idle passes) and from the run's own progress; a
hung run stops feeding it and systemd restarts the service, whose start-up recovers.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from . import pipeline
from .archive import Caps, open_bundle
from .config import Config
from .errors import LockHeld, MigrateError, RestoreFailed
from .fsutil import atomic_write
from .lock import RunLock
from .manifest import Manifest
from .progress import NotifySink, Reporter, default_sinks
from .recovery import recover
from .services import for_unit

SETTLE_S = 1.0
IDLE_WAKE_S = 2.0


class _Stop:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


def candidates(inbox: Path, now: float | None = None) -> list[Path]:
    now = time.time() if now is None else now
    out = []
    for p in inbox.iterdir():
        if p.name.startswith(".") or p.name.endswith(".partial") or not p.is_file() \
                or p.is_symlink():
            continue
        if now - p.stat().st_mtime < SETTLE_S:
            continue
        out.append(p)
    return out


def sequence_of(path: Path, caps: Caps) -> int:
    """The manifest's sequence, for ordering only (verification comes later)."""
    try:
        manifest_bytes, _ = open_bundle(path, caps)
        return Manifest.from_json(manifest_bytes).sequence
    except (MigrateError, OSError, ValueError):
        return 2**62  # unreadable ones last; their run rejects them with a reason


def _free_name(dest_dir: Path, name: str) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / name
    i = 1
    while dest.exists():
        dest = dest_dir / f"{name}.{i}"
        i += 1
    return dest


def _move(src: Path, dest_dir: Path, name: str) -> Path:
    dest = _free_name(dest_dir, name)
    shutil.move(str(src), dest)
    return dest


def process(path: Path, config: Config, reporter: Reporter, stop: _Stop) -> dict[str, Any]:
    archive_dir = config.state_dir / "archive"
    rejected_dir = config.state_dir / "rejected"
    try:
        result = pipeline.apply(path, config, reporter=reporter, stop_requested=stop,
                                wait=True)
    except RestoreFailed as exc:
        if exc.kind == "restore-blocked":
            # Not this bundle's fault: keep it until an operator has restored a backup.
            return {"bundle": path.name, "outcome": "blocked", "kept_in_inbox": True,
                    "message": exc.message}
        _reject(path, rejected_dir, exc)
        raise
    except LockHeld:
        return {"bundle": path.name, "outcome": "locked"}
    except MigrateError as exc:
        if exc.kind == "interrupted" and stop():
            return {"bundle": path.name, "outcome": "interrupted", "kept_in_inbox": True}
        return _reject(path, rejected_dir, exc)
    dest = _move(path, archive_dir, f"{result.run_id}-{path.name}")
    return {"bundle": path.name, "outcome": result.outcome, "archived": str(dest)}


def _reject(path: Path, rejected_dir: Path, exc: MigrateError) -> dict[str, Any]:
    if not path.exists():
        return {"bundle": path.name, "outcome": "gone"}
    dest = _free_name(rejected_dir, path.name)
    reason = {"kind": exc.kind, "message": exc.message, "exit_code": exc.exit_code,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # The reason first, atomically: whoever sees the bundle in rejected/ finds it whole.
    atomic_write(dest.with_name(dest.name + ".reason.json"),
                 (json.dumps(reason, indent=1) + "\n").encode())
    shutil.move(str(path), dest)
    return {"bundle": path.name, "outcome": "rejected", "reason": reason}


def run_daemon(config: Config) -> int:
    from .trust import TrustStore

    TrustStore.from_config(config)  # a key file that does not parse is a start-up error
    stop = _Stop()
    wake: queue.Queue[str] = queue.Queue()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.requested = True
        wake.put("stop")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sinks = default_sinks(config.status_path, tty=False)
    reporter = Reporter(sinks)
    notify = next((s for s in sinks if isinstance(s, NotifySink)), NotifySink())
    for d in (config.inbox, config.state_dir):
        d.mkdir(parents=True, exist_ok=True)
    services = for_unit(config.app_unit, config.systemctl)
    with RunLock(config.lock_path, wait=True):
        outcome = recover(config, services=services, reporter=reporter)
    reporter.emit("idle", f"ready; watching {config.inbox}"
                  + (f" (recovered: {outcome})" if outcome else ""))
    notify.send("READY=1")
    observer = _watch(config.inbox, wake)
    caps = Caps.from_config(config)
    exit_code = 0
    blocked = False
    try:
        while not stop():
            found = sorted(candidates(config.inbox), key=lambda p: (sequence_of(p, caps),
                                                                    p.name))
            for path in found:
                if stop():
                    break
                summary = process(path, config, reporter, stop)
                if summary["outcome"] == "blocked":
                    if not blocked:
                        reporter.alert("restore-failed", summary["message"] + "; bundles "
                                       "wait in the inbox")
                    blocked = True
                    break
                blocked = False
                reporter.emit("idle", f"{summary['bundle']}: {summary['outcome']}")
                if summary["outcome"] == "locked":
                    break
            notify.heartbeat()
            with contextlib.suppress(queue.Empty):
                wake.get(timeout=IDLE_WAKE_S)
    except RestoreFailed:
        exit_code = 6  # the app stays stopped; systemd restarts us, the gate keeps it down
    finally:
        notify.send("STOPPING=1")
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)
    return exit_code


def _watch(inbox: Path, wake: queue.Queue[str]) -> Any:
    """Wake the loop on any inbox change; the loop rescans, so no event is trusted."""
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        return None  # polling every IDLE_WAKE_S still works

    class Handler(FileSystemEventHandler):  # type: ignore[misc]
        def on_any_event(self, event: Any) -> None:
            wake.put(getattr(event, "event_type", "event"))

    observer = Observer()
    observer.schedule(Handler(), str(inbox), recursive=False)
    observer.daemon = True
    observer.start()
    return observer
