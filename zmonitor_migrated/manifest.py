"""The signed manifest of a bundle: what the bundle is, for whom, and every byte it holds.

``Manifest.from_json(data)`` is only called on bytes whose signatures already passed the
threshold (``verify.verify_manifest``). It still trusts nothing and checks, raising
``BundleRejected(kind="malformed")`` with the field named:

1. UTF-8 JSON, no duplicate keys, no NaN/Infinity, an object with exactly the known keys,
   ``format_version`` 1;
2. ``name``, ``app``, ``device_types``, ``description``, ``sequence`` >= 1, ``created`` and
   ``expires`` as ``YYYY-MM-DDTHH:MM:SSZ`` with ``expires`` after ``created``;
3. ``files``: sorted, unique, safe relative paths (``bundle.yaml`` or under
   ``migrations/``, ``schema/``, ``checks/``; segments of ``[A-Za-z0-9._-]`` not starting
   with a dot, so never ``..``, never absolute, always storable in a ustar header), each
   with a lowercase hex sha256 and a size;
4. ``migrations``: versions 1..n in order, each path under ``migrations/<type>/`` named
   for its version, each file and rollback listed in ``files`` with the same sha256, and
   every file under ``migrations/`` belonging to exactly one migration or rollback;
5. ``declared_row_loss`` (optional): ``{table: true}`` for tables a bundle may shrink;
6. the bytes are canonical: ``from_json(b).to_json() == b``. One manifest has one
   encoding, so its SHA-256 identifies it (anti-rollback compares those hashes).

Example::

    m = Manifest.from_json(data)
    m.to_json() == data          # always, for an accepted manifest
    m.file("bundle.yaml").sha256
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from .errors import BundleRejected
from .sources import KINDS, NAME_RE, ROLLBACK_RE, BatchSpec, BundleInfo, Migration
from .sqlscript import IDENT

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1024 * 1024
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
TOP_DIRS = ("migrations/", "schema/", "checks/")
ROOT_FILES = ("bundle.yaml",)

_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*\Z")
_WORD = re.compile(r"^[A-Za-z0-9._-]+\Z")
_MAX_SIZE = 1 << 40

_TOP_KEYS = {"format_version", "name", "app", "device_types", "description", "sequence",
             "created", "expires", "files", "migrations"}
_OPTIONAL_KEYS = frozenset({"declared_row_loss"})
_FILE_KEYS = {"path", "sha256", "size"}
_MIGRATION_KEYS = {"version", "type", "path", "sha256", "description", "rollback",
                   "rollback_sha256", "batch"}


def malformed(message: str) -> BundleRejected:
    return BundleRejected(f"manifest.json: {message}; the bundle was not built by "
                          "'zmonitor-migrate bundle build' or was altered. Rebuild it",
                          kind="malformed")


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(value: object, what: str) -> datetime:
    if not isinstance(value, str) or not _TIME.match(value):
        raise malformed(f"'{what}' must be a UTC time like 2025-01-31T12:00:00Z, got {value!r}")
    try:
        return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise malformed(f"'{what}' is not a valid date: {value!r}") from None


def check_path(path: object, what: str = "path") -> str:
    """A payload path: relative, posix, no dot segments, storable in a ustar header."""
    if not isinstance(path, str):
        raise malformed(f"{what} must be a string, got {path!r}")
    segments = path.split("/")
    if not all(_SEGMENT.match(s) for s in segments):
        raise malformed(f"{what} {path!r} is not a safe relative path (segments of letters, "
                        "digits, '.', '_', '-', not starting with '.')")
    if path not in ROOT_FILES and not path.startswith(TOP_DIRS):
        raise malformed(f"{what} {path!r} is outside bundle.yaml, migrations/, schema/, checks/")
    if not ustar_storable(path):
        raise malformed(f"{what} {path!r} is too long for a tar header")
    return path


def ustar_storable(path: str) -> bool:
    data = path.encode("ascii")
    if len(data) <= 100:
        return True
    return any(len(data[:i]) <= 155 and len(data[i + 1:]) <= 100
               for i in range(len(data)) if data[i:i + 1] == b"/")


def _int(value: object, what: str, low: int, high: int = _MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise malformed(f"'{what}' must be an integer in [{low}, {high}], got {value!r}")
    return value


def _str(value: object, what: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
        raise malformed(f"'{what}' has an invalid value {value!r}")
    return value


def _sha(value: object, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise malformed(f"'{what}' must be 64 lowercase hex digits, got {value!r}")
    return value


def _keys(obj: object, required: set[str], what: str,
          optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise malformed(f"{what} must be an object")
    missing = sorted(required - set(obj))
    unknown = sorted(set(obj) - required - optional)
    if missing:
        raise malformed(f"{what} lacks {', '.join(missing)}")
    if unknown:
        raise malformed(f"{what} has unknown key(s) {', '.join(unknown)}")
    return obj


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, raw: object) -> FileEntry:
        d = _keys(raw, _FILE_KEYS, "a files[] entry")
        path = check_path(d["path"], "files[].path")
        return cls(path=path, sha256=_sha(d["sha256"], f"sha256 of {path}"),
                   size=_int(d["size"], f"size of {path}", 0))


def migration_from_dict(raw: object) -> Migration:
    """The inverse of ``sources.Migration.to_dict``, checking every field."""
    d = _keys(raw, _MIGRATION_KEYS, "a migrations[] entry")
    version = _int(d["version"], "migrations[].version", 1, 10**9)
    kind = d["type"]
    if kind not in KINDS:
        raise malformed(f"migration {version}: type must be one of {', '.join(KINDS)}, "
                        f"got {kind!r}")
    path = check_path(d["path"], f"migration {version} path")
    folder, _, base = path.rpartition("/")
    m = NAME_RE.match(base)
    if folder != f"migrations/{kind}" or not m or int(m.group("version")) != version:
        raise malformed(f"migration {version}: path {path!r} must be "
                        f"migrations/{kind}/{version:04d}_<description>.sql")
    rollback, rollback_sha = d["rollback"], d["rollback_sha256"]
    if (rollback is None) != (rollback_sha is None):
        raise malformed(f"migration {version}: rollback and rollback_sha256 go together")
    if rollback is not None:
        check_path(rollback, f"migration {version} rollback")
        rfolder, _, rbase = rollback.rpartition("/")
        rm = ROLLBACK_RE.match(rbase)
        if rfolder != "migrations/rollback" or not rm or int(rm.group("version")) != version:
            raise malformed(f"migration {version}: rollback {rollback!r} must be "
                            f"migrations/rollback/{version:04d}_rollback.sql")
        _sha(rollback_sha, f"migration {version} rollback_sha256")
    batch_raw = d["batch"]
    batch = None
    if batch_raw is not None:
        b = _keys(batch_raw, {"table", "size"}, f"migration {version} batch")
        batch = BatchSpec(table=_str(b["table"], "batch.table", IDENT),
                          size=_int(b["size"], "batch.size", 1, 10**9))
    return Migration(version=version, kind=kind, path=path,
                     sha256=_sha(d["sha256"], f"migration {version} sha256"),
                     description=_str(d["description"], f"migration {version} description"),
                     rollback=rollback, rollback_sha256=rollback_sha, batch=batch)


@dataclass(frozen=True)
class Manifest:
    name: str
    app: str
    device_types: tuple[str, ...]
    description: str
    sequence: int
    created: datetime
    expires: datetime
    files: tuple[FileEntry, ...]
    migrations: tuple[Migration, ...]
    declared_row_loss: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION

    # -- derived views ---------------------------------------------------------------
    @cached_property
    def files_by_path(self) -> Mapping[str, FileEntry]:
        return {f.path: f for f in self.files}

    def file(self, path: str) -> FileEntry | None:
        return self.files_by_path.get(path)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def info(self) -> BundleInfo:
        return BundleInfo(name=self.name, app=self.app, device_types=self.device_types,
                          description=self.description)

    @property
    def last_version(self) -> int:
        return self.migrations[-1].version if self.migrations else 0

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "format_version": self.format_version,
            "name": self.name,
            "app": self.app,
            "device_types": list(self.device_types),
            "description": self.description,
            "sequence": self.sequence,
            "created": format_time(self.created),
            "expires": format_time(self.expires),
            "files": [f.to_dict() for f in self.files],
            "migrations": [m.to_dict() for m in self.migrations],
        }
        if self.declared_row_loss:
            d["declared_row_loss"] = {t: True for t in self.declared_row_loss}
        return d

    def to_json(self) -> bytes:
        """The canonical bytes: sorted keys, no whitespace, ASCII only."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True, allow_nan=False).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise BundleRejected(f"manifest.json is {len(data)} bytes, over the "
                                 f"{MAX_MANIFEST_BYTES} byte limit", kind="too-large")
        raw = parse_json(data, "manifest.json")
        manifest = cls.from_dict(raw)
        if manifest.to_json() != data:
            raise malformed("the bytes are not in canonical form (sorted keys, no whitespace, "
                            "ASCII)")
        return manifest

    @classmethod
    def from_dict(cls, raw: object) -> Manifest:
        d = _keys(raw, _TOP_KEYS, "the manifest", _OPTIONAL_KEYS)
        if d["format_version"] != FORMAT_VERSION or isinstance(d["format_version"], bool):
            raise malformed(f"format_version {d['format_version']!r} is not supported (this "
                            f"device reads version {FORMAT_VERSION}); update zmonitor-migrated")
        types = d["device_types"]
        if (not isinstance(types, list) or not types
                or not all(isinstance(t, str) and _WORD.match(t) for t in types)
                or len(set(types)) != len(types)):
            raise malformed("'device_types' must be a non-empty list of distinct device type "
                            "words")
        created = parse_time(d["created"], "created")
        expires = parse_time(d["expires"], "expires")
        if expires <= created:
            raise malformed("'expires' must be after 'created'")
        files = _files(d["files"])
        migrations = _migrations(d["migrations"], {f.path: f for f in files})
        row_loss: tuple[str, ...] = ()
        if "declared_row_loss" in d:
            rl = d["declared_row_loss"]
            if (not isinstance(rl, dict) or not rl
                    or not all(IDENT.match(k) and v is True for k, v in rl.items())):
                raise malformed("'declared_row_loss' must map table names to true")
            row_loss = tuple(sorted(rl))
        return cls(
            name=_str(d["name"], "name", _WORD),
            app=_str(d["app"], "app", _WORD),
            device_types=tuple(types),
            description=_str(d["description"], "description"),
            sequence=_int(d["sequence"], "sequence", 1, 2**63 - 1),
            created=created, expires=expires, files=files, migrations=migrations,
            declared_row_loss=row_loss,
        )


