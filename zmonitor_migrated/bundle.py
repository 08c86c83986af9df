"""Bundles: build and co-sign a signed ``.zmb`` from a migration source, verify one.

Guarantees:

- ``build`` refuses a source with lint errors; otherwise it writes an uncompressed ustar
  archive with ``manifest.json``, ``signatures.json``, then every payload file in sorted
  path order, each with mtime = ``created``, uid/gid 0, empty owner names, mode 0644. The
  same source, keys, sequence and times give a byte-identical bundle.
- The payload is every regular file of the source: ``bundle.yaml`` and everything under
  ``migrations/``, ``schema/``, ``checks/`` (names starting with a dot are skipped;
  symlinks and other special files are refused). A file that changes while the bundle
  is being written is detected and the build fails.
- ``sign`` adds one signature; the manifest bytes stay the same and the payload is
  checked against the manifest on the way. ``build`` with keys A, B and ``build`` with A
  then ``sign`` with B give the same bytes.
- Every write (``build``, ``sign``, ``private_copy``) goes to a temporary file that is
  fsynced and renamed into place, so a reader never sees half a bundle.
- ``verify_bundle`` = ``open_bundle`` → signature threshold → manifest schema →
  streamed payload into ``extract_to`` → ``bundle.yaml`` must say what the manifest
  says and every migration's description must follow from its file name. The
  migrations of the returned source are the manifest's (signed) ones; no payload file
  is read whole during verification (no re-discovery of SQL contents). Policy (device,
  sequence, expiry, applied hashes) is ``verify.check_policy``, applied by the caller
  with the device state.
- An incoming file (``receive``, ``private_copy``, ``verify_bundle``) is opened only if
  it is a regular file, without following a symlink and without blocking on a fifo
  (``archive.open_regular``). ``receive`` refuses a file no trusted key signed after
  reading its manifest and signatures only, before copying it: an unsigned file of any
  size costs about a MiB of reading and no disk space. A copy or extraction that does
  not fit in the free space is refused before writing (``PrecheckFailed`` kind
  ``disk-space``, exit 4) and a disk that fills up meanwhile leaves nothing behind. Every
  read is bounded and preceded by the optional ``tick`` (the run's watchdog heartbeat).

Example::

    build(Path("bundles/zmonitor"), Path("out.zmb"), [Path("keys/release.key")], 7,
          created=now, expires=now + timedelta(days=90))
    sign(Path("out.zmb"), Path("keys/clinical.key"))
    vb = verify_bundle(receive(Path("inbox/out.zmb"), work, trust), trust,
                       extract_to=work / "payload", caps=Caps())
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import yaml

from . import fsutil, sources
from .archive import (
    MANIFEST_NAME,
    SIGNATURES_NAME,
    Caps,
    Tick,
    check_free_space,
    extract_payload,
    is_no_space,
    no_space,
    open_bundle,
    open_regular,
)
from .errors import BundleRejected, LintFailed, UsageError
from .fsutil import sha256_and_size
from .keys import load_private_key
from .lint import lint_source
from .manifest import ROOT_FILES, FileEntry, Manifest, check_path
from .sqlscript import IDENT
from .trust import TrustStore
from .verify import (
    parse_signatures,
    sign_manifest_bytes,
    signatures_to_json,
    verify_signatures,
)

PAYLOAD_DIRS = ("migrations", "schema", "checks")


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    manifest_sha256: str
    source: sources.Source  # root = the extracted payload, migrations = the manifest's
    path: Path
    signed_by: tuple[str, ...] = ()


# -- build -------------------------------------------------------------------------------

def _utc_seconds(t: datetime, what: str) -> datetime:
    if t.tzinfo is None or t.utcoffset() is None:
        raise UsageError(f"{what} {t.isoformat()} has no time zone; give a UTC time such as "
                         "2025-01-31T12:00:00Z")
    return t.astimezone(UTC).replace(microsecond=0)


def _lint(src: Path) -> sources.Source:
    problems = lint_source(src)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise LintFailed(f"{src}: {len(errors)} lint error(s); fix them before building:\n"
                         + "\n".join(str(p) for p in errors))
    source, _ = sources.discover(src)
    return source


def payload_files(src: Path) -> list[str]:
    """Relative paths of every payload file of a source, sorted."""
    found: list[str] = []
    for name in ROOT_FILES:
        p = src / name
        if p.is_symlink() or not p.is_file():
            raise LintFailed(f"{p} must be a regular file")
        found.append(name)
    for top in PAYLOAD_DIRS:
        root = src / top
        if root.is_symlink():
            raise LintFailed(f"{root} is a symlink; bundles carry regular files only")
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in [*dirnames, *filenames]:
                p = Path(dirpath) / name
                if name.startswith("."):
                    continue
                rel = sources.rel(src, p)
                if p.is_symlink():
                    raise LintFailed(f"{rel} is a symlink; bundles carry regular files only, "
                                     "copy the file into the source instead")
                if name in filenames and not p.is_file():
                    raise LintFailed(f"{rel} is not a regular file")
                if name in filenames:
                    try:
                        check_path(rel)
                    except BundleRejected:
                        raise LintFailed(f"{rel}: file names in a bundle use letters, digits, "
                                         "'.', '_', '-' and fit a tar header; rename it"
                                         ) from None
                    found.append(rel)
    return sorted(found)


def declared_row_loss(src: Path) -> tuple[str, ...]:
    """The tables ``bundle.yaml`` says this source may shrink (sorted)."""
    raw = yaml.safe_load((src / "bundle.yaml").read_text(encoding="utf-8")) or {}
    tables = raw.get("declared_row_loss") if isinstance(raw, dict) else None
    if tables is None:
        return ()
    if (not isinstance(tables, list)
            or not all(isinstance(t, str) and IDENT.match(t) for t in tables)):
        raise LintFailed(f"{src / 'bundle.yaml'}: 'declared_row_loss' must be a list of table "
                         "names whose row count this bundle may lower")
    return tuple(sorted(set(tables)))


def build(src: Path, out: Path, keys: list[Path], sequence: int, *, created: datetime,
          expires: datetime) -> Manifest:
    """Lint ``src``, then write a signed bundle to ``out``. Returns its manifest."""
    src, out = Path(src), Path(out)
    if not keys:
        raise UsageError("a bundle needs at least one signature: give --key KEY.key")
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 1:
        raise UsageError(f"--sequence must be an integer >= 1, got {sequence!r}")
    created = _utc_seconds(created, "created")
    expires = _utc_seconds(expires, "expires")
    if expires <= created:
        raise UsageError(f"expires ({expires.isoformat()}) must be after created "
                         f"({created.isoformat()})")
    private_keys = [load_private_key(k) for k in keys]  # fail before any work
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory; give the migration source folder")
    source = _lint(src)
    files = []
    for rel in payload_files(src):
        sha, size = sha256_and_size(src / rel)
        files.append(FileEntry(rel, sha, size))
    manifest = Manifest(
        name=source.info.name, app=source.info.app, device_types=source.info.device_types,
        description=source.info.description, sequence=sequence, created=created,
        expires=expires, files=tuple(files), migrations=source.migrations,
        declared_row_loss=declared_row_loss(src),
    )
    data = manifest.to_json()
    try:
        Manifest.from_json(data)  # the same checks a device will make
    except BundleRejected as exc:
        raise LintFailed(f"{src}: cannot build a valid manifest: {exc.message}") from None
    signatures = signatures_to_json([sign_manifest_bytes(data, k) for k in private_keys])
    _write_bundle(out, data, signatures, manifest, src)
    return manifest


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class _HashingReader(io.RawIOBase):
    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hash.update(data)
        return data


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[BinaryIO]:
    """A temporary file next to ``out``: fsynced and renamed over ``out`` (0644) on
    success, removed on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.atomic_output(out.parent, out, prefix=f".{out.name}.", suffix=".tmp",
                              mode=0o644) as pending:
        yield pending.file


