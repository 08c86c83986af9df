"""``zmonitor-migrate demo``: the whole product on an embedded default, no systemd needed.

In a fresh work directory: a sample monitor database at version 10 with simulated
patients and vitals, a simulated monitor writing vitals into it (the "app"), a
throw-away signing key, the shipped bundle source (package data, so it works from any
install and any working directory; ``bundles/zmonitor`` in a checkout) built and signed.
Then:

1. a full run of the bundle (verify, rehearse, stop, back up, migrate, validate, swap,
   start, health gate), with progress;
2. ``status`` and ``history``;
3. a tampered copy of the bundle, refused before anything is touched (exit 3);
4. a bundle whose migration passes every check but breaks the app: the health gate
   fails, the backup is restored, the monitor runs again on the old database (exit 5).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from . import bundle, dbinfo, keys, pipeline, sources
from .config import Config, load
from .errors import MigrateError
from .history import describe, read, summary
from .progress import Reporter, default_sinks
from .sample import make_sample_db
from .services import ProcessUnit
from .status import collect, default_source, render

BREAKING_MIGRATION = """-- Migration: vitals need a reviewer (a change the app was not updated for)
-- It passes lint, the rehearsal and every post-migration check, yet the running app's
-- INSERT into vitals fails afterwards: only the health gate can catch it.
CREATE TRIGGER vitals_require_review BEFORE INSERT ON vitals
BEGIN
    SELECT RAISE(ABORT, 'vitals must carry a reviewer');
END;
"""


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _flip_payload_byte(src: Path, dst: Path) -> None:
    data = bytearray(src.read_bytes())
    at = data.find(b"CREATE TABLE patients")
    data[at + 7] ^= 0x20  # 'TABLE' -> 'tABLE': same size, different sha256
    dst.write_bytes(bytes(data))


def run_demo(workdir: Path | None = None, vitals: int = 300_000) -> int:
    source_dir = default_source()
    if source_dir is None:
        print("demo: the shipped bundle source (package data zmonitor_migrated/data/bundles/"
              "zmonitor) is missing from this installation; reinstall the package",
              file=sys.stderr)
        return 2
    work = _empty_workdir(workdir)
    if work is None:
        return 2
    db = work / "data" / "zmonitor.db"
    db.parent.mkdir()
    (work / "trusted.d").mkdir()
    config = load(_write_config(work, db))
    monitor = ProcessUnit([sys.executable, "-m", "zmonitor_migrated.demo_monitor", str(db)],
                          name="simulated monitor")
    reporter = Reporter(default_sinks(config.status_path))

    _say(f"work directory {work}")
    key, good, now = _prepare(work, db, source_dir, vitals)
    monitor.start()
    print("simulated monitor running (writes vitals every 20 ms)")
    try:
        _say("1. apply the signed bundle")
        result = pipeline.apply(good, config, services=monitor, reporter=reporter)
        print(f"-> {result.outcome}: version {result.from_version} → {result.to_version}, "
              f"downtime {result.downtime_s:.2f} s (rehearsal estimate "
              f"{result.estimate_s:.2f} s)")
        print(f"   backup (the untouched original, kept by a hard link): {result.backup}")

        _say("2. status and history")
        for line in render(collect(config, source_dir)):
            print(line)
        print()
        for r in read(config.history_path):
            for line in describe(r):
                print(line)

        _say("3. a tampered bundle (one byte of a migration changed)")
        if not _tampered_is_refused(work, good, config, monitor, reporter):
            return 1

        _say("4. a bundle that breaks the app: the health gate restores the backup")
        version = _broken_is_restored(work, source_dir, key, now, config, monitor, reporter)
        if version is None:
            return 1
        _say("history")
        for r in read(config.history_path):
            print(summary(r) + (f" [{r['error']['kind']}]" if r.get("error") else ""))
        print(f"\nmetrics for node_exporter: {config.metrics_path}")
        print(f"demo files are in {work}")
        ok = version == 14 and monitor.is_active()
        return 0 if ok else 1
    finally:
        monitor.stop(10)


def _empty_workdir(workdir: Path | None) -> Path | None:
    """The demo's work directory, absolute and empty (None, said on stderr, if not)."""
    # Absolute: the config written below is read back with paths relative to its own
    # directory, so a relative work dir would be applied twice (demo-work/demo-work/...).
    work = (Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="zmonitor-demo-"))
            ).absolute()
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        print(f"demo: {work} is not empty; pass an empty or new --workdir", file=sys.stderr)
        return None
    return work


