"""The streaming tar layer of a bundle: bounded reads, no trust in any header.

A bundle file is a ustar archive, optionally gzip-compressed as a whole:
``manifest.json``, ``signatures.json``, then the payload files. This module reads it
sequentially and guarantees:

1. Every read is bounded *before* it happens: a member's declared size is checked
   against the caps (manifest <= 1 MiB, signatures <= 64 KiB) or against the signed
   manifest (payload) before a byte of its data is read, and every byte actually read
   (after decompression) is counted against a ceiling derived from the caps. A
   decompression bomb — a 2 GiB declared size, gigabytes of zeros after the end of the
   archive, a million tiny members — is refused as ``too-large`` without being unpacked.
2. Payload data is streamed in 1 MiB chunks, hashed and written as it arrives; memory
   does not grow with the bundle size.
3. Only regular files are accepted. Symlinks, hard links, devices, fifos, directories
   and pax/GNU extension headers (which could rename the next member) are
   ``unsafe-member``, as are absolute names, ``..``, ``.``, empty or non-ASCII segments,
   backslashes and a name seen twice. A safe name the manifest does not list is
   ``unlisted-member``; a listed file never seen is ``missing-member``; a size or sha256
   that differs is ``hash-mismatch``.
4. Headers are parsed strictly: the checksum must match (6 octal digits, NUL, space),
   size is 11 octal digits and a NUL (or GNU base-256, which is always too large here),
   the magic is POSIX or GNU ustar, name/prefix/linkname fields are NUL-padded, the
   data padding and everything after the end-of-archive marker are zero bytes. So no
   byte of a bundle that is interpreted can change unnoticed, and the only bytes not
   interpreted are header fields covered by the header checksum (mode, owner, times).
   Anything else unreadable is ``malformed`` (truncated, empty, random bytes, bad gzip).
5. The file itself: it is opened without following a symlink, without blocking (a fifo
   swapped in for the bundle is refused, not waited on) and only after ``lstat`` says
   it is a regular file; ``fstat`` of the open descriptor must say the same file. A
   file that vanished is ``malformed`` with a message saying it is missing.
6. gzip (RFC 1952), a strict subset read by our own reader on ``zlib`` rather than
   ``gzip.GzipFile`` (which reads the name and comment fields a byte at a time, has no
   bound on them, and silently skips any number of empty members):

   - exactly one member: after its trailer only zero bytes may follow, at most
     ``MAX_TRAILER``; a second member or any other byte is ``malformed``;
   - header: ID1 ID2 = 1f 8b, CM = 8 (deflate), no reserved FLG bit; MTIME, XFL, OS and
     FTEXT are not interpreted; FEXTRA is read in one bounded read (XLEN <= 65535) and
     its subfields must add up to XLEN; FNAME and FCOMMENT must end with a NUL within
     ``GZIP_FIELD_CAP`` bytes (read in blocks); FHCRC, if present, must match;
   - data: inflated with a bound on the output of each call, every byte counted
     against the read limit; the compressed bytes consumed may not exceed 9/8 of the
     output plus ``GZIP_SLACK`` (compressors fall back to stored blocks, 5 bytes per
     64 KiB, when coding would expand; fixed Huffman codes are at most 9 bits a byte),
     so a stream of empty or padding deflate blocks is refused after about a MiB of
     input instead of being inflated to nothing for the whole file;
   - trailer: CRC32 and ISIZE must match the inflated data.

   Every read of the file is bounded (64 KiB of compressed input at a time) and
   preceded by the ``tick`` callback, so a caller's watchdog keeps being fed.
7. Disk space: ``extract_payload`` checks the free space of the extraction directory
   against the (verified) payload sizes before writing, and a full disk while writing is
   ``PrecheckFailed`` kind ``disk-space`` (exit 4, the kind the rehearsal's space check
   uses): not the bundle's fault, nothing on the device was touched; the partial
   extraction is removed.

Why a reader of our own rather than ``tarfile.open(mode="r|*")``: ``tarfile`` reads pax
and GNU long-name headers whole into memory whatever size they declare, accepts many
legacy formats and lenient header encodings, and stream mode gives no hook to check a
declared size before the data is consumed when skipping. The format we accept is tiny
(512-byte headers, regular files only), so reading it directly is both shorter to audit
and strictly bounded. Bundles are written uncompressed (``bundle.build``) for
reproducibility; gzip is accepted for transports that compress.

Example::

    manifest_bytes, signatures_bytes = open_bundle(path, caps)
    manifest = verify.verify_manifest(manifest_bytes, signatures_bytes, trust)
    extract_payload(path, manifest, dest_dir, caps)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from .config import Config
from .errors import BundleRejected, MigrateError, PrecheckFailed
from .manifest import MAX_MANIFEST_BYTES, Manifest
from .verify import MAX_SIGNATURES_BYTES

BLOCK = 512
CHUNK = 1024 * 1024
ZERO_BLOCK = bytes(BLOCK)
Tick = Callable[[], None]  # called between bounded units of reading (a watchdog ping)
MAX_TRAILER = 64 * 1024  # zero padding allowed after the end-of-archive marker (and gzip)
GZIP_FIELD_CAP = 1024  # FNAME / FCOMMENT, terminating NUL included
GZIP_SLACK = 1024 * 1024  # compressed bytes allowed beyond 9/8 of the inflated bytes
GZIP_IN = 64 * 1024  # compressed bytes read and inflated at a time
FREE_MARGIN = 1024 * 1024  # left free for the journal, status and history writes that follow
_FEXTRA, _FNAME, _FCOMMENT, _FHCRC, _FRESERVED = 0x04, 0x08, 0x10, 0x02, 0xE0
MANIFEST_NAME = "manifest.json"
SIGNATURES_NAME = "signatures.json"

_CHKSUM = re.compile(rb"^[0-7]{6}\x00 \Z")
_OCTAL_SIZE = re.compile(rb"^[0-7]{11}\x00\Z")
_MAGICS = (b"ustar\x0000", b"ustar  \x00")
_REGULAR = (b"0", b"\x00")
_TYPE_NAMES = {b"1": "hard link", b"2": "symlink", b"3": "character device",
               b"4": "block device", b"5": "directory", b"6": "fifo",
               b"7": "contiguous file", b"x": "pax header", b"g": "pax global header",
               b"L": "GNU long name", b"K": "GNU long link name"}


@dataclass(frozen=True)
class Caps:
    max_manifest_bytes: int = MAX_MANIFEST_BYTES
    max_signatures_bytes: int = MAX_SIGNATURES_BYTES
    max_total_bytes: int = 512 * 1024 * 1024  # sum of payload sizes
    max_members: int = 10000  # including manifest.json and signatures.json

    @classmethod
    def from_config(cls, config: Config) -> Caps:
        return cls(max_total_bytes=config.max_bundle_bytes,
                   max_members=config.max_bundle_members)

    @property
    def read_limit(self) -> int:
        """Most (decompressed) bytes a bundle within the caps can hold."""
        return (self.max_manifest_bytes + self.max_signatures_bytes + self.max_total_bytes
                + (self.max_members + 2) * 2 * BLOCK + MAX_TRAILER)


def _malformed(message: str) -> BundleRejected:
    return BundleRejected(f"{message}; this is not an intact bundle (truncated, corrupt or "
                          "altered). Get the bundle again or rebuild it", kind="malformed")


def _too_large(message: str) -> BundleRejected:
    return BundleRejected(f"{message}; refused without unpacking. Raise the cap in the config "
                          "only if this bundle is genuine", kind="too-large")


def _unsafe(message: str) -> BundleRejected:
    return BundleRejected(f"{message}; bundles contain only regular files with safe relative "
                          "names. Do not use this file", kind="unsafe-member")


def _not_a_file(path: Path, what: str) -> BundleRejected:
    return BundleRejected(f"{path} is {what}, not a regular file; a bundle is a regular file. "
                          "Remove it and put the bundle file itself there (write it next to "
                          "its final name, then rename it)", kind="malformed")


def _missing(path: Path) -> BundleRejected:
    return BundleRejected(f"bundle {path} is missing: it was removed or renamed before it "
                          "could be read. Nothing was done; put it there again if it is "
                          "still wanted", kind="malformed")


def _kind_of(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "a symlink (symlinks are refused)"),
                       (stat.S_ISFIFO, "a fifo"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "a special file"


def open_regular(path: Path) -> BinaryIO:
    """Open an incoming file for reading, only if it is a regular file.

    ``lstat`` first, so a device is never opened (opening one can have effects); then
    O_NOFOLLOW (a symlink swapped in is refused) and O_NONBLOCK (a fifo swapped in does
    not block the open); ``fstat`` of the descriptor must be the same regular file,
    before any read. Blocking mode is restored for the (regular) file."""
    path = Path(path)
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        raise _missing(path) from None
    except OSError as exc:
        raise BundleRejected(f"cannot read bundle {path}: {exc.strerror}",
                             kind="malformed") from None
    if not stat.S_ISREG(before.st_mode):
        raise _not_a_file(path, _kind_of(before.st_mode))
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _missing(path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _not_a_file(path, _kind_of(stat.S_IFLNK)) from None
        raise BundleRejected(f"cannot open bundle {path}: {exc.strerror}",
                             kind="malformed") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_a_file(path, _kind_of(st.st_mode))
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise BundleRejected(f"{path} was replaced while it was being opened; put the "
                                 "bundle in place with a single rename and retry",
                                 kind="malformed")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def no_space(directory: Path, needed: int | None = None,
             free: int | None = None) -> PrecheckFailed:
    """A full filesystem under the state directory: not the bundle's fault."""
    detail = "" if needed is None else f"; {needed} bytes needed"
    detail += "" if free is None else f", {free} free"
    return PrecheckFailed(f"not enough free space in {directory}{detail}. Nothing was "
                          "changed on the device; free space there (or raise the disk) and "
                          "retry the same bundle", kind="disk-space")


