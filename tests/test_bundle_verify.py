"""The hostile-bundle corpus: every refusal on real files, through the command line, with
its kind, exit code 3, and the database's bytes (and directory) left identical."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from bundle_helpers import (
    DEVICE,
    SQL_1,
    SQL_2,
    SQL_3,
    KeyPair,
    RawMember,
    build_bundle,
    build_unlinted,
    dir_snapshot,
    flip,
    make_db,
    make_key,
    make_source,
    member_data_offset,
    members,
    run_cli,
    tar_bytes,
    trust_dir,
    write_config,
)

from zmonitor_migrated.archive import Caps, extract_payload, open_bundle
from zmonitor_migrated.bundle import verify_bundle
from zmonitor_migrated.device_state import FLOOR_FILE, device_state
from zmonitor_migrated.errors import BundleRejected, PrecheckFailed
from zmonitor_migrated.keys import load_private_key
from zmonitor_migrated.manifest import Manifest
from zmonitor_migrated.trust import TrustStore
from zmonitor_migrated.verify import (
    Decision,
    check_policy,
    sign_manifest_bytes,
    signatures_to_json,
    verify_manifest,
)

REPO = Path(__file__).resolve().parents[1]
SEQUENCE = 5
SQL_PATH = "migrations/schema/0001_create_patients.sql"
ALL_APPLIED = {1: hashlib.sha256(SQL_1.encode()).hexdigest(),
               2: hashlib.sha256(SQL_2.encode()).hexdigest(),
               3: hashlib.sha256(SQL_3.encode()).hexdigest()}


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@dataclass
class Env:
    tmp: Path
    src: Path
    a: KeyPair
    b: KeyPair
    unknown: KeyPair
    trust: Path
    db: Path
    good: Path
    config_values: dict = field(default_factory=dict)

    def bundle(self, name: str, data: bytes) -> Path:
        path = self.tmp / "hostile" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return path

    def config(self, **overrides: object) -> Path:
        values = {"database": self.db, "device_type": DEVICE, "trust_dir": self.trust,
                  "signature_threshold": 1, "revoked_keys": [],
                  "state_dir": self.tmp / "state", "inbox": self.tmp / "inbox",
                  "backup_dir": self.tmp / "backups",
                  # the corpus's bundles are valid 2025-2125 (bundle_helpers T0..FAR)
                  "max_validity_days": 36525}
        values.update(overrides)
        return write_config(self.tmp / "config.yaml", **values)

    def items(self) -> list[RawMember]:
        return members(self.good)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    src = make_source(tmp_path / "src")
    keys = tmp_path / "keys"
    a, b, unknown = make_key(keys / "a"), make_key(keys / "b"), make_key(keys / "unknown")
    trust = trust_dir(tmp_path / "trust", a, b)
    (tmp_path / "db").mkdir()
    db = make_db(tmp_path / "db" / "monitor.db", applied={1: sha(SQL_1)},
                 bundles=[(SEQUENCE - 1, "f" * 64)])
    good = build_bundle(src, tmp_path / "good.zmb", [a], SEQUENCE)
    return Env(tmp_path, src, a, b, unknown, trust, db, good)


def verify_cli(bundle: Path, config: Path, *extra: str) -> tuple[int, dict]:
    code, out, err = run_cli(["bundle", "verify", str(bundle), "--config", str(config),
                              "--json", *extra])
    lines = out.splitlines()
    assert len(lines) == 1, (out, err)  # exactly one JSON object on stdout
    return code, json.loads(lines[0])


# -- the corpus -------------------------------------------------------------------------------

Case = Callable[[Env], tuple[Path, dict]]
CORPUS: dict[str, tuple[str, Case]] = {}


def case(name: str, kind: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CORPUS[name] = (kind, fn)
        return fn
    return register


def _replace(env: Env, name: str, data: bytes) -> list[RawMember]:
    items = env.items()
    next(m for m in items if m.name == name).data = data
    return items


@case("flipped byte in a SQL file", "hash-mismatch")
def _(env: Env):
    raw = env.good.read_bytes()
    return env.bundle("sql.zmb", flip(raw, member_data_offset(raw, SQL_PATH) + 7)), {}


@case("flipped byte in the manifest", "bad-signature")
def _(env: Env):
    raw = env.good.read_bytes()
    at = member_data_offset(raw, "manifest.json") + raw[512:].index(b"a test bundle") + 2
    return env.bundle("manifest.zmb", flip(raw, at)), {}


@case("flipped byte in a signature", "bad-signature")
def _(env: Env):
    raw = env.good.read_bytes()
    at = raw.index(b'"sig":"') + 7 + 20
    changed = bytearray(raw)
    changed[at] = ord("B") if raw[at] != ord("B") else ord("C")
    return env.bundle("sig.zmb", bytes(changed)), {}


@case("signatures.json from another bundle", "bad-signature")
def _(env: Env):
    other = build_bundle(env.src, env.tmp / "other.zmb", [env.a], SEQUENCE + 1)
    _, other_sigs = open_bundle(other, Caps())
    return env.bundle("swapped.zmb", tar_bytes(_replace(env, "signatures.json", other_sigs))), {}


@case("signed by an unknown key", "untrusted-key")
def _(env: Env):
    return build_bundle(env.src, env.tmp / "unknown.zmb", [env.unknown], SEQUENCE), {}


@case("signed by a revoked key", "revoked-key")
def _(env: Env):
    return env.good, {"revoked_keys": [env.a.keyid]}


@case("threshold 2 with one signature", "threshold-not-met")
def _(env: Env):
    return env.good, {"signature_threshold": 2}


@case("no signature at all", "threshold-not-met")
def _(env: Env):
    return env.bundle("unsigned.zmb", tar_bytes(_replace(env, "signatures.json", b"[]"))), {}


@case("signatures.json is not canonical", "malformed")
def _(env: Env):
    _, sigs = open_bundle(env.good, Caps())
    spaced = json.dumps(json.loads(sigs)).encode()
    return env.bundle("spaced.zmb", tar_bytes(_replace(env, "signatures.json", spaced))), {}


@case("validly signed manifest with an unknown field", "malformed")
def _(env: Env):
    items = _resigned(env, lambda d: d.update(run_this="rm -rf /"))
    return env.bundle("signed-junk.zmb", tar_bytes(items)), {}


def _resigned(env: Env, change: Callable[[dict], None]) -> list[RawMember]:
    manifest, _ = open_bundle(env.good, Caps())
    doc = json.loads(manifest)
    change(doc)
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    sigs = signatures_to_json([sign_manifest_bytes(data, load_private_key(env.a.key))])
    items = _replace(env, "manifest.json", data)
    next(m for m in items if m.name == "signatures.json").data = sigs
    return items


@case("signed manifest disagreeing with bundle.yaml", "malformed")
def _(env: Env):
    items = _resigned(env, lambda d: d.update(device_types=["zmonitor-bedside", "other"]))
    return env.bundle("yaml-disagrees.zmb", tar_bytes(items)), {}


@case("signed manifest with a description not from the file name", "malformed")
def _(env: Env):
    items = _resigned(env, lambda d: d["migrations"][0].update(description="Harmless"))
    return env.bundle("description.zmb", tar_bytes(items)), {}


@case("extra member", "unlisted-member")
def _(env: Env):
    items = [*env.items(), RawMember("migrations/schema/0004_backdoor.sql", b"DROP TABLE x;")]
    return env.bundle("extra.zmb", tar_bytes(items)), {}


@case("missing member", "missing-member")
def _(env: Env):
    items = [m for m in env.items() if m.name != "checks/post.yaml"]
    return env.bundle("missing.zmb", tar_bytes(items)), {}


@case("member with ../", "unsafe-member")
def _(env: Env):
    items = [*env.items(), RawMember("migrations/../../../etc/cron.d/x", b"* * * * * root x")]
    return env.bundle("dotdot.zmb", tar_bytes(items)), {}


@case("member with an absolute path", "unsafe-member")
def _(env: Env):
    items = [*env.items(), RawMember("/etc/passwd", b"root::0:0::/:/bin/sh\n")]
    return env.bundle("absolute.zmb", tar_bytes(items)), {}


@case("symlink member", "unsafe-member")
def _(env: Env):
    items = env.items()
    items.insert(3, RawMember("checks/evil.yaml", type=tarfile.SYMTYPE, linkname="/etc/shadow"))
    return env.bundle("symlink.zmb", tar_bytes(items)), {}


@case("symlink replacing a listed file", "unsafe-member")
def _(env: Env):
    items = [RawMember(m.name, type=tarfile.SYMTYPE, linkname="/etc/shadow")
             if m.name == "checks/post.yaml" else m for m in env.items()]
    return env.bundle("symlink-listed.zmb", tar_bytes(items)), {}


@case("hard link member", "unsafe-member")
def _(env: Env):
    items = [*env.items(), RawMember("checks/hard.yaml", type=tarfile.LNKTYPE,
                                     linkname="/etc/shadow")]
    return env.bundle("hardlink.zmb", tar_bytes(items)), {}


@case("device node member", "unsafe-member")
def _(env: Env):
    items = [*env.items(), RawMember("checks/mem", type=tarfile.CHRTYPE)]
    return env.bundle("device.zmb", tar_bytes(items)), {}


@case("fifo member", "unsafe-member")
def _(env: Env):
    items = [*env.items(), RawMember("checks/fifo", type=tarfile.FIFOTYPE)]
    return env.bundle("fifo.zmb", tar_bytes(items)), {}


@case("directory member", "unsafe-member")
def _(env: Env):
    items = env.items()
    items.insert(2, RawMember("migrations/", type=tarfile.DIRTYPE))
    return env.bundle("dir.zmb", tar_bytes(items)), {}


@case("pax header renaming a member", "unsafe-member")
def _(env: Env):
    items = env.items()
    pax = b"30 path=../../../../etc/passwd\n"
    items.insert(2, RawMember("PaxHeaders/x", pax, type=tarfile.XHDTYPE))
    items[2].size = len(pax)
    return env.bundle("pax.zmb", tar_bytes(items)), {}


@case("duplicate member", "unsafe-member")
def _(env: Env):
    items = env.items()
    sql = next(m for m in items if m.name == SQL_PATH)
    items.append(RawMember(SQL_PATH, sql.data.replace(b"patients", b"patientz")))
    return env.bundle("duplicate.zmb", tar_bytes(items)), {}


@case("manifest not first", "malformed")
def _(env: Env):
    items = env.items()
    items[0], items[1] = items[1], items[0]
    return env.bundle("order.zmb", tar_bytes(items)), {}


@case("signatures not second", "malformed")
def _(env: Env):
    items = env.items()
    items[1], items[2] = items[2], items[1]
    return env.bundle("order2.zmb", tar_bytes(items)), {}


@case("payload member declaring 2 GiB", "too-large")
def _(env: Env):
    items = env.items()
    sql = next(m for m in items if m.name == SQL_PATH)
    sql.size = 2 * 1024**3
    return env.bundle("2gib.zmb", tar_bytes(items)), {}


@case("manifest declaring 2 GiB", "too-large")
def _(env: Env):
    items = env.items()
    items[0].size = 2 * 1024**3
    return env.bundle("2gib-manifest.zmb", tar_bytes(items)), {}


@case("manifest over 1 MiB", "too-large")
def _(env: Env):
    return env.bundle("big-manifest.zmb", tar_bytes(
        _replace(env, "manifest.json", b" " * (1024 * 1024 + 1)))), {}


@case("signatures over 64 KiB", "too-large")
def _(env: Env):
    return env.bundle("big-sigs.zmb", tar_bytes(
        _replace(env, "signatures.json", b" " * (64 * 1024 + 1)))), {}


@case("more members than the cap", "too-large")
def _(env: Env):
    return env.good, {"max_bundle_members": 5}


@case("more bytes than the cap", "too-large")
def _(env: Env):
    return env.good, {"max_bundle_bytes": 100}


@case("gzip bomb after the end of the archive", "too-large")
def _(env: Env):
    # 1 GiB of zeros behind a valid archive, in one gzip member of about 1 MB: after a full
    # flush the deflate blocks of 16 MiB of zeros refer to nothing before them, so they
    # can be repeated (the trailer is never reached, the zeros are refused first)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = c.compress(env.good.read_bytes()) + c.flush(zlib.Z_FULL_FLUSH)
    zeros = c.compress(bytes(16 * 1024 * 1024)) + c.flush(zlib.Z_FULL_FLUSH)
    member = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + head + zeros * 64 + c.flush()
    return env.bundle("bomb.zmb.gz", member + bytes(8)), {}


@case("gzip bomb inside a member", "too-large")
def _(env: Env):
    items = env.items()
    sql = next(m for m in items if m.name == SQL_PATH)
    sql.size = 4 * 1024**3
    head = tar_bytes(items)
    head = head[:member_data_offset(head, SQL_PATH)]
    zeros = gzip.compress(bytes(16 * 1024 * 1024), compresslevel=9)
    return env.bundle("bomb2.zmb.gz", gzip.compress(head) + zeros * 64), {}


@case("size in the header differs from the manifest", "hash-mismatch")
def _(env: Env):
    return env.bundle("size.zmb", tar_bytes(_replace(env, SQL_PATH, SQL_1.encode() + b"\n"))), {}


@case("non-zero padding after a member", "malformed")
def _(env: Env):
    raw = env.good.read_bytes()
    end = member_data_offset(raw, SQL_PATH) + len(SQL_1)
    return env.bundle("padding.zmb", flip(raw, end + 3)), {}


@case("data after the end of the archive", "malformed")
def _(env: Env):
    raw = bytearray(env.good.read_bytes())
    raw[-10] = 1
    return env.bundle("trailer.zmb", bytes(raw)), {}


@case("header checksum wrong", "malformed")
def _(env: Env):
    raw = env.good.read_bytes()
    header = member_data_offset(raw, "bundle.yaml") - 512
    return env.bundle("checksum.zmb", flip(raw, header + 140)), {}  # a digit of its mtime


@case("truncated archive", "malformed")
def _(env: Env):
    raw = env.good.read_bytes()
    return env.bundle("truncated.zmb", raw[:member_data_offset(raw, SQL_PATH) + 10]), {}


@case("truncated gzip", "malformed")
def _(env: Env):
    return env.bundle("truncated.zmb.gz", gzip.compress(env.good.read_bytes())[:-20]), {}


@case("empty file", "malformed")
def _(env: Env):
    return env.bundle("empty.zmb", b""), {}


@case("random bytes", "malformed")
def _(env: Env):
    return env.bundle("random.zmb", random.Random(3).randbytes(20000)), {}


@case("sequence equal with different content", "rollback")
def _(env: Env):
    _reset_db(env, bundles=[(SEQUENCE, "e" * 64)])
    return env.good, {}


@case("sequence lower", "rollback")
def _(env: Env):
    _reset_db(env, bundles=[(SEQUENCE + 3, "e" * 64)])
    return env.good, {}


@case("bundle lacks a version the database has", "rollback")
def _(env: Env):
    _reset_db(env, applied={1: sha(SQL_1), 2: None, 3: None, 4: None})
    return env.good, {}


@case("expired", "expired")
def _(env: Env):
    created = datetime(2020, 1, 1, tzinfo=UTC)
    return build_bundle(env.src, env.tmp / "old.zmb", [env.a], SEQUENCE, created=created,
                        expires=created + timedelta(days=30)), {}


@case("wrong device type", "wrong-device")
def _(env: Env):
    return env.good, {"device_type": "zmonitor-central-station"}


@case("an applied migration changed", "applied-migration-changed")
def _(env: Env):
    _reset_db(env, applied={1: sha("CREATE TABLE patients (id INTEGER PRIMARY KEY);\n")})
    return env.good, {}


@case("created after the device time beyond the clock slack", "not-yet-valid")
def _(env: Env):
    created = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    return build_bundle(env.src, env.tmp / "future.zmb", [env.a], SEQUENCE, created=created,
                        expires=created + timedelta(days=30)), {}


@case("valid for longer than max_validity_days", "validity-too-long")
def _(env: Env):
    return env.good, {"max_validity_days": 730}  # the corpus bundles are valid 100 years


@case("checks/post.yaml that does not parse", "malformed")
def _(env: Env):
    (env.src / "checks" / "post.yaml").write_text("checks: []\n")
    return build_unlinted(env.src, env.tmp / "post.zmb", [env.a], SEQUENCE), {}


@case("schema/database.yaml that does not parse", "malformed")
def _(env: Env):
    (env.src / "schema" / "database.yaml").write_text("tables: {}\n")
    return build_unlinted(env.src, env.tmp / "spec.zmb", [env.a], SEQUENCE), {}


@case("sequence below the state file's floor", "rollback")
def _(env: Env):
    _write_floor(env, SEQUENCE + 1)  # the database's own record (SEQUENCE - 1) is lower
    return env.good, {}


@case("state file that is not JSON", "anti-rollback-state")
def _(env: Env):
    (env.tmp / "state").mkdir(exist_ok=True)
    (env.tmp / "state" / FLOOR_FILE).write_text("{not json")
    return env.good, {}


def _write_floor(env: Env, sequence: int) -> None:
    (env.tmp / "state").mkdir(exist_ok=True)
    (env.tmp / "state" / FLOOR_FILE).write_text(json.dumps({
        "format": 1, "sequence": sequence, "manifest_sha256": "e" * 64, "name": "test",
        "recorded_at": "2026-01-01T00:00:00Z", "origin": "bundle", "rolled_back_to": None}))


def _reset_db(env: Env, **kwargs: object) -> None:
    for p in env.db.parent.iterdir():
        p.unlink()
    make_db(env.db, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_bundle_is_refused_with_its_kind(env: Env, name: str) -> None:
    kind, make = CORPUS[name]
    bundle, overrides = make(env)
    config = env.config(**overrides)
    before = dir_snapshot(env.db.parent)
    started = time.monotonic()
    code, obj = verify_cli(bundle, config)
    elapsed = time.monotonic() - started
    assert (code, obj["ok"], obj["error"]["kind"]) == (3, False, kind), obj
    assert dir_snapshot(env.db.parent) == before  # the database's bytes, and no new files
    assert elapsed < 5, "a refusal must not unpack the bundle"


def test_the_corpus_covers_every_bundle_kind() -> None:
    kinds = {kind for kind, _ in CORPUS.values()}
    assert kinds == {"bad-signature", "untrusted-key", "threshold-not-met", "revoked-key",
                     "hash-mismatch", "unlisted-member", "missing-member", "unsafe-member",
                     "too-large", "malformed", "rollback", "expired", "wrong-device",
                     "applied-migration-changed", "not-yet-valid", "validity-too-long",
                     "anti-rollback-state"}
    assert len(CORPUS) >= 40


def test_refusal_in_human_form_names_the_kind_and_exits_3(env: Env) -> None:
    raw = env.good.read_bytes()
    bad = env.bundle("sql.zmb", flip(raw, member_data_offset(raw, SQL_PATH)))
    code, out, err = run_cli(["bundle", "verify", str(bad), "--config", str(env.config())])
    assert code == 3 and out == ""
    assert "[hash-mismatch]" in err and SQL_PATH in err


# -- what passes ---------------------------------------------------------------------------

def test_valid_bundle_verifies_and_the_database_is_untouched(env: Env) -> None:
    before = dir_snapshot(env.db.parent)
    code, obj = verify_cli(env.good, env.config())
    assert code == 0 and obj["ok"] and obj["decision"] == "apply"
    assert obj["signed_by"] == [env.a.keyid] and obj["sequence"] == SEQUENCE
    assert obj["migrations"] == [1, 2, 3]
    assert dir_snapshot(env.db.parent) == before
    code, out, _ = run_cli(["bundle", "verify", str(env.good), "--config", str(env.config())])
    assert code == 0 and "verified" in out and "apply" in out


def test_the_same_bundle_again_is_already_applied_exit_0(env: Env) -> None:
    manifest, _ = open_bundle(env.good, Caps())
    _reset_db(env, applied=ALL_APPLIED, bundles=[(SEQUENCE, sha(manifest))])
    code, obj = verify_cli(env.good, env.config())
    assert code == 0 and obj["decision"] == "already-applied"
    # the same bundle with something still pending (a failed run, --target): a retry
    _reset_db(env, applied={1: sha(SQL_1)}, bundles=[(SEQUENCE, sha(manifest))])
    code, obj = verify_cli(env.good, env.config())
    assert code == 0 and obj["decision"] == "apply"


def test_the_state_file_not_the_database_is_the_floor(env: Env) -> None:
    """The database says sequence SEQUENCE + 3; the state file says SEQUENCE - 1: the
    bundle passes, and the floor shown is the state file's."""
    _reset_db(env, applied={1: sha(SQL_1)}, bundles=[(SEQUENCE + 3, "e" * 64)])
    _write_floor(env, SEQUENCE - 1)
    code, obj = verify_cli(env.good, env.config())
    assert code == 0 and obj["decision"] == "apply", obj
    assert obj["anti_rollback"]["sequence"] == SEQUENCE - 1 and obj["anti_rollback"]["stored"]


