"""Ed25519 signing keys for migration bundles.

Guarantees:

- ``keygen(NAME)`` writes ``NAME.key`` (PKCS#8 PEM, unencrypted) and ``NAME.pub``
  (SubjectPublicKeyInfo PEM). The private key file is created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600 in the same ``open(2)``, so it is never
  readable by anyone else, not even between creation and a later ``chmod``; an existing
  file (or a symlink planted at that name) is never overwritten.
- A key id is the lowercase hex SHA-256 of the raw 32-byte public key, the same for the
  private key and its ``.pub``; ``signatures.json`` and ``revoked_keys`` use it.
- Loading a file that is not an Ed25519 key of the expected kind raises
  ``UsageError`` naming the file and the fix (``TrustStore`` turns that into a
  ``ConfigError`` at start-up).

Only APIs present in cryptography 38 (Debian 12) are used.

Example::

    priv_path, pub_path = keygen(Path("keys/release"))
    key = load_private_key(priv_path)
    key_id(key.public_key())   # 64 hex digits
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import UsageError
from .fsutil import write_new

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def key_paths(name: Path | str) -> tuple[Path, Path]:
    """``keys/release`` → (``keys/release.key``, ``keys/release.pub``)."""
    base = str(name)
    return Path(base + PRIVATE_SUFFIX), Path(base + PUBLIC_SUFFIX)


def keygen(name: Path | str) -> tuple[Path, Path]:
    """Create ``NAME.key`` (0600) and ``NAME.pub`` (0644). Returns both paths."""
    priv_path, pub_path = key_paths(name)
    for p in (priv_path, pub_path):
        if os.path.lexists(p):
            raise UsageError(f"{p} already exists; keygen never overwrites a key. Choose another "
                             "NAME or move the old key pair away first")
    parent = priv_path.parent
    if not parent.is_dir():
        try:
            parent.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise UsageError(f"cannot create key directory {parent}: {exc.strerror}") from None
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        write_new(priv_path, priv_pem, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot create {priv_path}: {exc.strerror}") from None
    try:
        write_new(pub_path, pub_pem, 0o644)
    except OSError as exc:
        with contextlib.suppress(OSError):
            priv_path.unlink()  # do not leave half a key pair behind
        raise UsageError(f"cannot create {pub_path}: {exc.strerror}") from None
    return priv_path, pub_path


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    data = _read(Path(path), "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not an unencrypted PEM private key ({exc}); give the "
                         "NAME.key file written by 'zmonitor-migrate keygen NAME'") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} is a {type(key).__name__}, not an Ed25519 key; bundles are "
                         "signed with Ed25519 keys made by 'zmonitor-migrate keygen'")
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    data = _read(Path(path), "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not a PEM public key ({exc}); a trusted key is the "
                         "NAME.pub file written by 'zmonitor-migrate keygen NAME'") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{path} is a {type(key).__name__}, not an Ed25519 public key")
    return key
