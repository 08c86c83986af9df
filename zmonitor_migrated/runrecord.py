"""One run's record: the facts the history keeps of it, written one way by every caller,
and the metrics derived from the history.

A run's facts are gathered in two places that must agree: the journal (durable, written
before each phase's work: the bundle, the versions, the backup, the error, the database a
restore replaced) and the run in memory (the row counts, the sizes, the downtime). A
``RunRecord`` is built from the journal (``from_journal``) and completed by whoever ran
the run, and it is the only way a history line is written (``append``): apply and
rollback (``pipeline``), a recovered run (``recovery``) and an operator restore
(``maintenance``) write the same type.

A line keeps the keys each kind of record always had (``KEYS``), with ``null`` for an
unknown value; any other field is written only when it is known. ``journal.Outcome``
is a ``str`` enum, so a line reads exactly as before.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import dbinfo, history
from .config import Config
from .journal import Journal, Outcome

# The keys a history line of each kind always carries (null when unknown).
_COMMON = ("run_id", "outcome", "started_at", "finished_at", "duration_s", "phase_times",
           "downtime_s", "restored")
KEYS: dict[str, frozenset[str]] = {
    "run": frozenset({*_COMMON, "bundle", "sequence", "error"}),
    "recovery": frozenset({*_COMMON, "bundle", "sequence", "error", "recovered",
                           "recovery_action", "from_version", "to_version", "backup",
                           "replaced"}),
    "restore": frozenset({*_COMMON, "operation", "backup", "replaced"}),
}


@dataclass
class RunRecord:
    run_id: str
    kind: str = "run"  # run | recovery | restore: which keys a line always has
    outcome: Outcome | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    phase_times: dict[str, float] = field(default_factory=dict)
    operation: str | None = None  # "restore" for an operator restore
    bundle: str | None = None
    sequence: int | None = None
    from_version: int | None = None
    to_version: int | None = None
    estimate_s: float | None = None
    db_size_before: int | None = None
    rows_before: dict[str, int] | None = None
    backup: str | None = None
    rows_after: dict[str, int] | None = None
    db_size_after: int | None = None
    downtime_s: float | None = None
    error: dict[str, Any] | None = None
    replaced: str | None = None  # the database a restore replaced, kept beside the backup
    recovered: bool | None = None
    recovery_action: str | None = None

    @classmethod
    def from_journal(cls, journal: Journal, *, kind: str,
                     started_at: float | None = None) -> RunRecord:
        """The facts the journal holds durably, under the names the history uses."""
        facts = journal.facts
        return cls(run_id=journal.run_id, kind=kind,
                   started_at=time.time() if started_at is None else started_at,
                   bundle=facts.bundle_name, sequence=facts.sequence,
                   from_version=facts.from_version, to_version=facts.to_version,
                   backup=facts.backup, error=facts.error, replaced=facts.replaced)

    @property
    def restored(self) -> bool:
        return self.outcome == Outcome.RESTORED

    def finish(self, outcome: Outcome | str, journal: Journal) -> RunRecord:
        self.outcome = Outcome(outcome)
        self.finished_at = time.time()
        self.phase_times = journal.phase_times()
        if journal.facts.replaced:
            self.replaced = journal.facts.replaced
        return self

    def to_dict(self) -> dict[str, Any]:
        always = KEYS[self.kind]
        finished = self.finished_at if self.finished_at is not None else time.time()
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                                  if f.name != "kind"}
        values.update(finished_at=finished, restored=self.restored,
                      duration_s=round(finished - self.started_at, 3))
        return {k: v for k, v in values.items() if k in always or v is not None}

    def append(self, history_path: Path) -> None:
        history.append(history_path, self.to_dict())


def write_metrics(config: Config) -> None:
    """Refresh the Prometheus textfile from the whole history and the live database."""
    if config.metrics_path is None:
        return
    version = size = None
    try:
        if config.database.exists():
            conn = dbinfo.open_ro(config.database)
            try:
                version = dbinfo.current_version(conn)
            finally:
                conn.close()
            size = dbinfo.file_size(config.database)
    except sqlite3.Error:
        version = None
    with contextlib.suppress(OSError):  # metrics are advisory; the history holds the truth
        history.write_metrics(config.metrics_path, history.render_metrics(
            history.read(config.history_path), current_version=version, db_size=size))