def test_gzip_compressed_bundle_verifies(env: Env) -> None:
    gz = env.bundle("good.zmb.gz", gzip.compress(env.good.read_bytes()))
    code, obj = verify_cli(gz, env.config())
    assert code == 0 and obj["decision"] == "apply"


def test_threshold_2_with_two_signatures_and_trust_override(env: Env) -> None:
    both = build_bundle(env.src, env.tmp / "both.zmb", [env.a, env.b], SEQUENCE)
    code, obj = verify_cli(both, env.config(signature_threshold=2))
    assert code == 0 and obj["signed_by"] == sorted([env.a.keyid, env.b.keyid])
    # --trust replaces the configured directory: only b is trusted there
    only_b = trust_dir(env.tmp / "only-b", env.b)
    code, obj = verify_cli(env.good, env.config(), "--trust", str(only_b))
    assert (code, obj["error"]["kind"]) == (3, "untrusted-key")
    code, obj = verify_cli(both, env.config(), "--trust", str(only_b))
    assert code == 0 and obj["signed_by"] == [env.b.keyid]


def test_without_a_database_the_device_policy_still_applies(env: Env) -> None:
    """No database (a build machine): the device type and time are still checked, the
    applied hashes cannot be; nothing is created."""
    config = env.config(database=env.tmp / "absent.db", device_type="other-device")
    code, obj = verify_cli(env.good, config)
    assert (code, obj["error"]["kind"]) == (3, "wrong-device")
    code, obj = verify_cli(env.good, env.config(database=env.tmp / "absent.db"))
    assert code == 0 and obj["decision"] == "apply" and obj["database"] is None
    assert obj["anti_rollback"]["sequence"] == 0
    assert not (env.tmp / "absent.db").exists() and not (env.tmp / "state").exists()


