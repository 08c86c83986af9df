"""Migration sources: the workflow's folder layout turned into an ordered list of migrations.

Layout::

    bundle.yaml
    migrations/schema/0001_initial_schema.sql     # or 0001_schema_initial_schema.sql
    migrations/data/0005_migrate_patient_ids.sql
    migrations/seed/0012_default_settings.sql
    migrations/rollback/0005_rollback.sql

Guarantees of ``discover``:

- versions form one sequence across schema/, data/ and seed/; every gap, duplicate and
  bad start is reported as a ``Problem`` with its file (never silently renumbered);
- a file name's optional type word must agree with its folder;
- a ``-- zmonitor:batch table=T size=N`` header is parsed into a ``BatchSpec``;
- rollback scripts are matched by version.

Discovery reads files but decides nothing about a database; ``plan`` does that.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from . import yamlsafe
from .errors import BundleRejected
from .sqlscript import IDENT

KINDS = ("schema", "data", "seed")
NAME_RE = re.compile(
    r"^(?P<version>\d{4,})_(?:(?P<kind>schema|data|seed)_)?(?P<slug>[a-z0-9_]+)\.sql\Z")
ROLLBACK_RE = re.compile(r"^(?P<version>\d{4,})_rollback(?:_[a-z0-9_]+)?\.sql\Z")
_BATCH = re.compile(r"^--\s*zmonitor:batch\s+(?P<args>.*)$", re.MULTILINE)


@dataclass(frozen=True)
class BatchSpec:
    table: str
    size: int

    def to_dict(self) -> dict[str, object]:
        return {"table": self.table, "size": self.size}


@dataclass(frozen=True)
class Migration:
    version: int
    kind: str
    path: str  # relative to the source root, posix separators
    sha256: str
    description: str
    rollback: str | None = None
    rollback_sha256: str | None = None
    batch: BatchSpec | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "type": self.kind,
            "path": self.path,
            "sha256": self.sha256,
            "description": self.description,
            "rollback": self.rollback,
            "rollback_sha256": self.rollback_sha256,
            "batch": self.batch.to_dict() if self.batch else None,
        }


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    path: str
    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.severity}: [{self.code}] {self.message}"


@dataclass(frozen=True)
class BundleInfo:
    name: str
    app: str
    device_types: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class Source:
    """A migration source directory on disk (a checkout, or a verified bundle's payload)."""

    root: Path
    info: BundleInfo
    migrations: tuple[Migration, ...]

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def text(self, rel: str) -> str:
        return self.read(rel).decode("utf-8")

    @property
    def last_version(self) -> int:
        return self.migrations[-1].version if self.migrations else 0

    def by_version(self) -> dict[int, Migration]:
        return {m.version: m for m in self.migrations}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_batch_header(text: str, path: str) -> tuple[BatchSpec | None, list[Problem]]:
    problems: list[Problem] = []
    specs: list[BatchSpec] = []
    for match in _BATCH.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        args: dict[str, str] = {}
        for part in match.group("args").split():
            key, sep, value = part.partition("=")
            if not sep:
                problems.append(Problem("error", path, line, "batch-header",
                                        f"batch header argument {part!r} is not key=value"))
                continue
            args[key] = value
        table, size = args.get("table", ""), args.get("size", "")
        if not IDENT.match(table):
            problems.append(Problem("error", path, line, "batch-header",
                                    "batch header needs table=NAME (an SQL identifier)"))
            continue
        if not size.isdigit() or int(size) < 1:
            problems.append(Problem("error", path, line, "batch-header",
                                    "batch header needs size=N with N >= 1"))
            continue
        specs.append(BatchSpec(table, int(size)))
    if len(specs) > 1:
        problems.append(Problem("error", path, 1, "batch-header",
                                "more than one batch header; split the migration"))
    if specs and (":batch_start" not in text or ":batch_end" not in text):
        problems.append(Problem("error", path, 1, "batch-header",
                                "a batched migration must use :batch_start and :batch_end "
                                "to bound its rowid range"))
    return (specs[0] if specs else None), problems


def describe(slug: str) -> str:
    return slug.replace("_", " ").strip().capitalize()


# bundle.yaml holds a name, an app, a few device types and a sentence: a few hundred bytes.
# Its bounds keep the parse of a hostile one short (the YAML parser is not linear in every
# input) and keep the recursive composer far from the stack's end.
MAX_INFO_BYTES = 64 * 1024
MAX_YAML_DEPTH = 32
MAX_YAML_EVENTS = 10_000
_SCALAR_TYPES = (str, int, float, bool)


def _refuse(path: Path, problem: str) -> BundleRejected:
    return BundleRejected(f"{path} {problem}; fix the file and rebuild the bundle",
                          kind="malformed")


def load_yaml_bounded(path: Path, *, max_bytes: int = MAX_INFO_BYTES,
                      max_depth: int = MAX_YAML_DEPTH,
                      max_events: int = MAX_YAML_EVENTS) -> object:
    """Parse a YAML file from an untrusted source. Every way it can fail (missing, too
    big, not UTF-8, not YAML, too deep, a value the constructor cannot build) is a
    ``BundleRejected`` naming the file; nothing else escapes."""
    try:
        # O_NONBLOCK: a FIFO in a source directory must not hang the reader.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _refuse(path, f"cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise _refuse(path, "is not a regular file")
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise _refuse(path, f"cannot be read ({exc.strerror})") from None
    if len(data) > max_bytes:
        raise BundleRejected(f"{path} is over {max_bytes} bytes; it holds a few fields, "
                             "rebuild the bundle with a smaller one", kind="too-large")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refuse(path, f"is not UTF-8 (byte {exc.start})") from None
    return yamlsafe.parse(text, path, max_depth=max_depth, max_events=max_events)


def load_info(root: Path) -> BundleInfo:
    path = root / "bundle.yaml"
    try:
        raw = load_yaml_bounded(path) or {}
    except FileNotFoundError:
        raise BundleRejected(f"{path} is missing; a migration source needs bundle.yaml "
                             "with name, app and device_types") from None
    if not isinstance(raw, dict):
        raise BundleRejected(f"{path} must be a mapping")
    name, app, types = raw.get("name"), raw.get("app", "zmonitor"), raw.get("device_types")
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9._-]+$", name or ""):
        raise BundleRejected(f"{path}: 'name' must be a word of letters, digits, '.', '_', '-'")
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise BundleRejected(f"{path}: 'device_types' must be a non-empty list of strings")
    description = raw.get("description", "")
    for key, value in (("app", app), ("description", description)):
        if value is not None and not isinstance(value, _SCALAR_TYPES):
            raise BundleRejected(f"{path}: '{key}' must be a single value, not a "
                                 f"{type(value).__name__}")
    return BundleInfo(name=name, app=str(app), device_types=tuple(types),
                      description=str(description))


