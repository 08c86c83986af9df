"""Hostile input before the signature check: the gzip layer, the file itself, the disk.

What must hold, whoever made the file:

1. gzip: only one member of the accepted subset (see ``archive``'s docstring) passes, and
   then with exactly the bytes that went in; anything else is a ``BundleRejected``, never
   another exception, and the work done before the refusal is bounded by the format, not
   by the size of the file (measured as bytes read from the file, through the ``tick``
   callback that runs before every read);
2. the file: a fifo, a symlink, a directory, a device, a file that vanished or was
   swapped are refused without blocking and without a traceback, by ``open_bundle`` and
   by ``private_copy`` alike;
3. the disk: a bundle that cannot fit in the state directory is refused before a byte is
   copied (``PrecheckFailed`` kind ``disk-space``, exit 4), a disk that fills during the
   copy or the extraction leaves nothing behind, with the same error;
4. the run's heartbeat is called while a bundle is copied and read.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from bundle_helpers import (
    DEFAULT_FILES,
    KeyPair,
    RawMember,
    build_bundle,
    make_db,
    make_key,
    make_source,
    members,
    tar_bytes,
    trust_dir,
    write_config,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from zmonitor_migrated import archive, maintenance, pipeline
from zmonitor_migrated import bundle as bundle_mod
from zmonitor_migrated.archive import (
    GZIP_FIELD_CAP,
    GZIP_IN,
    GZIP_SLACK,
    MAX_TRAILER,
    Caps,
    extract_payload,
    open_bundle,
)
from zmonitor_migrated.bundle import private_copy, verify_bundle
from zmonitor_migrated.config import Config
from zmonitor_migrated.errors import BundleRejected, MigrateError, PrecheckFailed
from zmonitor_migrated.manifest import Manifest
from zmonitor_migrated.progress import Reporter
from zmonitor_migrated.trust import TrustStore

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
FTEXT, FHCRC, FEXTRA, FNAME, FCOMMENT = 0x01, 0x02, 0x04, 0x08, 0x10
EMPTY_MEMBER = gzip.compress(b"", mtime=0)
HOSTILE = HealthCheck.too_slow, HealthCheck.function_scoped_fixture
# An example takes milliseconds; a deadline this far above catches a reader that goes
# through a whole file (or hangs) without failing on a loaded machine.
DEADLINE = timedelta(seconds=10)


# -- gzip surgery --------------------------------------------------------------------------

def gz_member(data: bytes, *, flags: int = 0, extra: bytes | None = None,
              name: bytes | None = None, comment: bytes | None = None,
              hcrc_xor: int = 0, crc: int | None = None, isize: int | None = None,
              level: int = 6, mtime: bytes = bytes(4), xfl_os: bytes = b"\x00\xff",
              method: int = 8) -> bytes:
    """One gzip member written field by field (RFC 1952), whatever the fields say.
    ``flags`` adds to the flags the given fields imply; with FHCRC the header CRC is
    the right one xor ``hcrc_xor``."""
    if extra is not None:
        flags |= FEXTRA
    if name is not None:
        flags |= FNAME
    if comment is not None:
        flags |= FCOMMENT
    head = bytes([0x1F, 0x8B, method, flags]) + mtime + xfl_os
    if flags & FEXTRA:
        extra = extra or b""
        head += len(extra).to_bytes(2, "little") + extra
    if flags & FNAME:
        head += (name or b"") + b"\x00"
    if flags & FCOMMENT:
        head += (comment or b"") + b"\x00"
    if flags & FHCRC:
        head += ((zlib.crc32(head) & 0xFFFF) ^ hcrc_xor).to_bytes(2, "little")
    z = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = z.compress(data) + z.flush()
    crc = zlib.crc32(data) if crc is None else crc
    isize = len(data) & 0xFFFFFFFF if isize is None else isize
    return head + body + crc.to_bytes(4, "little") + isize.to_bytes(4, "little")


def subfield(si: bytes, data: bytes) -> bytes:
    return si + len(data).to_bytes(2, "little") + data


def deflate_raw(data: bytes, *, level: int = 6, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> bytes:
    z = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 8, strategy)
    return z.compress(data) + z.flush()


def with_body(body: bytes, data: bytes) -> bytes:
    """A plain gzip header, a raw deflate ``body`` and the trailer for ``data``."""
    return (b"\x1f\x8b\x08\x00" + bytes(4) + b"\x00\xff" + body
            + zlib.crc32(data).to_bytes(4, "little") + len(data).to_bytes(4, "little"))


# -- the file's readers: bytes read, blocking -------------------------------------------------

class ReadMeter:
    """A ``tick`` that records how far into ``path`` the reader is each time it is called
    (the file offset of its open descriptor, from /proc), so a test can bound the bytes
    read before a refusal without timing anything."""

    def __init__(self, path: Path) -> None:
        self.path = os.path.realpath(path)
        self.calls = 0
        self.positions: list[int] = []

    def __call__(self) -> None:
        self.calls += 1
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") != self.path:
                    continue
                with open(f"/proc/self/fdinfo/{fd}") as info:
                    self.positions.append(int(info.readline().split()[1]))
            except (OSError, ValueError):
                continue

    @property
    def most(self) -> int:
        return max(self.positions, default=0)


def returns_within(fn: Callable[[], object], fifo: Path, seconds: float = 10.0) -> object:
    """``fn()``'s result or exception; fails (instead of hanging) if it blocks on ``fifo``."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # let the blocked reader go
        os.close(fd)
        t.join(10)
        pytest.fail(f"blocked on the fifo {fifo} for {seconds} s")
    return outcome.get("error", outcome.get("value"))