def test_bad_trust_store_is_a_config_error(env: Env) -> None:
    (env.trust / "typo.pub").write_text("not a key")
    code, obj = verify_cli(env.good, env.config())
    assert code == 2 and obj["error"]["kind"] == "config"


def test_verify_bundle_gives_the_extracted_source(env: Env) -> None:
    trust = TrustStore.load(env.trust)
    out = env.tmp / "payload"
    vb = verify_bundle(env.good, trust, extract_to=out, caps=Caps())
    manifest, _ = open_bundle(env.good, Caps())
    assert vb.manifest_sha256 == sha(manifest)
    assert vb.source.root == out
    assert vb.source.migrations == vb.manifest.migrations
    assert vb.source.text(SQL_PATH) == SQL_1
    assert vb.manifest.declared_row_loss == ()
    for f in vb.manifest.files:
        assert (out / f.path).read_bytes() == (env.src / f.path).read_bytes()


def test_refused_extraction_leaves_nothing_behind(env: Env) -> None:
    items = env.items()
    items[-1].data = b"tables: {changed}\n"[: len(items[-1].data)].ljust(len(items[-1].data))
    bad = env.bundle("late.zmb", tar_bytes(items))
    out = env.tmp / "payload"
    with pytest.raises(BundleRejected) as exc:
        verify_bundle(bad, TrustStore.load(env.trust), extract_to=out, caps=Caps())
    assert exc.value.kind == "hash-mismatch"
    assert list(out.iterdir()) == []


