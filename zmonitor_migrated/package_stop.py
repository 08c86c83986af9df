"""Stopping the daemon for the package's prerm (remove, purge, upgrade): never in the
middle of a run.

``python3 -I -m zmonitor_migrated.package_stop ACTION`` (ACTION is the prerm's ``$1``)
waits, bounded, while a run holds the run lock, saying so every ``REPORT_EVERY_S``;
when the lock is free it stops ``zmonitor-migrate.path`` and ``zmonitor-migrate.service``
(the daemon's SIGTERM handling ends whatever it does at a safe point). If the run still
holds the lock at the end of the wait, it refuses: exit 1, the package is left as it was
and the message says how to go on. The wait is ``DEFAULT_WAIT_S`` or
``$ZMONITOR_MIGRATE_PACKAGE_WAIT_S``; a ``failed-upgrade`` (dpkg asking the new package
after the old one refused) does not wait again.

On ``upgrade`` the units that were running are written to ``RESTART_MARK``; the new
package's postinst starts them again.

Between the lock being seen free and the SIGTERM arriving the daemon may begin a run: it
is then stopped before the app is (or the old database is put back) and the bundle stays
in the inbox for the next start. So a package operation never leaves a run half-done.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_WAIT_S = 600.0
MAX_WAIT_S = 86400.0
WAIT_ENV = "ZMONITOR_MIGRATE_PACKAGE_WAIT_S"
REPORT_EVERY_S = 15.0
POLL_S = 0.5
SERVICE = "zmonitor-migrate.service"
PATH_UNIT = "zmonitor-migrate.path"
RESTART_MARK = Path("/run/zmonitor-migrated.package-restart")
DEFAULT_LOCK = Path("/var/lib/zmonitor-migrated/lock")
ACTIONS = ("remove", "upgrade", "deconfigure", "failed-upgrade")


def say(message: str) -> None:
    print(f"zmonitor-migrated: {message}", file=sys.stderr, flush=True)


def wait_limit(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    text = environ.get(WAIT_ENV, "")
    if not text:
        return DEFAULT_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= MAX_WAIT_S:
        say(f"ignoring {WAIT_ENV}={text!r} (seconds from 0 to {MAX_WAIT_S:g}); waiting "
            f"{DEFAULT_WAIT_S:g} s")
        return DEFAULT_WAIT_S
    return value


def _paths() -> tuple[Path, Path | None]:
    """The run lock and journal of the configured state dir (the defaults if the config
    cannot be read: a package operation must not depend on it)."""
    try:
        from .config import load

        config = load()
        return config.lock_path, config.journal_path
    except Exception:  # any config problem: the packaged paths
        return DEFAULT_LOCK, DEFAULT_LOCK.with_name("journal.json")


def run_in_progress(lock: Path) -> bool:
    """True while a run (or the daemon's start-up recovery) holds the run lock."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # no lock file: no run has ever started
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we took
    return False


def _describe(journal: Path | None) -> str:
    if journal is None:
        return "a migration run"
    with contextlib.suppress(Exception):
        from .journal import Journal

        j = Journal.load(journal)
        if j is not None and not j.closed:
            return f"migration run {j.run_id} (phase {j.phase})"
    return "a migration run"


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)


def _active(unit: str) -> bool:
    return _systemctl("is-active", "--quiet", unit).returncode == 0


def wait_for_run(lock: Path, journal: Path | None, limit: float, action: str) -> bool:
    """Wait while a run holds the lock; False when it still does after ``limit``."""
    deadline = time.monotonic() + limit
    next_report = 0.0
    while run_in_progress(lock):
        now = time.monotonic()
        if now >= deadline:
            return False
        if now >= next_report:
            say(f"{_describe(journal)} is in progress; waiting for it to end before the "
                f"package {action} stops the daemon ({deadline - now:.0f} s left)")
            next_report = now + REPORT_EVERY_S
        time.sleep(min(POLL_S, max(0.0, deadline - now)))
    return True


def refusal(action: str, limit: float, what: str) -> str:
    return (f"{what} is still in progress after {limit:g} s; the package {action} is "
            "refused and nothing was changed. Either wait for the run to end "
            "('zmonitor-migrate status' shows it; 'journalctl -u zmonitor-migrate -f' "
            "follows it) and run the package command again, or end the run now at a safe "
            f"point, the old database kept: 'systemctl stop {SERVICE}', then run the package "
            f"command again. To wait longer: {WAIT_ENV}=SECONDS")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    action = args[0] if args else ""
    if action not in ACTIONS:
        return 0  # nothing to stop for any other prerm call
    if not Path("/run/systemd/system").is_dir():
        return 0  # no systemd running (a chroot, an image build): no daemon to stop
    with contextlib.suppress(OSError):  # one left by an upgrade dpkg did not finish
        RESTART_MARK.unlink()
    running = [u for u in (PATH_UNIT, SERVICE) if _active(u)]
    if SERVICE in running:
        lock, journal = _paths()
        limit = 0.0 if action == "failed-upgrade" else wait_limit()
        if not wait_for_run(lock, journal, limit, action):
            say(refusal(action, limit, _describe(journal)))
            return 1
    if action == "upgrade" and running:
        with contextlib.suppress(OSError):
            RESTART_MARK.write_text("".join(f"{u}\n" for u in running))
    for unit in running:
        if unit == SERVICE:
            say(f"stopping {SERVICE} for the package {action}")
        res = _systemctl("stop", unit)
        if res.returncode != 0:
            say(f"'systemctl stop {unit}' failed: {res.stderr.strip()}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
