"""What the device's database says it already has: the input of ``verify.check_policy``.

Guarantees:

- the database is opened read-only (``file:…?mode=ro``): reading the state never writes
  a byte of the database, so a refused bundle leaves it identical. A WAL-mode database
  with no ``-wal`` file has no open writer (a WAL connection always has one), and a
  read-only connection would *create* ``-wal``/``-shm`` next to it, owned by us, which
  could lock the app's user out; such a database is opened ``immutable=1`` instead, so
  not a single file in its directory changes;
- a missing database is ``DeviceState(exists=False)`` (nothing applied yet), a missing
  ``zmonitor_migrated_bundles`` or ``schema_version`` table is "nothing recorded";
- a file that is not a readable SQLite database is a ``PrecheckFailed``.

The anti-rollback floor (the highest bundle sequence this device accepted, with its
manifest sha256) lives in ``state_dir/anti-rollback.json``, *outside* the database it
protects: a ``restore``, an ``apply --target``, a failed run or a migration that edits the
database's own ``zmonitor_migrated_bundles`` table can neither lower nor raise it.

- written with ``fsutil.atomic_write`` (temp, fsync, rename, fsync dir) and only ever
  raised (``raise_floor`` keeps the higher of the file and the new value);
- missing: the first run under the run lock seeds it from the database's record
  (``seed_floor``), so upgrading the package never lowers the floor; readers that must
  not write (``bundle verify``, ``--dry-run``) use the same value without writing it;
- present but unreadable, not JSON, or not exactly the format below: ``BundleRejected``
  (kind ``anti-rollback-state``) naming the file and the fix, for every bundle. It is
  never reset silently.

File format (one JSON object, at most 64 KiB)::

    {"format": 1, "sequence": 7, "manifest_sha256": "<64 hex>" | null,
     "name": "zmonitor" | null, "recorded_at": "2026-01-31T12:00:00Z",
     "origin": "bundle" | "database", "rolled_back_to": null | 10}

``rolled_back_to`` is set when a ``rollback`` run committed after this floor's bundle:
the same bundle again is then a no-op, going forward needs a higher sequence.

Tables read::

    zmonitor_migrated_bundles(sequence INTEGER PRIMARY KEY, name TEXT,
                              manifest_sha256 TEXT, applied_at TEXT)
    schema_version(version INTEGER PRIMARY KEY, …, file_hash TEXT, …)

Example::

    state = device_state(Path("/var/lib/zmonitor/zmonitor.db"))
    state.last_sequence, state.applied   # 4, {1: "ab…", 2: "cd…"}
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .bookkeeping import BUNDLES_TABLE, SCHEMA_VERSION_TABLE
from .dbinfo import has_table, open_ro
from .errors import BundleRejected, PrecheckFailed
from .fsutil import atomic_write

FLOOR_FILE = "anti-rollback.json"
FLOOR_FORMAT = 1
MAX_FLOOR_BYTES = 64 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_FLOOR_KEYS = {"format", "sequence", "manifest_sha256", "name", "recorded_at", "origin",
               "rolled_back_to"}


@dataclass(frozen=True)
class DeviceState:
    exists: bool
    last_sequence: int | None = None
    last_manifest_sha256: str | None = None
    applied: dict[int, str | None] = field(default_factory=dict)


def device_state(db_path: Path | str) -> DeviceState:
    path = Path(db_path)
    if not path.exists():
        return DeviceState(exists=False)
    try:
        conn = open_ro(path)
    except sqlite3.Error as exc:
        raise PrecheckFailed(f"cannot open the database {path} read-only: {exc}") from None
    try:
        last_seq: int | None = None
        last_sha: str | None = None
        if has_table(conn, BUNDLES_TABLE):
            row = conn.execute(f"SELECT sequence, manifest_sha256 FROM {BUNDLES_TABLE} "
                               "ORDER BY sequence DESC LIMIT 1").fetchone()
            if row is not None:
                last_seq, last_sha = int(row[0]), row[1]
        applied: dict[int, str | None] = {}
        if has_table(conn, SCHEMA_VERSION_TABLE):
            for version, file_hash in conn.execute(
                    f"SELECT version, file_hash FROM {SCHEMA_VERSION_TABLE} ORDER BY version"):
                applied[int(version)] = file_hash
        return DeviceState(exists=True, last_sequence=last_seq, last_manifest_sha256=last_sha,
                           applied=applied)
    except sqlite3.Error as exc:
        raise PrecheckFailed(f"cannot read the applied versions from {path}: {exc}; check "
                             "that it is the monitor's database and not corrupt") from None
    finally:
        conn.close()


# -- the anti-rollback floor ----------------------------------------------------------------
@dataclass(frozen=True)
class Floor:
    """The highest bundle this device accepted. ``sequence`` 0: none yet."""

    sequence: int = 0
    manifest_sha256: str | None = None
    name: str | None = None
    origin: str = "none"  # "bundle" | "database" (seeded) | "none"
    rolled_back_to: int | None = None
    recorded_at: str | None = None
    stored: bool = False  # read from the state file (False: the value a seed would write)

    def to_json(self) -> bytes:
        doc = {"format": FLOOR_FORMAT, "sequence": self.sequence,
               "manifest_sha256": self.manifest_sha256, "name": self.name,
               "recorded_at": self.recorded_at or _utc_now(), "origin": self.origin,
               "rolled_back_to": self.rolled_back_to}
        return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode("ascii")

    def describe(self) -> str:
        if self.sequence == 0:
            return "no bundle accepted yet"
        name = f"{self.name}, " if self.name else ""
        text = f"sequence {self.sequence} ({name}manifest " \
               f"{(self.manifest_sha256 or 'unknown')[:12]}…)"
        if self.rolled_back_to is not None:
            text += f", rolled back to version {self.rolled_back_to}"
        return text


def floor_path(state_dir: Path) -> Path:
    return Path(state_dir) / FLOOR_FILE


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _corrupt(path: Path, problem: str) -> BundleRejected:
    return BundleRejected(
        f"the anti-rollback state {path} {problem}; every bundle is refused until it is "
        "fixed, because the highest accepted sequence is unknown. Fix: put back the file "
        "from a backup of the state dir, or write it by hand with the highest sequence "
        "this device accepted ('zmonitor-migrate history' lists them; 'zmonitor-migrate "
        "bundle verify BUNDLE' prints that bundle's manifest sha256) as "
        '{"format": 1, "sequence": N, "manifest_sha256": "<sha256 of that bundle\'s '
        'manifest.json>", "name": null, "recorded_at": "<time>", "origin": "bundle", '
        '"rolled_back_to": null}; deleting it re-seeds the floor from the database\'s own '
        "record, which a restore may have lowered", kind="anti-rollback-state")


def _int_field(value: object, low: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        return None
    return value


def parse_floor(data: bytes, path: Path) -> Floor:
    """Strict: anything but exactly the documented format is corrupt."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _corrupt(path, "is not valid JSON") from None
    if not isinstance(doc, dict) or set(doc) != _FLOOR_KEYS:
        raise _corrupt(path, f"must be an object with exactly the keys "
                             f"{', '.join(sorted(_FLOOR_KEYS))}")
    if doc["format"] != FLOOR_FORMAT or isinstance(doc["format"], bool):
        raise _corrupt(path, f"has format {doc['format']!r}, this version reads "
                             f"{FLOOR_FORMAT}")
    sequence = _int_field(doc["sequence"], 0)
    if sequence is None or sequence > 2**63 - 1:
        raise _corrupt(path, f"has sequence {doc['sequence']!r}, not an integer >= 0")
    sha = doc["manifest_sha256"]
    if not (sha is None or (isinstance(sha, str) and _SHA256.match(sha))):
        raise _corrupt(path, "has a manifest_sha256 that is not 64 lowercase hex digits")
    if sequence > 0 and sha is None:
        raise _corrupt(path, f"has sequence {sequence} without its manifest_sha256")
    rolled = doc["rolled_back_to"]
    if rolled is not None and _int_field(rolled, 0) is None:
        raise _corrupt(path, "has a rolled_back_to that is not null or a version >= 0")
    for key in ("name", "recorded_at"):
        if doc[key] is not None and not isinstance(doc[key], str):
            raise _corrupt(path, f"has a {key} that is not a string or null")
    if doc["origin"] not in ("bundle", "database", "none"):
        raise _corrupt(path, f"has origin {doc['origin']!r} (bundle, database or none)")
    return Floor(sequence=sequence, manifest_sha256=sha, name=doc["name"],
                 origin=doc["origin"], rolled_back_to=rolled, recorded_at=doc["recorded_at"],
                 stored=True)