def _files(raw: object) -> tuple[FileEntry, ...]:
    if not isinstance(raw, list):
        raise malformed("'files' must be a list")
    files = tuple(FileEntry.from_dict(f) for f in raw)
    paths = [f.path for f in files]
    if paths != sorted(set(paths)):
        raise malformed("'files' must be sorted by path without duplicates")
    if "bundle.yaml" not in paths:
        raise malformed("'files' does not list bundle.yaml")
    as_dirs = {p + "/" for p in paths}
    for p in paths:
        # "schema/a" and "schema/a/b" cannot both be files
        parts = p.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) + "/" in as_dirs:
                raise malformed(f"{p!r} lies under {'/'.join(parts[:i])!r}, which is a file")
    return files


def _migrations(raw: object, files: Mapping[str, FileEntry]) -> tuple[Migration, ...]:
    if not isinstance(raw, list):
        raise malformed("'migrations' must be a list")
    migrations = tuple(migration_from_dict(m) for m in raw)
    for expected, mig in enumerate(migrations, start=1):
        if mig.version != expected:
            raise malformed(f"migration versions must be 1..n in order; found {mig.version} "
                            f"where {expected} belongs")
        for path, sha in ((mig.path, mig.sha256), (mig.rollback, mig.rollback_sha256)):
            if path is None:
                continue
            entry = files.get(path)
            if entry is None:
                raise malformed(f"migration {mig.version}: {path} is not in 'files'")
            if entry.sha256 != sha:
                raise malformed(f"migration {mig.version}: sha256 of {path} differs from "
                                "its 'files' entry")
    owned = {m.path for m in migrations} | {m.rollback for m in migrations if m.rollback}
    for path in files:
        if path.startswith("migrations/") and path not in owned:
            raise malformed(f"{path} is under migrations/ but belongs to no migration")
    return migrations


def parse_json(data: bytes, what: str) -> object:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, v in pairs:
            if k in d:
                raise ValueError(f"duplicate key {k!r}")
            d[k] = v
        return d

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not allowed")

    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleRejected(f"{what} is not valid JSON ({exc}); the bundle is corrupt or was "
                             "altered. Rebuild it", kind="malformed") from None
