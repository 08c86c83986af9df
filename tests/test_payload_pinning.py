"""Every payload file is pinned by the signed manifest, whatever directory it is in.

One byte changed in one file of each kind (a schema, data, seed and rollback migration,
``schema/database.yaml``, ``checks/post.yaml``, ``bundle.yaml``) of the real signed
shipped bundle: verification refuses it as ``hash-mismatch`` and extracts nothing that
could be used. A tampered ``checks/post.yaml`` matters as much as a migration: it decides
what the validation accepts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bundle_helpers import flip, member_data_offset, members

from zmonitor_migrated.bundle import verify_bundle
from zmonitor_migrated.errors import BundleRejected
from zmonitor_migrated.trust import TrustStore

KINDS = ["migrations/schema/", "migrations/data/", "migrations/seed/", "migrations/rollback/",
         "schema/database.yaml", "checks/post.yaml", "bundle.yaml"]


def _first(bundle: Path, prefix: str) -> str:
    return next(m.name for m in members(bundle) if m.name.startswith(prefix))


def test_the_untouched_bundle_verifies(tmp_path: Path, shipped_bundle: Path,
                                       release_key: tuple[Path, Path]) -> None:
    trust = TrustStore.load(release_key[1].parent)
    vb = verify_bundle(shipped_bundle, trust, extract_to=tmp_path / "payload")
    assert (tmp_path / "payload" / "checks" / "post.yaml").is_file()
    assert vb.manifest.last_version == 14


@pytest.mark.parametrize("prefix", KINDS)
def test_one_changed_byte_in_any_payload_file_is_refused(tmp_path: Path, shipped_bundle: Path,
                                                         release_key: tuple[Path, Path],
                                                         prefix: str) -> None:
    name = _first(shipped_bundle, prefix)
    raw = shipped_bundle.read_bytes()
    tampered = tmp_path / "tampered.zmb"
    tampered.write_bytes(flip(raw, member_data_offset(raw, name) + 3))
    trust = TrustStore.load(release_key[1].parent)
    with pytest.raises(BundleRejected) as err:
        verify_bundle(tampered, trust, extract_to=tmp_path / "payload")
    assert err.value.kind == "hash-mismatch", err.value.message
    assert name in err.value.message
