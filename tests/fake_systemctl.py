"""A stand-in for ``systemctl`` at the unit-control boundary, for tests off systemd.

It is a real executable (tests point ``systemctl:`` in the config at a wrapper), so the
pipeline's subprocess calls are the real ones; the end-to-end suite covers the same
boundary with a real systemd. The "unit" is a real process: the simulated monitor
(``zmonitor_migrated.demo_monitor``) writing vitals into the database.

State lives in ``FAKE_SYSTEMCTL_DIR``: ``pid`` (the running monitor), ``calls.log`` (one
line per call: ``<verb> <unit>``), and optional fault switches, each a file:

- ``fail-start``: ``start`` exits 1 without starting anything;
- ``crash-after-start``: the monitor is started, then killed 0.2 s later (health gate);
- ``ignore-stop``: ``stop`` returns success but leaves the monitor running and holding
  a write lock (an app that "did not really stop");
- ``corrupt-backups-on-start``: ``start`` overwrites bytes in every ``*.db`` in the dir
  named by the file's content, then fails (a backup damaged before a restore).

A fault file whose content is ``once`` (``fail-start``, ``crash-after-start``) removes
itself when it fires: the next start works (the old version starts after a restore).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ["FAKE_SYSTEMCTL_DIR"])
DB = os.environ["FAKE_SYSTEMCTL_DB"]


def _pid() -> int | None:
    try:
        pid = int((STATE / "pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    try:  # a zombie is not running
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.split(") ", 1)[1].startswith("Z"):
            return None
    except (FileNotFoundError, IndexError):
        return None
    return pid


def _fires(name: str) -> bool:
    path = STATE / name
    try:
        once = path.read_text().strip() == "once"
    except FileNotFoundError:
        return False
    if once:
        path.unlink(missing_ok=True)
    return True


def start() -> int:
    if _fires("fail-start"):
        print("Job for zmonitor.service failed.", file=sys.stderr)
        return 1
    corrupt = STATE / "corrupt-backups-on-start"
    if corrupt.exists():
        for db in Path(corrupt.read_text().strip()).glob("*.db"):
            with open(db, "r+b") as f:
                f.seek(4096)
                f.write(b"\xde\xad\xbe\xef" * 256)
        print("Job for zmonitor.service failed.", file=sys.stderr)
        return 1
    if _pid() is not None:
        return 0
    with open(STATE / "app.log", "a") as app_log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zmonitor_migrated.demo_monitor", DB, "--interval-ms", "5"],
            stdout=subprocess.PIPE, stderr=app_log, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        print("Job for zmonitor.service failed (the app exited).", file=sys.stderr)
        return 1
    (STATE / "pid").write_text(str(proc.pid))
    if _fires("crash-after-start"):
        subprocess.Popen([sys.executable, "-c",
                          f"import os,time,signal; time.sleep(0.2); os.kill({proc.pid}, 9)"],
                         start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    return 0


def stop() -> int:
    pid = _pid()
    if pid is None:
        return 0
    if (STATE / "ignore-stop").exists():
        return 0
    os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        if _pid() is None:
            return 0
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    return 0


def main(argv: list[str]) -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    argv = [a for a in argv if a != "--no-block"]
    verb = argv[0]
    with open(STATE / "calls.log", "a") as log:
        log.write(" ".join(argv) + "\n")
    if verb == "start":
        return start()
    if verb == "stop":
        return stop()
    if verb == "is-active":
        active = _pid() is not None
        print("active" if active else "inactive")
        return 0 if active else 3
    if verb == "show":
        print("0")
        return 0
    print(f"fake systemctl: unsupported {argv}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