def test_payload_is_never_read_into_memory_whole(env: Env) -> None:
    """Extracting a 64 MiB payload file allocates a few MiB at most (traced)."""
    big = "-- " + "x" * 1000 + "\n"
    (env.src / "checks" / "big.sql.txt").write_text(big * (64 * 1024))
    bundle = build_bundle(env.src, env.tmp / "big.zmb", [env.a], SEQUENCE)
    manifest = verify_manifest(*open_bundle(bundle, Caps()), TrustStore.load(env.trust))
    tracemalloc.start()
    try:
        extract_payload(bundle, manifest, env.tmp / "payload", Caps())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (env.tmp / "payload" / "checks" / "big.sql.txt").stat().st_size == len(big) * 65536
    assert peak < 6 * 1024 * 1024, peak


# -- policy, pure ---------------------------------------------------------------------------

def _manifest(env: Env) -> tuple[Manifest, str]:
    data, _ = open_bundle(env.good, Caps())
    return Manifest.from_json(data), sha(data)


def test_expiry_honours_the_clock_slack(env: Env) -> None:
    created = datetime(2025, 1, 1, tzinfo=UTC)
    expires = created + timedelta(days=1)
    bundle = build_bundle(env.src, env.tmp / "e.zmb", [env.a], SEQUENCE, created=created,
                          expires=expires)
    data, _ = open_bundle(bundle, Caps())
    m = Manifest.from_json(data)

    def at(now: datetime) -> Decision:
        return check_policy(m, device_type=DEVICE, floor_sequence=0,
                            floor_manifest_sha256=None, manifest_sha256=sha(data), applied={},
                            now=now, clock_slack_s=300, max_validity_days=730)

    assert at(expires + timedelta(seconds=299)) == Decision.APPLY
    with pytest.raises(BundleRejected) as exc:
        at(expires + timedelta(seconds=301))
    assert exc.value.kind == "expired" and "--expires" in exc.value.message


