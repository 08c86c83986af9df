"""``plan`` and ``rollback_plan`` (zmonitor_migrated.plan), in memory: a source of five
migrations, applied rows as the database would hold them, and the plan or the refusal
(its ``kind``) each rule of the module docstring promises."""

from __future__ import annotations

import pytest

from zmonitor_migrated.errors import PlanError
from zmonitor_migrated.plan import AppliedRow, plan, rollback_plan
from zmonitor_migrated.sources import BatchSpec, Migration


def _mig(version: int, *, rollback: bool = True, batch: bool = False) -> Migration:
    return Migration(
        version=version, kind="data" if batch else "schema",
        path=f"migrations/schema/{version:04d}_m.sql", sha256=f"{version:064x}",
        description=f"m{version}",
        rollback=f"migrations/rollback/{version:04d}_rollback.sql" if rollback else None,
        batch=BatchSpec("vitals", 100) if batch else None)


SOURCE = [_mig(v) for v in range(1, 6)]


def _rows(*versions: int, hashes: dict[int, str | None] | None = None) -> list[AppliedRow]:
    hashes = hashes or {}
    return [AppliedRow(v, "2026-01-01 00:00:00", f"m{v}", "schema",
                       hashes.get(v, f"{v:064x}"), 1, "test") for v in versions]


# (name, applied versions, target, current, target, pending versions)
PLANS = [
    ("fresh database, everything", (), None, 0, 5, [1, 2, 3, 4, 5]),
    ("fresh database, up to 2", (), 2, 0, 2, [1, 2]),
    ("part way, the rest", (1, 2, 3), None, 3, 5, [4, 5]),
    ("part way, one more", (1, 2, 3), 4, 3, 4, [4]),
    ("up to date", (1, 2, 3, 4, 5), None, 5, 5, []),
    ("target equals current", (1, 2), 2, 2, 2, []),
    ("rows in any order", (3, 1, 2), None, 3, 5, [4, 5]),
]


@pytest.mark.parametrize(("name", "applied", "target", "current", "goal", "pending"), PLANS,
                         ids=[p[0] for p in PLANS])
def test_plan(name: str, applied: tuple[int, ...], target: int | None, current: int,
              goal: int, pending: list[int]) -> None:
    p = plan(SOURCE, _rows(*applied), target)
    assert (p.current, p.target) == (current, goal)
    assert [m.version for m in p.pending] == pending
    assert [r.version for r in p.applied] == sorted(applied)
    assert p.is_noop == (not pending)
    assert p.unverified == ()


# (name, applied versions, source versions, target, kind)
REFUSALS = [
    ("a hole in the applied versions", (1, 3), 5, None, "version-gap"),
    ("applied not starting at 1", (2, 3), 5, None, "version-gap"),
    ("a version applied twice", (1, 1), 5, None, "version-gap"),
    ("database ahead of the source", (1, 2, 3, 4, 5), 3, None, "database-ahead"),
    ("target beyond the source", (), 5, 6, "bad-target"),
    ("target below the current version", (1, 2, 3), 5, 2, "bad-target"),
]


@pytest.mark.parametrize(("name", "applied", "last", "target", "kind"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_plan_refuses(name: str, applied: tuple[int, ...], last: int, target: int | None,
                      kind: str) -> None:
    with pytest.raises(PlanError) as err:
        plan(SOURCE[:last], _rows(*applied), target)
    assert err.value.kind == kind


def test_an_edited_applied_migration_is_refused_a_missing_hash_is_unverified() -> None:
    with pytest.raises(PlanError) as err:
        plan(SOURCE, _rows(1, 2, hashes={2: "f" * 64}))
    assert err.value.kind == "applied-migration-changed"
    assert "0002_m.sql" in str(err.value)
    p = plan(SOURCE, _rows(1, 2, 3, hashes={1: None, 3: None}))
    assert p.unverified == (1, 3)
    assert [m.version for m in p.pending] == [4, 5]


def test_describe_and_to_dict_show_what_the_run_executes() -> None:
    source = [*SOURCE[:3], _mig(4, batch=True), _mig(5, rollback=False)]
    p = plan(source, _rows(1, 2, 3, hashes={2: None}))
    lines = p.describe()
    assert lines[0] == "current version 3, target 5, 2 pending"
    assert lines[1] == ("  0004 data   migrations/schema/0004_m.sql batch table=vitals "
                        "size=100 (rollback: yes)")
    assert lines[2] == "  0005 schema migrations/schema/0005_m.sql (rollback: NONE)"
    d = p.to_dict()
    assert (d["current"], d["target"], d["unverified"]) == (3, 5, [2])
    assert [m["version"] for m in d["pending"]] == [4, 5]  # type: ignore[index, union-attr]


# (name, applied versions, to, undone versions newest first)
ROLLBACKS = [
    ("one step", (1, 2, 3), 2, [3]),
    ("down to nothing", (1, 2, 3), 0, [3, 2, 1]),
    ("to the current version: nothing", (1, 2, 3), 3, []),
    ("fresh database to 0", (), 0, []),
]


@pytest.mark.parametrize(("name", "applied", "to", "undone"), ROLLBACKS,
                         ids=[r[0] for r in ROLLBACKS])
def test_rollback_plan(name: str, applied: tuple[int, ...], to: int, undone: list[int]) -> None:
    assert [m.version for m in rollback_plan(SOURCE, _rows(*applied), to)] == undone


# (name, source, applied versions, to, kind)
ROLLBACK_REFUSALS = [
    ("above the current version", SOURCE, (1, 2), 3, "bad-target"),
    ("below zero", SOURCE, (1, 2), -1, "bad-target"),
    ("a hole in the applied versions", SOURCE, (1, 3), 0, "version-gap"),
    ("an edited applied migration", SOURCE, (1,), 0, "applied-migration-changed"),
    ("a version to undo has no rollback script",
     [_mig(1), _mig(2, rollback=False), _mig(3)], (1, 2, 3), 0, "missing-rollback"),
]


@pytest.mark.parametrize(("name", "source", "applied", "to", "kind"), ROLLBACK_REFUSALS,
                         ids=[r[0] for r in ROLLBACK_REFUSALS])
def test_rollback_plan_refuses(name: str, source: list[Migration], applied: tuple[int, ...],
                               to: int, kind: str) -> None:
    rows = _rows(*applied, hashes={1: "e" * 64} if kind == "applied-migration-changed"
                 else None)
    with pytest.raises(PlanError) as err:
        rollback_plan(source, rows, to)
    assert err.value.kind == kind


def test_a_missing_rollback_script_below_the_target_does_not_matter() -> None:
    source = [_mig(1, rollback=False), _mig(2), _mig(3)]
    assert [m.version for m in rollback_plan(source, _rows(1, 2, 3), 1)] == [3, 2]
