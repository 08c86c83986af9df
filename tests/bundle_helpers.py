"""Helpers for the bundle tests: real sources, keys, bundles, databases and tar files on
disk, and a throwaway command line around ``cli_bundle.register`` (the main ``cli.py``
maps errors the same way: exit code from the error class, one JSON object with --json)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import sqlite3
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from zmonitor_migrated import cli_bundle, sources
from zmonitor_migrated import config as config_mod
from zmonitor_migrated.bundle import build
from zmonitor_migrated.errors import MigrateError
from zmonitor_migrated.keys import key_id, keygen, load_public_key

T0 = datetime(2025, 1, 1, tzinfo=UTC)
FAR = datetime(2125, 1, 1, tzinfo=UTC)
DEVICE = "zmonitor-bedside"

SQL_1 = "CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT NOT NULL);\n"
SQL_2 = "ALTER TABLE patients ADD COLUMN mrn TEXT;\n"
SQL_3 = ("-- zmonitor:batch table=patients size=100\n"
         "UPDATE patients SET mrn = 'MRN' || id\n"
         " WHERE rowid BETWEEN :batch_start AND :batch_end AND mrn IS NULL;\n")
SPEC = """version: 3
tables:
  patients:
    columns:
      - {name: id, type: INTEGER, primary_key: true}
      - {name: name, type: TEXT, nullable: false}
      - {name: mrn, type: TEXT}
"""
DEFAULT_FILES: dict[str, str] = {
    "migrations/schema/0001_create_patients.sql": SQL_1,
    "migrations/schema/0002_add_mrn.sql": SQL_2,
    "migrations/data/0003_backfill_mrn.sql": SQL_3,
    "migrations/rollback/0001_rollback.sql": "DROP TABLE patients;\n",
    "migrations/rollback/0002_rollback.sql": "ALTER TABLE patients DROP COLUMN mrn;\n",
    "migrations/rollback/0003_rollback.sql": "UPDATE patients SET mrn = NULL;\n",
    # Valid for the device's parsers (lint and build refuse what the device would refuse):
    # the schema after 0003, and one check.
    "schema/database.yaml": SPEC,
    "checks/post.yaml": ("- name: every_patient_has_an_mrn\n"
                         "  sql: SELECT COUNT(*) FROM patients WHERE mrn IS NULL\n"
                         "  expect: 0\n"),
}


def make_source(root: Path, files: Mapping[str, str] | None = None, *, name: str = "test",
                device_types: Sequence[str] = (DEVICE,), description: str = "a test bundle",
                extra_yaml: Mapping[str, object] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    info: dict[str, object] = {"name": name, "app": "zmonitor",
                               "device_types": list(device_types), "description": description}
    info.update(extra_yaml or {})
    (root / "bundle.yaml").write_text(yaml.safe_dump(info, sort_keys=True), encoding="utf-8")
    for rel, text in (DEFAULT_FILES if files is None else files).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@dataclass(frozen=True)
class KeyPair:
    key: Path
    pub: Path
    keyid: str


def make_key(prefix: Path) -> KeyPair:
    key, pub = keygen(prefix)
    return KeyPair(key, pub, key_id(load_public_key(pub)))


def trust_dir(root: Path, *keys: KeyPair) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k in keys:
        shutil.copy(k.pub, root / k.pub.name)
    return root


def build_bundle(src: Path, out: Path, keys: Sequence[KeyPair], sequence: int = 1, *,
                 created: datetime = T0, expires: datetime = FAR) -> Path:
    build(src, out, [k.key for k in keys], sequence, created=created, expires=expires)
    return out


def build_unlinted(src: Path, out: Path, keys: Sequence[KeyPair], sequence: int = 1, *,
                   created: datetime = T0, expires: datetime = FAR) -> Path:
    """A bundle signed without the build's lint: what an older tool, or a signer who
    skips the checks, would send. The device must refuse what lint would have."""
    from unittest import mock

    from zmonitor_migrated import bundle as bundle_mod

    with mock.patch.object(bundle_mod, "_lint", sources.load):
        return build_bundle(src, out, keys, sequence, created=created, expires=expires)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- databases ----------------------------------------------------------------------------

SCHEMA_VERSION_DDL = """CREATE TABLE schema_version (
    version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL, description TEXT,
    migration_type TEXT, file_hash TEXT, execution_time_ms INTEGER, applied_by TEXT)"""
BUNDLES_DDL = """CREATE TABLE zmonitor_migrated_bundles (
    sequence INTEGER PRIMARY KEY, name TEXT, manifest_sha256 TEXT, applied_at TEXT)"""


def make_db(path: Path, *, applied: Mapping[int, str | None] | None = None,
            bundles: Sequence[tuple[int, str]] = ()) -> Path:
    """A monitor database with ``schema_version`` rows and applied bundle rows."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(SCHEMA_VERSION_DDL)
        conn.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        conn.executemany("INSERT INTO patients (name) VALUES (?)", [("a",), ("b",)])
        for version, file_hash in (applied or {}).items():
            conn.execute("INSERT INTO schema_version (version, applied_at, description, "
                         "migration_type, file_hash) VALUES (?, '2025-01-01', 'x', 'schema', ?)",
                         (version, file_hash))
        if bundles:
            conn.execute(BUNDLES_DDL)
            conn.executemany("INSERT INTO zmonitor_migrated_bundles VALUES "
                             "(?, 'test', ?, '2025-01-01')", bundles)
    conn.close()
    return path