def test_policy_order_and_decisions(env: Env) -> None:
    m, digest = _manifest(env)
    now = datetime(2030, 1, 1, tzinfo=UTC)
    base = {"device_type": DEVICE, "floor_sequence": SEQUENCE - 1,
            "floor_manifest_sha256": "x", "manifest_sha256": digest,
            "applied": {1: sha(SQL_1), 2: None}, "now": now, "clock_slack_s": 0.0,
            "max_validity_days": 36525}
    assert check_policy(m, **base) == Decision.APPLY  # a NULL file_hash is not compared
    done = {**base, "floor_sequence": SEQUENCE, "floor_manifest_sha256": digest,
            "applied": ALL_APPLIED}
    assert check_policy(m, **done) == Decision.ALREADY_APPLIED
    # already applied wins over expiry: the same bundle again is a no-op
    assert check_policy(m, **{**done, "now": datetime(2200, 1, 1, tzinfo=UTC)}) == \
        Decision.ALREADY_APPLIED
    # a wrong device is reported before anything else
    with pytest.raises(BundleRejected) as exc:
        check_policy(m, **{**base, "device_type": "x", "floor_sequence": 99})
    assert exc.value.kind == "wrong-device"
    with pytest.raises(BundleRejected) as exc:
        check_policy(m, **{**base, "applied": {1: sha(SQL_1).upper()[:-1] + "0"}})
    assert exc.value.kind == "applied-migration-changed"
    assert check_policy(m, **{**base, "applied": {1: sha(SQL_1).upper()}}) == Decision.APPLY


