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

``recovery.ACTIONS`` holds the function that carries out each action.

A run enters the journal in ``received`` (``Journal.create``). An operator restore has
an entry of its own (``Journal.create_restore``): it starts in ``failed``, since from its
first durable instant what is left to do is to put its backup back and start the app.

A journal is *closed* once it has an ``outcome``; a closed journal needs nothing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import MigrateError, StopInterrupted, UsageError
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



class Action(StrEnum):
    """What finishing an open run means (``recovery.ACTIONS`` carries each out)."""

    ABANDON = "abandon"
    DISCARD = "discard"
    RESOLVE_SWAP = "resolve-swap"
    FINISH = "finish"
    RESTORE = "restore"
    START_APP = "start-app"
    COMMIT = "commit"


A = Action
RECOVERY: dict[Phase, Action] = {
    **{p: A.ABANDON for p in PRE_STOP},
    **{p: A.DISCARD for p in BEFORE_SWAP},
    P.SWAPPING: A.RESOLVE_SWAP,
    P.SWAPPED: A.FINISH,
    P.APP_STARTED: A.FINISH,  # START_APP when the journal has failed before
    P.FAILED: A.RESTORE,
    P.RESTORING: A.RESTORE,
    P.RESTORED: A.START_APP,
    P.COMMITTED: A.COMMIT,
}


class Outcome(StrEnum):
    """How a run ended, as the journal, the history, the metrics and ``--json`` name it."""

    APPLIED = "applied"
    ROLLED_BACK = "rolled-back"
    UP_TO_DATE = "up-to-date"
    DRY_RUN = "dry-run"
    REJECTED = "rejected"  # exit 3: nothing touched
    PRECHECK_FAILED = "precheck-failed"  # exit 4: the app was never stopped
    INTERRUPTED = "interrupted"  # a stop request or the time budget ended it at a safe point
    RESTORED = "restored"  # exit 5: the old database is back, the app runs on it
    RESTORE_FAILED = "restore-failed"  # exit 6: manual action needed
    FAILED = "failed"
    RECOVERED_OLD = "recovered-old"  # recovery kept the old database (the copy never went live)
    ABANDONED = "abandoned"  # recovery of a run that never stopped the app

    @classmethod
    def of_error(cls, error: MigrateError) -> Outcome:
        if isinstance(error, StopInterrupted):
            return cls.INTERRUPTED
        return _BY_EXIT_CODE.get(error.exit_code, cls.FAILED)


_BY_EXIT_CODE = {3: Outcome.REJECTED, 4: Outcome.PRECHECK_FAILED, 5: Outcome.RESTORED,
                 6: Outcome.RESTORE_FAILED}

@dataclass(frozen=True)
class RunFacts:
    """The journal's payload, typed: what a run has durably recorded so far, each field
    written with the phase that learns it (``journal.json`` keeps them as ``data``)."""

    # received (Journal.create / Journal.create_restore)
    bundle: str | None = None  # the label the run was started with (path, "rollback --to N")
    database: str | None = None
    dry_run: bool | None = None
    rollback_to: int | None = None
    operation: str | None = None  # "restore" for an operator restore
    # verified
    bundle_name: str | None = None
    sequence: int | None = None
    manifest_sha256: str | None = None
    # prechecked
    from_version: int | None = None
    to_version: int | None = None
    estimate_s: float | None = None
    # app_stopped: before the stop, what recovery needs to tell the copy from the live file
    copy: str | None = None
    live_inode: int | None = None
    app_unit: str | None = None
    # backed_up, applying, validated (the backup's sha256 is sealed at validated)
    backup: str | None = None
    backup_sha256: str | None = None
    backup_linked: bool | None = None
    journal_mode: str | None = None
    migration: int | None = None
    # swapped, app_started
    swapped: bool | None = None
    downtime_s: float | None = None
    # failed, restoring, restored, closed
    error: dict[str, Any] | None = None
    replaced: str | None = None  # the database a restore replaced, kept beside the backup
    restored_backup: bool | None = None
    restore_error: str | None = None
    recovered: bool | None = None

    @classmethod
    def of(cls, data: dict[str, Any]) -> RunFacts:
        return cls(**{k: v for k, v in data.items() if k in _FACT_NAMES})


_FACT_NAMES = frozenset(f.name for f in fields(RunFacts))


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
    def create_restore(cls, path: Path, *, backup: str, backup_sha256: str,
                       **data: Any) -> Journal:
        """An operator restore's entry: the journal starts in ``failed`` with the backup
        to put back, so a restore killed half-way is finished by ``recover``."""
        j = cls(path=path, run_id=new_run_id(), phase=Phase.FAILED, failed=True,
                data={**data, "operation": "restore", "backup": backup,
                      "backup_sha256": backup_sha256})
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

    @property
    def facts(self) -> RunFacts:
        return RunFacts.of(self.data)

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

    def recovery_action(self) -> Action | None:
        if self.closed:
            return None
        if self.phase is Phase.APP_STARTED and self.failed:
            return Action.START_APP
        return RECOVERY[self.phase]

    def downtime_s(self) -> float | None:
        """Seconds from the app's stop to its last start, as the journal recorded them:
        the run's own start, or the start by a restore or a recovery after a failure, a
        kill or a power cut. None when the app was never stopped, or is not started
        again (a failed restore). Wall-clock times: a clock set back between the two
        makes it None rather than negative."""
        # An operator restore has no app_stopped phase: it stops the app right after its
        # entry (failed, then restoring), which is when its downtime starts.
        stop = Phase.FAILED if self.facts.operation == "restore" else Phase.APP_STOPPED
        stopped = next((t for p, t in self.phases if p == stop.value), None)
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
