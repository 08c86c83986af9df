"""What the e2e tests share: the device layout, the provisioned device and ``ZMonitor``,
the device as a test sees it (real systemctl, real files, the installed CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .device import Device

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
E2E = "/root/e2e"                      # work dir inside the container
DB = "/var/lib/zmonitor/zmonitor.db"
STATE = "/var/lib/zmonitor-migrated"
INBOX = f"{STATE}/inbox"
LEDGER = "/var/lib/zmonitor/standin.ledger"
DAEMON = "zmonitor-migrate.service"
APP = "zmonitor.service"
# Vitals rows in the baseline database: enough that the batched migration 0012
# (batch_size below) runs for a few seconds, so a test can act in the middle of it.
VITALS_ROWS = int(os.environ.get("ZMONITOR_E2E_ROWS", "400000"))
BATCH_SIZE = 5000

APP_UNIT = f"""[Unit]
Description=Z Monitor bedside app (e2e stand-in)

[Service]
Type=notify
User=zmonitor
Group=zmonitor
ExecStart=/usr/bin/python3 /usr/local/lib/zmonitor/zmonitor_standin.py {DB} --ledger {LEDGER}
TimeoutStopSec=20s

[Install]
WantedBy=multi-user.target
"""

CONFIG = f"""# e2e: the shipped defaults with a shorter health gate and smaller batches
database: {DB}
device_type: zmonitor-bedside
app_unit: zmonitor.service
state_dir: {STATE}
runtime_dir: /run/zmonitor-migrated
inbox: {INBOX}
backup_dir: /var/lib/zmonitor/migration-backups
backup_keep: 3
trust_dir: /etc/zmonitor-migrated/trusted.d
signature_threshold: 1
max_downtime_s: 300
batch_size: {BATCH_SIZE}
health_check_s: 3
stop_timeout_s: 30
integrity_check: quick
"""


@dataclass
class Booted:
    dev: Device
    install_output: str
    enabled_after_install: str
    active_after_install: str
    artifacts: Path
    facts: dict[str, Any] = field(default_factory=dict)


class ZMonitor:
    """The device as a test sees it: real systemctl, real files, the installed CLI."""

    def __init__(self, booted: Booted) -> None:
        self.booted = booted
        self.dev = booted.dev

    # -- commands ----------------------------------------------------------------
    def run(self, cmd: list[str] | str, *, check: bool = False, timeout: float = 300.0
            ) -> subprocess.CompletedProcess[str]:
        return self.dev.run(cmd, check=check, timeout=timeout)

    def cli(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return self.dev.run(["zmonitor-migrate", *args], check=False, timeout=timeout)

    def cli_json(self, *args: str) -> dict[str, Any]:
        res = self.cli(*args, "--json")
        try:
            return json.loads(res.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"zmonitor-migrate {' '.join(args)} --json printed no JSON "
                                 f"(exit {res.returncode}): {res.stdout!r} {res.stderr!r}"
                                 ) from exc

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.dev.run(["systemctl", *args], check=False, timeout=120)

    def is_active(self, unit: str) -> str:
        return self.systemctl("is-active", unit).stdout.strip()

    def prop(self, unit: str, name: str) -> str:
        return self.systemctl("show", "-p", name, "--value", unit).stdout.strip()

    def sql(self, query: str, db: str = DB) -> str:
        res = self.dev.run(["sqlite3", "-readonly", db, query], check=False, timeout=60)
        if res.returncode != 0:
            raise AssertionError(f"sqlite3 {query!r}: {res.stderr}")
        return res.stdout.strip()

    def version(self, db: str = DB) -> int:
        return int(self.sql("SELECT max(version) FROM schema_version", db) or 0)

    def wait_for(self, what: str, cond: Callable[[], Any], timeout: float = 120.0,
                 interval: float = 0.25) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n"
                                     f"{self.diagnostics()}")
            time.sleep(interval)

    def diagnostics(self) -> str:
        parts = [self.systemctl("status", "--no-pager", "-n", "30", DAEMON, APP).stdout,
                 self.run(f"ls -lR {STATE} /var/lib/zmonitor 2>&1 | head -60").stdout,
                 self.run("cat /run/zmonitor-migrated/status.json 2>/dev/null").stdout]
        return "\n".join(parts)

    # -- bundles -----------------------------------------------------------------
    def make_source(self, name: str, *, upto: int | None = None,
                    extra: dict[str, str] | None = None, keep_expectations: bool = True,
                    batch_rows: int | None = None) -> str:
        """Copy the shipped bundle source inside the device, optionally truncated to
        migrations <= UPTO or extended with EXTRA files (paths under the source)."""
        src = f"{E2E}/src/{name}"
        self.dev.run(["rm", "-rf", src])
        self.dev.run(["mkdir", "-p", f"{E2E}/src"])
        self.dev.run(["cp", "-a", "/usr/share/zmonitor-migrated/bundles/zmonitor", src])
        if upto is not None:
            self.dev.run(f"cd {src}/migrations && for f in */*.sql; do "
                         f"v=$(basename $f | cut -c1-4); "
                         f"[ $((10#$v)) -le {upto} ] || rm -f $f; done")
        if batch_rows is not None:  # smaller batches: a batched migration that lasts
            self.dev.run(f"sed -i -E 's/^(-- zmonitor:batch .*size=)[0-9]+/\\1{batch_rows}/' "
                         f"{src}/migrations/*/*.sql")
        if not keep_expectations:
            self.dev.run(["rm", "-rf", f"{src}/checks", f"{src}/schema"])
        for rel, text in (extra or {}).items():
            self.dev.put(text.encode(), f"{src}/{rel}")
        return src

    def build(self, src: str, sequence: int, name: str) -> str:
        out = f"{E2E}/bundles/{name}.zmb"
        res = self.cli("bundle", "build", src, "-o", out, "--key", f"{E2E}/keys/fleet.key",
                       "--sequence", str(sequence))
        assert res.returncode == 0, f"bundle build failed: {res.stdout}{res.stderr}"
        return out

    def drop(self, bundle: str, name: str | None = None) -> str:
        """Deliver a bundle the documented way: copy beside the inbox, rename into it."""
        name = name or Path(bundle).name
        self.dev.run(["cp", bundle, f"{INBOX}/.{name}.partial"])
        self.dev.run(["mv", f"{INBOX}/.{name}.partial", f"{INBOX}/{name}"])
        return name

    def has(self, where: str, name: str) -> bool:
        """Bundle NAME is in archive/ or rejected/ (stored there as <run id>-<name>)."""
        return any(f == name or f.endswith(f"-{name}") for f in self.files(where))

    def files(self, sub: str) -> list[str]:
        res = self.run(["ls", "-1A", f"{STATE}/{sub}"])
        return res.stdout.split() if res.returncode == 0 else []

    def journal_closed(self) -> bool:
        """No run in progress: no journal yet, or the last one has an outcome."""
        j = self.journal()
        return not j or j.get("outcome") is not None

    def journal(self) -> dict[str, Any]:
        res = self.run(["cat", f"{STATE}/journal.json"])
        return json.loads(res.stdout) if res.returncode == 0 and res.stdout else {}

    def history(self) -> list[dict[str, Any]]:
        return list(self.cli_json("history").get("runs", []))

    def wait_settled(self, name: str, where: str = "archive", timeout: float = 180.0
                     ) -> dict[str, Any]:
        """Wait until bundle NAME left the inbox for WHERE (archive/rejected), the run's
        journal is closed and the app is active; return the last history record."""
        def done() -> bool:
            return (self.has(where, name)
                    and name not in self.files("inbox")
                    and self.journal().get("outcome") is not None
                    and self.is_active(APP) == "active")
        self.wait_for(f"{name} in {where}/ with the app active", done, timeout)
        runs = self.history()
        assert runs, "no run in the history"
        return runs[-1]

    # -- app ledger --------------------------------------------------------------
    def ledger(self) -> list[tuple[str, int, int, int]]:
        """(event, ms, pid, rows) per line of the stand-in's ledger."""
        out = []
        for line in self.run(["cat", LEDGER]).stdout.splitlines():
            parts = line.split()
            out.append((parts[0], int(parts[1]), int(parts[2]),
                        int(parts[3]) if len(parts) > 3 else -1))
        return out

    def app_sessions(self) -> list[tuple[int, int | None, int]]:
        """(start_ms, stop_ms or None, rows) per app process, in order."""
        sessions: dict[int, list[Any]] = {}
        for event, ms, pid, rows in self.ledger():
            if event == "start":
                sessions[pid] = [ms, None, -1]
            elif event == "stop" and pid in sessions:
                sessions[pid][1:] = [ms, rows]
        return [tuple(s) for s in sessions.values()]  # type: ignore[misc]

    def assert_no_vitals_lost(self) -> None:
        """Every row a finished app session committed is in the live database."""
        for start, stop, rows in self.app_sessions():
            if stop is None:
                continue
            have = int(self.sql(f"SELECT count(*) FROM vitals WHERE device_id = 'standin' "
                                f"AND timestamp BETWEEN {start} AND {stop}"))
            assert have == rows, (f"app session {start}..{stop} committed {rows} vitals rows, "
                                  f"the database holds {have}")

    # -- baseline ------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the baseline: daemon and app stopped, state wiped, DB at version 4,
        then the app and the daemon started the way the device boots them."""
        self.systemctl("stop", DAEMON, APP)
        self.run(["rm", "-rf", "/etc/systemd/system/zmonitor-migrate.service.d"])
        self.systemctl("daemon-reload")
        self.systemctl("reset-failed")
        self.dev.run(f"rm -rf {STATE}/* {STATE}/.[!.]* /run/zmonitor-migrated/* "
                     f"/var/lib/zmonitor/* && install -d -m 0700 {INBOX} "
                     f"&& cp {E2E}/baseline.db {DB} && chown -R zmonitor:zmonitor "
                     f"/var/lib/zmonitor && chmod 0640 {DB}")
        self.dev.run(["systemctl", "start", APP], timeout=60)
        self.dev.run(["systemctl", "start", DAEMON], timeout=120)


def phase_starts(journal: dict[str, Any]) -> dict[str, float]:
    """Phase name -> wall-clock time (s) it was first entered, from a journal.json."""
    out: dict[str, float] = {}
    for name, t in journal.get("phases", []):
        out.setdefault(name, float(t))
    return out
