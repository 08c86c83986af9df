"""Power-cut sweeps: record a flow once on the crash-simulating mount, then for every cut
point rebuild the crash states it may leave and check what boot and recovery make of each.

ALICE-style: the flow (``apply``, a restore after a failed health gate, an operator
``restore``, ``recover`` itself cut again, the daemon taking a bundle from the inbox)
runs once on ``fs.CutFS``, which logs every durability-relevant call. For each cut point
k (before op k, for every k) the states a power cut may leave are computed
(``model.crash_state``: only the durable ops; every op; seeded arbitrary subsets of the
unsynced ones; seeded subsets with unsynced writes torn at sectors), deduplicated by
content, loaded into the same mount (same paths, same inode numbers) and checked in a
fresh process (``check.py``): ``recover``, ``recover`` again, the app's start gate,
``status``. Invariants, after every state:

- the database is the old content or the fully migrated one, row by row;
- ``recover`` exits 0 and leaves the journal closed (or absent) and the app started, or
  fails with a stated reason that the gate repeats; a second ``recover`` changes nothing;
- the gate lets the app start, or refuses with a message;
- the anti-rollback floor never goes below where it was before the flow, nor below the
  sequence of a bundle the database records as applied;
- every backup ``status`` lists matches its recorded sha256;
- the journal is readable, or absent.

Full sweep (by hand, figures in tests/powercut/RESULTS.md)::

    sudo PYTHONPATH=$PWD:$PWD/tests python3 -m powercut.sweep --flows all

The CI sample is ``tests/test_powercut_sweep.py`` (a seeded sample of the same states).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from bundle_helpers import DEVICE, SQL_1, SQL_2, make_source

from zmonitor_migrated import backup as backups
from zmonitor_migrated import device_state as ds
from zmonitor_migrated.bundle import build
from zmonitor_migrated.journal import Journal
from zmonitor_migrated.keys import keygen

from . import model
from .fs import Mount, fuse_unavailable
from .model import Op, State

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
ROWS = 250  # patients: 3 batches of 100 in 0003

# The app unit: records its calls and an "active" flag outside the mount (systemd's own
# state is not on the data partition). ``unhealthy`` makes the health gate fail.
STUB = """#!/bin/sh
d='{d}'
echo "$*" >> "$d/calls.log"
case "$1" in
  start) touch "$d/active" ;;
  stop) rm -f "$d/active" ;;
  is-active) if [ -e "$d/active" ] && [ ! -e "$d/unhealthy" ]; then echo active; exit 0; fi
             echo inactive; exit 3 ;;
  show) echo 0 ;;
