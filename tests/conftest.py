"""Shared fixtures: real keys, a real signed bundle of the shipped source, a real sample
monitor database, and a device directory whose app unit is controlled through the
``fake_systemctl.py`` executable (a real process writing vitals)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from zmonitor_migrated import bundle, keys, sources
from zmonitor_migrated.sample import make_sample_db

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "bundles" / "zmonitor"
# Today at midnight: the fixtures' bundles are valid now (never created in the future, and
# valid a year, under the default max_validity_days) whenever the suite runs.
NOW = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
VALID = timedelta(days=365)


@pytest.fixture(scope="session")
def shipped_source() -> sources.Source:
    return sources.load(SHIPPED)


@pytest.fixture(scope="session")
def release_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    return keys.keygen(d / "release.test")


@pytest.fixture(scope="session")
def shipped_bundle(tmp_path_factory: pytest.TempPathFactory,
                   release_key: tuple[Path, Path]) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "zmonitor-1.zmb"
    bundle.build(SHIPPED, out, [release_key[0]], 1, created=NOW,
                 expires=NOW + VALID)
    return out


@pytest.fixture(scope="session")
def sample_db_v10(tmp_path_factory: pytest.TempPathFactory,
                  shipped_source: sources.Source) -> Path:
    path = tmp_path_factory.mktemp("sample") / "zmonitor-v10.db"
    make_sample_db(path, shipped_source, version=10, vitals=20_000, wal=False)
    return path


@dataclass
class Device:
    """A device directory: database, config, state, a fake systemctl with its app."""

    root: Path
    db: Path
    config_path: Path
    systemctl_dir: Path
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 120, check: bool = False,
            **kw: object) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "zmonitor_migrated.cli", "--config", str(self.config_path),
             *args], capture_output=True, text=True, timeout=timeout, env=self.env, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.root / "systemctl"), *args], capture_output=True,
                              text=True, env=self.env, timeout=30)

    def app_active(self) -> bool:
        return self.systemctl("is-active", "zmonitor.service").stdout.strip() == "active"

    def calls(self) -> list[str]:
        try:
            return (self.systemctl_dir / "calls.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def fault(self, name: str, content: str = "") -> None:
        (self.systemctl_dir / name).write_text(content)

    def clear_fault(self, name: str) -> None:
        (self.systemctl_dir / name).unlink(missing_ok=True)

    @property
    def config(self) -> dict[str, object]:
        return yaml.safe_load(self.config_path.read_text())

    def set_config(self, **changes: object) -> None:
        cfg = self.config
        cfg.update(changes)
        self.config_path.write_text(yaml.safe_dump(cfg))

    def history(self) -> list[dict[str, object]]:
        path = self.root / "state" / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]


def make_device(root: Path, db_template: Path, trust_pub: Path, *,
                app_unit: str | None = "zmonitor.service") -> Device:
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir()
    db = root / "data" / "zmonitor.db"
    shutil.copyfile(db_template, db)
    (root / "trusted.d").mkdir()
    shutil.copy(trust_pub, root / "trusted.d" / trust_pub.name)
    sysdir = root / "fake-systemd"
    sysdir.mkdir()
    wrapper = root / "systemctl"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / 'fake_systemctl.py'}"
                       ' "$@"\n')
    wrapper.chmod(0o755)
    cfg = {
        "database": str(db), "device_type": "zmonitor-bedside", "app_unit": app_unit,
        "state_dir": str(root / "state"), "runtime_dir": str(root / "run"),
        "inbox": str(root / "inbox"), "backup_dir": str(root / "backups"),
        "trust_dir": str(root / "trusted.d"), "health_check_s": 0.5, "stop_timeout_s": 10,
        "max_downtime_s": 120, "systemctl": str(wrapper),
        # Honour the bundles' own batch sizes on the private copy (the default raises them
        # to 50,000 rows for speed), so tests with small batches really take their time.
        "batch_size": 1,
        "metrics_path": str(root / "metrics" / "zmonitor_migrate.prom"),
    }
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "FAKE_SYSTEMCTL_DIR": str(sysdir), "FAKE_SYSTEMCTL_DB": str(db),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("NOTIFY_SOCKET", None)
    return Device(root=root, db=db, config_path=config_path, systemctl_dir=sysdir, env=env)


@pytest.fixture
def device(tmp_path: Path, sample_db_v10: Path,
           release_key: tuple[Path, Path]) -> Iterator[Device]:
    """A device at version 10 with its app running (the simulated monitor)."""
    dev = make_device(tmp_path / "device", sample_db_v10, release_key[1])
    started = dev.systemctl("start", "zmonitor.service")
    assert started.returncode == 0, started.stderr
    yield dev
    dev.clear_fault("ignore-stop")
    dev.systemctl("stop", "zmonitor.service")


# -- the run and the daemon: bundle variants, database snapshots ----------------
def build_variant(out: Path, key: Path, sequence: int, *,
                  edit: Callable[[Path], None] | None = None) -> Path:
    """Build a signed bundle from a copy of the shipped source, changed by ``edit``."""
    src = out.parent / (out.stem + "-src")
    shutil.copytree(SHIPPED, src)
    if edit is not None:
        edit(src)
    bundle.build(src, out, [key], sequence, created=NOW, expires=NOW + VALID)
    return out


def add_migration(src: Path, version: int, sql: str, rollback: str = "SELECT 1;\n",
                  kind: str = "data", name: str = "extra") -> None:
    """Append one migration (and its rollback) to a bundle source."""
    (src / "migrations" / kind / f"{version:04d}_{kind}_{name}.sql").write_text(sql)
    (src / "migrations" / "rollback" / f"{version:04d}_rollback.sql").write_text(rollback)


def set_batch_size(src: Path, size: int) -> None:
    path = next((src / "migrations" / "data").glob("0012_*.sql"))
    path.write_text(path.read_text().replace("size=10000", f"size={size}"))


@pytest.fixture(scope="session")
def slow_bundle(tmp_path_factory: pytest.TempPathFactory,
                release_key: tuple[Path, Path]) -> Path:
    """The shipped history with 0012 batched by 25 rows: 4,000 batches on big_db_v10."""
    out = tmp_path_factory.mktemp("slow") / "zmonitor-slow-1.zmb"
    return build_variant(out, release_key[0], 1, edit=lambda s: set_batch_size(s, 25))


@pytest.fixture(scope="session")
def big_db_v10(tmp_path_factory: pytest.TempPathFactory,
               shipped_source: sources.Source) -> Path:
    """Version 10 with 100,000 vitals (about 13 MB): seconds of 0012 at batch size 25."""
    path = tmp_path_factory.mktemp("big") / "zmonitor-big-v10.db"
    make_sample_db(path, shipped_source, version=10, vitals=100_000, wal=False)
    return path


def _open_quietly(db: Path) -> sqlite3.Connection:
    """Read-only, and ``immutable`` for a closed WAL database, so that looking at a file
    never creates ``-wal``/``-shm`` next to it (tests compare directory listings)."""
    uri = f"{Path(db).absolute().as_uri()}?mode=ro"
    with open(db, "rb") as f:
        wal = f.read(20)[18:20] == b"\x02\x02"
    if wal and not Path(f"{db}-wal").exists():
        uri += "&immutable=1"
    return sqlite3.connect(uri, uri=True)


def table_rows(db: Path, *, vitals_up_to: int | None = None) -> dict[str, list[tuple[object, ...]]]:
    """Schema and every row of every table (by rowid). With ``vitals_up_to`` only the
    vitals rows up to that rowid count: the running monitor appends vitals, nothing else."""
    conn = _open_quietly(db)
    try:
        out: dict[str, list[tuple[object, ...]]] = {
            "sqlite_master": conn.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
            ).fetchall()}
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                    "AND name NOT LIKE 'sqlite_%' ORDER BY name").fetchall():
            where = ""
            if name == "vitals" and vitals_up_to is not None:
                where = f" WHERE rowid <= {int(vitals_up_to)}"
            out[name] = conn.execute(
                f'SELECT rowid, * FROM "{name}"{where} ORDER BY rowid').fetchall()
        return out
    finally:
        conn.close()


def max_vitals_rowid(db: Path) -> int:
    conn = _open_quietly(db)
    try:
        return int(conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM vitals").fetchone()[0])
    finally:
        conn.close()


# -- fault injection: the tally the test_faults_* tests fill --------------------
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    try:
        from fault_helpers import TALLY
    except ImportError:
        return
    lines = TALLY.lines()
    if lines:
        terminalreporter.section("fault injection summary")
        for line in lines:
            terminalreporter.write_line(line)


# -- real full filesystems: tmpfs mounts, unmounted after the test ---------------------------

@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("filling a real filesystem needs a tmpfs mount: root and mount(8)")
    made: list[Path] = []
    yield made
    for m in reversed(made):
        subprocess.run(["umount", "-l", str(m)], check=False)


def mount_tmpfs(path: Path, size_kb: int, made: list[Path]) -> None:
    """A ``size_kb`` tmpfs on ``path``, recorded in ``made`` (the ``mounts`` fixture)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    made.append(path)