def test_signature_checks_happen_before_the_manifest_is_parsed(env: Env) -> None:
    """Garbage manifest bytes with a foreign signature: bad-signature, never malformed."""
    trust = TrustStore.load(env.trust)
    garbage = b"\x00not json{{{"
    forged = signatures_to_json([sign_manifest_bytes(b"something else",
                                                     load_private_key(env.a.key))])
    with pytest.raises(BundleRejected) as exc:
        verify_manifest(garbage, forged, trust)
    assert exc.value.kind == "bad-signature"
    by_unknown = signatures_to_json([sign_manifest_bytes(garbage,
                                                         load_private_key(env.unknown.key))])
    with pytest.raises(BundleRejected) as exc:
        verify_manifest(garbage, by_unknown, trust)
    assert exc.value.kind == "untrusted-key"


def test_a_bad_signature_is_refused_even_when_the_threshold_is_met(env: Env) -> None:
    manifest, _ = open_bundle(env.good, Caps())
    good = sign_manifest_bytes(manifest, load_private_key(env.a.key))
    bad = sign_manifest_bytes(b"other", load_private_key(env.b.key))
    trust = TrustStore.load(env.trust, threshold=1)
    with pytest.raises(BundleRejected) as exc:
        verify_manifest(manifest, signatures_to_json([good, bad]), trust)
    assert exc.value.kind == "bad-signature"


