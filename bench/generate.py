"""Generate (or reuse) a realistic Z Monitor database for the benchmarks.

The database is at version 11, the version before the shipped bundle's batched
migration 0012, so a full apply of the shipped bundle has 0012 (batched over every
vitals row), 0013 and 0014 (seeds) pending. Content comes from
``zmonitor_migrated.sample.make_sample_db`` (one patient per ~2,500 vitals, one alarm
per ~400 vitals, a third archived, ~8 % legacy vitals rows), in WAL mode like the
app's own database, and is seeded: the same ``--vitals`` and ``--seed`` give the same
database. Generated files are cached under ``bench/out/`` (gitignored), keyed by both.

    python bench/generate.py [--vitals 1000000] [--seed 7] [--force]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zmonitor_migrated import sources  # noqa: E402
from zmonitor_migrated.sample import make_sample_db  # noqa: E402

OUT = ROOT / "bench" / "out"
SHIPPED = ROOT / "bundles" / "zmonitor"
VERSION = 11


def cached_path(vitals: int, seed: int) -> Path:
    return OUT / f"zmonitor-v{VERSION}-n{vitals}-s{seed}.db"


def ensure(vitals: int, seed: int = 7, *, force: bool = False, quiet: bool = False) -> Path:
    """Path of the cached database for (vitals, seed), generating it if needed."""
    path = cached_path(vitals, seed)
    if path.exists() and not force:
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    for p in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        p.unlink(missing_ok=True)
    t0 = time.monotonic()
    if not quiet:
        print(f"generating {vitals:,} vitals rows (seed {seed}) at version {VERSION} ...",
              flush=True)
    make_sample_db(tmp, sources.load(SHIPPED), version=VERSION, vitals=vitals, seed=seed,
                   wal=True)
    tmp.replace(path)
    if not quiet:
        print(f"  {path} ({path.stat().st_size / 1e6:.1f} MB) in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vitals", type=int, default=1_000_000,
                    help="vitals rows (default 1,000,000; e.g. --vitals 10000000)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--force", action="store_true", help="regenerate even if cached")
    args = ap.parse_args(argv)
    print(ensure(args.vitals, args.seed, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
