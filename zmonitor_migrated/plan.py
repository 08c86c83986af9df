"""Planning: what to run, decided from the source and the database's applied rows alone.

``plan`` and ``rollback_plan`` are pure. They are what ``--dry-run``, ``status``,
``apply`` and ``rollback`` all use, so the dry run shows exactly what the run executes.

Rules enforced, in order:

1. The applied versions are exactly 1..k, each present in the source (a database ahead
   of the source, or with holes, is refused).
2. Every applied migration's recorded sha256 equals the source file's: an applied
   migration must never be edited. A row without a hash (written by
   a hand-written runner) is accepted and reported as unverified.
3. The target is between the current version and the source's last one.
4. Rolling back needs a rollback script for every version to undo; a missing one refuses
   the whole rollback before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PlanError
from .sources import Migration


@dataclass(frozen=True)
class AppliedRow:
    version: int
    applied_at: str
    description: str | None
    migration_type: str | None
    file_hash: str | None
    execution_time_ms: int | None
    applied_by: str | None

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Plan:
    current: int
    target: int
    pending: tuple[Migration, ...]
    applied: tuple[AppliedRow, ...]
    unverified: tuple[int, ...] = ()

    @property
    def is_noop(self) -> bool:
        return not self.pending

    def describe(self) -> list[str]:
        lines = [f"current version {self.current}, target {self.target}, "
                 f"{len(self.pending)} pending"]
        for m in self.pending:
            batch = f" batch table={m.batch.table} size={m.batch.size}" if m.batch else ""
            rb = "rollback: yes" if m.rollback else "rollback: NONE"
            lines.append(f"  {m.version:04d} {m.kind:6s} {m.path}{batch} ({rb})")
        return lines

    def to_dict(self) -> dict[str, object]:
        return {
            "current": self.current,
            "target": self.target,
            "pending": [m.to_dict() for m in self.pending],
            "unverified": list(self.unverified),
        }


def _check_applied(migrations: tuple[Migration, ...] | list[Migration],
                   applied: list[AppliedRow]) -> tuple[int, tuple[int, ...]]:
    by_version = {m.version: m for m in migrations}
    versions = sorted(r.version for r in applied)
    if versions != list(range(1, len(versions) + 1)):
        raise PlanError(
            f"the database's schema_version holds versions {versions}, which is not 1..k; "
            "it was changed outside this tool — restore a backup or repair schema_version",
            kind="version-gap",
        )
    unverified: list[int] = []
    for row in sorted(applied, key=lambda r: r.version):
        mig = by_version.get(row.version)
        if mig is None:
            raise PlanError(
                f"the database is at version {versions[-1]}, newer than this source "
                f"(last version {max(by_version, default=0)}); use a newer bundle",
                kind="database-ahead",
            )
        if row.file_hash is None:
            unverified.append(row.version)
        elif row.file_hash != mig.sha256:
            raise PlanError(
                f"migration {row.version} ({mig.path}) was applied with sha256 "
                f"{row.file_hash[:12]}… but the source has {mig.sha256[:12]}…: an applied "
                "migration must never be modified; add a new migration instead",
                kind="applied-migration-changed",
            )
    return (versions[-1] if versions else 0), tuple(unverified)


def plan(migrations: tuple[Migration, ...] | list[Migration], applied: list[AppliedRow],
         target: int | None = None) -> Plan:
    current, unverified = _check_applied(migrations, applied)
    last = max((m.version for m in migrations), default=0)
    goal = last if target is None else target
    if goal > last:
        raise PlanError(f"--target {goal} is beyond the source's last version {last}",
                        kind="bad-target")
    if goal < current:
        raise PlanError(
            f"--target {goal} is below the current version {current}; "
            f"use 'rollback --to {goal}' to go down",
            kind="bad-target",
        )
    pending = tuple(m for m in sorted(migrations, key=lambda m: m.version)
                    if current < m.version <= goal)
    return Plan(current=current, target=goal, pending=pending,
                applied=tuple(sorted(applied, key=lambda r: r.version)), unverified=unverified)


def rollback_plan(migrations: tuple[Migration, ...] | list[Migration],
                  applied: list[AppliedRow], to: int) -> tuple[Migration, ...]:
    """Migrations to undo, newest first."""
    current, _ = _check_applied(migrations, applied)
    if to < 0 or to > current:
        raise PlanError(f"rollback --to {to}: must be between 0 and the current version "
                        f"{current}", kind="bad-target")
    undo = tuple(sorted((m for m in migrations if to < m.version <= current),
                        key=lambda m: -m.version))
    missing = [m for m in undo if m.rollback is None]
    if missing:
        raise PlanError(
            "no rollback script for "
            + ", ".join(f"{m.version:04d} ({m.path})" for m in missing)
            + "; nothing was rolled back — restore a backup instead (zmonitor-migrate restore)",
            kind="missing-rollback",
        )
    return undo