def test_non_canonical_base64_signature_is_refused(env: Env) -> None:
    manifest, sigs = open_bundle(env.good, Caps())
    doc = json.loads(sigs)
    raw = base64.b64decode(doc[0]["sig"])
    text = base64.b64encode(raw).decode()
    # the last character before '==' carries 4 unused bits: set one of them
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = text[-3]
    doc[0]["sig"] = text[:-3] + alphabet[alphabet.index(last) ^ 1] + "=="
    assert base64.b64decode(doc[0]["sig"]) == raw  # decodes to the same signature
    tampered = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(BundleRejected) as exc:
        verify_manifest(manifest, tampered, TrustStore.load(env.trust))
    assert exc.value.kind == "malformed"


# -- device state --------------------------------------------------------------------------

def test_device_state_reads_read_only(env: Env, tmp_path: Path) -> None:
    assert device_state(tmp_path / "absent.db").exists is False
    assert not (tmp_path / "absent.db").exists()
    _reset_db(env, applied={1: "ab" * 32, 2: None}, bundles=[(3, "a" * 64), (7, "b" * 64)])
    before = dir_snapshot(env.db.parent)
    state = device_state(env.db)
    assert (state.exists, state.last_sequence, state.last_manifest_sha256) == (True, 7, "b" * 64)
    assert state.applied == {1: "ab" * 32, 2: None}
    assert dir_snapshot(env.db.parent) == before
    bare = tmp_path / "bare.db"
    sqlite3.connect(bare).close()
    assert device_state(bare).applied == {} and device_state(bare).last_sequence is None
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(PrecheckFailed):
        device_state(junk)