def check_free_space(directory: Path, sizes: Iterable[int]) -> None:
    """Refuse before writing files of ``sizes`` into ``directory`` if they cannot fit
    (each rounded up to the filesystem's block size) with ``FREE_MARGIN`` to spare."""
    vfs = os.statvfs(directory)
    block = max(vfs.f_frsize, 1)
    needed = sum(-(-size // block) * block for size in sizes) + FREE_MARGIN
    free = vfs.f_bavail * block
    if needed > free:
        raise no_space(Path(directory), needed, free)


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class _Reader(Protocol):
    def read(self, n: int, /) -> bytes: ...


class _Input:
    """The raw bytes of a gzip bundle: bounded reads with a tick before each, and a
    push-back buffer (the header is read in blocks, so a block may hold the start of the
    deflate data, and the inflater hands back what follows the deflate stream)."""

    def __init__(self, f: BinaryIO, tick: Tick | None) -> None:
        self._f = f
        self._tick = tick
        self._buf = b""

    def chunk(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" only at the end of the file."""
        if self._buf:
            data, self._buf = self._buf[:n], self._buf[n:]
            return data
        if self._tick is not None:
            self._tick()
        try:
            return self._f.read(n)
        except OSError as exc:
            raise _malformed(f"the bundle cannot be read ({exc.strerror})") from None

    def unread(self, data: bytes) -> None:
        self._buf = data + self._buf

    def exact(self, n: int, what: str) -> bytes:
        data = self.chunk(n)
        while len(data) < n:
            more = self.chunk(n - len(data))
            if not more:
                raise _malformed(f"the gzip data ends inside its {what} (truncated)")
            data += more
        return data

    def until_nul(self, cap: int, what: str) -> bytes:
        """A NUL-terminated field of at most ``cap`` bytes (NUL included)."""
        field = b""
        while len(field) < cap:
            block = self.chunk(min(256, cap - len(field)))
            if not block:
                raise _malformed(f"the gzip data ends inside its {what} field (truncated)")
            end = block.find(b"\x00")
            if end >= 0:
                self.unread(block[end + 1:])
                return field + block[:end + 1]
            field += block
        raise _malformed(f"the gzip {what} field does not end within {cap} bytes")


def _gzip_extra(extra: bytes) -> None:
    """FEXTRA subfields (SI1 SI2 LEN data) must exactly fill the field."""
    pos = 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            raise _malformed("the gzip extra field ends inside a subfield header")
        pos += 4 + int.from_bytes(extra[pos + 2:pos + 4], "little")
        if pos > len(extra):
            raise _malformed("a gzip extra subfield is longer than the extra field")


def _gzip_header(raw: _Input) -> None:
    head = raw.exact(10, "header")
    if head[:2] != b"\x1f\x8b":
        raise _malformed("the gzip magic is wrong")
    if head[2] != 8:
        raise _malformed(f"gzip compression method {head[2]} is not deflate (8)")
    flags = head[3]
    if flags & _FRESERVED:
        raise _malformed(f"the gzip header sets reserved flag bits ({flags:#04x})")
    seen = head
    if flags & _FEXTRA:
        xlen = raw.exact(2, "extra field length")
        extra = raw.exact(int.from_bytes(xlen, "little"), "extra field")
        _gzip_extra(extra)
        seen += xlen + extra
    if flags & _FNAME:
        seen += raw.until_nul(GZIP_FIELD_CAP, "file name")
    if flags & _FCOMMENT:
        seen += raw.until_nul(GZIP_FIELD_CAP, "comment")
    if flags & _FHCRC:
        crc16 = int.from_bytes(raw.exact(2, "header CRC"), "little")
        if crc16 != zlib.crc32(seen) & 0xFFFF:
            raise _malformed("the gzip header CRC does not match the header")


class _Gunzip:
    """Exactly one gzip member, strictly and with bounded work (see the module docstring).
    ``read(n)`` returns 1 to n bytes, or b"" once the member, its trailer and the zero
    padding after it have been checked."""

    def __init__(self, raw: _Input, limit: int) -> None:
        self._in = raw
        self._limit = limit
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._crc = 0
        self._size = 0  # inflated bytes
        self._fed = 0  # compressed bytes the inflater consumed
        self._done = False  # the deflate stream ended
        self._checked = False  # trailer and padding checked
        _gzip_header(raw)

    def read(self, n: int) -> bytes:
        if n <= 0:
            return b""  # zlib's max_length 0 means no limit
        while not self._done:
            data = self._z.unconsumed_tail or self._in.chunk(GZIP_IN)
            try:
                out = self._z.decompress(data, n)
            except zlib.error as exc:
                raise _malformed(f"the gzip data is corrupt ({exc})") from None
            self._fed += len(data) - len(self._z.unconsumed_tail) - len(self._z.unused_data)
            self._count(out)
            if self._z.eof:
                self._done = True
                self._in.unread(self._z.unused_data)
            elif not out and not data:
                raise _malformed("the gzip data ends before its deflate stream does "
                                 "(truncated)")
            if out:
                return out  # the trailer is checked when the reader asks for more
        if not self._checked:
            self._checked = True
            self._trailer()
        return b""

    def _count(self, out: bytes) -> None:
        self._crc = zlib.crc32(out, self._crc)
        self._size += len(out)
        if self._size > self._limit:
            raise _too_large(f"the gzip data inflates to more than {self._limit} bytes, more "
                             "than any bundle within the configured caps")
        if self._fed > GZIP_SLACK + self._size + self._size // 8:
            raise _malformed(f"{self._fed} bytes of gzip data inflate to only {self._size} "
                             "bytes (empty or padding deflate blocks; no compressor writes "
                             "that)")

    def _trailer(self) -> None:
        trailer = self._in.exact(8, "trailer (CRC32 and length)")
        if int.from_bytes(trailer[:4], "little") != self._crc:
            raise _malformed("the gzip CRC32 does not match the inflated data")
        if int.from_bytes(trailer[4:], "little") != self._size & 0xFFFFFFFF:
            raise _malformed("the gzip length field (ISIZE) does not match the inflated data")
        seen = 0
        while data := self._in.chunk(BLOCK * 16):
            rest = data.lstrip(b"\x00")
            if rest:
                head = rest[:2] if len(rest) >= 2 else rest + self._in.chunk(1)
                raise _malformed("a second gzip member follows the first; only a single gzip "
                                 "member is accepted (compress the bundle in one go)"
                                 if head == b"\x1f\x8b" else
                                 "data after the gzip member (only zero padding may follow)")
            seen += len(data)
            if seen > MAX_TRAILER:
                raise _malformed(f"more than {MAX_TRAILER} bytes of zero padding follow the "
                                 "gzip member")


class _Stream:
    """Exact-length reads from the (gunzipped) archive, counting every byte read."""

    def __init__(self, f: _Reader, limit: int, tick: Tick | None = None) -> None:
        self._f = f
        self._limit = limit
        self._tick = tick
        self.offset = 0

    def _raw(self, n: int) -> bytes:
        if self._tick is not None:
            self._tick()  # every read is bounded, so the caller hears from us between them
        try:
            return self._f.read(n)
        except (OSError, EOFError, zlib.error) as exc:
            raise _malformed(f"the archive cannot be read ({exc})") from None

    def read(self, n: int) -> bytes:
        if self.offset + n > self._limit:
            raise _too_large(f"the archive holds more than {self._limit} bytes, more than any "
                             "bundle within the configured caps")
        data = self._raw(n)
        while len(data) < n:  # a short read is not yet end of file for every reader
            more = self._raw(n - len(data))
            if not more:
                raise _malformed(f"the archive ends after {self.offset + len(data)} bytes, in "
                                 "the middle of a member (truncated)")
            data += more
        self.offset += n
        return data

    def read_trailer(self) -> None:
        """After the end-of-archive marker only zero padding may follow, and not much."""
        seen = 0
        while data := self._raw(BLOCK * 16):
            if data.count(0) != len(data):
                raise _malformed("data follows the end-of-archive marker")
            seen += len(data)
            self.offset += len(data)
            if seen > MAX_TRAILER:
                raise _too_large(f"more than {MAX_TRAILER} bytes of padding follow the end "
                                 "of the archive (a decompression bomb?)")


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    offset: int  # of the header in the (decompressed) tar stream


def _field(raw: bytes, what: str) -> bytes:
    """A NUL-padded header string: text, then only NULs."""
    text, nul, rest = raw.partition(b"\x00")
    if nul and rest.count(0) != len(rest):
        raise _malformed(f"tar header field {what} has bytes after its end")
    return text


def _parse_size(raw: bytes) -> int:
    if raw[0] & 0x80:  # GNU base-256: only used for sizes of 8 GiB and more
        if raw[0] != 0x80:
            raise _malformed("negative size in a tar header")
        return int.from_bytes(raw[1:], "big")
    if not _OCTAL_SIZE.match(raw):
        raise _malformed("the size field of a tar header is not 11 octal digits")
    return int(raw[:11], 8)


def _safe_name(name: bytes) -> str:
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        raise _unsafe(f"member name {name!r} is not ASCII") from None
    if not text:
        raise _unsafe("a member has an empty name")
    if text.startswith("/"):
        raise _unsafe(f"member {text!r} has an absolute path")
    if "\\" in text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise _unsafe(f"member name {text!r} contains a backslash or control character")
    for seg in text.split("/"):
        if seg == "..":
            raise _unsafe(f"member {text!r} climbs out of the bundle with '..'")
        if seg in ("", "."):
            raise _unsafe(f"member {text!r} has an empty or '.' path segment")
    return text


def _header(stream: _Stream) -> Member | None:
    """The next member's header, or None at a valid end of archive."""
    offset = stream.offset
    block = stream.read(BLOCK)
    if block == ZERO_BLOCK:
        if stream.read(BLOCK) != ZERO_BLOCK:
            raise _malformed(f"a zero block at offset {offset} is not followed by a second one")
        stream.read_trailer()
        return None
    chk = block[148:156]
    if not _CHKSUM.match(chk):
        raise _malformed(f"no valid tar header at offset {offset}")
    if int(chk[:6], 8) != sum(block[:148]) + 8 * 0x20 + sum(block[156:]):
        raise _malformed(f"tar header checksum mismatch at offset {offset}")
    magic = block[257:265]
    if magic not in _MAGICS:
        raise _malformed(f"tar header at offset {offset} is not ustar")
    if block[500:] != bytes(12):
        raise _malformed(f"tar header at offset {offset} has data in its padding")
    typeflag = block[156:157]
    name = _field(block[0:100], "name")
    if magic == _MAGICS[0]:
        prefix = _field(block[345:500], "prefix")
    elif block[345:500].count(0) == 155:
        prefix = b""
    else:
        raise _malformed(f"GNU tar header at offset {offset} uses extension fields")
    full = prefix + b"/" + name if prefix else name
    if typeflag not in _REGULAR:
        what = _TYPE_NAMES.get(typeflag, f"type {typeflag!r}")
        raise _unsafe(f"member {full.decode('ascii', 'replace')!r} is a {what}")
    if _field(block[157:257], "linkname"):
        raise _malformed(f"regular file at offset {offset} has a link target")
    size = _parse_size(block[124:136])
    return Member(name=_safe_name(full), size=size, offset=offset)


@contextlib.contextmanager
def _open(path: Path, caps: Caps, tick: Tick | None = None) -> Iterator[_Stream]:
    with open_regular(path) as f:
        st = os.fstat(f.fileno())
        if st.st_size == 0:
            raise _malformed(f"{path} is empty")
        if st.st_size > caps.read_limit:
            raise _too_large(f"{path} is {st.st_size} bytes, more than any bundle within the "
                             f"configured caps ({caps.read_limit})")
        try:
            magic = f.read(2)
            f.seek(0)
        except OSError as exc:
            raise _malformed(f"the bundle cannot be read ({exc.strerror})") from None
        if magic == b"\x1f\x8b":
            gz = _Gunzip(_Input(f, tick), caps.read_limit)
            yield _Stream(gz, caps.read_limit, tick)
        else:
            yield _Stream(f, caps.read_limit, tick)


def _read_small(stream: _Stream, expected: str, cap: int, position: str) -> bytes:
    member = _header(stream)
    if member is None:
        raise _malformed(f"the archive ends before its {position} member {expected}")
    if member.name != expected:
        raise _malformed(f"the {position} member must be {expected}, found {member.name!r}")
    if member.size > cap:
        raise _too_large(f"{expected} declares {member.size} bytes, over the {cap} byte limit")
    data = stream.read(member.size)
    _padding(stream, member)
    return data


def _padding(stream: _Stream, member: Member) -> None:
    pad = stream.read(-member.size % BLOCK)
    if pad.count(0) != len(pad):
        raise _malformed(f"non-zero padding after member {member.name!r}")


def open_bundle(path: Path, caps: Caps, tick: Tick | None = None) -> tuple[bytes, bytes]:
    """The exact bytes of ``manifest.json`` and ``signatures.json``, read within caps."""
    with _open(Path(path), caps, tick) as stream:
        manifest = _read_small(stream, MANIFEST_NAME, caps.max_manifest_bytes, "first")
        signatures = _read_small(stream, SIGNATURES_NAME, caps.max_signatures_bytes, "second")
    return manifest, signatures


def extract_payload(path: Path, manifest: Manifest, dest_dir: Path | None, caps: Caps,
                    tick: Tick | None = None) -> None:
    """Stream every payload member, check it against the (verified) manifest and write
    it under ``dest_dir`` (which must be empty; None only checks). On any refusal
    everything written under ``dest_dir`` is removed again."""
    if manifest.total_size > caps.max_total_bytes:
        raise _too_large(f"the manifest lists {manifest.total_size} bytes of files, over the "
                         f"{caps.max_total_bytes} byte cap")
    if len(manifest.files) + 2 > caps.max_members:
        raise _too_large(f"the manifest lists {len(manifest.files)} files, over the "
                         f"{caps.max_members} member cap")
    if dest_dir is not None:
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        if any(dest_dir.iterdir()):
            raise MigrateError(f"extraction directory {dest_dir} is not empty")
        check_free_space(dest_dir, (entry.size for entry in manifest.files))
    try:
        with _open(Path(path), caps, tick) as stream:
            first = _read_small(stream, MANIFEST_NAME, caps.max_manifest_bytes, "first")
            if first != manifest.to_json():
                raise _malformed("manifest.json differs from the manifest that was verified "
                                 "(the file changed during verification)")
            _read_small(stream, SIGNATURES_NAME, caps.max_signatures_bytes, "second")
            _extract_members(stream, manifest, dest_dir, caps)
    except BaseException as exc:
        if dest_dir is not None:
            for child in dest_dir.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            if is_no_space(exc):
                raise no_space(dest_dir) from None
        raise


def _extract_members(stream: _Stream, manifest: Manifest, dest_dir: Path | None,
                     caps: Caps) -> None:
    listed = manifest.files_by_path
    seen: set[str] = {MANIFEST_NAME, SIGNATURES_NAME}
    count = 2
    while (member := _header(stream)) is not None:
        count += 1
        if count > caps.max_members:
            raise _too_large(f"the archive has more than {caps.max_members} members")
        if member.name in seen:
            raise _unsafe(f"member {member.name!r} appears twice")
        seen.add(member.name)
        entry = listed.get(member.name)
        if entry is None:
            raise BundleRejected(f"member {member.name!r} is not listed in the signed manifest;"
                                 " extra files are refused. Rebuild the bundle",
                                 kind="unlisted-member")
        if member.size != entry.size:
            if member.size > caps.max_total_bytes:
                raise _too_large(f"member {member.name!r} declares {member.size} bytes")
            raise BundleRejected(f"member {member.name!r} is {member.size} bytes, the signed "
                                 f"manifest says {entry.size}; the file was altered",
                                 kind="hash-mismatch")
        digest = _copy(stream, member, dest_dir)
        if digest != entry.sha256:
            raise BundleRejected(f"member {member.name!r} has sha256 {digest}, the signed "
                                 f"manifest says {entry.sha256}; the file was altered. Do not "
                                 "use this bundle", kind="hash-mismatch")
    missing = sorted(set(listed) - seen)
    if missing:
        raise BundleRejected(f"the signed manifest lists {', '.join(missing)} but the archive "
                             "does not contain it; the bundle is incomplete. Get it again",
                             kind="missing-member")


def _copy(stream: _Stream, member: Member, dest_dir: Path | None) -> str:
    h = hashlib.sha256()
    out = None
    if dest_dir is not None:
        target = dest_dir / member.name
        target.parent.mkdir(parents=True, exist_ok=True)
        out = open(target, "xb")  # noqa: SIM115 - closed below; x: never follow or replace
    try:
        remaining = member.size
        while remaining:
            chunk = stream.read(min(CHUNK, remaining))
            h.update(chunk)
            if out is not None:
                out.write(chunk)
            remaining -= len(chunk)
    finally:
        if out is not None:
            out.close()
    _padding(stream, member)
    return h.hexdigest()
