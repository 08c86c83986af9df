"""The anti-rollback floor lives in the state dir, not in the database it protects, and
``apply``, ``rollback --bundle`` and ``bundle verify`` give one verdict.

Device tests run the real CLI in a subprocess on a real SQLite file with the simulated
monitor writing vitals (``conftest.device``). "Untouched" means: no ``stop`` call, the app
running, every row that existed before still there (the monitor only appends vitals).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import pytest
import yaml
from bundle_helpers import make_key
from conftest import NOW, SHIPPED, VALID, Device, add_migration, max_vitals_rowid, table_rows

from zmonitor_migrated import bundle, sources
from zmonitor_migrated.device_state import (
    FLOOR_FILE,
    DeviceState,
    Floor,
    raise_floor,
    read_floor,
    seed_floor,
)
from zmonitor_migrated.errors import BundleRejected
from zmonitor_migrated.manifest import Manifest
from zmonitor_migrated.verify import Decision, Purpose, check_policy

DAY = timedelta(days=1)


# -- helpers ------------------------------------------------------------------------------
def variant(tmp: Path, key: Path, sequence: int, *, name: str | None = None,
            edit: Callable[[Path], None] | None = None, created: datetime = NOW,
            expires: datetime | None = None, lint: bool = True) -> Path:
    """A signed bundle from a copy of the shipped source, changed by ``edit``; with
    ``lint`` off, signed the way a signer who skips the build's lint would."""
    label = name or f"s{sequence}"
    src = tmp / f"{label}-src"
    shutil.copytree(SHIPPED, src)
    if edit is not None:
        edit(src)
    out = tmp / f"{label}.zmb"
    skip_lint = mock.patch.object(bundle, "_lint", sources.load)
    with contextlib.nullcontext() if lint else skip_lint:
        bundle.build(src, out, [key], sequence, created=created,
                     expires=expires or created + VALID)
    return out


def noop_migration(src: Path) -> None:
    add_migration(src, 15, "SELECT 1;\n")


def for_device(device_type: str) -> Callable[[Path], None]:
    def edit(src: Path) -> None:
        info = yaml.safe_load((src / "bundle.yaml").read_text())
        info["device_types"] = [device_type]
        (src / "bundle.yaml").write_text(yaml.safe_dump(info))
    return edit


def replace_file(rel: str, text: str) -> Callable[[Path], None]:
    def edit(src: Path) -> None:
        (src / rel).write_text(text)
    return edit


def version(db: Path) -> int:
    conn = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])
    finally:
        conn.close()


def floor_file(dev: Device) -> Path:
    return dev.root / "state" / FLOOR_FILE


def floor_of(dev: Device) -> dict[str, object]:
    return json.loads(floor_file(dev).read_text())


def stops(dev: Device) -> list[str]:
    return [c for c in dev.calls() if c.startswith("stop")]


def forget_calls(dev: Device) -> None:
    (dev.systemctl_dir / "calls.log").unlink(missing_ok=True)


def snapshot(dev: Device) -> tuple[int, dict[str, list[tuple[object, ...]]]]:
    upto = max_vitals_rowid(dev.db)
    return upto, table_rows(dev.db, vitals_up_to=upto)