def test_device_state_of_a_wal_database(env: Env) -> None:
    """Closed WAL database: no -wal/-shm appear. Open writer: its committed rows are seen."""
    _reset_db(env, applied={1: "ab" * 32})
    conn = sqlite3.connect(env.db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    before = dir_snapshot(env.db.parent)
    assert device_state(env.db).applied == {1: "ab" * 32}
    assert dir_snapshot(env.db.parent) == before
    writer = sqlite3.connect(env.db)
    try:
        with writer:
            writer.execute("INSERT INTO schema_version (version, applied_at, file_hash) "
                           "VALUES (2, 'now', ?)", ("cd" * 32,))
        main_before = (env.db.read_bytes(), Path(str(env.db) + "-wal").read_bytes())
        assert device_state(env.db).applied == {1: "ab" * 32, 2: "cd" * 32}
        assert (env.db.read_bytes(), Path(str(env.db) + "-wal").read_bytes()) == main_before
    finally:
        writer.close()


# -- the shipped source and the real command line -----------------------------------------------

def test_shipped_source_builds_and_verifies(tmp_path: Path) -> None:
    shipped = REPO / "bundles" / "zmonitor"
    if not (shipped / "bundle.yaml").exists():
        pytest.skip("bundles/zmonitor/bundle.yaml does not exist yet")
    key = make_key(tmp_path / "release")
    out = build_bundle(shipped, tmp_path / "zmonitor.zmb", [key], 1)
    vb = verify_bundle(out, TrustStore.load(trust_dir(tmp_path / "trust", key)),
                       extract_to=tmp_path / "payload", caps=Caps())
    assert vb.manifest.name == "zmonitor"
    assert vb.manifest.migrations and vb.manifest.migrations[0].version == 1
    assert {f.path for f in vb.manifest.files} >= {"bundle.yaml", vb.manifest.migrations[0].path}


def _real_cli() -> list[str] | None:
    if not (REPO / "zmonitor_migrated" / "cli.py").exists():
        return None
    return [sys.executable, "-m", "zmonitor_migrated.cli"]


@pytest.mark.parametrize("name", ["flipped byte in a SQL file", "signed by an unknown key",
                                  "symlink member", "an applied migration changed"])
def test_refusals_through_the_real_command_line(env: Env, name: str) -> None:
    cli = _real_cli()
    if cli is None:
        pytest.skip("zmonitor_migrated/cli.py does not exist yet")
    kind, make = CORPUS[name]
    bundle, overrides = make(env)
    config = env.config(**overrides)
    before = dir_snapshot(env.db.parent)
    proc = subprocess.run([*cli, "bundle", "verify", str(bundle), "--config", str(config),
                           "--json"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 3, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["ok"] is False and obj["error"]["kind"] == kind
    assert dir_snapshot(env.db.parent) == before
    ok = subprocess.run([*cli, "bundle", "verify", str(env.good), "--config",
                         str(env.config()), "--json"], capture_output=True, text=True,
                        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    if name == "an applied migration changed":
        assert ok.returncode == 3
    else:
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["decision"] == "apply"
