"""Mutations of a valid bundle never get past verification with changed content.

What exactly must hold. The reader interprets or checks every byte of an uncompressed
bundle except a few ustar header fields that carry no content (mode, uid, gid, mtime,
uname, gname, devmajor, devminor, the typeflag's two spellings of "regular file", the
two ustar magics, and the checksum field itself), and those are covered by the header
checksum. Hence:

1. one changed byte anywhere — in a header, a member's data, its padding or the end of
   archive padding — is always refused with a ``BundleRejected`` (never another
   exception), and nothing is left in the extraction directory;
2. several changed bytes can only pass if they all lie in those content-free header
   fields (with the checksum still adding up), and then the verified manifest and every
   extracted file are byte-identical to the original;
3. a gzip-compressed bundle may pass with a changed byte only if it decompresses to a
   tar that differs at most in those same content-free fields (gzip does not checksum
   its own header: mtime, XFL, OS, the FTEXT flag; nor the unused bits of the last
   deflate byte).
"""

from __future__ import annotations

import gzip
import io
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bundle_helpers import build_bundle, make_key, make_source, trust_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from zmonitor_migrated.archive import Caps, extract_payload, open_bundle
from zmonitor_migrated.bundle import verify_bundle
from zmonitor_migrated.errors import BundleRejected
from zmonitor_migrated.trust import TrustStore
from zmonitor_migrated.verify import verify_manifest

# byte ranges of a 512-byte ustar header that hold no content (see the module docstring)
_CONTENT_FREE = [(100, 124), (136, 157), (257, 265), (265, 345)]
_SMALL_FILES = {
    "migrations/schema/0001_create_patients.sql": "CREATE TABLE patients (id INTEGER);\n",
    "migrations/rollback/0001_rollback.sql": "DROP TABLE patients;\n",
}


@dataclass(frozen=True)
class Sample:
    raw: bytes
    manifest: bytes
    src: Path
    trust: TrustStore
    content_free: frozenset[int]
    end_of_members: int  # offset of the end-of-archive marker

    def only_content_free(self, other: bytes) -> bool:
        return len(other) == len(self.raw) and all(
            a == b or i in self.content_free
            for i, (a, b) in enumerate(zip(self.raw, other, strict=True)))


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    tmp = tmp_path_factory.mktemp("fuzz")
    src = make_source(tmp / "src", _SMALL_FILES)
    key = make_key(tmp / "key")
    bundle = build_bundle(src, tmp / "good.zmb", [key], 1)
    raw = bundle.read_bytes()
    free: set[int] = set()
    with tarfile.open(bundle, "r:") as tar:
        infos = tar.getmembers()
    for ti in infos:
        for lo, hi in _CONTENT_FREE:
            free.update(range(ti.offset + lo, ti.offset + hi))
    end = infos[-1].offset_data + infos[-1].size
    end += -end % 512
    return Sample(raw, open_bundle(bundle, Caps())[0], src,
                  TrustStore.load(trust_dir(tmp / "trust", key)), frozenset(free), end)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-work")


def _attempt(sample: Sample, data: bytes, workdir: Path, suffix: str = ".zmb"):
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / f"b{suffix}"
        path.write_bytes(data)
        out = Path(tmp) / "payload"
        try:
            vb = verify_bundle(path, sample.trust, extract_to=out, caps=Caps())
        except BundleRejected as exc:
            assert not out.exists() or list(out.iterdir()) == []
            return exc
        files = {f.path: (out / f.path).read_bytes() for f in vb.manifest.files}
        return vb, files


def _assert_identical_content(sample: Sample, result: tuple) -> None:
    vb, files = result
    assert vb.manifest.to_json() == sample.manifest
    for path, data in files.items():
        assert data == (sample.src / path).read_bytes()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_one_changed_byte_is_always_refused(sample: Sample, workdir: Path,
                                            data: st.DataObject) -> None:
    offset = data.draw(st.integers(0, len(sample.raw) - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor")
    mutated = bytearray(sample.raw)
    mutated[offset] ^= mask
    result = _attempt(sample, bytes(mutated), workdir)
    assert isinstance(result, BundleRejected), f"offset {offset} ^ {mask:#x} was accepted"


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_several_changed_bytes_pass_only_without_content_change(
        sample: Sample, workdir: Path, data: st.DataObject) -> None:
    # half of the examples aim at header bytes, where a compensating change is possible
    headers = sorted(sample.content_free)
    positions = data.draw(st.lists(st.one_of(st.integers(0, len(sample.raw) - 1),
                                             st.sampled_from(headers)),
                                   min_size=2, max_size=6, unique=True), label="offsets")
    mutated = bytearray(sample.raw)
    for p in positions:
        mutated[p] ^= data.draw(st.integers(1, 255), label=f"xor@{p}")
    result = _attempt(sample, bytes(mutated), workdir)
    if not isinstance(result, BundleRejected):
        assert set(positions) <= sample.content_free, positions
        _assert_identical_content(sample, result)


def test_a_compensated_change_in_content_free_fields_passes_with_identical_content(
        sample: Sample, workdir: Path) -> None:
    """Rule 2 is not vacuous: mode 0644 -> 0634 and uid 0 -> 1 keep the header checksum,
    and the bundle verifies with the same content (neither field is used)."""
    with tarfile.open(fileobj=io.BytesIO(sample.raw)) as tar:
        third = tar.getmembers()[2].offset
    mutated = bytearray(sample.raw)
    assert mutated[third + 105:third + 107] == b"44" and mutated[third + 114] == ord("0")
    mutated[third + 105] -= 1  # mode digit '4' -> '3'
    mutated[third + 114] += 1  # uid digit '0' -> '1'
    result = _attempt(sample, bytes(mutated), workdir)
    assert not isinstance(result, BundleRejected), result
    _assert_identical_content(sample, result)


def _every_offset(sample: Sample) -> Iterator[int]:
    yield from range(sample.end_of_members + 1024)
    yield from range(sample.end_of_members + 1024, len(sample.raw), 97)


def test_every_bit_flip_before_the_end_marker_is_refused(sample: Sample, workdir: Path) -> None:
    """Exhaustive over the members and the end-of-archive marker (sampled after it),
    without extraction: header, manifest, signatures and payload bytes."""
    trust = sample.trust
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "b.zmb"
        accepted = []
        for offset in _every_offset(sample):
            mutated = bytearray(sample.raw)
            mutated[offset] ^= 0x01
            path.write_bytes(mutated)
            try:
                manifest = verify_manifest(*open_bundle(path, Caps()), trust)
                extract_payload(path, manifest, None, Caps())
            except BundleRejected:
                continue
            accepted.append(offset)
        assert accepted == []


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_gzip_bundle_changed_byte(sample: Sample, workdir: Path, data: st.DataObject) -> None:
    gz = gzip.compress(sample.raw, mtime=0)
    offset = data.draw(st.integers(0, len(gz) - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor")
    mutated = bytearray(gz)
    mutated[offset] ^= mask
    result = _attempt(sample, bytes(mutated), workdir, ".zmb.gz")
    if not isinstance(result, BundleRejected):
        assert sample.only_content_free(gzip.decompress(bytes(mutated))), offset
        _assert_identical_content(sample, result)