def discover(root: Path) -> tuple[Source, list[Problem]]:
    """Read a source directory. Returns the migrations that could be identified and
    every problem found; callers refuse to act while any problem is an error."""
    root = Path(root)
    info = load_info(root)
    problems: list[Problem] = []
    mig_dir = root / "migrations"
    if not mig_dir.is_dir():
        raise BundleRejected(f"{root}: no migrations/ folder; expected migrations/schema, "
                             "migrations/data, migrations/seed, migrations/rollback")
    for child in sorted(mig_dir.iterdir()):
        if child.name not in (*KINDS, "rollback"):
            problems.append(Problem("error", rel(root, child), 1, "layout",
                                    f"unknown folder {child.name!r} under migrations/"))
    rollbacks = _rollbacks(root, mig_dir / "rollback", problems)
    found = [mg for kind in KINDS
             for mg in _migrations(root, mig_dir / kind, kind, rollbacks, problems)]
    found.sort(key=lambda mg: (mg.version, mg.path))
    problems.extend(sequence_problems(found))
    versions = {mg.version for mg in found}
    for v, path in sorted(rollbacks.items()):
        if v not in versions:
            problems.append(Problem("error", path, 1, "orphan-rollback",
                                    f"rollback for version {v}, which has no migration"))
    unique: dict[int, Migration] = {}
    for mg in found:
        unique.setdefault(mg.version, mg)
    return Source(root=root, info=info, migrations=tuple(unique.values())), problems


