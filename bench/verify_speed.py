"""Verification speed and memory of a large bundle (target: >= 200 MB/s, memory flat).

Builds bundles of 50 MB and 200 MB (one big seed migration made of SQL comment lines
plus a small schema migration) in a temporary directory, then verifies each in a fresh
child process — signatures, manifest, every payload byte streamed, hashed and written
to an extraction directory, exactly what ``apply`` does — and prints MB/s and the
child's peak RSS (``ru_maxrss``). Each size is measured in its own process so that the
peak belongs to that verification alone; the build (which lints, and so reads the big
file) happens in the parent.

    python bench/verify_speed.py [--sizes 50,200] [--dir /var/tmp] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zmonitor_migrated.archive import Caps
from zmonitor_migrated.bundle import build, verify_bundle
from zmonitor_migrated.keys import keygen
from zmonitor_migrated.trust import TrustStore

MB = 1000 * 1000
LINE = ("-- " + "0123456789abcdef" * 6 + "\n").encode()


def make_source(root: Path, size_mb: int) -> None:
    (root / "migrations" / "schema").mkdir(parents=True)
    (root / "migrations" / "seed").mkdir()
    (root / "migrations" / "rollback").mkdir()
    (root / "bundle.yaml").write_text("name: bench\napp: zmonitor\n"
                                      "device_types: [zmonitor-bedside]\n")
    (root / "migrations/schema/0001_create_t.sql").write_text("CREATE TABLE t (x INTEGER);\n")
    (root / "migrations/rollback/0001_rollback.sql").write_text("DROP TABLE t;\n")
    block = LINE * (MB // len(LINE) + 1)
    with open(root / "migrations/seed/0002_big.sql", "wb") as f:
        written = 0
        while written < size_mb * MB:
            f.write(block)
            written += len(block)
        f.write(b"INSERT INTO t VALUES (1);\n")


def child(bundle: Path, trust: Path, work: Path) -> None:
    """Verify once, print one JSON line: seconds, bytes, peak RSS in KiB."""
    store = TrustStore.load(trust)
    caps = Caps(max_total_bytes=1024 * MB)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    vb = verify_bundle(bundle, store, extract_to=work, caps=caps)
    elapsed = time.perf_counter() - start
    print(json.dumps({"seconds": elapsed, "bytes": bundle.stat().st_size,
                      "payload_bytes": vb.manifest.total_size,
                      "rss_before_kib": rss_before,
                      "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,200", help="bundle sizes in MB")
    parser.add_argument("--dir", default=None, help="where to build (default: $TMPDIR)")
    parser.add_argument("--repeat", type=int, default=3, help="verifications per size")
    parser.add_argument("--child", nargs=3, metavar=("BUNDLE", "TRUST", "WORK"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=5, metavar=("SIZE", "SRC", "OUT", "KEY", "CREATED"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*(Path(p) for p in args.child))
        return 0
    if args.build:
        size, src, out, key, when = args.build
        make_source(Path(src), int(size))
        created = datetime.fromisoformat(when)
        build(Path(src), Path(out), [Path(key)], 1, created=created,
              expires=created + timedelta(days=1))
        return 0
    created = datetime.now(UTC).replace(microsecond=0)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="zmb-bench-") as tmp_name:
        tmp = Path(tmp_name)
        key, pub = keygen(tmp / "keys" / "bench")
        trust = tmp / "trust"
        trust.mkdir()
        (trust / pub.name).write_bytes(pub.read_bytes())
        for size in (int(s) for s in args.sizes.split(",")):
            src = tmp / f"src-{size}"
            bundle = tmp / f"bench-{size}.zmb"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--build", str(size), str(src),
                            str(bundle), str(key), created.isoformat()], check=True)
            build_s = time.perf_counter() - t0
            best = None
            for i in range(args.repeat):
                work = tmp / f"work-{size}-{i}"
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(bundle), str(trust), str(work)],
                    check=True, capture_output=True, text=True).stdout
                result = json.loads(out)
                if best is None or result["seconds"] < best["seconds"]:
                    best = result
            assert best is not None
            rows.append((size, best, build_s))
            rate = best["bytes"] / MB / best["seconds"]
            print(f"{best['bytes'] / MB:7.1f} MB bundle: verify {rate:7.1f} MB/s "
                  f"({best['seconds']:.3f} s, best of {args.repeat}), peak RSS "
                  f"{best['rss_peak_kib'] / 1024:6.1f} MiB (interpreter + imports "
                  f"{best['rss_before_kib'] / 1024:.1f} MiB); source + build {build_s:.2f} s",
                  flush=True)
    peaks = [r[1]["rss_peak_kib"] for r in rows]
    print(f"peak RSS growth from {rows[0][0]} MB to {rows[-1][0]} MB: "
          f"{(peaks[-1] - peaks[0]) / 1024:+.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