# -- a signed bundle and its gzip forms ----------------------------------------------------------

@dataclass(frozen=True)
class Signed:
    raw: bytes  # the uncompressed tar
    trust: TrustStore
    key: KeyPair
    src: Path
    tmp: Path


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Signed:
    tmp = tmp_path_factory.mktemp("hostile")
    src = make_source(tmp / "src")
    key = make_key(tmp / "key")
    good = build_bundle(src, tmp / "good.zmb", [key], 1)
    return Signed(good.read_bytes(), TrustStore.load(trust_dir(tmp / "trust", key)), key, src,
                  tmp)


def attempt(signed: Signed, data: bytes, where: Path) -> BundleRejected | dict[str, bytes]:
    """Verify ``data`` as a bundle: the refusal, or every extracted file's bytes (which
    must then be the source's). Any other exception fails the test."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / "b.zmb"
    path.write_bytes(data)
    out = where / "payload"
    try:
        try:
            vb = verify_bundle(path, signed.trust, extract_to=out, caps=Caps())
        except BundleRejected as exc:
            assert not out.exists() or list(out.iterdir()) == []
            return exc
        files = {f.path: (out / f.path).read_bytes() for f in vb.manifest.files}
        for rel, data_ in files.items():
            assert data_ == (signed.src / rel).read_bytes(), rel
        return files
    finally:
        shutil.rmtree(out, ignore_errors=True)
        path.unlink()


def signed_with_extra(signed: Signed, out: Path, size: int, *, gz: bool = False) -> Path:
    """The signed bundle with an unlisted member of ``size`` random bytes at the end:
    manifest and signatures unchanged, so it passes a signature check, and fails
    verification only when the extra member is reached."""
    items = members(signed.raw)
    if size:
        items.append(RawMember("checks/extra.yaml", os.urandom(size)))
    raw = tar_bytes(items)
    out.write_bytes(gz_member(raw, level=1) if gz else raw)
    return out


def refused(result: object, kind: str = "malformed", text: str = "") -> BundleRejected:
    assert isinstance(result, BundleRejected), f"accepted: {result!r}"[:300]
    assert result.kind == kind, result.message
    assert text in result.message, result.message
    return result


# -- 1. gzip, explicit cases -------------------------------------------------------------------

GzCase = Callable[[bytes], bytes]
GZ_OK: dict[str, GzCase] = {
    "plain": lambda raw: gz_member(raw),
    "python gzip.compress": lambda raw: gzip.compress(raw),
    "stored (level 0)": lambda raw: gz_member(raw, level=0),
    "every optional field, header CRC": lambda raw: gz_member(
        raw, flags=FHCRC | FTEXT, extra=subfield(b"AB", b"xyz") + subfield(b"CD", b""),
        name=b"bundle.zmb", comment=b"release 7"),
    "file name of 1023 bytes (at the cap)": lambda raw: gz_member(
        raw, name=b"n" * (GZIP_FIELD_CAP - 1)),
    "extra field of 65535 bytes": lambda raw: gz_member(raw, extra=subfield(b"AB", bytes(65531))),
    "zero padding after the member, at the cap": lambda raw: gz_member(raw) + bytes(MAX_TRAILER),
    "fixed Huffman (9 bits for some bytes)": lambda raw: with_body(
        deflate_raw(raw, strategy=zlib.Z_FIXED), raw),
}

GZ_BAD: dict[str, tuple[GzCase, str, str]] = {
    "two members (the bundle split in two)": (
        lambda raw: gz_member(raw[:4096]) + gz_member(raw[4096:]), "malformed",
        "a second gzip member"),
    "an empty member after the bundle": (
        lambda raw: gz_member(raw) + EMPTY_MEMBER, "malformed", "a second gzip member"),
    "20,000 empty members after the bundle": (
        lambda raw: gz_member(raw) + EMPTY_MEMBER * 20000, "malformed", "a second gzip member"),
    "an empty member before the bundle": (
        lambda raw: EMPTY_MEMBER + gz_member(raw), "malformed", "a second gzip member"),
    "junk after the member": (
        lambda raw: gz_member(raw) + b"junk", "malformed", "data after the gzip member"),
    "a zero then junk after the member": (
        lambda raw: gz_member(raw) + bytes(5000) + b"\x01", "malformed",
        "data after the gzip member"),
    "zero padding over the cap": (
        lambda raw: gz_member(raw) + bytes(MAX_TRAILER + 1 + 8192), "malformed",
        "zero padding"),
    "file name of 1024 bytes (over the cap)": (
        lambda raw: gz_member(raw, name=b"n" * GZIP_FIELD_CAP), "malformed",
        "file name field does not end"),
    "comment of 100 KiB": (
        lambda raw: gz_member(raw, comment=b"c" * 100 * 1024), "malformed",
        "comment field does not end"),
    "file name never ends (file ends)": (
        lambda raw: b"\x1f\x8b\x08\x08" + bytes(6) + b"name", "malformed",
        "inside its file name field"),
    "extra field longer than the file": (
        lambda raw: b"\x1f\x8b\x08\x04" + bytes(6) + b"\xff\xff" + b"x" * 100, "malformed",
        "inside its extra field"),
    "extra subfield longer than the extra field": (
        lambda raw: gz_member(raw, extra=b"AB\x10\x00" + b"x" * 4), "malformed",
        "subfield is longer"),
    "extra field ends inside a subfield header": (
        lambda raw: gz_member(raw, extra=b"AB\x00"), "malformed", "inside a subfield header"),
    "header CRC wrong": (
        lambda raw: gz_member(raw, flags=FHCRC, name=b"x", hcrc_xor=0x1234), "malformed",
        "header CRC"),
    "CRC32 wrong": (lambda raw: gz_member(raw, crc=zlib.crc32(raw) ^ 1), "malformed", "CRC32"),
    "ISIZE wrong": (lambda raw: gz_member(raw, isize=len(raw) + 1), "malformed", "ISIZE"),
    "reserved flag 0x20": (lambda raw: gz_member(raw, flags=0x20), "malformed", "reserved"),
    "reserved flag 0x40": (lambda raw: gz_member(raw, flags=0x40), "malformed", "reserved"),
    "reserved flag 0x80": (lambda raw: gz_member(raw, flags=0x80), "malformed", "reserved"),
    "compression method 7": (lambda raw: gz_member(raw, method=7), "malformed", "method 7"),
    "truncated inside the header": (lambda raw: gz_member(raw)[:7], "malformed", "header"),
    "truncated inside the trailer": (lambda raw: gz_member(raw)[:-3], "malformed", "trailer"),
    "truncated inside the deflate data": (
        lambda raw: gz_member(raw)[:200], "malformed", "truncated"),
    "corrupt deflate data": (
        lambda raw: with_body(b"\xff" * 64, raw), "malformed", "corrupt"),
    "only empty members": (lambda raw: EMPTY_MEMBER * 1000, "malformed", "a second gzip member"),
}


@pytest.mark.parametrize("name", list(GZ_OK))
def test_gzip_forms_that_are_accepted(signed: Signed, tmp_path: Path, name: str) -> None:
    result = attempt(signed, GZ_OK[name](signed.raw), tmp_path)
    assert not isinstance(result, BundleRejected), result.message
    assert set(result) == set(DEFAULT_FILES) | {"bundle.yaml"}


@pytest.mark.parametrize("name", list(GZ_BAD))
def test_gzip_forms_that_are_refused(signed: Signed, tmp_path: Path, name: str) -> None:
    make, kind, text = GZ_BAD[name]
    refused(attempt(signed, make(signed.raw), tmp_path), kind, text)


def test_members_of_a_whole_number_of_blocks_in_a_gzip_bundle(signed: Signed,
                                                               tmp_path: Path) -> None:
    """Members of 512 and 1024 bytes have no padding: the reader asks the gzip layer for
    0 bytes, which must be 0 bytes (zlib reads max_length 0 as "no limit")."""
    post = DEFAULT_FILES["checks/post.yaml"]
    spec = DEFAULT_FILES["schema/database.yaml"]
    files = {**DEFAULT_FILES,  # valid files (build lints them), padded by a comment
             "checks/post.yaml": post + "#" + "x" * (512 - len(post) - 2) + "\n",
             "schema/database.yaml": spec + "#" + "x" * (1024 - len(spec) - 2) + "\n"}
    src = make_source(tmp_path / "src", files)
    assert (src / "checks/post.yaml").stat().st_size == 512
    raw = build_bundle(src, tmp_path / "b.zmb", [signed.key], 1).read_bytes()
    for data in (raw, gz_member(raw), gz_member(raw, level=0)):
        result = attempt(Signed(raw, signed.trust, signed.key, src, tmp_path), data,
                         tmp_path / "p")
        assert not isinstance(result, BundleRejected), result.message


# -- 1. gzip: bounded work ---------------------------------------------------------------------

@contextlib.contextmanager
def bytes_read() -> Iterator[list[int]]:
    """How many bytes this process reads inside the block (``rchar`` of /proc/self/io:
    every read(2), from the page cache or not), in the list's one item."""
    def rchar() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

    box = [0]
    before = rchar()
    try:
        yield box
    finally:
        box[0] = rchar() - before


