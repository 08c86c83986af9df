"""Building, co-signing and the manifest format: real sources and bundles in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from bundle_helpers import (
    FAR,
    T0,
    build_bundle,
    make_key,
    make_source,
    members,
    run_cli,
    sha256_file,
    tar_bytes,
)

from zmonitor_migrated.archive import Caps, open_bundle
from zmonitor_migrated.bundle import build, private_copy, sign
from zmonitor_migrated.errors import BundleRejected, LintFailed, UsageError
from zmonitor_migrated.manifest import Manifest
from zmonitor_migrated.sources import discover
from zmonitor_migrated.verify import parse_signatures


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_source(tmp_path / "src", extra_yaml={"declared_row_loss": ["patients"]})


@pytest.fixture
def key(tmp_path: Path):
    return make_key(tmp_path / "keys" / "release")


def test_two_builds_are_byte_identical(tmp_path: Path, src: Path, key) -> None:
    a = build_bundle(src, tmp_path / "a.zmb", [key], 3)
    for p in src.rglob("*"):  # file times and a rebuild elsewhere must not matter
        os.utime(p, (1, 1))
    b = build_bundle(src, tmp_path / "out" / "b.zmb", [key], 3)
    assert a.read_bytes() == b.read_bytes()
    c = build_bundle(src, tmp_path / "c.zmb", [key], 4)
    assert c.read_bytes() != a.read_bytes()


def test_member_order_and_fixed_attributes(tmp_path: Path, src: Path, key) -> None:
    out = build_bundle(src, tmp_path / "a.zmb", [key], 1)
    raw = out.read_bytes()
    assert raw[257:263] == b"ustar\x00"  # plain ustar, uncompressed
    with tarfile.open(out, "r:") as tar:
        infos = tar.getmembers()
    names = [ti.name for ti in infos]
    payload = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert names == ["manifest.json", "signatures.json", *payload]
    for ti in infos:
        assert ti.isreg()
        assert (ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode) == \
            (int(T0.timestamp()), 0, 0, "", "", 0o644)


def test_manifest_pins_every_file_and_migration(tmp_path: Path, src: Path, key) -> None:
    (src / "checks" / ".post.yaml.swp").write_text("editor junk")  # hidden: not shipped
    out = build_bundle(src, tmp_path / "a.zmb", [key], 7, expires=T0 + timedelta(days=30))
    manifest_bytes, _ = open_bundle(out, Caps())
    m = Manifest.from_json(manifest_bytes)
    raw = json.loads(manifest_bytes)
    assert raw["format_version"] == 1
    assert (raw["created"], raw["expires"]) == ("2025-01-01T00:00:00Z", "2025-01-31T00:00:00Z")
    assert raw["declared_row_loss"] == {"patients": True}
    assert (m.name, m.app, m.device_types, m.sequence) == \
        ("test", "zmonitor", ("zmonitor-bedside",), 7)
    on_disk = {p.relative_to(src).as_posix(): p for p in src.rglob("*")
               if p.is_file() and not p.name.startswith(".")}
    assert {f.path for f in m.files} == set(on_disk)
    for f in m.files:
        data = on_disk[f.path].read_bytes()
        assert (f.sha256, f.size) == (hashlib.sha256(data).hexdigest(), len(data))
    source, _ = discover(src)
    assert m.migrations == source.migrations
    assert m.migrations[2].batch is not None and m.migrations[2].batch.size == 100
    assert m.migrations[0].rollback == "migrations/rollback/0001_rollback.sql"


@pytest.mark.parametrize("breakage", ["gap", "no-rollback", "bad-name"])
def test_lint_errors_refuse_the_build_and_leave_out_untouched(tmp_path: Path, src: Path, key,
                                                              breakage: str) -> None:
    out = tmp_path / "a.zmb"
    out.write_bytes(b"previous bundle")
    if breakage == "gap":
        (src / "migrations/data/0003_backfill_mrn.sql").rename(
            src / "migrations/data/0004_backfill_mrn.sql")
    elif breakage == "no-rollback":
        (src / "migrations/rollback/0002_rollback.sql").unlink()
    else:
        (src / "migrations/schema/Init.sql").write_text("SELECT 1;")
    with pytest.raises(LintFailed):
        build(src, out, [key.key], 1, created=T0, expires=FAR)
    assert out.read_bytes() == b"previous bundle"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".a.zmb")] == []


def test_build_refuses_symlinks_and_odd_names(tmp_path: Path, src: Path, key) -> None:
    (src / "checks" / "link.yaml").symlink_to(src / "checks" / "post.yaml")
    with pytest.raises(LintFailed, match="symlink"):
        build(src, tmp_path / "a.zmb", [key.key], 1, created=T0, expires=FAR)
    (src / "checks" / "link.yaml").unlink()
    (src / "checks" / "post checks.yaml").write_text("x")
    with pytest.raises(LintFailed, match="rename"):
        build(src, tmp_path / "a.zmb", [key.key], 1, created=T0, expires=FAR)
    assert not (tmp_path / "a.zmb").exists()


def test_build_argument_errors(tmp_path: Path, src: Path, key) -> None:
    out = tmp_path / "a.zmb"
    with pytest.raises(UsageError, match="after created"):
        build(src, out, [key.key], 1, created=T0, expires=T0)
    with pytest.raises(UsageError, match="time zone"):
        build(src, out, [key.key], 1, created=datetime(2025, 1, 1), expires=FAR)
    with pytest.raises(UsageError, match="sequence"):
        build(src, out, [key.key], 0, created=T0, expires=FAR)
    with pytest.raises(UsageError, match="at least one"):
        build(src, out, [], 1, created=T0, expires=FAR)
    with pytest.raises(UsageError, match="private key"):
        build(src, out, [key.pub], 1, created=T0, expires=FAR)
    assert not out.exists()


def test_sign_adds_a_signature_without_changing_the_manifest(tmp_path: Path, src: Path,
                                                             key) -> None:
    clinical = make_key(tmp_path / "keys" / "clinical")
    one = build_bundle(src, tmp_path / "one.zmb", [key], 2)
    manifest_before, _ = open_bundle(one, Caps())
    signed_by = sign(one, clinical.key)
    assert set(signed_by) == {key.keyid, clinical.keyid}
    manifest_after, sigs = open_bundle(one, Caps())
    assert manifest_after == manifest_before
    assert {s.keyid for s in parse_signatures(sigs)} == {key.keyid, clinical.keyid}
    both = build_bundle(src, tmp_path / "both.zmb", [key, clinical], 2)
    assert one.read_bytes() == both.read_bytes()  # build(A, B) == build(A) + sign(B)
    sign(one, clinical.key)  # signing again with the same key changes nothing
    assert one.read_bytes() == both.read_bytes()
    assert stat.S_IMODE(one.stat().st_mode) == 0o644


def test_sign_refuses_a_bundle_whose_payload_was_altered(tmp_path: Path, src: Path,
                                                          key) -> None:
    out = build_bundle(src, tmp_path / "a.zmb", [key], 1)
    items = members(out)
    sql = next(m for m in items if m.name == "migrations/schema/0002_add_mrn.sql")
    sql.data = sql.data.replace(b"patients", b"patientz")
    out.write_bytes(tar_bytes(items))
    before = out.read_bytes()
    with pytest.raises(BundleRejected) as exc:
        sign(out, make_key(tmp_path / "k2").key)
    assert exc.value.kind == "hash-mismatch"
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_build_and_sign_commands(tmp_path: Path, src: Path, key) -> None:
    argv = ["bundle", "build", str(src), "-o", str(tmp_path / "a.zmb"), "--key", str(key.key),
            "--sequence", "5", "--created", "2025-01-01T00:00:00Z", "--valid-days", "10",
            "--json"]
    code, out, _ = run_cli(argv)
    assert code == 0
    obj = json.loads(out)
    assert obj["ok"] and obj["sequence"] == 5 and obj["expires"] == "2025-01-11T00:00:00Z"
    assert obj["manifest_sha256"] == hashlib.sha256(
        open_bundle(tmp_path / "a.zmb", Caps())[0]).hexdigest()
    first = sha256_file(tmp_path / "a.zmb")
    assert run_cli(argv)[0] == 0
    assert sha256_file(tmp_path / "a.zmb") == first  # reproducible through the CLI too
    second = make_key(tmp_path / "keys" / "second")
    code, out, _ = run_cli(["bundle", "sign", str(tmp_path / "a.zmb"), "--key",
                            str(second.key), "--json"])
    assert code == 0 and json.loads(out)["signed_by"] == sorted([key.keyid, second.keyid])
    code, _, err = run_cli(["bundle", "build", str(src), "-o", str(tmp_path / "b.zmb"),
                            "--key", str(key.key), "--sequence", "1", "--expires",
                            "2030-01-01T00:00:00"])
    assert code == 2 and "time zone" in err
    code, _, _ = run_cli(["bundle", "build", str(src), "-o", str(tmp_path / "b.zmb"),
                          "--key", str(key.key), "--sequence", "1", "--expires",
                          "2030-01-01T00:00:00Z", "--valid-days", "3"])
    assert code == 2  # mutually exclusive
    os.rename(src / "migrations/rollback/0001_rollback.sql", tmp_path / "moved.sql")
    code, out, _ = run_cli(["bundle", "build", str(src), "-o", str(tmp_path / "b.zmb"),
                            "--key", str(key.key), "--sequence", "1", "--json"])
    assert code == 3 and json.loads(out)["error"]["kind"] == "lint"
    assert not (tmp_path / "b.zmb").exists()


def test_source_date_epoch_fixes_created(tmp_path: Path, src: Path, key,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(int(T0.timestamp())))
    code, out, _ = run_cli(["bundle", "build", str(src), "-o", str(tmp_path / "a.zmb"),
                            "--key", str(key.key), "--sequence", "1", "--json"])
    assert code == 0 and json.loads(out)["created"] == "2025-01-01T00:00:00Z"
    assert json.loads(out)["expires"] == "2025-04-01T00:00:00Z"  # default 90 days


# -- manifest format ------------------------------------------------------------------------

@pytest.fixture
def manifest_dict(tmp_path: Path, src: Path, key) -> dict:
    out = build_bundle(src, tmp_path / "a.zmb", [key], 1)
    return json.loads(open_bundle(out, Caps())[0])


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def test_manifest_round_trips_canonically(manifest_dict: dict) -> None:
    data = _canonical(manifest_dict)
    m = Manifest.from_json(data)
    assert m.to_json() == data
    assert Manifest.from_json(m.to_json()) == m


def _set(path: str, value: object):
    def change(d: dict) -> None:
        *parents, last = path.split(".")
        node = d
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return change


_DELETE = object()
_BAD_SHA = "A" * 64

MALFORMED = {
    "unknown key": _set("extra", 1),
    "missing key": _set("name", _DELETE),
    "format version 2": _set("format_version", 2),
    "sequence is a bool": _set("sequence", True),
    "sequence is zero": _set("sequence", 0),
    "expires before created": _set("expires", "2024-01-01T00:00:00Z"),
    "time with offset": _set("created", "2025-01-01T00:00:00+00:00"),
    "empty device_types": _set("device_types", []),
    "uppercase sha": _set("files.0.sha256", _BAD_SHA),
    "negative size": _set("files.0.size", -1),
    "dotdot path": _set("files.1.path", "migrations/../../etc/passwd"),
    "absolute path": _set("files.1.path", "/etc/passwd"),
    "hidden path": _set("files.1.path", "checks/.hidden"),
    "outside payload dirs": _set("files.1.path", "bin/evil"),
    "migration type unknown": _set("migrations.0.type", "magic"),
    "migration path in wrong folder": _set("migrations.0.path",
                                           "migrations/data/0001_create_patients.sql"),
    "migration sha differs from files": _set("migrations.0.sha256", "0" * 64),
    "migration version gap": _set("migrations.1.version", 5),
    "batch size zero": _set("migrations.2.batch.size", 0),
    "row loss not true": _set("declared_row_loss", {"patients": 1}),
    "rollback without hash": _set("migrations.0.rollback_sha256", None),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_manifest_from_json_refuses_malformed_fields(manifest_dict: dict, case: str) -> None:
    MALFORMED[case](manifest_dict)
    with pytest.raises(BundleRejected) as exc:
        Manifest.from_json(_canonical(manifest_dict))
    assert exc.value.kind == "malformed"
    assert "manifest.json" in exc.value.message


def test_manifest_refuses_non_canonical_json_and_json_tricks(manifest_dict: dict) -> None:
    data = _canonical(manifest_dict)
    cases = [
        json.dumps(manifest_dict, sort_keys=True).encode(),  # whitespace
        json.dumps(dict(reversed(manifest_dict.items())),
                   separators=(",", ":")).encode(),  # key order
        data[:-1] + b',"name":"other"}',  # duplicate key
        data.replace(b'"sequence":1', b'"sequence":NaN'),
        data.replace(b'"sequence":1', b'"sequence":1.0'),
        b"\xff" + data,
        b"[" * 100000,
    ]
    for bad in cases:
        with pytest.raises(BundleRejected) as exc:
            Manifest.from_json(bad)
        assert exc.value.kind == "malformed", bad[:60]


def test_manifest_refuses_an_unowned_migration_file(manifest_dict: dict) -> None:
    manifest_dict["files"].append({"path": "migrations/seed/0009_extra.sql",
                                   "sha256": "0" * 64, "size": 1})
    manifest_dict["files"].sort(key=lambda f: f["path"])
    with pytest.raises(BundleRejected, match="belongs to no migration"):
        Manifest.from_json(_canonical(manifest_dict))


# -- private copy -----------------------------------------------------------------------

def test_private_copy_is_content_addressed_private_and_detached(tmp_path: Path, src: Path,
                                                                key) -> None:
    incoming = build_bundle(src, tmp_path / "inbox" / "a.zmb", [key], 1)
    work = tmp_path / "state" / "work"
    copy = private_copy(incoming, work)
    assert copy.parent == work
    assert copy.name == sha256_file(incoming) + ".zmb"
    assert copy.read_bytes() == incoming.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert stat.S_IMODE(work.stat().st_mode) == 0o700
    incoming.write_bytes(b"changed after the copy")
    assert copy.read_bytes() != incoming.read_bytes()
    assert [p.name for p in work.iterdir()] == [copy.name]  # no temp file left


def test_private_copy_refuses_symlinks_and_oversized_files(tmp_path: Path) -> None:
    real = tmp_path / "real.zmb"
    real.write_bytes(b"x" * 100)
    (tmp_path / "link.zmb").symlink_to(real)
    with pytest.raises(BundleRejected, match="symlink"):
        private_copy(tmp_path / "link.zmb", tmp_path / "work")
    with pytest.raises(BundleRejected) as exc:
        private_copy(real, tmp_path / "work", max_bytes=99)
    assert exc.value.kind == "too-large"
    assert list((tmp_path / "work").iterdir()) == []


def test_build_output_time_is_utc(tmp_path: Path, src: Path, key) -> None:
    plus2 = datetime(2025, 1, 1, 2, 0, 0, 999, tzinfo=UTC).astimezone(
        __import__("datetime").timezone(timedelta(hours=2)))
    m = build(src, tmp_path / "a.zmb", [key.key], 1, created=plus2, expires=FAR)
    assert m.created == datetime(2025, 1, 1, 2, 0, 0, tzinfo=UTC)