def _write_config(work: Path, db: Path) -> Path:
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "database": str(db), "device_type": "zmonitor-bedside", "app_unit": None,
        "state_dir": str(work / "state"), "runtime_dir": str(work / "run"),
        "inbox": str(work / "inbox"), "backup_dir": str(work / "backups"),
        "trust_dir": str(work / "trusted.d"), "health_check_s": 2, "max_downtime_s": 120,
        "metrics_path": str(work / "metrics" / "zmonitor_migrate.prom"),
    }))
    return cfg_path


def _prepare(work: Path, db: Path, source_dir: Path, vitals: int
             ) -> tuple[Path, Path, datetime]:
    """The sample database, a throw-away trusted key and the signed bundle built with it:
    (the key, the bundle, the time it was signed)."""
    source = sources.load(source_dir)
    make_sample_db(db, source, version=10, vitals=vitals)
    print(f"sample database {db}: version 10, {vitals:,} vitals rows, "
          f"{db.stat().st_size / 1e6:.1f} MB")
    (work / "keys").mkdir()
    key, pub = keys.keygen(work / "keys" / "demo-release")
    shutil.copy(pub, work / "trusted.d" / pub.name)
    print(f"throw-away signing key {key} (trusted: {pub.name})")
    now = datetime.now(UTC).replace(microsecond=0)
    good = work / "zmonitor-1.zmb"
    bundle.build(source_dir, good, [key], 1, created=now, expires=now + timedelta(days=30))
    print(f"built and signed {good} ({good.stat().st_size:,} bytes)")
    return key, good, now


def _tampered_is_refused(work: Path, good: Path, config: Config, monitor: ProcessUnit,
                         reporter: Reporter) -> bool:
    tampered = work / "zmonitor-1-tampered.zmb"
    _flip_payload_byte(good, tampered)
    try:
        pipeline.apply(tampered, config, services=monitor, reporter=reporter)
        print("-> UNEXPECTED: the tampered bundle was accepted")
        return False
    except MigrateError as exc:
        print(f"-> refused, exit {exc.exit_code} [{exc.kind}]: {exc.message}")
        print(f"   monitor still running: {monitor.is_active()}")
    return True


def _broken_is_restored(work: Path, source_dir: Path, key: Path, now: datetime,
                        config: Config, monitor: ProcessUnit, reporter: Reporter
                        ) -> int | None:
    """Apply a bundle whose migration breaks the app's writes; the database's version
    afterwards (None, said, if the bundle was committed)."""
    broken_src = work / "broken-src"
    shutil.copytree(source_dir, broken_src)
    (broken_src / "migrations" / "schema" / "0015_schema_require_vitals_review.sql"
     ).write_text(BREAKING_MIGRATION)
    (broken_src / "migrations" / "rollback" / "0015_rollback.sql").write_text(
        "DROP TRIGGER vitals_require_review;\n")
    broken = work / "zmonitor-2-broken.zmb"
    bundle.build(broken_src, broken, [key], 2, created=now,
                 expires=now + timedelta(days=30))
    try:
        pipeline.apply(broken, config, services=monitor, reporter=reporter)
        print("-> UNEXPECTED: the breaking bundle was committed")
        return None
    except MigrateError as exc:
        print(f"-> exit {exc.exit_code} [{exc.kind}]: {exc.message}")
    conn = dbinfo.open_ro(config.database)
    try:
        version = dbinfo.current_version(conn)
    finally:
        conn.close()
    print(f"   database back at version {version}; monitor running: "
          f"{monitor.is_active()}")
    return version
