"""The set of keys whose signatures a device accepts on a bundle.

Rules, checked once at load (start-up), each a ``ConfigError`` naming the fix:

1. The trust directory exists and is a directory; every regular, non-hidden ``*.pub``
   file in it is an Ed25519 public key. Such a file that does not parse is an error,
   never silently skipped: a typo in a key file must not quietly lower the number of
   signers a device can accept.
2. ``revoked_keys`` are key ids (exactly 64 hex digits, nothing after them); a revoked
   key stays in the directory but no longer counts.
3. ``threshold`` >= 1 and at most the number of distinct usable (trusted, non-revoked)
   keys, otherwise no bundle could ever be accepted.

Two files holding the same key are one key: the threshold counts distinct keys.

The trust store is exactly the regular ``*.pub`` files of the directory, what
``ls -l`` shows as ``-`` entries, so an audit of the directory is an audit of the trust.
Everything else named ``*.pub`` is ignored with a warning on stderr, never followed and
never a start-up error:

- **hidden files** (``.old.pub``): renaming a key to a dotfile is how an operator parks
  it, and a parked key must not stay trusted;
- **symlinks** are not followed: a link's target can be swapped by whoever controls the
  target's directory (often not root, often not this directory), which would turn the
  root-only trust dir into a trust anchor anyone writing there could change, and what
  ``ls`` shows would no longer be what is trusted. Copy keys in instead;
- **FIFOs, sockets, devices, directories**: opening a FIFO would block the daemon
  forever (``verify`` and ``apply`` hung on one), a device has no end.

Ignoring (rather than refusing) means one stray entry cannot keep the daemon from
starting, recovering an interrupted run and taking bundles; it can only ever lower the
set of trusted keys, and if that leaves fewer usable keys than the threshold, rule 3
refuses with the count. Files are opened ``O_NOFOLLOW | O_NONBLOCK`` relative to the
opened directory, checked with ``fstat`` to be regular (an entry swapped after the
listing is caught) and read with a size cap.

Example::

    trust = TrustStore.load(Path("/etc/zmonitor-migrated/trusted.d"), threshold=2,
                            revoked=["ab12…"])
    trust.usable_key("…key id…")   # Ed25519PublicKey or None
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .config import Config
from .errors import ConfigError
from .fsutil import read_at_most
from .keys import PUBLIC_SUFFIX, key_id
from .text import clean

_KEY_ID = re.compile(r"[0-9a-f]{64}")  # used with fullmatch: nothing before or after
# A PEM Ed25519 public key is 113 bytes; a comment or CRLFs may add a little.
MAX_KEY_BYTES = 4096
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def _warn_stderr(message: str) -> None:
    from .progress import Event, LogSink

    LogSink().emit(Event(phase="trust", message=message, level="warning"))


def _read_key_file(dir_fd: int, name: str, where: str) -> bytes | str:
    """The bytes of a regular key file, or the reason it is ignored (a str)."""
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink (symlinks are not followed; copy the key file in)"
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):
            return "not a regular file"
        if exc.errno == errno.ENOENT:
            return "gone while the directory was read"
        raise ConfigError(f"trust directory {where}: cannot read {clean(name)}: "
                          f"{exc.strerror}; fix its permissions or remove it") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        data = read_at_most(fd, MAX_KEY_BYTES)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_BYTES:
        raise ConfigError(f"trust directory {where}: {clean(name)} is larger than "
                          f"{MAX_KEY_BYTES} bytes, so it is not a public key; a trusted key "
                          "is the NAME.pub file written by 'zmonitor-migrate keygen NAME'")
    return data


def _parse_key(data: bytes, name: str, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"trust directory {where}: {clean(name)} is not a PEM public key "
                          f"({clean(exc)}); a trusted key is the NAME.pub file written by "
                          "'zmonitor-migrate keygen NAME'; fix or remove the file") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"trust directory {where}: {clean(name)} is a "
                          f"{type(key).__name__}, not an Ed25519 public key; fix or remove "
                          "the file")
    return key


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    path: Path
    public_key: Ed25519PublicKey


@dataclass(frozen=True)
class TrustStore:
    keys: Mapping[str, TrustedKey]  # key id -> key (revoked ones included)
    threshold: int
    revoked: frozenset[str]
    directory: Path | None = None

    @classmethod
    def load(cls, directory: Path | str, *, threshold: int = 1,
             revoked: Iterable[str] = (),
             warn: Callable[[str], None] | None = None) -> TrustStore:
        """Load the regular ``*.pub`` files of ``directory``; every other ``*.pub`` entry
        is reported to ``warn`` (default: a warning line on stderr) and skipped."""
        directory = Path(directory)
        warn = warn or _warn_stderr
        where = clean(directory)
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise ConfigError(f"trust directory {where} does not exist or is not a "
                              "directory; create it and copy the release keys' .pub files "
                              "into it (config 'trust_dir' or --trust)") from None
        keys: dict[str, TrustedKey] = {}
        try:
            for name in sorted(os.listdir(dir_fd)):
                if not name.endswith(PUBLIC_SUFFIX):
                    continue
                if name.startswith("."):
                    warn(f"trust directory {where}: ignoring {clean(name)}: hidden files "
                         "are never trusted")
                    continue
                data = _read_key_file(dir_fd, name, where)
                if isinstance(data, str):
                    warn(f"trust directory {where}: ignoring {clean(name)}: {data}")
                    continue
                public_key = _parse_key(data, name, where)
                kid = key_id(public_key)
                keys.setdefault(kid, TrustedKey(kid, directory / name, public_key))
        finally:
            os.close(dir_fd)
        return cls.from_keys(keys.values(), threshold=threshold, revoked=revoked,
                             directory=directory)

    @classmethod
    def from_keys(cls, keys: Iterable[TrustedKey], *, threshold: int = 1,
                  revoked: Iterable[str] = (), directory: Path | None = None) -> TrustStore:
        by_id = {k.key_id: k for k in keys}
        revoked_set = frozenset(r.lower() for r in revoked)
        bad = sorted(repr(r) for r in revoked_set if not _KEY_ID.fullmatch(r))
        if bad:
            raise ConfigError(f"revoked_keys: {clean(', '.join(bad))} is not a key id "
                              "(exactly 64 hex digits, "
                              "as printed by 'zmonitor-migrate keygen'); a mistyped id would "
                              "leave the key trusted")
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ConfigError(f"signature_threshold must be an integer >= 1, got {threshold!r}")
        usable = [k for k in by_id if k not in revoked_set]
        where = f" in {directory}" if directory else ""
        if threshold > len(usable):
            raise ConfigError(
                f"signature_threshold is {threshold} but only {len(usable)} usable key(s) are "
                f"trusted{where} ({len(by_id)} key(s), {len(by_id) - len(usable)} revoked); "
                "add the missing .pub files or lower the threshold"
            )
        return cls(keys=MappingProxyType(by_id), threshold=threshold, revoked=revoked_set,
                   directory=directory)

    @classmethod
    def from_config(cls, config: Config, *, directory: Path | None = None,
                    threshold: int | None = None) -> TrustStore:
        return cls.load(directory or config.trust_dir,
                        threshold=threshold if threshold is not None
                        else config.signature_threshold,
                        revoked=config.revoked_keys)

    def is_revoked(self, kid: str) -> bool:
        return kid in self.revoked

    def usable_key(self, kid: str) -> Ed25519PublicKey | None:
        """The key with this id if it is trusted and not revoked, else None."""
        if kid in self.revoked:
            return None
        entry = self.keys.get(kid)
        return entry.public_key if entry else None

    @property
    def usable_ids(self) -> tuple[str, ...]:
        return tuple(sorted(k for k in self.keys if k not in self.revoked))