def assert_refused(dev: Device, proc, code: int, kind: str,
                   before: tuple[int, dict[str, list[tuple[object, ...]]]]) -> None:
    """Refused before the stop: the exit code and kind, no stop, app running, every row
    that existed before still there and nothing else changed."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert f"[{kind}]" in proc.stderr, proc.stderr
    assert stops(dev) == [], "the app must never be stopped for a refused bundle"
    assert dev.app_active()
    upto, rows = before
    assert table_rows(dev.db, vitals_up_to=upto) == rows


def sql(dev: Device, statement: str, *params: object) -> None:
    conn = sqlite3.connect(dev.db, timeout=10)
    try:
        with conn:
            conn.execute(statement, params)
    finally:
        conn.close()


@pytest.fixture
def key(release_key: tuple[Path, Path]) -> Path:
    return release_key[0]


# -- the floor survives what happens to the database ------------------------------------
def test_restore_then_an_older_bundle_is_refused(device: Device, key: Path,
                                                 shipped_bundle: Path, tmp_path: Path) -> None:
    """The restore puts back a database whose own record is older (none at all): the
    state file still says sequence 2, so sequence 1 is refused."""
    b2 = variant(tmp_path, key, 2, edit=noop_migration)
    assert device.cli("apply", str(b2)).returncode == 0
    assert version(device.db) == 15 and floor_of(device)["sequence"] == 2
    restored = device.cli("restore")
    assert restored.returncode == 0, restored.stderr
    assert version(device.db) == 10
    forget_calls(device)
    before = snapshot(device)
    proc = device.cli("apply", str(shipped_bundle))
    assert_refused(device, proc, 3, "rollback", before)
    assert "sequence 2" in proc.stderr and "--sequence 3" in proc.stderr
    assert version(device.db) == 10 and floor_of(device)["sequence"] == 2


def test_restore_seeds_the_floor_before_replacing_the_database(
        device: Device, key: Path, shipped_bundle: Path, tmp_path: Path) -> None:
    """A device upgraded from a version that kept the record only in the database: the
    first command after the upgrade is a restore to an older backup. The floor is seeded
    from the live database before it is replaced, not from the restored one."""
    b2 = variant(tmp_path, key, 2, edit=noop_migration)
    assert device.cli("apply", str(b2)).returncode == 0
    floor_file(device).unlink()  # as before the upgrade: only the database's record
    assert device.cli("restore").returncode == 0
    assert version(device.db) == 10
    assert floor_of(device)["sequence"] == 2 and floor_of(device)["origin"] == "database"
    forget_calls(device)
    proc = device.cli("apply", str(shipped_bundle))
    assert_refused(device, proc, 3, "rollback", snapshot(device))


def test_apply_target_then_an_older_bundle_is_refused(device: Device, key: Path,
                                                      shipped_bundle: Path,
                                                      tmp_path: Path) -> None:
    """``--target`` stops before the bundle's last version, where the database record
    is written: the floor is recorded at acceptance anyway."""
    b2 = variant(tmp_path, key, 2, edit=noop_migration)
    proc = device.cli("apply", str(b2), "--target", "12")
    assert proc.returncode == 0, proc.stderr
    assert version(device.db) == 12
    forget_calls(device)
    before = snapshot(device)
    proc = device.cli("apply", str(shipped_bundle))
    assert_refused(device, proc, 3, "rollback", before)
    assert version(device.db) == 12
    # the same bundle again finishes what --target left pending
    proc = device.cli("apply", str(b2))
    assert proc.returncode == 0, proc.stderr
    assert version(device.db) == 15


def test_a_newer_bundle_with_nothing_pending_raises_the_floor(
        device: Device, key: Path, shipped_bundle: Path, tmp_path: Path) -> None:
    assert device.cli("apply", str(shipped_bundle)).returncode == 0
    same_content = variant(tmp_path, key, 2)  # the shipped migrations, sequence 2
    forget_calls(device)
    proc = device.cli("apply", str(same_content), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "up-to-date"
    assert stops(device) == []
    assert floor_of(device)["sequence"] == 2
    before = snapshot(device)
    proc = device.cli("apply", str(shipped_bundle))
    assert_refused(device, proc, 3, "rollback", before)


def test_the_database_record_can_neither_lower_nor_raise_the_floor(
        device: Device, key: Path, shipped_bundle: Path, tmp_path: Path) -> None:
    """What a migration (or anyone) writing the database's bundles table could do."""
    b2 = variant(tmp_path, key, 2)
    b3 = variant(tmp_path, key, 3)
    assert device.cli("apply", str(b2)).returncode == 0
    sql(device, "DELETE FROM zmonitor_migrated_bundles")  # erase the record
    forget_calls(device)
    proc = device.cli("apply", str(shipped_bundle))
    assert_refused(device, proc, 3, "rollback", snapshot(device))
    # a record far above: does not block the next genuine bundle
    sql(device, "INSERT INTO zmonitor_migrated_bundles VALUES (99, 'x', ?, 'now', NULL)",
        "e" * 64)
    proc = device.cli("apply", str(b3))
    assert proc.returncode == 0, proc.stderr
    assert floor_of(device)["sequence"] == 3


