"""The set of keys whose signatures a device accepts on a bundle.

Rules, checked once at load (start-up), each a ``ConfigError`` naming the fix:

1. The trust directory exists and is a directory; every ``*.pub`` in it is an Ed25519
   public key. A file that does not parse is an error, never silently skipped: a typo
   in a key file must not quietly lower the number of signers a device can accept.
2. ``revoked_keys`` are key ids (64 hex digits); a revoked key stays in the directory
   but no longer counts.
3. ``threshold`` >= 1 and at most the number of distinct usable (trusted, non-revoked)
   keys, otherwise no bundle could ever be accepted.

Two files holding the same key are one key: the threshold counts distinct keys.

Example::

    trust = TrustStore.load(Path("/etc/zmonitor-migrated/trusted.d"), threshold=2,
                            revoked=["ab12…"])
    trust.usable_key("…key id…")   # Ed25519PublicKey or None
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .config import Config
from .errors import ConfigError, UsageError
from .keys import PUBLIC_SUFFIX, key_id, load_public_key

_KEY_ID = re.compile(r"^[0-9a-f]{64}$")


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
             revoked: Iterable[str] = ()) -> TrustStore:
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(f"trust directory {directory} does not exist or is not a "
                              "directory; create it and copy the release keys' .pub files "
                              "into it (config 'trust_dir' or --trust)")
        keys: dict[str, TrustedKey] = {}
        for path in sorted(directory.glob("*" + PUBLIC_SUFFIX)):
            try:
                public_key = load_public_key(path)
            except UsageError as exc:
                raise ConfigError(f"trust directory {directory}: {exc.message}; fix or remove "
                                  "the file") from None
            kid = key_id(public_key)
            keys.setdefault(kid, TrustedKey(kid, path, public_key))
        return cls.from_keys(keys.values(), threshold=threshold, revoked=revoked,
                             directory=directory)

    @classmethod
    def from_keys(cls, keys: Iterable[TrustedKey], *, threshold: int = 1,
                  revoked: Iterable[str] = (), directory: Path | None = None) -> TrustStore:
        by_id = {k.key_id: k for k in keys}
        revoked_set = frozenset(r.lower() for r in revoked)
        bad = sorted(r for r in revoked_set if not _KEY_ID.match(r))
        if bad:
            raise ConfigError(f"revoked_keys: {', '.join(bad)} is not a key id (64 hex digits, "
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
