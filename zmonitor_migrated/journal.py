"""The durable run journal: one state machine, written down once.

A run moves through ``Phase`` values; ``Journal.advance`` refuses any transition not in
``TRANSITIONS`` and rewrites ``journal.json`` atomically (temp, fsync, rename, fsync the
directory) before the caller does the work of the next phase. So after a crash the
journal names the last phase whose *start* was durable, and ``RECOVERY`` says, in one
table, what finishing the job means from there:

==================================  ===============================================
phase found in an open journal      recovery action
==================================  ===============================================
received, verified, prechecked      ``abandon``: the app was never stopped; clean up
app_stopped … validated             ``discard``: the live file was never written;
                                    drop the copy and the run's backup link, start app
swapping                            ``resolve-swap``: the live inode tells whether the
                                    rename happened; continue as discard or finish
swapped, app_started (forward)      ``finish``: start the app, hold the health gate,
                                    commit (a failing gate restores)
failed, restoring                   ``restore``: put the backup back, start the app
restored, app_started (after fail)  ``start-app``
==================================  ===============================================

A journal is *closed* once it has an ``outcome``; a closed journal needs nothing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import MigrateError, UsageError
from .fsutil import atomic_write


class Phase(StrEnum):
    RECEIVED = "received"
    VERIFIED = "verified"
    PRECHECKED = "prechecked"
    APP_STOPPED = "app_stopped"
    BACKED_UP = "backed_up"
    APPLYING = "applying"
    VALIDATED = "validated"
    SWAPPING = "swapping"
    SWAPPED = "swapped"
    APP_STARTED = "app_started"
    COMMITTED = "committed"
    FAILED = "failed"
    RESTORING = "restoring"
    RESTORED = "restored"


P = Phase
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    P.RECEIVED: frozenset({P.VERIFIED}),
    P.VERIFIED: frozenset({P.PRECHECKED}),
    P.PRECHECKED: frozenset({P.APP_STOPPED}),
    P.APP_STOPPED: frozenset({P.BACKED_UP, P.FAILED}),
    P.BACKED_UP: frozenset({P.APPLYING, P.FAILED}),
    P.APPLYING: frozenset({P.APPLYING, P.VALIDATED, P.FAILED}),
    P.VALIDATED: frozenset({P.SWAPPING, P.FAILED}),
    P.SWAPPING: frozenset({P.SWAPPED, P.FAILED}),
    P.SWAPPED: frozenset({P.APP_STARTED, P.FAILED}),
    P.APP_STARTED: frozenset({P.COMMITTED, P.FAILED}),
    P.COMMITTED: frozenset(),
    P.FAILED: frozenset({P.RESTORING}),
    P.RESTORING: frozenset({P.RESTORING, P.RESTORED}),
    P.RESTORED: frozenset({P.APP_STARTED}),
}
PRE_STOP = frozenset({P.RECEIVED, P.VERIFIED, P.PRECHECKED})
BEFORE_SWAP = frozenset({P.APP_STOPPED, P.BACKED_UP, P.APPLYING, P.VALIDATED})

RECOVERY: dict[Phase, str] = {
    **{p: "abandon" for p in PRE_STOP},
    **{p: "discard" for p in BEFORE_SWAP},
    P.SWAPPING: "resolve-swap",
    P.SWAPPED: "finish",
    P.APP_STARTED: "finish",  # "start-app" when the journal has failed before
    P.FAILED: "restore",
    P.RESTORING: "restore",
    P.RESTORED: "start-app",
    P.COMMITTED: "commit",
}


class IllegalTransition(MigrateError):
    kind = "illegal-transition"


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(3).hex()


def _damaged(path: Path, exc: BaseException) -> MigrateError:
    return MigrateError(f"run journal {path} is unreadable ({type(exc).__name__}: {exc}); it "
                        "is written atomically, so the disk or a person changed it. Recovery "
                        "relies on it: keep it (copy it before any repair), check the disk, "
                        "and restore the newest backup with 'zmonitor-migrate restore' if "
                        "the database is in doubt")


@dataclass
class Journal:
    path: Path
    run_id: str
    phase: Phase = Phase.RECEIVED
    outcome: str | None = None
    failed: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    phases: list[tuple[str, float]] = field(default_factory=list)

    # -- persistence ----------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, run_id: str | None = None, **data: Any) -> Journal:
        j = cls(path=path, run_id=run_id or new_run_id(), data=dict(data))
        j.phases.append((j.phase.value, time.time()))
        j.save()
        return j

    @classmethod
    def load(cls, path: Path) -> Journal | None:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except PermissionError:
            # Not damage: this user may not read the state dir. Recovery relies on this
            # file, so the advice is never to move it.
            raise UsageError(f"run journal {path} cannot be read by this user (permission "
                             "denied); the state dir belongs to root: run the command as "
                             "root (sudo zmonitor-migrate ...)", kind="permission") from None
        except (OSError, ValueError) as exc:
            raise _damaged(path, exc) from None
        try:
            return cls(path=path, run_id=raw["run_id"], phase=Phase(raw["phase"]),
                       outcome=raw.get("outcome"), failed=bool(raw.get("failed")),
                       data=raw.get("data", {}),
                       phases=[(p, t) for p, t in raw.get("phases", [])])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _damaged(path, exc) from None

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "phase": self.phase.value, "outcome": self.outcome,
                "failed": self.failed, "data": self.data, "phases": self.phases}

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.to_dict(), indent=1, sort_keys=True).encode())

    # -- state machine --------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.outcome is not None

    def advance(self, to: Phase, **data: Any) -> None:
        if self.closed:
            raise IllegalTransition(f"run {self.run_id} is closed ({self.outcome}); "
                                    f"cannot move to {to}")
        if to not in TRANSITIONS[self.phase]:
            raise IllegalTransition(f"run {self.run_id}: {self.phase} → {to} is not a legal "
                                    "transition")
        if to is Phase.FAILED:
            self.failed = True
        self.phase = to
        self.data.update(data)
        self.phases.append((to.value, time.time()))
        self.save()

    def update(self, **data: Any) -> None:
        self.data.update(data)
        self.save()

    def close(self, outcome: str, **data: Any) -> None:
        if self.phase not in PRE_STOP and self.phase not in (Phase.COMMITTED,
                                                              Phase.APP_STARTED) \
                and outcome != "restore-failed":
            raise IllegalTransition(f"run {self.run_id}: cannot close in phase {self.phase} "
                                    "with the app stopped")
        self.outcome = outcome
        self.data.update(data)
        self.phases.append(("closed", time.time()))
        self.save()

    def recovery_action(self) -> str | None:
        if self.closed:
            return None
        if self.phase is Phase.APP_STARTED and self.failed:
            return "start-app"
        return RECOVERY[self.phase]

    def downtime_s(self) -> float | None:
        """Seconds from the app's stop to its last start, as the journal recorded them:
        the run's own start, or the start by a restore or a recovery after a failure, a
        kill or a power cut. None when the app was never stopped, or is not started
        again (a failed restore). Wall-clock times: a clock set back between the two
        makes it None rather than negative."""
        stopped = next((t for p, t in self.phases if p == Phase.APP_STOPPED.value), None)
        started = [t for p, t in self.phases if p == Phase.APP_STARTED.value]
        if stopped is None or not started or started[-1] < stopped:
            return None
        return round(started[-1] - stopped, 3)

    def phase_times(self) -> dict[str, float]:
        """Seconds spent in each phase (from its start to the next phase's start)."""
        out: dict[str, float] = {}
        for (name, t0), (_next, t1) in zip(self.phases, self.phases[1:], strict=False):
            out[name] = round(out.get(name, 0.0) + (t1 - t0), 6)
        return out