def test_first_start_seeds_the_floor_from_the_database(device: Device,
                                                       shipped_bundle: Path) -> None:
    """Upgrading the package never lowers the floor: the database's record (sequence 5)
    becomes the state file's, and later edits of the database do not change it."""
    sql(device, "CREATE TABLE IF NOT EXISTS zmonitor_migrated_bundles (sequence INTEGER "
                "PRIMARY KEY, name TEXT NOT NULL, manifest_sha256 TEXT NOT NULL, "
                "applied_at TEXT NOT NULL, run_id TEXT)")
    sql(device, "INSERT INTO zmonitor_migrated_bundles VALUES (5, 'zmonitor', ?, 'x', NULL)",
        "a" * 64)
    verify = device.cli("bundle", "verify", str(shipped_bundle), "--json")
    assert verify.returncode == 3 and json.loads(verify.stdout)["error"]["kind"] == "rollback"
    assert not floor_file(device).exists(), "bundle verify writes nothing"
    forget_calls(device)
    proc = device.cli("apply", str(shipped_bundle))
    assert_refused(device, proc, 3, "rollback", snapshot(device))
    assert floor_of(device)["sequence"] == 5 and floor_of(device)["origin"] == "database"
    assert floor_of(device)["manifest_sha256"] == "a" * 64
    sql(device, "DELETE FROM zmonitor_migrated_bundles")
    proc = device.cli("apply", str(shipped_bundle))
    assert_refused(device, proc, 3, "rollback", snapshot(device))


