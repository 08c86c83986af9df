"""``zmonitor-migrate daemon``: the systemd service's main loop.

Start-up: config and trust store are validated (a bad one exits 2 before anything
else), an interrupted run is recovered, then ``READY=1``. Bundles already in the inbox
are processed, then the inbox is watched with ``watchdog``.

Inbox contract: a bundle counts once it is complete. Put it there with ``rename(2)``
(write ``name.zmb.partial`` or a dotfile in the same directory, then rename); files
named ``.*`` or ``*.partial`` are ignored, and a file modified less than
``SETTLE_S`` seconds ago waits for the next pass (a plain ``cp`` into the inbox is
picked up once it has been quiet that long). Bundles are processed one at a time in
arrival order (modification time, then name); no file is opened before its turn.
Ordering by the manifests' sequence is not needed: every bundle carries the whole
migration history, so the newest bundle alone brings a device up to date, and an older
one arriving after it is refused by the device policy as ``rollback``.

Everything in the inbox is hostile until verified, its names included. The directory
is read with ``lstat`` only (no link is followed, nothing is opened) and at most
``MAX_ENTRIES_PER_PASS`` entries are considered per pass. A name that is not printable
UTF-8 or is longer than ``MAX_NAME_BYTES`` is refused before the file is read.
Entries that are not regular files are never opened: symlinks and directories are moved
to ``rejected/`` as they are; FIFOs, sockets and device nodes hold no bytes to keep and
are removed, their reason file saying what they were. Any error while one entry is
handled, expected or not, becomes that entry's rejection (kind ``internal`` for an
unexpected one, naming the exception) and the loop goes on with the next entry.

After a run the bundle leaves the inbox: to ``archive/<run-id>-<name>`` when applied or
already applied, to ``rejected/<name>`` with ``<name>.reason.json`` otherwise. Both are
created exclusively: when either path exists, ``<name>`` becomes ``<name>.1``, ``.2``…,
so no earlier evidence is ever replaced. ``<name>`` is the inbox name with anything not
printable replaced by ``_``, cut to ``MAX_NAME_BYTES``; the original name is kept,
escaped, in the reason file. When ``rejected/`` (or ``archive/``) cannot take a file
(another filesystem that is full, a file where the directory should be), it stays in the
inbox renamed to a dotfile (``.rejected-…``, ``.applied-…``) that the daemon ignores, and
the reason file, if it could be written, says so.

Crash-loop breaker: before a file is handled, an attempt count for it is written
durably to ``state_dir/inbox-attempts.json``; it is cleared when the handling returns
(the file left the inbox, or stays there after SIGTERM, a held lock or a blocked
restore). A file found already attempted ``MAX_ATTEMPTS`` (2) times died with the
process each time (a crash, the OOM killer, a watchdog kill, a power cut) and is
rejected without a third try, kind ``repeated-interruption``. Two, not one: a single
power cut or reboot during a genuine run must not cost the bundle; two in a row is a
pattern, and the unit's start limit (10 starts in 5 minutes) is far from reached. The
database is safe across those deaths: start-up recovery finishes any interrupted run
before the inbox is read.

The watchdog is fed from this loop (after each inbox entry, every
``SCAN_TICK_EVERY`` directory entries, and idle passes that wake at least every
quarter of ``WATCHDOG_USEC``) and from the run's own progress; a hung run stops feeding
it and systemd restarts the service, whose start-up recovers.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import stat
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import pipeline
from .config import Config
from .errors import LockHeld, MigrateError, RestoreBlocked, RestoreFailed, StopInterrupted
from .fsutil import atomic_write, fsync_dir, link_new, make_dirs, remove_stale_temps
from .lock import RunLock
from .progress import NotifySink, Reporter, default_sinks, stream_is_journal
from .recovery import recover
from .services import for_unit
from .text import clean

SETTLE_S = 1.0
IDLE_WAKE_S = 2.0
MAX_ENTRIES_PER_PASS = 1024  # inbox entries lstat'ed and handled per pass
MAX_NAMES_PER_PASS = 65536  # directory entries read per pass, ignored names included
SCAN_TICK_EVERY = 256
MAX_NAME_BYTES = 200  # leaves room for ".NNN.reason.json" within NAME_MAX (255)
MAX_ATTEMPTS = 2
MAX_ATTEMPT_RECORDS = 1000
ATTEMPTS_FILE = "inbox-attempts.json"
REASON_SUFFIX = ".reason.json"
_COPY_CHUNK = 1024 * 1024

# Refusals that say someone may be trying something (a signature, the device policy, a
# tampered or unsafe archive) rather than that a bundle is broken or does not fit.
SECURITY_KINDS = frozenset({
    "bad-signature", "untrusted-key", "threshold-not-met", "revoked-key", "hash-mismatch",
    "unlisted-member", "missing-member", "unsafe-member", "rollback", "expired",
    "not-yet-valid", "validity-too-long", "wrong-device", "applied-migration-changed",
    "anti-rollback-state"})

log = logging.getLogger(__name__)  # debug only: tracebacks of internal errors


def _warn(message: str) -> None:
    """A warning on stderr, prefixed for journald only when stderr is the journal."""
    head = "<4>" if stream_is_journal(sys.stderr) else ""
    print(f"{head}inbox: {clean(message)}", file=sys.stderr, flush=True)
Tick = Callable[[], None]


class _Stop:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


# -- the inbox listing --------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One inbox entry as ``lstat`` saw it."""

    path: Path
    kind: str  # file, symlink, directory, fifo, socket, device
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def order(self) -> tuple[int, str]:
        return (self.mtime_ns, self.name)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def _ignored_name(name: str) -> bool:
    return name.startswith(".") or name.endswith(".partial")


