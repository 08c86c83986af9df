"""Time to refuse a hostile, unsigned file of any size up to the cap (target >= 200 MB/s).

For each case a file of each size is written to a temporary directory, then the path a
run (the daemon's, ``apply``'s) takes for an incoming file is timed from start to
refusal: ``verified.verify_bundle`` = ``bundle.receive`` (the signature check on the incoming
file, then ``private_copy``: read, sha256, write, fsync) then ``verify_bundle`` of the
copy, against a trust store holding one key that signed none of these files. Each
size/case is measured ``--runs`` times; the median is printed with MB/s of input
(MB = 10^6 bytes) and the refusal's kind. ``--copy-first`` also times the path without
the early check (``private_copy`` then ``verify_bundle``, what a run did before), whose
cost is the copy of the whole file.

Cases (the worst we know for each layer before the signature check):

- gzip: many empty members, a file name field that never ends, a valid gzip bundle
  followed by junk, empty stored deflate blocks, empty fixed-Huffman deflate blocks,
  a single-member gzip bomb (zeros), random bytes stored (level 0), a big bundle signed
  by an unknown key compressed with gzip -1;
- tar: a manifest.json header declaring 8 GiB - 1, a manifest.json of exactly the 1 MiB
  cap followed by filler, a file of valid empty tar headers, a big bundle signed by an
  unknown key;
- neither: zeros, random bytes.

At most two files of the largest size exist at once (the case and its private copy).

    python3 bench/hostile_refusal.py [--sizes 64,256,512] [--runs 3] [--dir /var/tmp]
        [--cases NAME,...] [--copy-first]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zmonitor_migrated import verified
from zmonitor_migrated.archive import Caps
from zmonitor_migrated.bundle import build, private_copy, verify_bundle
from zmonitor_migrated.config import Config
from zmonitor_migrated.errors import MigrateError
from zmonitor_migrated.keys import keygen
from zmonitor_migrated.trust import TrustStore

MB = 1000 * 1000
MIB = 1024 * 1024
GZ_HEAD = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
EMPTY_MEMBER = GZ_HEAD + b"\x03\x00" + bytes(8)  # a final empty fixed block, crc 0, size 0
EMPTY_STORED = b"\x00\x00\x00\xff\xff"  # a non-final stored block of length 0
EMPTY_FIXED_X4 = b"\x02\x08\x20\x80\x00"  # four non-final empty fixed blocks (40 bits)
Writer = Callable[[Path, int, "Setup"], None]


class Setup:
    """A small valid bundle signed by a key the trust store does not hold."""

    def __init__(self, tmp: Path) -> None:
        src = tmp / "src"
        (src / "migrations" / "schema").mkdir(parents=True)
        (src / "migrations" / "rollback").mkdir()
        (src / "bundle.yaml").write_text("name: bench\napp: zmonitor\n"
                                         "device_types: [zmonitor-bedside]\n")
        (src / "migrations/schema/0001_create_t.sql").write_text("CREATE TABLE t (x INT);\n")
        (src / "migrations/rollback/0001_rollback.sql").write_text("DROP TABLE t;\n")
        signer, _ = keygen(tmp / "unknown")
        (tmp / "trust").mkdir()
        keygen(tmp / "trust" / "trusted")
        now = datetime.now(UTC)
        build(src, tmp / "small.zmb", [signer], 1, created=now, expires=now + timedelta(1))
        self.small = (tmp / "small.zmb").read_bytes()
        self.trust = TrustStore.load(tmp / "trust")

    def unsigned_tar(self, size: int, filler: bytes = (b"-- " + b"x" * 124 + b"\n") * 8192
                     ) -> Iterator[bytes]:
        """The small bundle without its end marker, then a big member, up to ``size``."""
        with tarfile.open(fileobj=io.BytesIO(self.small)) as tar:
            last = tar.getmembers()[-1]
        end = last.offset_data + last.size + (-last.size % 512)
        yield self.small[:end]
        big = max(0, size - end - 512 - 1024)
        big -= big % 512
        info = tarfile.TarInfo("migrations/seed/0002_big.sql")
        info.size = big
        yield info.tobuf(tarfile.USTAR_FORMAT)
        yield from _repeat(filler, big)
        yield bytes(1024)


def _repeat(block: bytes, total: int) -> Iterator[bytes]:
    while total > 0:
        yield block[:total]
        total -= len(block)


def _fill(path: Path, parts: Iterator[bytes], size: int | None = None) -> None:
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)
        if size is not None:
            for zeros in _repeat(bytes(MIB), size - f.tell()):
                f.write(zeros)


def _gzip_stream(chunks: Iterator[bytes], level: int) -> Iterator[bytes]:
    z = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    crc = length = 0
    yield GZ_HEAD
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
        length += len(chunk)
        yield z.compress(chunk)
    yield z.flush()
    yield crc.to_bytes(4, "little") + (length & 0xFFFFFFFF).to_bytes(4, "little")


def _random_block() -> bytes:
    return os.urandom(MIB)


CASES: dict[str, Writer] = {
    "gzip: empty members": lambda p, n, s: _fill(p, _repeat(EMPTY_MEMBER * 65536, n)),
    "gzip: FNAME without end": lambda p, n, s: _fill(
        p, iter([GZ_HEAD[:3] + b"\x08" + GZ_HEAD[4:], *_repeat(b"a" * MIB, n - 10)])),
    "gzip: valid member + junk": lambda p, n, s: _fill(
        p, iter([gz := b"".join(_gzip_stream(iter([s.small]), 6)),
                 *_repeat(_random_block(), n - len(gz))])),
    "gzip: empty stored blocks": lambda p, n, s: _fill(
        p, iter([GZ_HEAD, *_repeat(EMPTY_STORED * 200000, n - 10)])),
    "gzip: empty fixed blocks": lambda p, n, s: _fill(
        p, iter([GZ_HEAD, *_repeat(EMPTY_FIXED_X4 * 200000, n - 10)])),
    "gzip: bomb (one member of zeros)": lambda p, n, s: _fill(p, _bomb(n)),
    "gzip: random bytes, stored": lambda p, n, s: _fill(
        p, _gzip_stream(_repeat(_random_block(), n), 0)),
    "gzip -1: big bundle, unknown key": lambda p, n, s: _fill(
        p, _gzip_stream(s.unsigned_tar(n, _random_block()), 1)),
    "tar: manifest declares 8 GiB": lambda p, n, s: _fill(p, _declared_manifest(), n),
    "tar: 1 MiB manifest + filler": lambda p, n, s: _fill(p, _cap_manifest(), n),
    "tar: valid empty headers": lambda p, n, s: _fill(p, _headers(n)),
    "tar: big bundle, unknown key": lambda p, n, s: _fill(p, s.unsigned_tar(n)),
    "zeros": lambda p, n, s: _fill(p, _repeat(bytes(MIB), n)),
    "random bytes": lambda p, n, s: _fill(p, _repeat(_random_block(), n)),
}


def _bomb(size: int) -> Iterator[bytes]:
    # after a full flush the blocks of 16 MiB of zeros refer to nothing before them
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = z.compress(bytes(16 * MIB)) + z.flush(zlib.Z_FULL_FLUSH)
    yield GZ_HEAD
    yield from _repeat(zeros * 64, (size - 10 - 64) // len(zeros) * len(zeros))
    yield z.flush() + bytes(8)  # the trailer is never reached


def _declared_manifest() -> Iterator[bytes]:
    info = tarfile.TarInfo("manifest.json")
    info.size = 8 * 1024**3 - 1
    yield info.tobuf(tarfile.USTAR_FORMAT)


def _cap_manifest() -> Iterator[bytes]:
    info = tarfile.TarInfo("manifest.json")
    info.size = MIB
    yield info.tobuf(tarfile.USTAR_FORMAT)
    yield b"{" + b" " * (MIB - 2) + b"}"
    info = tarfile.TarInfo("signatures.json")
    info.size = 64 * 1024
    yield info.tobuf(tarfile.USTAR_FORMAT)
    yield b"[" + b" " * (64 * 1024 - 2) + b"]"


def _headers(size: int) -> Iterator[bytes]:
    names = ["manifest.json", "signatures.json"]
    first = b"".join(tarfile.TarInfo(n).tobuf(tarfile.USTAR_FORMAT) for n in names)
    yield first
    yield from _repeat(tarfile.TarInfo("x").tobuf(tarfile.USTAR_FORMAT) * 2048,
                       size - len(first))


def _timed(fn: Callable[[], object]) -> tuple[float, str]:
    start = time.perf_counter()
    try:
        fn()
    except MigrateError as exc:
        return time.perf_counter() - start, exc.kind
    raise SystemExit("a hostile file was accepted")


def measure_run(path: Path, work: Path, config: Config) -> tuple[float, str]:
    """The run's own path: seconds to the refusal, and its kind."""
    run = Path(tempfile.mkdtemp(dir=work))
    try:
        return _timed(lambda: verified.verify_bundle(config, path, run, datetime.now(UTC)))
    finally:
        shutil.rmtree(run)