def _rollbacks(root: Path, rb_dir: Path, problems: list[Problem]) -> dict[int, str]:
    """version -> path of its rollback script (naming problems added to ``problems``)."""
    rollbacks: dict[int, str] = {}
    if not rb_dir.is_dir():
        return rollbacks
    for f in sorted(rb_dir.iterdir()):
        m = ROLLBACK_RE.match(f.name)
        if not m:
            problems.append(Problem("error", rel(root, f), 1, "naming",
                                    "rollback files are named NNNN_rollback.sql"))
            continue
        v = int(m.group("version"))
        if v in rollbacks:
            problems.append(Problem("error", rel(root, f), 1, "duplicate-rollback",
                                    f"second rollback for version {v} "
                                    f"(first: {rollbacks[v]})"))
            continue
        rollbacks[v] = rel(root, f)
    return rollbacks


def _migrations(root: Path, kdir: Path, kind: str, rollbacks: dict[int, str],
                problems: list[Problem]) -> list[Migration]:
    """The migrations of one kind's folder, in file name order."""
    found: list[Migration] = []
    if not kdir.is_dir():
        return found
    for f in sorted(kdir.iterdir()):
        path = rel(root, f)
        m = NAME_RE.match(f.name)
        if not m:
            problems.append(Problem("error", path, 1, "naming",
                                    "migration files are named NNNN_description.sql or "
                                    "NNNN_<type>_description.sql (lower case)"))
            continue
        if m.group("kind") and m.group("kind") != kind:
            problems.append(Problem("error", path, 1, "naming",
                                    f"file name says {m.group('kind')!r} but it is in "
                                    f"migrations/{kind}/"))
        data = f.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(Problem("error", path, 1, "encoding", "file is not UTF-8"))
            continue
        batch, bp = parse_batch_header(text, path)
        problems.extend(bp)
        version = int(m.group("version"))
        rb = rollbacks.get(version)
        found.append(Migration(
            version=version, kind=kind, path=path, sha256=sha256_bytes(data),
            description=describe(m.group("slug")), rollback=rb,
            rollback_sha256=sha256_bytes((root / rb).read_bytes()) if rb else None,
            batch=batch,
        ))
    return found


def sequence_problems(migrations: list[Migration]) -> list[Problem]:
    """One sequence across all types: start at 1, no gaps, no duplicates."""
    problems: list[Problem] = []
    seen: dict[int, str] = {}
    for mg in migrations:
        if mg.version in seen:
            problems.append(Problem("error", mg.path, 1, "duplicate-version",
                                    f"version {mg.version} is also used by {seen[mg.version]}; "
                                    "versions are one sequence across schema, data and seed"))
        else:
            seen[mg.version] = mg.path
    expected = 1
    for v in sorted(seen):
        if v != expected:
            what = "must start at 1" if expected == 1 else f"gap: {expected} is missing"
            problems.append(Problem("error", seen[v], 1, "sequence",
                                    f"version {v}: the sequence {what}"))
        expected = v + 1
    return problems


def rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def load(root: Path) -> Source:
    """Discover and refuse on any error-level problem."""
    source, problems = discover(root)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise BundleRejected(
            f"{root}: {len(errors)} problem(s) in the migration source:\n"
            + "\n".join(str(p) for p in errors),
            kind="lint",
        )
    return source