def read_floor(state_dir: Path) -> Floor | None:
    """The stored floor, or None when there is no file yet. Raises BundleRejected
    (``anti-rollback-state``) when it exists but cannot be read or trusted."""
    path = floor_path(state_dir)
    try:
        # O_NONBLOCK: a FIFO in its place must not hang the run; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a symlink (ELOOP), no permission, an I/O error
        raise _corrupt(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise _corrupt(path, "is not a regular file")
            data = f.read(MAX_FLOOR_BYTES + 1)
    except OSError as exc:  # e.g. a directory in its place (EISDIR), an I/O error
        raise _corrupt(path, f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > MAX_FLOOR_BYTES:
        raise _corrupt(path, f"is over {MAX_FLOOR_BYTES} bytes")
    return parse_floor(data, path)


def seed_value(state: DeviceState) -> Floor:
    """What a missing state file starts from: the database's own record, if any."""
    if state.last_sequence:
        return Floor(sequence=state.last_sequence, manifest_sha256=state.last_manifest_sha256,
                     origin="database")
    return Floor()


def current_floor(state_dir: Path, state: DeviceState) -> Floor:
    """The floor without writing anything: the file, else what seeding would write."""
    stored = read_floor(state_dir)
    if stored is not None:
        return stored
    return seed_value(state)


def _write(state_dir: Path, floor: Floor) -> Floor:
    path = floor_path(state_dir)
    try:
        atomic_write(path, floor.to_json(), mode=0o644)
    except OSError as exc:
        raise PrecheckFailed(
            f"cannot record the anti-rollback floor in {path}: {exc.strerror or exc}; "
            "nothing was changed and the app was not stopped. Free space in (or fix the "
            "permissions of) the state dir and retry with the same bundle",
            kind="state-unwritable") from None
    return replace(floor, stored=True)


def seed_floor(state_dir: Path, state: DeviceState) -> Floor:
    """Under the run lock: the stored floor, writing the seed first if there is none."""
    stored = read_floor(state_dir)
    if stored is not None:
        return stored
    seeded = seed_value(state)
    return _write(state_dir, replace(seeded, recorded_at=_utc_now()))


def raise_floor(state_dir: Path, *, sequence: int, manifest_sha256: str,
                name: str) -> Floor:
    """Under the run lock: record an accepted bundle. Never lowers the floor, and never
    changes the manifest recorded for a sequence (policy refused that before)."""
    stored = read_floor(state_dir) or Floor()
    if sequence <= stored.sequence:
        return stored
    return _write(state_dir, Floor(sequence=sequence, manifest_sha256=manifest_sha256,
                                   name=name, origin="bundle", recorded_at=_utc_now()))


def mark_rolled_back(state_dir: Path, *, sequence: int, manifest_sha256: str,
                     to: int) -> bool:
    """Under the run lock, after a committed rollback with the floor's own bundle (or an
    unsigned source, ``sequence`` 0 = whatever the floor is): the same bundle again
    becomes a no-op. False if the floor moved meanwhile or there is none."""
    stored = read_floor(state_dir)
    if stored is None or stored.sequence == 0:
        return False
    if sequence and (stored.sequence, stored.manifest_sha256) != (sequence, manifest_sha256):
        return False
    with contextlib.suppress(PrecheckFailed):
        _write(state_dir, replace(stored, rolled_back_to=to, recorded_at=_utc_now()))
        return True
    return False
