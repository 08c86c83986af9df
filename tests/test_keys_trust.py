"""Keys and the trust store: real key files in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from bundle_helpers import make_key, run_cli, trust_dir
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from zmonitor_migrated.config import Config
from zmonitor_migrated.errors import ConfigError, UsageError
from zmonitor_migrated.keys import key_id, keygen, load_private_key, load_public_key
from zmonitor_migrated.trust import TrustStore


def test_keygen_writes_a_0600_private_key_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        priv, pub = keygen(tmp_path / "keys" / "release")
    finally:
        os.umask(old)
    assert priv == tmp_path / "keys" / "release.key"
    assert pub == tmp_path / "keys" / "release.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert b"BEGIN PRIVATE KEY" in priv.read_bytes()  # PKCS#8, unencrypted
    assert b"BEGIN PUBLIC KEY" in pub.read_bytes()  # SubjectPublicKeyInfo


def test_key_id_is_sha256_of_the_raw_public_key(tmp_path: Path) -> None:
    priv, pub = keygen(tmp_path / "k")
    public = load_public_key(pub)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    assert key_id(public) == hashlib.sha256(raw).hexdigest()
    assert key_id(load_private_key(priv).public_key()) == key_id(public)


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    priv, _ = keygen(tmp_path / "k")
    before = priv.read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        keygen(tmp_path / "k")
    assert priv.read_bytes() == before
    # only the .pub is there (say, copied from elsewhere): still refused, no .key left
    (tmp_path / "other.pub").write_text("x")
    with pytest.raises(UsageError):
        keygen(tmp_path / "other")
    assert not (tmp_path / "other.key").exists()


def test_keygen_does_not_write_through_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "stolen"
    (tmp_path / "k.key").symlink_to(target)
    with pytest.raises(UsageError):
        keygen(tmp_path / "k")
    assert not target.exists()


def test_keys_of_the_wrong_kind_are_refused(tmp_path: Path) -> None:
    priv, pub = keygen(tmp_path / "k")
    with pytest.raises(UsageError, match="not a PEM public key"):
        load_public_key(priv)
    with pytest.raises(UsageError, match="private key"):
        load_private_key(pub)
    from cryptography.hazmat.primitives.asymmetric import ec
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pub").write_bytes(ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(UsageError, match="not an Ed25519"):
        load_public_key(tmp_path / "ec.pub")
    encrypted = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"))
    (tmp_path / "enc.key").write_bytes(encrypted)
    with pytest.raises(UsageError, match="unencrypted"):
        load_private_key(tmp_path / "enc.key")


def test_keygen_command_prints_the_key_id(tmp_path: Path) -> None:
    code, out, _ = run_cli(["keygen", str(tmp_path / "rel"), "--json"])
    assert code == 0
    obj = json.loads(out)
    assert obj["keyid"] == key_id(load_public_key(tmp_path / "rel.pub"))
    code, _, err = run_cli(["keygen", str(tmp_path / "rel")])
    assert code == 2 and "already exists" in err


# -- trust store -----------------------------------------------------------------------

def test_trust_store_loads_every_pub_and_counts_distinct_keys(tmp_path: Path) -> None:
    a, b = make_key(tmp_path / "a"), make_key(tmp_path / "b")
    d = trust_dir(tmp_path / "trust", a, b)
    (d / "a-copy.pub").write_bytes(a.pub.read_bytes())  # same key twice is one key
    (d / "README").write_text("not a key, not *.pub: ignored")
    store = TrustStore.load(d, threshold=2)
    assert set(store.keys) == {a.keyid, b.keyid}
    assert store.usable_ids == tuple(sorted([a.keyid, b.keyid]))
    with pytest.raises(ConfigError, match="only 2 usable"):
        TrustStore.load(d, threshold=3)


def test_a_key_file_that_does_not_parse_is_an_error_not_skipped(tmp_path: Path) -> None:
    a = make_key(tmp_path / "a")
    d = trust_dir(tmp_path / "trust", a)
    (d / "broken.pub").write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match=r"broken\.pub"):
        TrustStore.load(d)


def test_revoked_keys_do_not_count(tmp_path: Path) -> None:
    a, b = make_key(tmp_path / "a"), make_key(tmp_path / "b")
    d = trust_dir(tmp_path / "trust", a, b)
    store = TrustStore.load(d, revoked=[a.keyid.upper()])
    assert store.is_revoked(a.keyid)
    assert store.usable_key(a.keyid) is None
    assert store.usable_key(b.keyid) is not None
    with pytest.raises(ConfigError, match="1 revoked"):
        TrustStore.load(d, threshold=2, revoked=[a.keyid])


def test_a_mistyped_revoked_key_id_is_an_error(tmp_path: Path) -> None:
    d = trust_dir(tmp_path / "trust", make_key(tmp_path / "a"))
    with pytest.raises(ConfigError, match="not a key id"):
        TrustStore.load(d, revoked=["abc123"])


def test_missing_or_empty_trust_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        TrustStore.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="0 usable"):
        TrustStore.load(tmp_path / "empty")
    with pytest.raises(ConfigError, match=">= 1"):
        TrustStore.load(tmp_path / "empty", threshold=0)


def test_trust_store_from_config(tmp_path: Path) -> None:
    a, b = make_key(tmp_path / "a"), make_key(tmp_path / "b")
    d = trust_dir(tmp_path / "trust", a, b)
    config = Config(trust_dir=d, signature_threshold=2, revoked_keys=())
    assert TrustStore.from_config(config).threshold == 2
    other = trust_dir(tmp_path / "other", a)
    store = TrustStore.from_config(config, directory=other, threshold=1)
    assert set(store.keys) == {a.keyid}