def _read_before_refusal(path: Path, data: bytes) -> tuple[BundleRejected, ReadMeter, int]:
    path.write_bytes(data)
    meter = ReadMeter(path)
    with pytest.raises(BundleRejected) as info, bytes_read() as read:
        open_bundle(path, Caps(), meter)
    return info.value, meter, read[0]


PREFIXES: dict[str, tuple[Callable[[], bytes], int]] = {
    # 16 MB of empty members: refused at the second one
    "empty members": (lambda: EMPTY_MEMBER * (16 * MIB // len(EMPTY_MEMBER)), 128 * 1024),
    "a comment that never ends": (lambda: b"\x1f\x8b\x08\x10" + bytes(6) + b"c" * 16 * MIB,
                                  128 * 1024),
    "a file name that never ends": (lambda: b"\x1f\x8b\x08\x08" + bytes(6) + b"n" * 16 * MIB,
                                    128 * 1024),
    # deflate blocks that inflate to nothing: stored (5 bytes each), fixed (10 bits each)
    "empty stored blocks": (lambda: b"\x1f\x8b\x08\x00" + bytes(6)
                            + b"\x00\x00\x00\xff\xff" * 3_000_000, GZIP_SLACK + 2 * GZIP_IN),
    "empty fixed blocks": (lambda: b"\x1f\x8b\x08\x00" + bytes(6)
                           + b"\x02\x08\x20\x80\x00" * 3_000_000, GZIP_SLACK + 2 * GZIP_IN),
}


@pytest.mark.parametrize("name", list(PREFIXES))
def test_gzip_refusal_reads_a_bounded_prefix(tmp_path: Path, name: str) -> None:
    """The refusal comes after at most ``bound`` bytes of a 15-16 MB file (the old reader
    went through the whole file first: 346 MB of empty members starved the watchdog)."""
    make, bound = PREFIXES[name]
    exc, meter, read = _read_before_refusal(tmp_path / "b.zmb", make())
    assert exc.kind == "malformed"
    assert read <= bound, (read, exc.message)
    assert meter.calls > 0 and meter.most <= bound  # and the caller heard from the reader


def test_gzip_input_is_read_in_bounded_steps_with_a_tick_before_each(
        signed: Signed, tmp_path: Path) -> None:
    """An incompressible 8 MiB payload: ticks come at least every ``GZIP_IN`` compressed
    bytes (plus the 8 KiB the buffered file reads ahead) through the whole extraction."""
    src = make_source(tmp_path / "src", {**DEFAULT_FILES, "checks/noise.yaml":
                                         "# " + os.urandom(4 * MIB).hex() + "\n"})
    raw = build_bundle(src, tmp_path / "b.zmb", [signed.key], 1).read_bytes()
    path = tmp_path / "b.zmb.gz"
    path.write_bytes(gz_member(raw, level=1))
    meter = ReadMeter(path)
    manifest = Manifest.from_json(open_bundle(path, Caps(), meter)[0])
    extract_payload(path, manifest, tmp_path / "out", Caps(), meter)
    steps = [b - a for a, b in zip(meter.positions, meter.positions[1:], strict=False)]
    assert meter.positions[-1] == path.stat().st_size
    assert max(steps) <= GZIP_IN + 8192, max(steps)


def test_expansion_bound_counts_only_padding(tmp_path: Path) -> None:
    """The 9/8 bound does not refuse the worst real coding: 4 MiB of bytes 0x90-0xff
    in fixed Huffman blocks (9 bits each) inflate, and so does a stored stream."""
    data = bytes(0x90 + b % 112 for b in os.urandom(4 * MIB))  # literals, few matches
    for body in (deflate_raw(data, strategy=zlib.Z_FIXED), deflate_raw(data, level=0)):
        assert len(body) > len(data)
        f = tmp_path / "x.gz"
        f.write_bytes(with_body(body, data))
        with open(f, "rb") as fh:
            out = _inflate_all(archive._Gunzip(archive._Input(fh, None), 8 * MIB))
        assert out == data


def _inflate_all(gz: archive._Gunzip) -> bytes:
    out = []
    while chunk := gz.read(MIB):
        out.append(chunk)
    return b"".join(out)


def test_a_gzip_bomb_in_one_member_is_refused_within_the_read_limit(tmp_path: Path) -> None:
    """Zeros that inflate past the read limit: too-large, after reading about
    read_limit / 1000 compressed bytes (deflate's best ratio)."""
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = z.compress(bytes(16 * MIB)) + z.flush(zlib.Z_FULL_FLUSH)
    caps = Caps(max_total_bytes=32 * MIB, max_members=10)
    gz = archive._Gunzip(archive._Input(_BytesReader(with_body(zeros * 8, b"")), None),
                         caps.read_limit)
    with pytest.raises(BundleRejected) as info:
        _inflate_all(gz)
    assert info.value.kind == "too-large"


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, n: int) -> bytes:
        chunk = bytes(self._data[self._pos:self._pos + n])
        self._pos += len(chunk)
        return chunk


# -- 1. gzip and tar: properties ---------------------------------------------------------------

_field = st.one_of(st.binary(max_size=40), st.binary(min_size=GZIP_FIELD_CAP - 8,
                                                     max_size=GZIP_FIELD_CAP + 8)
                   ).map(lambda b: b.replace(b"\x00", b"a"))
_subfields = st.lists(st.tuples(st.binary(min_size=2, max_size=2), st.binary(max_size=40)),
                      max_size=4)


@settings(max_examples=150, deadline=DEADLINE, suppress_health_check=HOSTILE)
@given(flags=st.one_of(st.integers(0, 0x1F), st.integers(0, 255)), name=_field,
       comment=_field, subs=_subfields,
       extra_junk=st.binary(max_size=3), hcrc_ok=st.booleans(), level=st.integers(0, 9),
       mtime=st.binary(min_size=4, max_size=4), xfl_os=st.binary(min_size=2, max_size=2),
       padding=st.one_of(st.just(0), st.integers(0, MAX_TRAILER + 10)),
       trailing=st.one_of(st.just(b""), st.binary(max_size=4)))
def test_gzip_header_fields_pass_exactly_when_valid(
        signed: Signed, tmp_path: Path, flags: int, name: bytes, comment: bytes,
        subs: list[tuple[bytes, bytes]], extra_junk: bytes, hcrc_ok: bool, level: int,
        mtime: bytes, xfl_os: bytes, padding: int, trailing: bytes) -> None:
    """Random header flags and fields, padding and trailing bytes: accepted with the
    original content exactly when the header is in the accepted subset and only up to
    ``MAX_TRAILER`` zeros follow; refused (``BundleRejected``) otherwise."""
    extra = b"".join(subfield(si, data) for si, data in subs) + extra_junk
    data = gz_member(signed.raw, flags=flags, extra=extra if flags & FEXTRA else None,
                     name=name if flags & FNAME else None,
                     comment=comment if flags & FCOMMENT else None,
                     hcrc_xor=0 if hcrc_ok else 0x0101,
                     level=level, mtime=mtime, xfl_os=xfl_os)
    tail = bytes(padding) + trailing
    valid = (not flags & 0xE0
             and not (flags & FEXTRA and extra_junk)
             and not (flags & FNAME and len(name) >= GZIP_FIELD_CAP)
             and not (flags & FCOMMENT and len(comment) >= GZIP_FIELD_CAP)
             and not (flags & FHCRC and not hcrc_ok)
             and tail.count(0) == len(tail) and len(tail) <= MAX_TRAILER)
    event("valid" if valid else "invalid")
    result = attempt(signed, data + tail, tmp_path / "p")
    if valid:
        assert not isinstance(result, BundleRejected), result.message
    else:
        assert isinstance(result, BundleRejected)


@settings(max_examples=100, deadline=DEADLINE, suppress_health_check=HOSTILE)
@given(data=st.data())
def test_every_truncation_of_a_gzip_bundle_is_refused(signed: Signed, tmp_path: Path,
                                                      data: st.DataObject) -> None:
    gz = gz_member(signed.raw, flags=FHCRC, extra=subfield(b"AB", b"1"), name=b"b.zmb",
                   comment=b"c")
    cut = data.draw(st.integers(0, len(gz) - 1), label="cut")
    refused(attempt(signed, gz[:cut], tmp_path / "p"))


@settings(max_examples=60, deadline=DEADLINE, suppress_health_check=HOSTILE)
@given(data=st.data())
def test_concatenated_members_are_refused(signed: Signed, tmp_path: Path,
                                          data: st.DataObject) -> None:
    """The bundle in 2-5 members at random split points, with empty members anywhere."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(signed.raw)), min_size=1, max_size=4),
                            label="cuts"))
    pieces = [signed.raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(signed.raw)],
                                              strict=True)]
    out = b"".join(gz_member(p, level=data.draw(st.integers(0, 9))) for p in pieces)
    refused(attempt(signed, out, tmp_path / "p"), "malformed", "")


@settings(max_examples=100, deadline=DEADLINE, suppress_health_check=HOSTILE)
@given(data=st.data())
def test_changed_bytes_in_a_gzip_bundle_with_every_header_field(
        signed: Signed, tmp_path: Path, data: st.DataObject) -> None:
    """1-3 changed bytes anywhere: refused, or accepted with identical content (the
    only uninterpreted bytes are MTIME, XFL, OS, the FTEXT flag, and unused bits of the
    last deflate byte)."""
    gz = bytearray(gz_member(signed.raw, flags=FHCRC, extra=subfield(b"AB", b"12"),
                             name=b"b.zmb", comment=b"release"))
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        gz[data.draw(st.integers(0, len(gz) - 1), label="offset")] ^= data.draw(
            st.integers(1, 255), label="xor")
    attempt(signed, bytes(gz), tmp_path / "p")  # asserts identical content if accepted


_TYPES = st.sampled_from([b"0", b"\x00", b"1", b"2", b"3", b"5", b"6", b"7", b"x", b"g", b"L"])
_NAMES = st.sampled_from(["manifest.json", "signatures.json", "bundle.yaml", "a/../b", "/etc",
                          "x" * 99, "checks/post.yaml", "", "a//b"])


@settings(max_examples=100, deadline=DEADLINE, suppress_health_check=HOSTILE)
@given(items=st.lists(st.tuples(_NAMES, _TYPES, st.integers(0, 8 * 1024**3 - 1),
                                st.binary(max_size=600)), max_size=6),
       keep_real=st.integers(0, 2))
def test_random_tar_structure_is_refused_cheaply(signed: Signed, tmp_path: Path,
                                                 items: list, keep_real: int) -> None:
    """Random members (any type, declared sizes up to 8 GiB) after 0-2 of the real
    members, plain and gzipped: refused with a BundleRejected, after reading at most the
    caps (never the declared sizes)."""
    real = members(signed.raw)[:keep_real]
    fake = [RawMember(n, d, type=t, size=s) for n, t, s, d in items]
    raw = tar_bytes([*real, *fake])
    for data in (raw, gz_member(raw, level=1)):
        path = tmp_path / "t.zmb"
        path.write_bytes(data)
        meter = ReadMeter(path)
        try:
            manifest = Manifest.from_json(open_bundle(path, Caps(), meter)[0])
            extract_payload(path, manifest, None, Caps(), meter)
        except BundleRejected:
            pass
        else:
            pytest.fail("an archive without the signed payload passed")
        assert meter.most <= len(data)


# -- 2. the file itself ------------------------------------------------------------------------

def _readers(tmp_path: Path) -> dict[str, Callable[[Path], object]]:
    return {"open_bundle": lambda p: open_bundle(p, Caps()),
            "private_copy": lambda p: private_copy(p, tmp_path / "work")}


@pytest.mark.parametrize("reader", ["open_bundle", "private_copy"])
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, reader: str) -> None:
    fifo = tmp_path / "b.zmb"
    os.mkfifo(fifo)
    result = returns_within(lambda: _readers(tmp_path)[reader](fifo), fifo)
    refused(result, "malformed", "is a fifo")


@pytest.mark.parametrize("reader", ["open_bundle", "private_copy"])
def test_a_fifo_swapped_in_after_the_lstat_is_refused_without_blocking(
        signed: Signed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str) -> None:
    """The inbox race: lstat sees the regular file, then a fifo is renamed over it before
    the open. O_NONBLOCK makes the open return, fstat sees the fifo."""
    path = tmp_path / "b.zmb"
    path.write_bytes(signed.raw)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    real_lstat = os.lstat

    def lstat_then_swap(p: object, *a: object, **kw: object) -> os.stat_result:
        st_ = real_lstat(p, *a, **kw)  # type: ignore[arg-type]
        if Path(str(p)) == path:
            os.rename(fifo, path)
        return st_

    monkeypatch.setattr(archive.os, "lstat", lstat_then_swap)
    result = returns_within(lambda: _readers(tmp_path)[reader](path), path)
    refused(result, "malformed", "is a fifo")


@pytest.mark.parametrize("reader", ["open_bundle", "private_copy"])
def test_a_symlink_is_refused(signed: Signed, tmp_path: Path, reader: str) -> None:
    real = tmp_path / "real.zmb"
    real.write_bytes(signed.raw)
    (tmp_path / "link.zmb").symlink_to(real)
    refused(_call(lambda: _readers(tmp_path)[reader](tmp_path / "link.zmb")), "malformed",
            "symlink")


@pytest.mark.parametrize("reader", ["open_bundle", "private_copy"])
@pytest.mark.parametrize("what", ["a directory", "a character device"])
def test_a_directory_or_device_is_refused(tmp_path: Path, reader: str, what: str) -> None:
    path = tmp_path / "d" if what == "a directory" else Path("/dev/null")
    path.mkdir(exist_ok=True) if what == "a directory" else None
    refused(_call(lambda: _readers(tmp_path)[reader](path)), "malformed", f"is {what}")


@pytest.mark.parametrize("reader", ["open_bundle", "private_copy"])
def test_a_vanished_file_is_named_missing(tmp_path: Path, reader: str) -> None:
    refused(_call(lambda: _readers(tmp_path)[reader](tmp_path / "gone.zmb")), "malformed",
            "is missing")


def _call(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except MigrateError as exc:
        return exc


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "zmonitor_migrated.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_bundle_verify_of_a_fifo_is_refused_without_blocking(signed: Signed,
                                                                tmp_path: Path) -> None:
    """The argument check (exit 2, the argument named) sees the FIFO before the archive
    layer would (which refuses it as malformed without blocking, tested above)."""
    fifo = tmp_path / "b.zmb"
    os.mkfifo(fifo)
    config = write_config(tmp_path / "c.yaml", trust_dir=signed.tmp / "trust")
    try:
        proc = _cli("--config", str(config), "bundle", "verify", str(fifo), "--json",
                    timeout=30)
    except subprocess.TimeoutExpired:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("zmonitor-migrate bundle verify FIFO blocked")
    assert proc.returncode == 2, proc.stderr
    assert "BUNDLE" in proc.stdout + proc.stderr
    assert "not a regular file" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


# -- 3. the disk -------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[Path, int], Path]]:
    made: list[Path] = []
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")

    def mount(path: Path, size_kib: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                               str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
        made.append(path)
        return path

    try:
        yield mount
    finally:
        for m in reversed(made):
            subprocess.run(["umount", "-l", str(m)], check=False)


def test_private_copy_larger_than_the_free_space_is_refused_before_copying(
        tmp_path: Path, tmpfs: Callable[[Path, int], Path]) -> None:
    dest = tmpfs(tmp_path / "state", 8 * 1024)
    big = tmp_path / "big.zmb"
    big.write_bytes(os.urandom(10 * MIB))
    meter = ReadMeter(big)
    with pytest.raises(PrecheckFailed) as info:
        private_copy(big, dest / "runs" / "r1", tick=meter)
    assert (info.value.kind, info.value.exit_code) == ("disk-space", 4)
    assert "not enough free space" in info.value.message
    assert meter.most == 0  # not a byte read, let alone written
    assert list((dest / "runs" / "r1").iterdir()) == []


def test_a_disk_that_fills_during_the_copy_leaves_nothing(
        tmp_path: Path, tmpfs: Callable[[Path, int], Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The free-space check passed, then another writer took the space (simulated by a
    check that lets everything through): ENOSPC is the same typed error, no temp file."""
    dest = tmpfs(tmp_path / "state", 8 * 1024)
    big = tmp_path / "big.zmb"
    big.write_bytes(os.urandom(10 * MIB))
    monkeypatch.setattr(bundle_mod, "check_free_space", lambda *a: None)
    with pytest.raises(PrecheckFailed) as info:
        private_copy(big, dest)
    assert info.value.kind == "disk-space"
    assert list(dest.iterdir()) == []


def _big_payload_bundle(signed: Signed, tmp_path: Path) -> Path:
    src = make_source(tmp_path / "bigsrc", {**DEFAULT_FILES, "checks/noise.yaml":
                                            "# " + "x" * (4 * MIB) + "\n"})
    return build_bundle(src, tmp_path / "big.zmb", [signed.key], 1)


def test_extraction_larger_than_the_free_space_is_refused_before_writing(
        signed: Signed, tmp_path: Path, tmpfs: Callable[[Path, int], Path]) -> None:
    bundle = _big_payload_bundle(signed, tmp_path)
    dest = tmpfs(tmp_path / "state", 2 * 1024)
    manifest = Manifest.from_json(open_bundle(bundle, Caps())[0])
    meter = ReadMeter(bundle)
    with pytest.raises(PrecheckFailed) as info:
        extract_payload(bundle, manifest, dest / "payload", Caps(), meter)
    assert info.value.kind == "disk-space" and info.value.exit_code == 4
    assert meter.calls == 0  # refused before the bundle was opened, nothing written
    assert list((dest / "payload").iterdir()) == []


def test_a_disk_that_fills_during_the_extraction_leaves_nothing(
        signed: Signed, tmp_path: Path, tmpfs: Callable[[Path, int], Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _big_payload_bundle(signed, tmp_path)
    dest = tmpfs(tmp_path / "state", 2 * 1024)
    monkeypatch.setattr(archive, "check_free_space", lambda *a: None)
    with pytest.raises(PrecheckFailed) as info:
        verify_bundle(bundle, signed.trust, extract_to=dest / "payload", caps=Caps())
    assert info.value.kind == "disk-space"
    assert list((dest / "payload").iterdir()) == []


def test_apply_of_a_bundle_bigger_than_the_state_dir_exits_4_and_touches_nothing(
        signed: Signed, tmp_path: Path, tmpfs: Callable[[Path, int], Path]) -> None:
    """The whole command: exit 4 [disk-space] with one JSON object, no traceback, the
    database's bytes unchanged, nothing left in the state dir's run directories."""
    state = tmpfs(tmp_path / "state", 8 * 1024)
    (tmp_path / "data").mkdir()
    db = make_db(tmp_path / "data" / "zmonitor.db")
    before = db.read_bytes()
    config = write_config(tmp_path / "c.yaml", database=db, state_dir=state,
                          runtime_dir=tmp_path / "run", inbox=tmp_path / "inbox",
                          backup_dir=tmp_path / "backups", trust_dir=signed.tmp / "trust",
                          app_unit=None)
    big = signed_with_extra(signed, tmp_path / "big.zmb", 10 * MIB)  # passes the early check
    proc = _cli("--config", str(config), "apply", str(big), "--json")
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    error = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert error["kind"] == "disk-space", error
    assert "Traceback" not in proc.stderr
    assert db.read_bytes() == before
    runs = state / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


# -- 4. the heartbeat --------------------------------------------------------------------------

class CountingReporter(Reporter):
    """Records every heartbeat the run asks for (no rate limit), and through ``meter``
    how far into the incoming file the reader is at each."""

    def __init__(self, meter: ReadMeter) -> None:
        super().__init__([])
        self.log: list[str] = []
        self.meter = meter

    def emit(self, phase: str, message: str, **fields: object):  # type: ignore[override]
        self.log.append(phase)
        return super().emit(phase, message, **fields)

    def heartbeat(self) -> None:
        self.log.append("beat")
        self.meter()


def _device_config(signed: Signed, tmp_path: Path) -> Config:
    (tmp_path / "data").mkdir()
    return Config(database=make_db(tmp_path / "data" / "zmonitor.db"),
                  state_dir=tmp_path / "state", runtime_dir=tmp_path / "run",
                  inbox=tmp_path / "inbox", backup_dir=tmp_path / "backups",
                  trust_dir=signed.tmp / "trust", app_unit=None)


def _run(command: str, config: Config, bundle: Path, reporter: Reporter) -> BundleRejected:
    with pytest.raises(BundleRejected) as info:
        if command == "apply":
            pipeline.apply(bundle, config, reporter=reporter)
        else:
            maintenance.rollback(config, to=1, source_dir=None, bundle=bundle,
                                 reporter=reporter)
    return info.value


@pytest.mark.parametrize("command", ["apply", "rollback"])
def test_the_run_heartbeat_is_fed_while_the_bundle_is_copied_and_read(
        signed: Signed, tmp_path: Path, command: str) -> None:
    """A signed bundle with an unlisted 4 MiB member: copied, then refused while it is
    extracted; the heartbeat is called all along."""
    config = _device_config(signed, tmp_path)
    bundle = signed_with_extra(signed, tmp_path / "extra.zmb", 4 * MIB)
    reporter = CountingReporter(ReadMeter(bundle))
    assert _run(command, config, bundle, reporter).kind == "unlisted-member"
    after = reporter.log[reporter.log.index("received"):]
    assert after.count("beat") >= 6, reporter.log  # 4 MiB copied in 1 MiB chunks, then read
    assert reporter.meter.most == bundle.stat().st_size  # the copy read it all


@pytest.mark.parametrize("command", ["apply", "rollback"])
@pytest.mark.parametrize("form", ["tar", "gzip"])
def test_an_unsigned_file_is_refused_before_it_is_copied(
        signed: Signed, tmp_path: Path, command: str, form: str) -> None:
    """16 MiB signed by a key the device does not trust: refused after reading the
    manifest and signatures of the incoming file, no private copy taken."""
    other = make_key(tmp_path / "other")
    src = make_source(tmp_path / "src")
    small = build_bundle(src, tmp_path / "small.zmb", [other], 1)
    signed_other = Signed(small.read_bytes(), signed.trust, other, src, tmp_path)
    bundle = signed_with_extra(signed_other, tmp_path / "unsigned.zmb", 16 * MIB,
                               gz=form == "gzip")
    config = _device_config(signed, tmp_path)
    reporter = CountingReporter(ReadMeter(bundle))
    assert _run(command, config, bundle, reporter).kind == "untrusted-key"
    assert reporter.meter.calls > 0 and reporter.meter.most <= 256 * 1024, reporter.meter.most


def test_receive_checks_signatures_before_copying(signed: Signed, tmp_path: Path) -> None:
    unsigned = tmp_path / "u.zmb"
    unsigned.write_bytes(tar_bytes([RawMember("manifest.json", b"{}"),
                                    RawMember("signatures.json", b"[]"),
                                    RawMember("x", bytes(4 * MIB))]))
    with pytest.raises(BundleRejected):
        bundle_mod.receive(unsigned, tmp_path / "work", signed.trust)
    assert not (tmp_path / "work").exists()  # refused before the copy's directory was made
    good = signed_with_extra(signed, tmp_path / "g.zmb", 0)
    copy = bundle_mod.receive(good, tmp_path / "work", signed.trust)
    assert copy.read_bytes() == good.read_bytes() and copy.parent == tmp_path / "work"