def measure_copy_first(path: Path, work: Path, trust: TrustStore,
                       caps: Caps) -> tuple[float, str]:
    run = Path(tempfile.mkdtemp(dir=work))
    try:
        return _timed(lambda: verify_bundle(private_copy(path, run, max_bytes=caps.read_limit),
                                            trust, extract_to=run / "payload", caps=caps))
    finally:
        shutil.rmtree(run)


def _median(results: list[tuple[float, str]]) -> tuple[float, str]:
    return (statistics.median(t for t, _ in results),
            ", ".join(sorted({k for _, k in results})))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,512", help="file sizes in MiB")
    parser.add_argument("--runs", type=int, default=3, help="measurements per case and size")
    parser.add_argument("--dir", default=None, help="where to write (default: $TMPDIR)")
    parser.add_argument("--cases", default=None, help="comma-separated case names")
    parser.add_argument("--copy-first", action="store_true",
                        help="also time private_copy + verify_bundle (no early check)")
    args = parser.parse_args()
    sizes = [int(s) * MIB for s in args.sizes.split(",")]
    names = args.cases.split(",") if args.cases else list(CASES)
    caps = Caps()
    print(f"{'case':34} {'MiB':>4} {'run s':>8} {'MB/s':>7}  {'kind':14}"
          + (f" {'copy-first s':>12} {'MB/s':>6}" if args.copy_first else ""), flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="hostile-") as tmp:
        work = Path(tmp)
        setup = Setup(work / "setup")
        config = Config(database=work / "absent.db", trust_dir=work / "setup" / "trust",
                        state_dir=work / "state", app_unit=None)
        for name in names:
            for size in sizes:
                path = work / "case.zmb"
                CASES[name](path, size, setup)
                n = path.stat().st_size
                run_s, kind = _median([measure_run(path, work, config)
                                       for _ in range(args.runs)])
                line = f"{name:34} {n / MIB:4.0f} {run_s:8.4f} {n / MB / run_s:7.0f}  {kind:14}"
                if args.copy_first:
                    copy_s, _ = _median([measure_copy_first(path, work, setup.trust, caps)
                                         for _ in range(args.runs)])
                    line += f" {copy_s:12.3f} {n / MB / copy_s:6.0f}"
                path.unlink()
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