def test_the_same_bundle_again_is_a_no_op(device: Device, shipped_bundle: Path) -> None:
    assert device.cli("apply", str(shipped_bundle)).returncode == 0
    recorded = floor_file(device).read_bytes()
    forget_calls(device)
    proc = device.cli("apply", str(shipped_bundle), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "up-to-date"
    assert stops(device) == [] and device.app_active()
    assert floor_file(device).read_bytes() == recorded


def test_a_failed_run_moves_the_floor_and_only_the_same_bundle_retries(
        device: Device, key: Path, shipped_bundle: Path, tmp_path: Path) -> None:
    """A genuine, signed sequence 1 that fails its rehearsal still supersedes every other
    sequence-1 manifest; retrying it is allowed (it fails in the rehearsal again, not in
    the policy)."""
    broken = variant(tmp_path, key, 1, name="broken", edit=lambda s: add_migration(
        s, 15, "UPDATE vitals SET heart_rate = no_such_column;\n"))
    proc = device.cli("apply", str(broken))
    assert proc.returncode == 4 and "[rehearsal]" in proc.stderr, proc.stderr
    assert floor_of(device)["sequence"] == 1
    again = device.cli("apply", str(broken))
    assert again.returncode == 4 and "[rehearsal]" in again.stderr, again.stderr
    forget_calls(device)
    proc = device.cli("apply", str(shipped_bundle))
    assert_refused(device, proc, 3, "rollback", snapshot(device))
    assert "same sequence with different content" in proc.stderr


def test_a_dry_run_records_nothing(device: Device, key: Path, tmp_path: Path) -> None:
    b2 = variant(tmp_path, key, 2, edit=noop_migration)
    proc = device.cli("apply", str(b2), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert not floor_file(device).exists()


def test_after_a_rollback_the_same_bundle_is_refused_naming_what_is_pending(
        device: Device, shipped_bundle: Path) -> None:
    """Not "nothing to do" (exit 0) while status shows migrations pending: exit 3 with
    the pending versions and the way forward, nothing touched, the app never stopped."""
    assert device.cli("apply", str(shipped_bundle)).returncode == 0
    rb = device.cli("rollback", "--to", "10", "--bundle", str(shipped_bundle))
    assert rb.returncode == 0, rb.stderr
    assert floor_of(device)["rolled_back_to"] == 10
    forget_calls(device)
    proc = device.cli("apply", str(shipped_bundle), "--json")
    assert proc.returncode == 3, proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert error["kind"] == "rollback" and "0011" in error["message"], error
    assert "--sequence 2" in error["message"], error
    assert version(device.db) == 10 and stops(device) == []


# -- a damaged state file refuses every bundle -------------------------------------------
def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _symlink(path: Path) -> None:
    target = path.with_name("elsewhere.json")
    target.write_text(json.dumps({"format": 1, "sequence": 0, "manifest_sha256": None,
                                  "name": None, "recorded_at": None, "origin": "none",
                                  "rolled_back_to": None}))
    path.symlink_to(target)


def _good_doc(**changes: object) -> str:
    doc = {"format": 1, "sequence": 1, "manifest_sha256": "a" * 64, "name": "zmonitor",
           "recorded_at": "2026-01-01T00:00:00Z", "origin": "bundle", "rolled_back_to": None}
    doc.update(changes)
    return json.dumps(doc)


DAMAGED: dict[str, Callable[[Path], None]] = {
    "not JSON": lambda p: p.write_text("{\"format\": 1, \"seq"),
    "empty": lambda p: p.write_bytes(b""),
    "zero bytes of a crashed write": lambda p: p.write_bytes(b"\x00" * 512),
    "unknown key": lambda p: p.write_text(_good_doc(extra=1)),
    "negative sequence": lambda p: p.write_text(_good_doc(sequence=-1)),
    "sequence as text": lambda p: p.write_text(_good_doc(sequence="7")),
    "sequence without its manifest": lambda p: p.write_text(_good_doc(manifest_sha256=None)),
    "future format": lambda p: p.write_text(_good_doc(format=2)),
    "a directory": lambda p: p.mkdir(),
    "a FIFO": _fifo,
    "a symlink": _symlink,
    "over 64 KiB": lambda p: p.write_text(_good_doc(name="x" * 70000)),
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_a_damaged_state_file_refuses_every_bundle_with_the_fix(
        device: Device, shipped_bundle: Path, name: str) -> None:
    path = floor_file(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    DAMAGED[name](path)
    kept = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    before = snapshot(device)
    proc = device.cli("apply", str(shipped_bundle))
    assert_refused(device, proc, 3, "anti-rollback-state", before)
    assert str(path) in proc.stderr and "Fix:" in proc.stderr
    assert version(device.db) == 10
    if kept is not None:
        assert path.read_bytes() == kept, "never reset silently"
    verify = device.cli("bundle", "verify", str(shipped_bundle), "--json")
    assert verify.returncode == 3
    assert json.loads(verify.stdout)["error"]["kind"] == "anti-rollback-state"


# -- rollback --bundle goes through the same policy --------------------------------------
ROLLBACK_BUNDLES: dict[str, tuple[str, Callable[[Path, Path, Path], Path]]] = {
    "expired": ("expired", lambda tmp, key, other: variant(
        tmp, key, 2, created=NOW - 40 * DAY, expires=NOW - 10 * DAY)),
    "for another device type": ("wrong-device", lambda tmp, key, other: variant(
        tmp, key, 2, edit=for_device("zmonitor-central-station"))),
    "signed by an untrusted key": ("untrusted-key", lambda tmp, key, other: variant(
        tmp, other, 2)),
    "created in the future": ("not-yet-valid", lambda tmp, key, other: variant(
        tmp, key, 2, created=datetime.now(UTC).replace(microsecond=0) + 2 * DAY)),
    "the floor's sequence with another manifest": ("rollback", lambda tmp, key, other: variant(
        tmp, key, 1, created=NOW - DAY)),
}


@pytest.mark.parametrize("name", list(ROLLBACK_BUNDLES))
def test_rollback_bundle_is_admitted_like_apply(device: Device, shipped_bundle: Path,
                                                key: Path, tmp_path: Path, name: str) -> None:
    assert device.cli("apply", str(shipped_bundle)).returncode == 0
    kind, make = ROLLBACK_BUNDLES[name]
    hostile = make(tmp_path, key, make_key(tmp_path / "stranger").key)
    forget_calls(device)
    before = snapshot(device)
    proc = device.cli("rollback", "--to", "10", "--bundle", str(hostile))
    assert_refused(device, proc, 3, kind, before)
    assert version(device.db) == 14


# -- rollback --source is for developer machines -----------------------------------------
@pytest.mark.parametrize("flag,allowed,needs", [
    (False, False, "--unsigned-source"),
    (True, False, "allow_unsigned_source: true"),
    (False, True, "--unsigned-source"),
])
def test_unsigned_rollback_source_needs_the_flag_and_the_config_key(
        device: Device, flag: bool, allowed: bool, needs: str) -> None:
    if allowed:
        device.set_config(allow_unsigned_source=True)
    before = snapshot(device)
    args = ["rollback", "--to", "5", "--source", str(SHIPPED)]
    proc = device.cli(*args, *(["--unsigned-source"] if flag else []))
    assert_refused(device, proc, 2, "unsigned-source", before)
    assert needs in proc.stderr and "--bundle" in proc.stderr
    assert not (device.root / "state" / "journal.json").exists(), "no run was started"


def test_unsigned_rollback_source_on_a_developer_machine(device: Device,
                                                         shipped_bundle: Path) -> None:
    assert device.cli("apply", str(shipped_bundle)).returncode == 0
    device.set_config(allow_unsigned_source=True)
    proc = device.cli("rollback", "--to", "10", "--source", str(SHIPPED), "--unsigned-source")
    assert proc.returncode == 0, proc.stderr
    assert version(device.db) == 10


def test_the_packaged_config_does_not_allow_unsigned_sources() -> None:
    shipped = yaml.safe_load((SHIPPED.parent.parent / "packaging" / "config.yaml").read_text())
    assert "allow_unsigned_source" not in shipped
    assert shipped["max_validity_days"] == 730


# -- one verdict: bundle verify says what apply does --------------------------------------
VERDICTS: dict[str, tuple[str, Callable[[Path, Path], Path]]] = {
    "another device type": ("wrong-device", lambda tmp, key: variant(
        tmp, key, 2, edit=for_device("zmonitor-central-station"))),
    "created beyond the clock slack": ("not-yet-valid", lambda tmp, key: variant(
        tmp, key, 2, created=datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1))),
    "valid longer than max_validity_days": ("validity-too-long", lambda tmp, key: variant(
        tmp, key, 2, expires=NOW + 731 * DAY)),
    "post.yaml not a list of checks": ("malformed", lambda tmp, key: variant(
        tmp, key, 2, edit=replace_file("checks/post.yaml", "checks: []\n"), lint=False)),
    "database.yaml without a table": ("malformed", lambda tmp, key: variant(
        tmp, key, 2, edit=replace_file("schema/database.yaml", "tables: {}\n"), lint=False)),
}


@pytest.mark.parametrize("name", list(VERDICTS))
def test_bundle_verify_and_apply_give_the_same_refusal(device: Device, key: Path,
                                                       tmp_path: Path, name: str) -> None:
    kind, make = VERDICTS[name]
    hostile = make(tmp_path, key)
    verify = device.cli("bundle", "verify", str(hostile), "--json")
    assert verify.returncode == 3, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["error"]["kind"] == kind
    before = snapshot(device)
    proc = device.cli("apply", str(hostile))
    assert_refused(device, proc, 3, kind, before)
    assert not floor_file(device).exists() or floor_of(device)["sequence"] == 0


def test_bundle_verify_shows_the_floor_and_its_verdict(device: Device, key: Path,
                                                       shipped_bundle: Path,
                                                       tmp_path: Path) -> None:
    assert device.cli("apply", str(shipped_bundle)).returncode == 0
    b2 = variant(tmp_path, key, 2)
    ok = device.cli("bundle", "verify", str(b2), "--json")
    assert ok.returncode == 0, ok.stderr
    obj = json.loads(ok.stdout)
    assert obj["decision"] == "apply" and obj["device_type"] == "zmonitor-bedside"
    assert obj["anti_rollback"]["sequence"] == 1 and obj["anti_rollback"]["stored"]
    text = device.cli("bundle", "verify", str(shipped_bundle))
    assert text.returncode == 0 and "anti-rollback floor: sequence 1" in text.stdout
    assert "already-applied" in text.stdout


def test_bundle_verify_threshold_can_only_raise(device: Device, shipped_bundle: Path,
                                                tmp_path: Path) -> None:
    second = make_key(tmp_path / "clinical")
    shutil.copy(second.pub, device.root / "trusted.d" / second.pub.name)
    device.set_config(signature_threshold=2)
    proc = device.cli("bundle", "verify", str(shipped_bundle), "--threshold", "1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "signature_threshold 2" in proc.stderr
    proc = device.cli("bundle", "verify", str(shipped_bundle), "--threshold", "0")
    assert proc.returncode == 2 and "--threshold" in proc.stderr, proc.stdout + proc.stderr
    proc = device.cli("bundle", "verify", str(shipped_bundle), "--json")
    assert (proc.returncode, json.loads(proc.stdout)["error"]["kind"]) == \
        (3, "threshold-not-met")
    device.set_config(signature_threshold=1)
    proc = device.cli("bundle", "verify", str(shipped_bundle), "--threshold", "2", "--json")
    assert (proc.returncode, json.loads(proc.stdout)["error"]["kind"]) == \
        (3, "threshold-not-met")


# -- time, pure ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory,
             release_key: tuple[Path, Path]) -> Manifest:
    from zmonitor_migrated.archive import Caps, open_bundle

    tmp = tmp_path_factory.mktemp("time")
    out = variant(tmp, release_key[0], 3, created=datetime(2026, 1, 1, tzinfo=UTC),
                  expires=datetime(2026, 1, 1, tzinfo=UTC) + 730 * DAY)
    return Manifest.from_json(open_bundle(out, Caps())[0])


def _policy(m: Manifest, *, now: datetime, slack: float = 300, max_days: int = 730,
            **changes: object) -> Decision:
    values: dict[str, object] = {
        "device_type": "zmonitor-bedside", "floor_sequence": 0,
        "floor_manifest_sha256": None, "manifest_sha256": "b" * 64, "applied": {},
        "now": now, "clock_slack_s": slack, "max_validity_days": max_days}
    values.update(changes)
    return check_policy(m, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize("offset_s,ok", [(-1, True), (299, True), (301, False),
                                         (86400, False)])
def test_created_in_the_future_beyond_the_slack_is_refused(manifest: Manifest,
                                                           offset_s: int, ok: bool) -> None:
    """The device clock ``offset_s`` seconds before the bundle's creation."""
    now = manifest.created - timedelta(seconds=offset_s)
    if ok:
        assert _policy(manifest, now=now) == Decision.APPLY
        return
    with pytest.raises(BundleRejected) as exc:
        _policy(manifest, now=now)
    assert exc.value.kind == "not-yet-valid" and "timedatectl" in exc.value.message


@pytest.mark.parametrize("max_days,ok", [(730, True), (729, False), (1, False)])
def test_validity_over_the_maximum_is_refused(manifest: Manifest, max_days: int,
                                              ok: bool) -> None:
    now = manifest.created + DAY
    if ok:
        assert _policy(manifest, now=now, max_days=max_days) == Decision.APPLY
        return
    with pytest.raises(BundleRejected) as exc:
        _policy(manifest, now=now, max_days=max_days)
    assert exc.value.kind == "validity-too-long"
    assert f"--valid-days {max_days}" in exc.value.message


def test_rollback_purpose_never_skips_the_time_checks(manifest: Manifest) -> None:
    """For apply, the floor's own fully applied bundle is a no-op even once expired; a
    rollback uses the bundle, so an expired one is refused."""
    applied = {m.version: m.sha256 for m in manifest.migrations}
    late = manifest.expires + 2 * DAY
    same = {"floor_sequence": manifest.sequence, "floor_manifest_sha256": "b" * 64,
            "applied": applied}
    assert _policy(manifest, now=late, **same) == Decision.ALREADY_APPLIED
    with pytest.raises(BundleRejected) as exc:
        _policy(manifest, now=late, purpose=Purpose.ROLLBACK, **same)
    assert exc.value.kind == "expired"


# -- the state file, pure -----------------------------------------------------------------
def test_the_floor_is_only_ever_raised_and_written_atomically(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    seeded = seed_floor(state, DeviceState(exists=True, last_sequence=4,
                                           last_manifest_sha256="c" * 64))
    assert (seeded.sequence, seeded.origin, seeded.stored) == (4, "database", True)
    assert seed_floor(state, DeviceState(exists=True, last_sequence=9,
                                         last_manifest_sha256="d" * 64)).sequence == 4
    assert raise_floor(state, sequence=3, manifest_sha256="e" * 64, name="x").sequence == 4
    assert raise_floor(state, sequence=4, manifest_sha256="e" * 64,
                       name="x").manifest_sha256 == "c" * 64
    raised = raise_floor(state, sequence=6, manifest_sha256="f" * 64, name="zmonitor")
    assert read_floor(state) == raised and raised.sequence == 6
    assert sorted(p.name for p in state.iterdir()) == [FLOOR_FILE]  # no temp file left
    assert read_floor(tmp_path / "nowhere") is None
    assert Floor().describe() == "no bundle accepted yet"


def test_the_daemon_seeds_the_floor_at_start(tmp_path: Path) -> None:
    """A package upgrade leaves no floor file: the daemon writes it from the database at
    start, before any inbox file is looked at, so the floor never starts at zero."""
    from zmonitor_migrated import daemon
    from zmonitor_migrated.config import from_mapping
    from zmonitor_migrated.progress import Reporter

    db = tmp_path / "monitor.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE zmonitor_migrated_bundles (sequence INTEGER, "
                     "manifest_sha256 TEXT)")
        conn.execute("INSERT INTO zmonitor_migrated_bundles VALUES (7, ?)", ("ab" * 32,))
    conn.close()
    config = from_mapping({"database": str(db), "state_dir": str(tmp_path / "state")})
    (tmp_path / "state").mkdir()
    assert read_floor(tmp_path / "state") is None
    daemon._seed_floor(config, Reporter([]))
    floor = read_floor(tmp_path / "state")
    assert floor is not None and floor.sequence == 7


def test_a_hand_applied_version_does_not_end_the_check_of_later_ones(
        manifest: Manifest) -> None:
    """A version recorded without a hash (applied by hand) is skipped, and every later
    applied version is still checked: an edited migration after it is refused."""
    now = datetime(2026, 6, 1, tzinfo=UTC)
    applied: dict[int, str | None] = {m.version: m.sha256 for m in manifest.migrations[:5]}
    applied[2] = None
    assert _policy(manifest, now=now, applied=applied) == Decision.APPLY
    applied[4] = "0" * 64  # version 4, after the unhashed 2, was edited
    with pytest.raises(BundleRejected) as err:
        _policy(manifest, now=now, applied=applied)
    assert err.value.kind == "applied-migration-changed" and "migration 4" in err.value.message