def dir_snapshot(directory: Path) -> dict[str, str]:
    """name → sha256 of every file in a directory (to show nothing was written)."""
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}


# -- configuration and command line -------------------------------------------------------

def write_config(path: Path, **values: object) -> Path:
    raw = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def run_cli(argv: Sequence[str]) -> tuple[int, str, str]:
    """Run ``zmonitor-migrate ARGV`` in process with a minimal main around
    ``cli_bundle.register``. Returns (exit code, stdout, stderr)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None)
    common.add_argument("--db", default=None)
    common.add_argument("--json", action="store_true")
    parser = argparse.ArgumentParser(prog="zmonitor-migrate")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_bundle.register(sub, common)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            args = parser.parse_args(list(argv))
        except SystemExit as exc:
            return int(exc.code or 0), out.getvalue(), err.getvalue()
        try:
            config = config_mod.load(args.config, required=args.config is not None)
            if args.db:
                config = config.with_overrides(database=Path(args.db))
            code = args.func(args, config)
        except MigrateError as exc:
            if args.json:
                print(json.dumps({"ok": False, "error": {"kind": exc.kind,
                                                         "message": exc.message}}))
            else:
                print(f"error [{exc.kind}]: {exc.message}", file=err)
            code = exc.exit_code
    return code, out.getvalue(), err.getvalue()


# -- raw tar surgery ----------------------------------------------------------------------

@dataclass
class RawMember:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None  # declared size, if it should differ from len(data)


def members(bundle: Path | bytes) -> list[RawMember]:
    raw = bundle if isinstance(bundle, bytes) else bundle.read_bytes()
    out = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for ti in tar:
            f = tar.extractfile(ti)
            out.append(RawMember(ti.name, f.read() if f else b""))
    return out


def tar_bytes(items: Sequence[RawMember], *, mtime: int = int(T0.timestamp())) -> bytes:
    """A ustar archive exactly as written, whatever its members say (no safety filter)."""
    buf = io.BytesIO()
    for m in items:
        ti = tarfile.TarInfo(m.name)
        ti.type = m.type
        ti.linkname = m.linkname
        ti.size = len(m.data) if m.type == tarfile.REGTYPE else 0
        ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = mtime, 0o644, 0, 0, "", ""
        if m.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            ti.devmajor, ti.devminor = 1, 3
        if m.size is not None:
            ti.size = m.size
        buf.write(ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
        buf.write(m.data)
        buf.write(bytes(-len(m.data) % 512))
    buf.write(bytes(1024))
    buf.write(bytes(-buf.tell() % 10240))
    return buf.getvalue()


def member_data_offset(bundle: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:") as tar:
        for ti in tar:
            if ti.name == name:
                return ti.offset_data
    raise KeyError(name)


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[offset] ^= mask
    return bytes(b)


def expiring(days: float) -> tuple[datetime, datetime]:
    return T0, T0 + timedelta(days=days)
