"""Keys and the trust store: real key files in tmp_path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from bundle_helpers import (
    build_bundle,
    make_db,
    make_key,
    make_source,
    run_cli,
    trust_dir,
    write_config,
)
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


# -- what in the trust dir is trusted: regular, non-hidden *.pub files only ---------------

def _load_in_thread(d: Path, **kw: object) -> tuple[TrustStore | Exception | None, list[str]]:
    """TrustStore.load with a time limit: before the fix a FIFO blocked open() forever."""
    warnings: list[str] = []
    result: list[TrustStore | Exception] = []

    def run() -> None:
        try:
            result.append(TrustStore.load(d, warn=warnings.append, **kw))  # type: ignore[arg-type]
        except Exception as exc:
            result.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=15)
    if t.is_alive():
        for fifo in d.glob("*.pub"):  # unblock the stuck open() so the thread can end
            if stat.S_ISFIFO(fifo.lstat().st_mode):
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        return None, warnings
    return result[0], warnings


def test_a_fifo_named_pub_does_not_hang_the_load(tmp_path: Path) -> None:
    a = make_key(tmp_path / "a")
    d = trust_dir(tmp_path / "trust", a)
    os.mkfifo(d / "stuck.pub")
    store, warnings = _load_in_thread(d)
    assert isinstance(store, TrustStore), "TrustStore.load hung on a FIFO"
    assert set(store.keys) == {a.keyid}
    assert any("stuck.pub" in w and "not a regular file" in w for w in warnings)


def test_hidden_pub_files_are_never_trusted(tmp_path: Path) -> None:
    a, b = make_key(tmp_path / "a"), make_key(tmp_path / "b")
    d = trust_dir(tmp_path / "trust", a)
    shutil.copy(b.pub, d / ".old.pub")  # an operator "parked" key b
    store, warnings = _load_in_thread(d)
    assert isinstance(store, TrustStore)
    assert set(store.keys) == {a.keyid} and store.usable_key(b.keyid) is None
    assert any(".old.pub" in w and "hidden" in w for w in warnings)
    store, _ = _load_in_thread(d, threshold=2)
    assert isinstance(store, ConfigError) and "only 1 usable" in store.message


@pytest.mark.parametrize("kind", ["to a key outside", "to a key inside", "dangling", "loop",
                                  "to a fifo"])
def test_symlinked_keys_are_not_followed(tmp_path: Path, kind: str) -> None:
    a, b = make_key(tmp_path / "a"), make_key(tmp_path / "b")
    d = trust_dir(tmp_path / "trust", a)
    link = d / "linked.pub"
    if kind == "to a key outside":
        link.symlink_to(b.pub)
    elif kind == "to a key inside":
        shutil.copy(b.pub, d / "b.key-material")
        link.symlink_to("b.key-material")
    elif kind == "dangling":
        link.symlink_to(tmp_path / "nowhere.pub")
    elif kind == "loop":
        link.symlink_to("linked.pub")
    else:
        os.mkfifo(tmp_path / "fifo")
        link.symlink_to(tmp_path / "fifo")
    store, warnings = _load_in_thread(d)
    assert isinstance(store, TrustStore), store
    assert set(store.keys) == {a.keyid}  # b is never trusted through a link
    assert any("linked.pub" in w and "symlink" in w for w in warnings), warnings


@pytest.mark.parametrize("kind", ["directory", "socket"])
def test_other_non_regular_entries_are_ignored(tmp_path: Path, kind: str) -> None:
    a = make_key(tmp_path / "a")
    d = trust_dir(tmp_path / "trust", a)
    if kind == "directory":
        (d / "dir.pub").mkdir()
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(d / "dir.pub"))
    store, warnings = _load_in_thread(d)
    assert isinstance(store, TrustStore) and set(store.keys) == {a.keyid}
    assert any("dir.pub" in w and "not a regular file" in w for w in warnings)


def test_an_oversized_key_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    a = make_key(tmp_path / "a")
    d = trust_dir(tmp_path / "trust", a)
    with open(d / "huge.pub", "wb") as f:
        f.write(a.pub.read_bytes())
        f.truncate(1 << 30)  # sparse: 1 GiB that costs nothing
    store, _ = _load_in_thread(d)
    assert isinstance(store, ConfigError) and "huge.pub" in store.message
    assert "larger than" in store.message


def test_a_key_file_name_with_controls_is_cleaned_in_messages(tmp_path: Path) -> None:
    d = trust_dir(tmp_path / "trust", make_key(tmp_path / "a"))
    (d / "bad\n<1>ALERT x.pub").write_text("not a key")
    store, _ = _load_in_thread(d)
    assert isinstance(store, ConfigError)
    assert "\n" not in store.message and "bad\\n<1>ALERT x.pub" in store.message


@pytest.mark.parametrize("suffix", ["\n", " ", "\t", "\r\n", "x"])
def test_a_revoked_key_id_must_match_completely(tmp_path: Path, suffix: str) -> None:
    """^…$ let "<id>\\n" through; the id then never matched and the key stayed trusted."""
    a, b = make_key(tmp_path / "a"), make_key(tmp_path / "b")
    d = trust_dir(tmp_path / "trust", a, b)
    with pytest.raises(ConfigError, match="not a key id"):
        TrustStore.load(d, revoked=[a.keyid + suffix])


def test_verify_is_not_locked_out_by_stray_entries(tmp_path: Path) -> None:
    """The real command: a FIFO, a symlink, a hidden key and a directory beside the real
    key; the good bundle verifies (exit 0), each stray entry named on stderr."""
    src = make_source(tmp_path / "src")
    a, b = make_key(tmp_path / "keys" / "a"), make_key(tmp_path / "keys" / "b")
    d = trust_dir(tmp_path / "trust", a)
    os.mkfifo(d / "fifo.pub")
    (d / "link.pub").symlink_to(b.pub)
    shutil.copy(b.pub, d / ".parked.pub")
    (d / "dir.pub").mkdir()
    (tmp_path / "db").mkdir()
    db = make_db(tmp_path / "db" / "monitor.db")
    good = build_bundle(src, tmp_path / "good.zmb", [a], 1)
    by_b = build_bundle(src, tmp_path / "by-b.zmb", [b], 1)
    config = write_config(tmp_path / "config.yaml", database=db, trust_dir=d,
                          device_type="zmonitor-bedside", state_dir=tmp_path / "state",
                          inbox=tmp_path / "inbox", backup_dir=tmp_path / "backups",
                          max_validity_days=36525)  # the helpers' bundles are valid 100 years
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("JOURNAL_STREAM", None)
    cmd = [sys.executable, "-m", "zmonitor_migrated.cli", "--config", str(config), "bundle",
           "verify"]
    proc = subprocess.run([*cmd, str(good), "--json"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
    for name in ("fifo.pub", "link.pub", ".parked.pub", "dir.pub"):
        assert name in proc.stderr, proc.stderr
    proc = subprocess.run([*cmd, str(by_b), "--json"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 3 and json.loads(proc.stdout)["error"]["kind"] == \
        "untrusted-key", proc.stdout