def scan_inbox(inbox: Path, now: float | None = None, *, limit: int = MAX_ENTRIES_PER_PASS,
               tick: Tick | None = None) -> list[Entry]:
    """Settled inbox entries of every type, oldest first (mtime, then name).

    Only ``lstat``: nothing is opened and no link followed. An entry that vanishes at
    any step is skipped. At most ``limit`` entries are considered (in directory order,
    then sorted), so a flooded inbox is worked through over several passes."""
    now = time.time() if now is None else now
    out: list[Entry] = []
    try:
        it = os.scandir(inbox)
    except OSError as exc:
        _warn(f"cannot list the inbox {inbox}: {exc}")
        return out
    with it:
        for seen, dirent in enumerate(it, start=1):
            if tick is not None and seen % SCAN_TICK_EVERY == 0:
                tick()
            if seen > MAX_NAMES_PER_PASS or len(out) >= limit:
                break
            if _ignored_name(dirent.name):
                continue
            try:
                st = dirent.stat(follow_symlinks=False)
            except OSError:
                continue  # gone (or unreadable) since the listing: the next pass decides
            if now - st.st_mtime < SETTLE_S:
                continue
            out.append(Entry(Path(dirent.path), _kind(st.st_mode), st.st_dev, st.st_ino,
                             st.st_size, st.st_mtime_ns))
    out.sort(key=lambda e: e.order)
    return out


def candidates(inbox: Path, now: float | None = None, *,
               limit: int = MAX_ENTRIES_PER_PASS) -> list[Path]:
    """The regular files among the settled inbox entries, in processing order."""
    return [e.path for e in scan_inbox(inbox, now, limit=limit) if e.kind == "file"]


# -- names ----------------------------------------------------------------------------------

def escape_name(name: str) -> str:
    """A printable, unambiguous rendering of a file name (undecodable bytes as ``\\xNN``)."""
    out = []
    for c in name:
        o = ord(c)
        if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif c == "\\":
            out.append("\\\\")
        elif c.isprintable():
            out.append(c)
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return "".join(out)


def _truncate_utf8(text: str, limit: int) -> str:
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def clean_name(name: str) -> str:
    """The name a file is stored under in ``rejected/`` or ``archive/``: printable, not
    hidden, never ending in ``.reason.json`` (that suffix belongs to reason files),
    at most ``MAX_NAME_BYTES`` bytes."""
    text = os.fsencode(name).decode("utf-8", "replace")
    out = "".join(c if c.isprintable() and c != "\ufffd" else "_" for c in text)
    if out.startswith("."):
        out = "_" + out[1:]
    out = _truncate_utf8(out, MAX_NAME_BYTES)
    if out.endswith(REASON_SUFFIX):
        out = _truncate_utf8(out, MAX_NAME_BYTES - len(".bundle")) + ".bundle"
    return out or "_"