def _write_bundle(out: Path, manifest_bytes: bytes, signatures: bytes, manifest: Manifest,
                  payload_root: Path) -> None:
    mtime = int(manifest.created.timestamp())
    with atomic_output(out) as f, \
            tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURES_NAME, signatures)):
            tar.addfile(_tarinfo(name, len(data), mtime), io.BytesIO(data))
        for entry in manifest.files:
            with open(payload_root / entry.path, "rb") as src_file:
                reader = _HashingReader(src_file)
                tar.addfile(_tarinfo(entry.path, entry.size, mtime), reader)
            if reader.hash.hexdigest() != entry.sha256:
                raise LintFailed(f"{payload_root / entry.path} changed while the bundle was "
                                 "being written; build again")


# -- sign --------------------------------------------------------------------------------

def sign(bundle: Path, key: Path, *, caps: Caps | None = None) -> tuple[str, ...]:
    """Add KEY's signature to BUNDLE in place (atomically). Returns the signing key ids."""
    bundle = Path(bundle)
    caps = caps or Caps()
    private = load_private_key(key)
    manifest_bytes, sig_bytes = open_bundle(bundle, caps)
    manifest = Manifest.from_json(manifest_bytes)
    signatures = [*parse_signatures(sig_bytes), sign_manifest_bytes(manifest_bytes, private)]
    new_sig_bytes = signatures_to_json(signatures)
    with tempfile.TemporaryDirectory(dir=bundle.parent, prefix=".sign-") as tmp:
        payload = Path(tmp) / "payload"
        extract_payload(bundle, manifest, payload, caps)  # co-sign only an intact bundle
        _write_bundle(bundle, manifest_bytes, new_sig_bytes, manifest, payload)
    return tuple(s.keyid for s in parse_signatures(new_sig_bytes))


