"""The rehearsal: the run's whole work on an online snapshot, while the app keeps running.

The snapshot is taken with SQLite's online backup in one step (one read snapshot, never
restarted by the app's writes), the bundle is applied to it exactly as the real run will
apply it to the working copy, and it is validated by the same rules. Its measured time is
the downtime estimate the operator acts on. Any failure is a ``PrecheckFailed``: the app
was never stopped.

The rehearsal has a hard time limit of its own (``budget_s``), and stops at its safe
points when a stop is requested; the snapshot is always removed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import dbinfo, fsutil, prechecks
from .engine import Engine, Interrupted, Progress, watch
from .errors import MigrateError, PrecheckFailed

# The rehearsal may take REHEARSAL_FACTOR × max_downtime_s (at least REHEARSAL_SLACK_S
# more than it), with --allow-long LONG_REHEARSAL_FACTOR ×.
REHEARSAL_FACTOR = 3.0
REHEARSAL_SLACK_S = 5.0
LONG_REHEARSAL_FACTOR = 10.0


def budget_s(max_downtime_s: float, allow_long: bool) -> float:
    """The rehearsal's hard limit. The rehearsal runs while the app is up, so running past
    max_downtime_s costs no downtime, and a migration that is merely too slow should
    finish it: its measured time is the estimate the operator acts on (--allow-long, a
    maintenance window). A runaway statement or check is cut at the limit instead of
    running for ever."""
    factor = LONG_REHEARSAL_FACTOR if allow_long else REHEARSAL_FACTOR
    return max(factor * max_downtime_s, max_downtime_s + REHEARSAL_SLACK_S)


@dataclass(frozen=True)
class Rehearsed:
    """What a passed rehearsal measured."""

    estimate_s: float  # the whole rehearsal: the downtime estimate
    snapshot_s: float  # of which taking the snapshot
    grown: int  # bytes of the migrated snapshot: the size the working copy will have


@dataclass
class Rehearsal:
    db: Path
    snapshot: Path
    max_downtime_s: float
    allow_long: bool
    batch_size: int
    stop_requested: Callable[[], bool]
    tick: Callable[[], None]
    deadline: float | None = None

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def should_stop(self) -> bool:
        """The rehearsal's safe points: a stop request ends it (the app still runs), and
        so does its time budget."""
        self.tick()
        return self.stop_requested() or self.expired()

    def run(self, migrate: Callable[[Engine], None],
            validate: Callable[[Path, float | None], list[str]],
            on_progress: Callable[[Progress], None]) -> Rehearsed:
        """Snapshot, ``migrate`` it, ``validate`` it on a fresh connection (nothing the
        migrations left on theirs answers for the file). Raises PrecheckFailed."""
        t0 = time.monotonic()
        self.deadline = t0 + budget_s(self.max_downtime_s, self.allow_long)
        try:
            self._take_snapshot()
            t_copy = time.monotonic() - t0
            with Engine(self.snapshot, fast=True, min_batch=self.batch_size,
                        on_progress=on_progress, should_stop=self.should_stop) as eng:
                watch(eng.conn, expired=self.expired, tick=self.tick)
                migrate(eng)
            problems = validate(self.snapshot, self.deadline)
            if problems:
                raise PrecheckFailed("the rehearsal on a snapshot failed validation: "
                                     + "; ".join(problems[:5]), kind="rehearsal-validation")
            grown = dbinfo.file_size(self.snapshot)
        except PrecheckFailed:
            raise
        except MigrateError as exc:
            raise self._refusal(exc) from None
        except (sqlite3.Error, OSError) as exc:
            raise PrecheckFailed(f"the rehearsal on a snapshot failed: {exc}",
                                 kind="rehearsal") from None
        finally:
            fsutil.remove(self.snapshot)
            fsutil.remove_sidecars(self.snapshot)
        return Rehearsed(estimate_s=time.monotonic() - t0, snapshot_s=t_copy, grown=grown)

    def _take_snapshot(self) -> None:
        dbinfo.snapshot(self.db, self.snapshot)

    def _refusal(self, exc: MigrateError) -> PrecheckFailed:
        if isinstance(exc, Interrupted):
            if self.stop_requested():
                return prechecks.interrupted()
            return PrecheckFailed(
                f"the rehearsal ran out of its time budget "
                f"({budget_s(self.max_downtime_s, self.allow_long):g} s, from max_downtime_s="
                f"{self.max_downtime_s:g}): {exc.message}; the app was never stopped — "
                "fix the migration or check (a runaway query?), or raise max_downtime_s",
                kind="too-slow")
        return PrecheckFailed(f"the rehearsal on a snapshot failed: {exc.message}",
                              kind="rehearsal")