def name_problem(name: str) -> str | None:
    """Why an inbox name is refused before its file is read, or None. Such a name would
    otherwise travel into the journal, the history, logs and ``STATUS=``."""
    raw = os.fsencode(name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "the file name is not UTF-8"
    if not text.isprintable():
        return "the file name holds control or other non-printable characters"
    if len(raw) > MAX_NAME_BYTES:
        return f"the file name is longer than {MAX_NAME_BYTES} bytes"
    return None


# -- the crash-loop breaker ---------------------------------------------------------------

class Attempts:
    """Durable per-file attempt counts (``state_dir/inbox-attempts.json``)."""

    def __init__(self, path: Path, inbox: Path) -> None:
        self.path = path
        self.inbox = inbox
        self.records: list[dict[str, Any]] = self._load()

    def _load(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                raw = json.loads(f.read(4 * 1024 * 1024))
            records = raw["attempts"]
            if not isinstance(records, list):
                raise ValueError("attempts is not a list")
            return [r for r in records if isinstance(r, dict)][:MAX_ATTEMPT_RECORDS]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            _warn(f"ignoring unreadable {self.path}: {exc}")
            return []

    @staticmethod
    def _identity(entry: Entry) -> dict[str, Any]:
        return {"name_hex": os.fsencode(entry.name).hex(), "dev": entry.dev,
                "ino": entry.ino, "size": entry.size, "mtime_ns": entry.mtime_ns}

    def _find(self, entry: Entry) -> dict[str, Any] | None:
        ident = self._identity(entry)
        for r in self.records:
            if all(r.get(k) == v for k, v in ident.items()):
                return r
        return None

    def count(self, entry: Entry) -> int:
        r = self._find(entry)
        return int(r.get("count", 0)) if r is not None else 0

    def _still_in_inbox(self, r: dict[str, Any]) -> bool:
        try:
            name = os.fsdecode(bytes.fromhex(str(r.get("name_hex", ""))))
            return os.lstat(self.inbox / name).st_ino == r.get("ino")
        except (OSError, ValueError):
            return False

    def _save(self) -> None:
        try:
            atomic_write(self.path, (json.dumps({"attempts": self.records}) + "\n").encode())
        except OSError as exc:
            # Without the record this file has no crash-loop protection, nothing worse.
            _warn(f"cannot write {self.path}: {exc}")

    def begin(self, entry: Entry) -> None:
        """Record one more attempt, durably, before the file is touched."""
        r = self._find(entry)
        self.records = [x for x in self.records if x is r or self._still_in_inbox(x)]
        if r is None:
            r = {**self._identity(entry), "name": escape_name(entry.name), "count": 0}
            self.records.append(r)
        r["count"] = int(r.get("count", 0)) + 1
        self.records = self.records[-MAX_ATTEMPT_RECORDS:]
        self._save()

    def finish(self, entry: Entry) -> None:
        r = self._find(entry)
        if r is not None:
            self.records.remove(r)
            self._save()


# -- keeping evidence ---------------------------------------------------------------------

def _reason_body(entry_name: str, reason: dict[str, Any]) -> bytes:
    body = {**reason, "original_name": escape_name(entry_name),
            "original_name_hex": os.fsencode(entry_name).hex()}
    return (json.dumps(body, indent=1) + "\n").encode()


def _fresh_names(base: str) -> list[str]:
    return [base, *(f"{base}.{i}" for i in range(1, 100)), f"{base}.{uuid.uuid4().hex}"]


def _copy_exclusive(src: Path, dest: Path, tick: Tick | None) -> None:
    """Copy a regular file to a new ``dest`` (O_EXCL), never following a link and never
    blocking on a FIFO swapped in; fsynced. A partial copy is removed."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{src} is no longer a regular file")
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            while chunk := os.read(fd, _COPY_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
                if tick is not None:
                    tick()
            os.fsync(out)
        except BaseException:
            os.close(out)
            with contextlib.suppress(OSError):
                os.unlink(dest)
            raise
        os.close(out)
    finally:
        os.close(fd)


def _move_exclusive(src: Path, dest: Path, tick: Tick | None) -> str:
    """Move one inbox entry to ``dest``, which must not exist (FileExistsError if it
    does). Returns what was done: ``moved``, or ``removed`` for a FIFO, socket or device
    (no content to keep; never opened)."""
    kind = _kind(os.lstat(src).st_mode)
    if kind in ("fifo", "socket", "device"):
        os.unlink(src)
        return "removed"
    if kind == "directory":
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, "exists", str(dest))
        os.rename(src, dest)  # rejected/ is written only by this daemon
        return "moved"
    try:
        os.link(src, dest, follow_symlinks=False)  # fails on an existing dest
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        if kind == "symlink":
            os.symlink(os.readlink(src), dest)
        else:
            _copy_exclusive(src, dest, tick)
    # The new name durable before the old one goes: a power cut between them must not
    # take the bundle from both directories.
    fsync_dir(dest.parent)
    os.unlink(src)
    return "moved"


def _set_aside(path: Path, state: str) -> Path | None:
    """Rename a file that could not leave the inbox to a dotfile the scan ignores."""
    aside = path.with_name(f".{state}-{time.strftime('%Y%m%dT%H%M%S')}-"
                           f"{uuid.uuid4().hex[:8]}-{clean_name(path.name)}")
    try:
        os.rename(path, aside)
        return aside
    except OSError as exc:
        _warn(f"cannot set {path} aside: {exc}")
        return None


def keep(path: Path, dest_dir: Path, base: str, *, reason: dict[str, Any] | None = None,
         tick: Tick | None = None) -> dict[str, Any]:
    """Move ``path`` out of the inbox into ``dest_dir`` under a fresh name derived from
    ``base`` (with ``<name>.reason.json`` first when ``reason`` is given), never
    replacing anything. Falls back to a dotfile in the inbox when ``dest_dir`` cannot
    take it. Returns where things went."""
    last_error: OSError | None = None
    try:
        make_dirs(dest_dir)
        names = _fresh_names(base)
    except OSError as exc:  # e.g. a file where the directory should be
        last_error, names = exc, []
    for name in names:
        dest = dest_dir / name
        reason_path = dest_dir / (name + REASON_SUFFIX)
        if os.path.lexists(dest) or (reason is not None and os.path.lexists(reason_path)):
            continue
        try:
            if reason is not None:
                link_new(reason_path, _reason_body(path.name, reason))
        except FileExistsError:
            continue
        except OSError as exc:
            last_error = exc
            break
        try:
            done = _move_exclusive(path, dest, tick)
        except FileExistsError:
            if reason is not None:
                os.unlink(reason_path)
            continue
        except FileNotFoundError:
            if reason is not None:  # removed by someone else meanwhile: nothing to explain
                with contextlib.suppress(OSError):
                    os.unlink(reason_path)
            return {"stored": None, "reason_file": None, "gone": True}
        except OSError as exc:
            last_error = exc
            aside = _set_aside(path, "rejected" if reason is not None else "applied")
            if reason is not None:
                _rewrite_reason(reason_path, path.name, reason, aside, exc)
            return {"stored": None, "reason_file": str(reason_path) if reason else None,
                    "kept_in_inbox_as": str(aside) if aside else None}
        with contextlib.suppress(OSError):
            fsync_dir(dest_dir)
        return {"stored": str(dest) if done == "moved" else None, "removed": done == "removed",
                "reason_file": str(reason_path) if reason is not None else None}
    aside = _set_aside(path, "rejected" if reason is not None else "applied")
    _warn(f"cannot write into {dest_dir} ({last_error}); {path.name} kept in the inbox as "
          f"{aside}")
    return {"stored": None, "reason_file": None,
            "kept_in_inbox_as": str(aside) if aside else None}


def _rewrite_reason(reason_path: Path, name: str, reason: dict[str, Any],
                    aside: Path | None, exc: OSError) -> None:
    note = dict(reason)
    note["kept_in_inbox_as"] = aside.name if aside else None
    note["not_moved_because"] = f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(OSError):
        atomic_write(reason_path, _reason_body(name, note))


# -- one inbox entry --------------------------------------------------------------------------

def _now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _reason(exc: MigrateError) -> dict[str, Any]:
    return {"kind": exc.kind, "message": exc.message, "exit_code": exc.exit_code,
            "time": _now_utc()}


def _internal(exc: BaseException, path: Path) -> MigrateError:
    text = " ".join(str(exc).split())[:500]
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return MigrateError(f"no space left while handling {clean_name(path.name)} ({text}); "
                            "free space in the state dir or send a smaller bundle, then drop "
                            "it again", kind="no-space")
    return MigrateError(f"internal error while handling {clean_name(path.name)}: "
                        f"{type(exc).__name__}: {text}; the bundle is set aside, the daemon "
                        "goes on. Report this with the file", kind="internal")


def process(path: Path, config: Config, reporter: Reporter, stop: _Stop) -> dict[str, Any]:
    """One bundle through the pipeline; whatever happens, the daemon goes on (except for
    a failed restore, which the caller turns into exit 6)."""
    archive_dir = config.state_dir / "archive"
    rejected_dir = config.state_dir / "rejected"
    try:
        result = pipeline.apply(path, config, reporter=reporter, stop_requested=stop,
                                wait=True)
    except RestoreBlocked as exc:
        # Not this bundle's fault: keep it until an operator has restored a backup.
        return {"bundle": path.name, "outcome": "blocked", "kept_in_inbox": True,
                "message": exc.message}
    except RestoreFailed as exc:
        _reject(path, rejected_dir, exc)
        raise
    except LockHeld:
        return {"bundle": path.name, "outcome": "locked"}
    except MigrateError as exc:
        if isinstance(exc, StopInterrupted) and stop():
            return {"bundle": path.name, "outcome": "interrupted", "kept_in_inbox": True}
        return _reject(path, rejected_dir, exc)
    except Exception as exc:  # any error of one bundle is its rejection
        log.debug("internal error while handling %s", escape_name(str(path)), exc_info=True)
        return _reject(path, rejected_dir, _internal(exc, path))
    where = keep(path, archive_dir, f"{result.run_id}-{clean_name(path.name)}",
                 tick=reporter.heartbeat)
    return {"bundle": path.name, "outcome": result.outcome, "archived": where["stored"]}


def _reject(path: Path, rejected_dir: Path, exc: MigrateError, tick: Tick | None = None,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    if not os.path.lexists(path):
        return {"bundle": path.name, "outcome": "gone"}
    reason = {**_reason(exc), **(extra or {})}
    where = keep(path, rejected_dir, clean_name(path.name), reason=reason, tick=tick)
    if where.get("gone"):
        return {"bundle": path.name, "outcome": "gone"}
    return {"bundle": path.name, "outcome": "rejected", "reason": reason, **where}


def _reject_stray(entry: Entry, rejected_dir: Path) -> dict[str, Any]:
    what = {"symlink": "a symbolic link", "directory": "a directory", "fifo": "a FIFO",
            "socket": "a socket", "device": "a device node"}[entry.kind]
    fate = ("it was moved here as it is" if entry.kind in ("symlink", "directory") else
            "it holds no bytes to keep and was removed")
    exc = MigrateError(f"{clean_name(entry.name)} is {what}, not a regular file; it was not "
                       f"opened, {fate}. Drop the bundle file itself, by rename",
                       kind="not-a-file")
    extra: dict[str, Any] = {"entry_type": entry.kind}
    if entry.kind == "symlink":
        with contextlib.suppress(OSError):
            extra["link_target"] = escape_name(os.readlink(entry.path))
    return _reject(entry.path, rejected_dir, exc, extra=extra)


class InboxWorker:
    """Handles inbox entries one at a time; nothing one entry does stops the loop."""

    def _report_rejection(self, name: str, reason: dict[str, Any]) -> None:
        """A refusal is a warning in the journal with its kind and reason (the reason file
        keeps the same); a refusal for a security reason is an alert."""
        kind = str(reason.get("kind", "?"))
        text = f"{name}: rejected [{kind}]: {reason.get('message', '')}"
        if kind in SECURITY_KINDS:
            self.reporter.alert("bundle-rejected", text)
        else:
            self.reporter.emit("idle", text, level="warning")

    def __init__(self, config: Config, reporter: Reporter, stop: _Stop,
                 ping: Tick) -> None:
        self.config = config
        self.reporter = reporter
        self.stop = stop
        self.ping = ping
        self.rejected_dir = config.state_dir / "rejected"
        self.attempts = Attempts(config.state_dir / ATTEMPTS_FILE, config.inbox)
        # Entries that could leave the inbox neither to rejected/ nor to a dotfile.
        self.skipped: set[tuple[int, int]] = set()

    def handle(self, entry: Entry) -> dict[str, Any]:
        if (entry.dev, entry.ino) in self.skipped:
            return {"bundle": entry.name, "outcome": "skipped"}
        try:
            summary = self._handle(entry)
        except RestoreFailed:
            raise
        except Exception as exc:  # even our own bookkeeping must not kill us
            log.debug("internal error around %s", escape_name(entry.name), exc_info=True)
            summary = self._refuse(entry, _internal(exc, entry.path))
        if summary.get("outcome") == "rejected" and summary.get("kept_in_inbox_as") is None \
                and not summary.get("stored") and not summary.get("removed") \
                and os.path.lexists(entry.path):
            self.skipped.add((entry.dev, entry.ino))
        return summary

    def _refuse(self, entry: Entry, exc: MigrateError) -> dict[str, Any]:
        try:
            return _reject(entry.path, self.rejected_dir, exc, tick=self.ping)
        except Exception as inner:  # the rejection itself failed
            _warn(f"cannot reject {entry.name}: {inner}")
            self.skipped.add((entry.dev, entry.ino))
            return {"bundle": entry.name, "outcome": "skipped"}

    def _handle(self, entry: Entry) -> dict[str, Any]:
        if entry.kind != "file":
            return _reject_stray(entry, self.rejected_dir)
        problem = name_problem(entry.name)
        if problem is not None:
            return self._refuse(entry, MigrateError(
                f"{problem}; the file was not read. Rename the bundle to letters, digits, "
                "'.', '_', '-' and drop it again", kind="bad-name"))
        tried = self.attempts.count(entry)
        if tried >= MAX_ATTEMPTS:
            self.attempts.finish(entry)
            return self._refuse(entry, MigrateError(
                f"{entry.name} interrupted the daemon {tried} times: the process died while "
                "handling it (a crash, out of memory, a watchdog or power loss), so it is set "
                "aside without another try and the inbox goes on. If the device was only "
                "restarted, drop the bundle again", kind="repeated-interruption"))
        self.attempts.begin(entry)
        try:
            return process(entry.path, self.config, self.reporter, self.stop)
        finally:
            self.attempts.finish(entry)

    def run_pass(self) -> dict[str, Any] | None:
        """One pass over the inbox. Returns the summary of the entry that ended the pass
        early (a blocked restore, a held lock), else None."""
        for entry in scan_inbox(self.config.inbox, tick=self.ping):
            if self.stop():
                return None
            summary = self.handle(entry)
            self.ping()
            outcome = summary["outcome"]
            if outcome == "blocked":
                return summary
            if outcome == "rejected":
                self._report_rejection(entry.name, summary.get("reason") or {})
            elif outcome != "skipped":
                self.reporter.emit("idle", f"{entry.name}: {outcome}")
            if outcome == "locked":
                return summary
        return None


# -- the loop -------------------------------------------------------------------------------

def watchdog_interval_s(environ: dict[str, str] | None = None) -> float | None:
    """systemd's WatchdogSec for this process, from WATCHDOG_USEC (and WATCHDOG_PID)."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid.strip() != str(os.getpid())):
        return None
    return usec / 1_000_000


def idle_wait_s(environ: dict[str, str] | None = None) -> float:
    """How long an idle pass sleeps: well inside half the watchdog interval."""
    interval = watchdog_interval_s(environ)
    return IDLE_WAKE_S if interval is None else max(0.05, min(IDLE_WAKE_S, interval / 4))


class _Waker:
    """A self-pipe: signals (through ``signal.set_wakeup_fd``) and the inbox watcher's
    thread wake the idle wait without taking any lock in a signal handler."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def poke(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
            os.write(self.w, b"w")

    def wait(self, timeout: float) -> None:
        with contextlib.suppress(InterruptedError):
            select.select([self.r], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self.r, 4096):
                pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def _seed_floor(config: Config, reporter: Reporter) -> None:
    """After a package upgrade the anti-rollback floor may not exist yet: seed it from
    the database before any bundle is looked at, so the floor never starts lower than
    what the device already accepted. A failure here is reported, not fatal: every run
    seeds (or refuses) again under its own lock."""
    from .device_state import device_state, seed_floor

    try:
        seed_floor(config.state_dir, device_state(config.database))
    except MigrateError as exc:
        reporter.emit("idle", f"anti-rollback floor not seeded at start: {exc.message}",
                      level="warning")


def run_daemon(config: Config) -> int:
    from .trust import TrustStore

    TrustStore.from_config(config)  # a key file that does not parse is a start-up error
    stop = _Stop()
    waker = _Waker()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.requested = True  # the wake-up fd has already woken the wait

    with contextlib.suppress(ValueError):  # not the main thread: idle waits still end
        signal.set_wakeup_fd(waker.w)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sinks = default_sinks(config.status_path, tty=False)
    reporter = Reporter(sinks)
    notify = next((s for s in sinks if isinstance(s, NotifySink)), NotifySink())
    for d in (config.inbox, config.state_dir):
        make_dirs(d)
    services = for_unit(config.app_unit, config.systemctl)
    with RunLock(config.lock_path, wait=True):
        outcome = recover(config, services=services, reporter=reporter)
        _seed_floor(config, reporter)
    remove_stale_temps(config.state_dir / "rejected")  # a reason file's, if killed mid-write
    reporter.emit("idle", f"ready; watching {config.inbox}"
                  + (f" (recovered: {outcome})" if outcome else ""))
    notify.send("READY=1")
    watch = _InboxWatch(config.inbox, waker.poke, reporter)
    worker = InboxWorker(config, reporter, stop, notify.heartbeat)
    wait_s = idle_wait_s()
    exit_code = 0
    blocked = False
    try:
        while not stop():
            stopped = worker.run_pass() if watch.present() else None
            if stopped is not None and stopped["outcome"] == "blocked":
                if not blocked:
                    reporter.alert("restore-failed", stopped["message"] + "; bundles wait "
                                   "in the inbox")
                blocked = True
            else:
                blocked = False
            notify.heartbeat()
            if not stop():
                waker.wait(wait_s)
    except RestoreFailed:
        exit_code = 6  # the app stays stopped; systemd restarts us, the gate keeps it down
    finally:
        notify.send("STOPPING=1")
        watch.stop()
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        waker.close()
    return exit_code


class _InboxWatch:
    """The inbox watcher, and what the daemon does when the inbox vanishes (a package
    removal, a person): it says so once, stays up, skips its passes, and when the
    inbox is back says so and watches the new directory (a watch dies with the old)."""

    def __init__(self, inbox: Path, poke: Callable[[], None], reporter: Reporter) -> None:
        self.inbox = inbox
        self.poke = poke
        self.reporter = reporter
        self._present = True
        self.observer = self._start()

    def _start(self) -> Any:
        try:
            return _watch(self.inbox, self.poke)
        except OSError as exc:  # gone between the check and the watch: polled instead
            self.reporter.emit("idle", f"cannot watch the inbox {self.inbox} "
                               f"({exc.strerror or exc}); it is polled every "
                               f"{IDLE_WAKE_S:g} s", level="warning")
            return None

    def present(self) -> bool:
        present = self.inbox.is_dir()
        if present == self._present:
            return present
        self._present = present
        if not present:
            self.stop()
            self.reporter.emit("idle", f"the inbox {self.inbox} is gone (the package is being "
                               "removed, or it was deleted); the daemon waits for it. "
                               f"Recreate it with 'install -d -m 0700 {self.inbox}' or "
                               "reinstall the package", level="warning")
        else:
            self.reporter.emit("idle", f"the inbox {self.inbox} is back; watching it",
                               level="notice")
            self.observer = self._start()
        return present

    def stop(self) -> None:
        if self.observer is not None:
            with contextlib.suppress(Exception):  # a watcher whose directory is gone
                self.observer.stop()
                self.observer.join(timeout=5)
            self.observer = None


def _watch(inbox: Path, poke: Callable[[], None]) -> Any:
    """Wake the loop on any inbox change; the loop rescans, so no event is trusted."""
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        return None  # polling every idle wait still works

    class Handler(FileSystemEventHandler):  # type: ignore[misc]
        def on_any_event(self, event: Any) -> None:
            poke()

    observer = Observer()
    observer.schedule(Handler(), str(inbox), recursive=False)
    observer.daemon = True
    observer.start()
    return observer