esac
exit 0
"""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


JOURNAL_MODES = ("wal", "delete")


def make_db(path: Path, journal_mode: str = "wal") -> None:
    """The monitor's database is in WAL mode; ``delete`` (a rollback journal) is the
    other way SQLite commits, and the copy-then-swap must hold for both."""
    if journal_mode not in JOURNAL_MODES:
        raise ValueError(f"journal mode {journal_mode!r}: one of {JOURNAL_MODES}")
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA journal_mode={journal_mode}")
    with conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at "
                     "TEXT NOT NULL, description TEXT, migration_type TEXT, file_hash TEXT, "
                     "execution_time_ms INTEGER, applied_by TEXT)")
        conn.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "mrn TEXT)")
        conn.executemany("INSERT INTO patients (name) VALUES (?)",
                         [(f"patient {i}",) for i in range(ROWS)])
        for version, sql in ((1, SQL_1), (2, SQL_2)):
            conn.execute("INSERT INTO schema_version (version, applied_at, description, "
                         "migration_type, file_hash) VALUES (?, '2025-01-01', 'x', 'schema', "
                         "?)", (version, _sha(sql)))
    conn.close()


def table_rows(db: Path) -> dict[str, list[tuple[object, ...]]]:
    """The file's journal mode (header bytes 18-19), schema and every row of every table
    by rowid. Read without writing: a closed WAL database is opened ``immutable``."""
    with open(db, "rb") as f:
        header = f.read(100)
    uri = f"{db.absolute().as_uri()}?mode=ro"
    if header[18:20] == b"\x02\x02" and not Path(f"{db}-wal").exists():
        uri += "&immutable=1"
    conn = sqlite3.connect(uri, uri=True)
    try:
        out = {"header": [(header[18], header[19])],
               "sqlite_master": conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()}
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND "
                                    "name NOT LIKE 'sqlite_%' ORDER BY name").fetchall():
            out[name] = conn.execute(f'SELECT rowid, * FROM "{name}" ORDER BY rowid'
                                     ).fetchall()
        return out
    finally:
        conn.close()


@dataclass
class Rig:
    """A device whose database, state dir, backup dir and inbox live on the mount; the
    config, keys, app stub and run dir (a tmpfs on the device) outside it."""

    tmp: Path
    journal_mode: str = "wal"
    backing: Path = field(init=False)
    mnt: Path = field(init=False)
    out: Path = field(init=False)
    config: Path = field(init=False)
    unit: Path = field(init=False)
    bundle: Path = field(init=False)
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.backing, self.mnt, self.out = (self.tmp / n for n in ("backing", "mnt", "out"))
        for d in (self.backing, self.mnt, self.out):
            d.mkdir(parents=True)
        (self.backing / "data").mkdir()
        make_db(self.backing / "data" / "zmonitor.db", self.journal_mode)
        key, pub = keygen(self.out / "release.test")
        (self.out / "trusted.d").mkdir()
        shutil.copy(pub, self.out / "trusted.d" / pub.name)
        src = make_source(self.out / "src", description="power-cut sweep")
        self.bundle = self.out / "test-1.zmb"
        now = datetime.now(UTC).replace(microsecond=0)
        build(src, self.bundle, [key], 1, created=now - timedelta(days=1),
              expires=now + timedelta(days=365))
        self.unit = self.out / "unit"
        self.unit.mkdir()
        stub = self.out / "systemctl"
        stub.write_text(STUB.format(d=self.unit))
        stub.chmod(0o755)
        self.config = self.out / "config.yaml"
        self.config.write_text(yaml.safe_dump({
            "database": str(self.mnt / "data" / "zmonitor.db"), "device_type": DEVICE,
            "app_unit": "zmonitor.service", "systemctl": str(stub),
            "state_dir": str(self.mnt / "state"), "runtime_dir": str(self.out / "run"),
            "inbox": str(self.mnt / "inbox"), "backup_dir": str(self.mnt / "backups"),
            "trust_dir": str(self.out / "trusted.d"), "health_check_s": 0.2,
            "stop_timeout_s": 5, "max_downtime_s": 120, "batch_size": 1}))
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}
        self.env.pop("NOTIFY_SOCKET", None)

    @property
    def db(self) -> Path:
        return self.mnt / "data" / "zmonitor.db"

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "zmonitor_migrated.cli", "--config",
                               str(self.config), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=self.out)

    def app(self, active: bool, healthy: bool = True) -> None:
        """Power is back: nothing runs until boot starts it."""
        (self.unit / "calls.log").unlink(missing_ok=True)
        flag = self.unit / "active"
        flag.touch() if active else flag.unlink(missing_ok=True)
        bad = self.unit / "unhealthy"
        bad.unlink(missing_ok=True) if healthy else bad.touch()

    def app_active(self) -> bool:
        return (self.unit / "active").exists()


@dataclass
class Recording:
    flow: str
    base: State
    ops: list[Op]
    old_rows: dict[str, list[tuple[object, ...]]]
    new_rows: dict[str, list[tuple[object, ...]]] | None
    floor_before: int
    result: str


@dataclass
class Tally:
    states: int = 0
    cut_points: int = 0
    ops: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    db: Counter[str] = field(default_factory=Counter)
    rows_lost: int = 0
    stuck_without_reason: int = 0
    refused_with_reason: int = 0
    failures: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)


def _floor(state_dir: Path, db: Path) -> int:
    return ds.current_floor(state_dir, ds.device_state(db)).sequence


# -- flows: each leaves the rig in its start state, records, returns the recording ------

def _record(rig: Rig, m: Mount, flow: str, run: Callable[[], str],
            new_rows: dict[str, list[tuple[object, ...]]] | None = None) -> Recording:
    old = table_rows(rig.db)
    floor = _floor(rig.mnt / "state", rig.db)
    m.fs.load(model.scan(rig.backing))  # a clean baseline with an empty log
    base = m.fs.base
    result = run()
    ops = list(m.fs.ops)
    after = table_rows(rig.db) if rig.db.exists() else None
    return Recording(flow, base, ops, old, new_rows if new_rows is not None else after,
                     floor, result)


def flow_apply(rig: Rig, m: Mount) -> Recording:
    rig.app(active=True)

    def run() -> str:
        p = rig.cli("apply", str(rig.bundle))
        assert p.returncode == 0, p.stderr
        return "applied"
    return _record(rig, m, "apply", run)


def flow_health_gate_restore(rig: Rig, m: Mount) -> Recording:
    rig.app(active=True, healthy=False)

    def run() -> str:
        p = rig.cli("apply", str(rig.bundle))
        assert p.returncode == 5, (p.returncode, p.stderr)
        return "restored"
    rec = _record(rig, m, "health-gate-restore", run)
    rig.app(active=True)
    # Both ends of the flow are the old database; the migrated one (this run's: its
    # bookkeeping rows carry this run's id and times) was live in between.
    rec.new_rows = _rows_after_swap(rig, rec)
    return rec


def _rows_after_swap(rig: Rig, rec: Recording) -> dict[str, list[tuple[object, ...]]]:
    """The database's rows right after the run renamed its migrated copy into place."""
    swap = next(i for i, op in enumerate(rec.ops) if op.kind == "rename"
                and op.path == "data/zmonitor.db" and ".migrating-" in op.src)
    plain = rig.out / "after-swap"
    plain.mkdir(exist_ok=True)
    model.materialize(model.crash_state(rec.base, rec.ops, swap + 1, "all"), plain)
    return table_rows(plain / "data" / "zmonitor.db")