# -- verify ------------------------------------------------------------------------------

def verify_bundle(path: Path, trust: TrustStore, *, extract_to: Path,
                  caps: Caps | None = None, tick: Tick | None = None) -> VerifiedBundle:
    """Full verification of one bundle file (use a ``private_copy``); no policy.
    ``tick`` is called between bounded reads (a watchdog ping)."""
    path = Path(path)
    caps = caps or Caps()
    manifest_bytes, sig_bytes = open_bundle(path, caps, tick)
    signed_by = verify_signatures(manifest_bytes, sig_bytes, trust)
    manifest = Manifest.from_json(manifest_bytes)
    extract_payload(path, manifest, extract_to, caps, tick)
    _check_payload_agrees(manifest, Path(extract_to))
    source = sources.Source(root=Path(extract_to), info=manifest.info,
                            migrations=manifest.migrations)
    return VerifiedBundle(manifest=manifest,
                          manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
                          source=source, path=path, signed_by=signed_by)


def _check_payload_agrees(manifest: Manifest, root: Path) -> None:
    """What the payload's layout says must be what the signed manifest says."""
    yaml_entry = manifest.file("bundle.yaml")
    if yaml_entry is None or yaml_entry.size > 1024 * 1024:
        raise BundleRejected("bundle.yaml is missing or over 1 MiB", kind="malformed")
    info = sources.load_info(root)
    if info != manifest.info:
        raise BundleRejected(f"bundle.yaml says {info} but the signed manifest says "
                             f"{manifest.info}; rebuild the bundle", kind="malformed")
    for mig in manifest.migrations:
        m = sources.NAME_RE.match(mig.path.rpartition("/")[2])
        if m is None or sources.describe(m.group("slug")) != mig.description:
            raise BundleRejected(f"migration {mig.version}: description {mig.description!r} "
                                 f"does not follow from {mig.path}; rebuild the bundle",
                                 kind="malformed")


def receive(path: Path, dest_dir: Path, trust: TrustStore, *, caps: Caps | None = None,
            tick: Tick | None = None) -> Path:
    """What a run does with an incoming bundle before verifying it: refuse a file that
    no trusted key signed after reading at most its manifest and signatures, then take
    the ``private_copy`` that verification and the run use.

    So an unsigned file of any size up to the cap costs about a MiB of reading, no copy
    and no disk space. The early check only ever refuses: the copy is verified in full
    by ``verify_bundle`` (the file may change between the two)."""
    caps = caps or Caps()
    verify_signatures(*open_bundle(path, caps, tick), trust)
    return private_copy(path, dest_dir, max_bytes=caps.read_limit, tick=tick)


def private_copy(path: Path, dest_dir: Path, *, max_bytes: int | None = None,
                 tick: Tick | None = None) -> Path:
    """Copy an incoming bundle into ``dest_dir`` (mode 0700) as ``<sha256>.zmb`` (0600).

    Verification and the run then use only the copy, so the sender cannot change the
    file between verification and use. Symlinks and special files are refused without
    blocking (``archive.open_regular``). A copy that cannot fit in the free space of
    ``dest_dir`` is refused before a byte is written, and a disk that fills up during the
    copy removes the partial copy: both are ``PrecheckFailed`` kind ``disk-space`` (exit 4;
    not the bundle's fault, the same bundle can be retried once there is space).
    ``tick`` is called before each 1 MiB chunk."""
    path, dest_dir = Path(path), Path(dest_dir)
    dest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open_regular(path) as src:
        size = os.fstat(src.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise BundleRejected(f"{path} is {size} bytes, over the {max_bytes} byte "
                                 "cap", kind="too-large")
        check_free_space(dest_dir, [size])
        try:
            with fsutil.atomic_output(dest_dir, prefix=".incoming-") as pending:
                digest = _copy_bounded(path, src, pending.file, max_bytes, tick)
                final = pending.target = dest_dir / f"{digest}.zmb"
        except BaseException as exc:
            if is_no_space(exc):
                raise no_space(dest_dir, size) from None
            raise
    return final


def _copy_bounded(path: Path, src: BinaryIO, dst: BinaryIO, max_bytes: int | None,
                  tick: Tick | None) -> str:
    h = hashlib.sha256()
    copied = 0
    while True:
        if tick is not None:
            tick()
        try:
            chunk = src.read(1024 * 1024)
        except OSError as exc:
            raise BundleRejected(f"{path} cannot be read ({exc.strerror}); get the bundle "
                                 "again", kind="malformed") from None
        if not chunk:
            return h.hexdigest()
        copied += len(chunk)
        if max_bytes is not None and copied > max_bytes:
            raise BundleRejected(f"{path} grew past the {max_bytes} byte cap while being "
                                 "copied", kind="too-large")
        h.update(chunk)
        dst.write(chunk)