def flow_operator_restore(rig: Rig, m: Mount) -> Recording:
    """After an applied run: the operator puts the backup back."""
    rig.app(active=True)
    migrated = table_rows(rig.db)

    def run() -> str:
        p = rig.cli("restore")
        assert p.returncode == 0, p.stderr
        return "restored"
    rec = _record(rig, m, "operator-restore", run)
    rec.new_rows, rec.old_rows = rec.new_rows, migrated
    return rec


def flow_daemon(rig: Rig, m: Mount) -> Recording:
    """The daemon takes the bundle from the inbox, applies it and archives it; stopped
    (SIGTERM) once the bundle is in ``archive/``."""
    rig.app(active=True)
    inbox = rig.mnt / "inbox"
    inbox.mkdir(exist_ok=True)
    shutil.copy(rig.bundle, inbox / rig.bundle.name)

    def run() -> str:
        proc = subprocess.Popen([sys.executable, "-m", "zmonitor_migrated.cli", "--config",
                                 str(rig.config), "daemon"], env=rig.env, cwd=rig.out,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        archive = rig.mnt / "state" / "archive"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if archive.is_dir() and any(archive.iterdir()):
                break
            time.sleep(0.05)
        proc.terminate()
        _out, err = proc.communicate(timeout=60)
        assert archive.is_dir() and any(archive.iterdir()), err
        return "applied"
    return _record(rig, m, "daemon", run)


# Per flow: a closed journal's outcome → the content the database must then hold ("old"
# is the content before the flow, "new" after it).
_FORWARD = {"applied": "new", "restored": "old", "recovered-old": "old", "abandoned": "old",
            "interrupted": "old"}
OUTCOME_CONTENT: dict[str, dict[str | None, str]] = {
    "apply": _FORWARD, "daemon": _FORWARD, "recover-cut": _FORWARD,
    "health-gate-restore": {"restored": "old", "recovered-old": "old", "abandoned": "old",
                            "applied": "new"},
}

MIGRATED: dict[str, dict[str, list[tuple[object, ...]]]] = {}


# -- checking one crash state ----------------------------------------------------------

def _mount_alive(rig: Rig) -> bool:
    try:
        os.stat(rig.mnt / "data")
        return os.path.ismount(rig.mnt)
    except OSError:
        return False


def check_state(rig: Rig, m: Mount, rec: Recording, state: State, label: str,
                tally: Tally) -> None:
    """Check one state; a FUSE server that died under the check (it happens, rarely,
    under a noisy machine) is remounted and the state checked again, once."""
    for attempt in (1, 2):
        if not _mount_alive(rig):
            m.remount()
            tally.outcomes["remounted"] += 1
        before = copy.deepcopy(tally.__dict__)
        _check_state(rig, m, rec, state, label, tally)
        if attempt == 2 or _mount_alive(rig) or len(tally.failures) == len(before["failures"]):
            return
        tally.__dict__.update(before)  # this attempt's counts go with it


def _check_state(rig: Rig, m: Mount, rec: Recording, state: State, label: str,
                 tally: Tally) -> None:
    m.fs.load(state)
    rig.app(active=False)
    proc = subprocess.run([sys.executable, "-m", "powercut.check", str(rig.config),
                           str(rig.mnt)], env=rig.env, capture_output=True, text=True,
                          timeout=300, cwd=rig.out)
    tally.states += 1
    problems: list[str] = []
    try:
        res = json.loads(proc.stdout.splitlines()[-1])
    except (IndexError, ValueError):
        tally.failures.append(f"{label}: checker died (exit {proc.returncode}): "
                              f"{proc.stderr[-2000:]}")
        return
    r1, r2, gate, status = res["recover"], res["recover2"], res["gate"], res["status"]
    # At boot systemd starts the app unit after recovery; its ExecStartPre is the gate.
    starts = rig.app_active() or gate["code"] == 0
    said = (gate["out"] + gate["err"]).strip()
    tally.outcomes[f"recover-exit-{r1['code']}"] += 1
    if r1["code"] not in (0, 6):  # 6: restore failed, the operator is told why
        problems.append(f"recover exit {r1['code']}: {(r1['err'] or r1['out'])[-800:]}")
    if not starts:
        if said:
            tally.refused_with_reason += 1
            tally.outcomes["gate-refused"] += 1
            tally.refusals.append(f"{label}: {said[-300:]} / recover: "
                                  f"{(r1['err'] or r1['out'])[-600:]}")
        else:
            tally.stuck_without_reason += 1
            problems.append("the app cannot start and nothing says why")
    elif r1["code"] != 0:
        problems.append(f"recover failed (exit {r1['code']}) yet the gate lets the app "
                        f"start: {(r1['err'] or r1['out'])[-500:]}")
    if r2["code"] != 0 or res["tree1"] != res["tree2"]:
        problems.append(f"second recover was not a no-op: exit {r2['code']} {r2['out']}")
    elif r1["code"] == 0 and '"outcome": null' not in r2["out"]:
        problems.append(f"second recover found work: {r2['out']}")
    # The database: old or fully migrated, never a mix, never a row lost.
    content: str | None = None
    if not rig.db.exists():
        tally.db["missing"] += 1
        tally.rows_lost += 1
        problems.append("database missing")
    else:
        try:
            rows = table_rows(rig.db)
        except sqlite3.Error as exc:
            rows = {"error": [(str(exc),)]}
        if rows == rec.old_rows:
            tally.db["old"] += 1
            content = "old"
        elif rows == rec.new_rows:
            tally.db["new"] += 1
            content = "new"
        elif {**rows, "header": None} in ({**rec.old_rows, "header": None},
                                          {**(rec.new_rows or {}), "header": None}):
            tally.db["wrong-journal-mode"] += 1
            problems.append(f"the database's rows are intact but its header says journal "
                            f"mode {rows['header']} (1,1 rollback journal; 2,2 WAL), not "
                            f"the one it had")
        else:
            tally.db["mixed"] += 1
            tally.rows_lost += 1
            problems.append("database is neither the old nor the new content")
    if r1["code"] == 0 and rig.db.exists():
        problems += _leftovers(rig)
    # Journal readable (or absent) and closed after a successful recover; what it says
    # happened is what the database shows.
    try:
        j = Journal.load(rig.mnt / "state" / "journal.json")
        if r1["code"] == 0 and j is not None and not j.closed:
            problems.append(f"journal still open in {j.phase}")
        said = OUTCOME_CONTENT.get(rec.flow.split("[")[0], {}).get(
            j.outcome if j is not None else None)
        if said is not None and content is not None and said != content:
            problems.append(f"the journal says {j.outcome if j else None} but the database "
                            f"holds the {content} content")
    except Exception as exc:
        problems.append(f"journal unreadable: {exc}")
    # Anti-rollback floor.
    if rig.db.exists():
        try:
            floor = _floor(rig.mnt / "state", rig.db)
            applied = ds.device_state(rig.db).last_sequence or 0
            if floor < rec.floor_before or floor < applied:
                problems.append(f"anti-rollback floor {floor} went below {rec.floor_before} "
                                f"or the applied sequence {applied}")
        except Exception as exc:
            problems.append(f"anti-rollback state unreadable: {exc}")
    # Backups that status lists match their recorded checksum.
    try:
        info = json.loads(status["out"])
        for b in info.get("backups", []):
            recorded = backups.read_checksum(Path(b))
            actual = hashlib.sha256(Path(b).read_bytes()).hexdigest()
            if recorded != actual:
                problems.append(f"backup {Path(b).name} listed by status does not match its "
                                f"recorded sha256 ({recorded and recorded[:12]} vs "
                                f"{actual[:12]})")
    except (ValueError, OSError) as exc:
        problems.append(f"status unusable: exit {status['code']} {exc} {status['err'][-300:]}")
    if rec.flow == "daemon":
        problems += _bundle_problems(rig, rec, content, tally)
    if problems:
        tally.failures.append(f"{label}: " + "; ".join(problems))


def _leftovers(rig: Rig) -> list[str]:
    """After a recovery that finished: no working copy or restore copy left taking space,
    and no backup that is a hard link to the live file (not a point-in-time copy)."""
    data = rig.db.parent
    left = [p.name for p in data.iterdir() if ".migrating-" in p.name
            or p.name.endswith(".restoring")]
    live = os.stat(rig.db).st_ino
    linked = [b.name for b in backups.list_backups(rig.db, rig.mnt / "backups")
              if os.stat(b).st_ino == live]
    return ([f"left behind after recovery: {', '.join(left)}"] if left else []) + (
        [f"a listed backup is the live file itself: {', '.join(linked)}"] if linked else [])


def _bundle_problems(rig: Rig, rec: Recording, content: str | None,
                     tally: Tally) -> list[str]:
    """The daemon's bundle is never lost while the database is still the old one, and
    never applied twice: one the cut left in the inbox beside a migrated database
    changes nothing when it is taken again (as the restarted daemon would)."""
    want = hashlib.sha256(rig.bundle.read_bytes()).hexdigest()
    found = [p for p in rig.mnt.rglob("*.zmb*") if p.is_file()
             and hashlib.sha256(p.read_bytes()).hexdigest() == want]
    if content == "old" and not found:
        return ["the bundle is gone from the inbox and the database is old"]
    again = [p for p in found if p.parent == rig.mnt / "inbox"]
    if content != "new" or not again:
        return []
    tally.outcomes["bundle-taken-again"] += 1
    p = rig.cli("apply", str(again[0]))
    if p.returncode != 0 or table_rows(rig.db) != rec.new_rows:
        return [f"the bundle left in the inbox, taken again, changed the migrated database "
                f"(exit {p.returncode}): {p.stderr[-300:]}"]
    return []


# -- the sweep -------------------------------------------------------------------------

def states_of(rec: Recording, subsets: int, seed: int, cuts: range | None = None,
              torn: int = 0) -> list[tuple[str, State]]:
    """Every distinct crash state of the recording: per cut point, the durable ops only,
    every op, ``subsets`` seeded subsets of the unsynced ones and ``torn`` more with the
    unsynced writes torn at sectors."""
    durable = model.durable_after(rec.ops)
    seen: set[str] = set()
    out: list[tuple[str, State]] = []
    for k in cuts if cuts is not None else range(len(rec.ops) + 1):
        if k > len(rec.ops):
            break
        modes = [("sync", 0), ("all", 0)]
        if model.unsynced_count(rec.ops, k, durable) > 1:
            modes += [("subset", seed * 1_000_003 + k * 101 + s) for s in range(subsets)]
        if model.unsynced_count(rec.ops, k, durable) > 0:
            modes += [("torn", seed * 1_000_003 + k * 101 + 50 + s) for s in range(torn)]
        for mode, s in modes:
            st = model.crash_state(rec.base, rec.ops, k, mode, s, durable)
            d = st.digest()
            if d in seen:
                continue
            seen.add(d)
            out.append((f"{rec.flow} k={k}/{len(rec.ops)} {mode}"
                        + (f" seed={s}" if mode in ("subset", "torn") else ""), st))
    return out


def pick(states: list[tuple[str, State]], sample: int,
         rng: random.Random) -> list[tuple[str, State]]:
    """A sample: every worst-case state (one per fsync: where a missing fsync shows)
    first, then a seeded draw from the others."""
    worst = [s for s in states if s[0].endswith(" sync")]
    rest = [s for s in states if not s[0].endswith(" sync")]
    if len(worst) > sample:  # spread over the whole flow, not only its first cut points
        worst = [worst[i * len(worst) // sample] for i in range(sample)]
    return worst + rng.sample(rest, max(0, min(len(rest), sample - len(worst))))


FLOWS = ("apply", "health-gate-restore", "operator-restore", "recover-cut", "daemon")


def sweep(tmp: Path, flows: list[str], *, subsets: int = 2, torn: int = 2, seed: int = 1,
          sample: int = 0,
          cuts: range | None = None, journal_mode: str = "wal",
          log: Callable[[str], None] = print) -> dict[str, Tally]:
    """Record each flow, check its crash states (all of them, or ``sample`` per flow)."""
    rng = random.Random(seed)
    tallies: dict[str, Tally] = {}
    rig = Rig(tmp, journal_mode)
    with Mount(rig.backing, rig.mnt) as m:
        start = model.scan(rig.backing)
        # The apply recording also gives the migrated content the others compare with.
        m.fs.load(start)
        rec_apply = flow_apply(rig, m)
        MIGRATED["rows"] = rec_apply.new_rows or {}
        applied_state = model.scan(rig.backing)
        for flow in flows:
            t0 = time.monotonic()
            if flow == "apply":
                rec = rec_apply
            elif flow == "health-gate-restore":
                m.fs.load(start)
                rec = flow_health_gate_restore(rig, m)
            elif flow == "operator-restore":
                m.fs.load(applied_state)
                rec = flow_operator_restore(rig, m)
            elif flow == "daemon":
                m.fs.load(start)
                rec = flow_daemon(rig, m)
            elif flow == "recover-cut":
                rec = None
            else:
                raise ValueError(flow)
            tally = tallies.setdefault(flow, Tally())
            if rec is not None:
                states = states_of(rec, subsets, seed, cuts, torn)
                tally.ops, tally.cut_points = len(rec.ops), len(rec.ops) + 1
                if sample and len(states) > sample:
                    states = pick(states, sample, rng)
                for label, st in states:
                    check_state(rig, m, rec, st, label, tally)
            else:
                _sweep_recover_cut(rig, m, rec_apply, (subsets, torn), seed, sample, rng,
                                   tally)
            log(f"{flow}: {tally.states} states from {tally.cut_points} cut points "
                f"({tally.ops} ops) in {time.monotonic() - t0:.0f} s; db {dict(tally.db)}; "
                f"{dict(tally.outcomes)}; rows lost {tally.rows_lost}; failures "
                f"{len(tally.failures)}")
            for f in tally.failures[:20]:
                log(f"  FAIL {f}")
            for f in tally.refusals[:5]:
                log(f"  REFUSED {f}")
    return tallies


def _sweep_recover_cut(rig: Rig, m: Mount, rec_apply: Recording, subsets: tuple[int, int],
                       seed: int, sample: int, rng: random.Random, tally: Tally) -> None:
    """A cut during ``apply`` that leaves recovery work (an open journal after the stop),
    then ``recover`` recorded from there and cut at every point of its own. The first
    cut leaves the worst case (only what was synced) or everything written (the working
    copy then still there for recovery to remove), once per open journal phase."""
    durable = model.durable_after(rec_apply.ops)
    picks: list[State] = []
    seen: set[tuple[str, str]] = set()
    for mode, k in [(mode, k) for mode in ("sync", "all")
                    for k in range(len(rec_apply.ops) + 1)]:
        st = model.crash_state(rec_apply.base, rec_apply.ops, k, mode, 0, durable)
        jpath = "state/journal.json"
        ino = st.names.get(jpath)
        if ino is None:
            continue
        try:
            phase = json.loads(st.data[ino]).get("phase")
            closed = json.loads(st.data[ino]).get("outcome")
        except ValueError:
            continue
        if closed or phase in ("received", "verified", "prechecked") or (mode, phase) in seen:
            continue
        seen.add((mode, phase))
        picks.append(st)
    for i, st in enumerate(picks):
        m.fs.load(st)
        rig.app(active=False)
        base = m.fs.base
        p = rig.cli("recover")
        rec = Recording(f"recover-cut[{i}]", base, list(m.fs.ops), rec_apply.old_rows,
                        rec_apply.new_rows, rec_apply.floor_before, f"exit {p.returncode}")
        states = states_of(rec, subsets[0], seed, torn=subsets[1])
        tally.ops += len(rec.ops)
        tally.cut_points += len(rec.ops) + 1
        if sample:
            states = pick(states, max(1, sample // len(picks)), rng)
        for label, cs in states:
            check_state(rig, m, rec, cs, label, tally)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", default="all", help=f"comma list of {', '.join(FLOWS)}")
    ap.add_argument("--subsets", type=int, default=2,
                    help="seeded subsets of the unsynced ops per cut point")
    ap.add_argument("--torn", type=int, default=2,
                    help="seeded subsets with torn writes per cut point")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sample", type=int, default=0, help="states per flow (0: all)")
    ap.add_argument("--cuts", help="only cut points A:B (a debugging aid)")
    ap.add_argument("--journal-mode", choices=JOURNAL_MODES, default="wal",
                    help="the database's journal mode (the monitor's is wal)")
    ap.add_argument("--json", type=Path, help="write the tallies here")
    args = ap.parse_args(argv)
    flows = list(FLOWS) if args.flows == "all" else args.flows.split(",")
    unknown = [f for f in flows if f not in FLOWS]
    if unknown:
        ap.error(f"--flows: unknown flow {', '.join(unknown)}; one of all, {', '.join(FLOWS)}")
    if min(args.subsets, args.torn, args.sample) < 0:
        ap.error("--subsets, --torn and --sample count states: 0 or more")
    if args.cuts and not re.fullmatch(r"\d+:\d+", args.cuts):
        ap.error(f"--cuts {args.cuts!r}: A:B, two cut points (e.g. 250:290)")
    why = fuse_unavailable()
    if why:
        print(f"powercut.sweep: {why}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="powercut-") as tmp:
        tallies = sweep(Path(tmp), flows, subsets=args.subsets, torn=args.torn,
                        seed=args.seed,
                        sample=args.sample, journal_mode=args.journal_mode,
                        cuts=range(*map(int, args.cuts.split(":"))) if args.cuts else None)
    total = sum(t.states for t in tallies.values())
    lost = sum(t.rows_lost for t in tallies.values())
    stuck = sum(t.stuck_without_reason for t in tallies.values())
    failures = sum(len(t.failures) for t in tallies.values())
    print(f"TOTAL: {total} distinct crash states in {time.monotonic() - t0:.0f} s; rows "
          f"lost {lost}; monitors unable to start without a stated reason {stuck}; "
          f"failed checks {failures}")
    if args.json:
        args.json.write_text(json.dumps({k: {**v.__dict__, "outcomes": dict(v.outcomes),
                                             "db": dict(v.db)} for k, v in tallies.items()},
                                        indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
