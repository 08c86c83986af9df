"""A new user's first contact with the command line: wrong values, usage errors, --json,
and the text an operator reads.

The table below runs every command and option with bad values (zero, negative, huge,
not a number, a missing file, a file where a directory is expected and the other way
round) through the real entry point, ``cli.main``: no traceback, exit 2 (or the
documented code), the option named, and not one file created or changed in the device
directory (no state dir, journal or history for a usage error). The rest runs the CLI
as a subprocess on a real device directory (fake systemctl, a real app process).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SHIPPED, Device

from zmonitor_migrated import cli

BIG = str(2**64)


@dataclass
class Env:
    root: Path
    config: Path
    db: Path
    key: Path
    bundle: Path

    def fmt(self, arg: str) -> str:
        return arg.format(root=self.root, missing=self.root / "missing", file=self.root /
                          "notes.txt", dir=self.root / "adir", db=self.db, key=self.key,
                          bundle=self.bundle, src=SHIPPED,
                          spec=SHIPPED / "schema" / "database.yaml")


def _tree(root: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (p.stat().st_size, p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[str(p.relative_to(root))] = (0, 0, "dir")
    return out


@pytest.fixture
def env(tmp_path: Path, sample_db_v10: Path, release_key: tuple[Path, Path],
        shipped_bundle: Path) -> Env:
    root = tmp_path / "device"
    (root / "data").mkdir(parents=True)
    db = root / "data" / "zmonitor.db"
    shutil.copyfile(sample_db_v10, db)
    (root / "trusted.d").mkdir()
    shutil.copy(release_key[1], root / "trusted.d" / release_key[1].name)
    (root / "notes.txt").write_text("# not a database, not a bundle, not a key\n")
    (root / "adir").mkdir()
    (root / "adir" / "something").write_text("x")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "database": str(db), "app_unit": None, "state_dir": str(root / "state"),
        "runtime_dir": str(root / "run"), "inbox": str(root / "inbox"),
        "backup_dir": str(root / "backups"), "trust_dir": str(root / "trusted.d"),
        "health_check_s": 0.2}))
    return Env(root=root, config=config, db=db, key=release_key[0], bundle=shipped_bundle)


# (argv, text that must appear in the output: the option or argument named). Exit 2
# unless a third element gives the documented code.
BAD: list[tuple[list[str], str] | tuple[list[str], str, int]] = [
    # the configuration file and --db
    (["--config", "{missing}", "status"], "does not exist"),
    (["--config", "{dir}", "status"], "is not a regular file"),
    (["--config", "{file}", "status"], "config"),
    (["status", "--db", "{dir}"], "argument --db"),
    (["status", "--db", "{missing}"], "does not exist"),
    (["status", "--db", "{file}"], "cannot be read"),
    (["status", "--source", "{missing}"], "argument --source"),
    (["status", "--source", "{file}"], "argument --source"),
    (["status", "--source", "{dir}"], "argument --source"),
    # lint
    (["lint", "{missing}"], "argument SRC"),
    (["lint", "{file}"], "argument SRC"),
    (["lint", "{dir}"], "argument SRC"),
    # apply
    (["apply", "{missing}"], "argument BUNDLE"),
    (["apply", "{dir}"], "argument BUNDLE"),
    (["apply", "{bundle}", "--target", "-1"], "argument --target"),
    (["apply", "{bundle}", "--target", "ten"], "argument --target"),
    (["apply", "{bundle}", "--target", BIG], "argument --target"),
    (["apply", "{bundle}", "--frobnicate"], "--frobnicate"),
    # restore: nothing was stopped, so a bad backup is a usage error, not exit 6
    (["restore", "/nonexistent.db"], "argument BACKUP"),
    (["restore", "{missing}"], "argument BACKUP"),
    (["restore", "{file}"], "argument BACKUP"),
    (["restore", "{dir}"], "argument BACKUP"),
    (["restore", "--run", "20990101T000000Z-000000"], "run 20990101T000000Z-000000"),
    # rollback
    (["rollback", "--to", "-1", "--source", "{src}"], "argument --to"),
    (["rollback", "--to", "x", "--source", "{src}"], "argument --to"),
    (["rollback", "--to", BIG, "--source", "{src}"], "argument --to"),
    (["rollback", "--to", "99", "--source", "{src}"], "--to 99"),
    (["rollback", "--to", "10", "--source", "{src}"], "--to 10"),
    (["rollback", "--to", "5"], "--bundle"),
    (["rollback", "--to", "5", "--source", "{src}", "--bundle", "{bundle}"], "exactly one"),
    (["rollback", "--to", "5", "--source", "{missing}"], "argument --source"),
    (["rollback", "--to", "5", "--source", "{file}"], "argument --source"),
    (["rollback", "--to", "5", "--bundle", "{missing}"], "argument --bundle"),
    (["rollback", "--to", "5", "--bundle", "{dir}"], "argument --bundle"),
    (["rollback", "--source", "{src}"], "--to"),
    # demo
    (["demo", "--vitals", "0"], "argument --vitals"),
    (["demo", "--vitals", "-5"], "argument --vitals"),
    (["demo", "--vitals", "many"], "argument --vitals"),
    (["demo", "--vitals", BIG], "argument --vitals"),
    (["demo", "--workdir", "{file}"], "argument --workdir"),
    (["demo", "--workdir", "{file}/sub"], "argument --workdir"),
    (["demo", "--workdir", "{dir}"], "--workdir"),
    (["demo", "--json"], "--json"),
    (["daemon", "--json"], "--json"),
    # keygen
    (["keygen", "{file}/x"], "notes.txt"),
    # bundle build
    (["bundle", "build", "{missing}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence",
      "1"], "argument SRC"),
    (["bundle", "build", "{file}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence", "1"],
     "argument SRC"),
    (["bundle", "build", "{dir}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence", "1"],
     "argument SRC"),
    (["bundle", "build", "{src}", "-o", "{dir}", "--key", "{key}", "--sequence", "1"],
     "argument -o"),
    (["bundle", "build", "{src}", "-o", "{missing}/o.zmb", "--key", "{key}", "--sequence",
      "1"], "argument -o"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{missing}", "--sequence",
      "1"], "argument --key"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{dir}", "--sequence", "1"],
     "argument --key"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{file}", "--sequence", "1"],
     "notes.txt"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence", "0"],
     "argument --sequence"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence", "-1"],
     "argument --sequence"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence", BIG],
     "argument --sequence"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence",
      "one"], "argument --sequence"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence", "1",
      "--valid-days", "0"], "argument --valid-days"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence", "1",
      "--valid-days", "-3"], "argument --valid-days"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence", "1",
      "--valid-days", "1e9"], "argument --valid-days"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence", "1",
      "--valid-days", "nan"], "argument --valid-days"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence", "1",
      "--valid-days", "inf"], "argument --valid-days"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence", "1",
      "--expires", "soon"], "--expires"),
    (["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence", "1",
      "--created", "2026-01-01"], "--created"),
    # bundle sign / verify
    (["bundle", "sign", "{missing}", "--key", "{key}"], "argument BUNDLE"),
    (["bundle", "sign", "{dir}", "--key", "{key}"], "argument BUNDLE"),
    (["bundle", "sign", "{bundle}", "--key", "{missing}"], "argument --key"),
    (["bundle", "verify", "nothere.zmb"], "not found"),
    (["bundle", "verify", "{dir}"], "argument BUNDLE"),
    (["bundle", "verify", "{bundle}", "--trust", "{file}"], "a directory is expected"),
    (["bundle", "verify", "{bundle}", "--trust", "{missing}"], "argument --trust"),
    (["bundle", "verify", "{bundle}", "--threshold", "0"], "argument --threshold"),
    (["bundle", "verify", "{bundle}", "--threshold", "-2"], "argument --threshold"),
    (["bundle", "verify", "{bundle}", "--threshold", "two"], "argument --threshold"),
    # schema
    (["schema", "ddl", "{missing}"], "argument PATH"),
    (["schema", "ddl", "{dir}"], "argument PATH"),
    (["schema", "ddl", "{file}"], "notes.txt", 3),  # a malformed database.yaml: exit 3
    (["schema", "diff", "{spec}", "--db", "{missing}"], "no such database"),
    (["schema", "diff", "{spec}", "--db", "{dir}"], "argument --db"),
    (["schema", "diff", "{spec}", "--db", "{file}"], "cannot read the schema"),
    (["schema", "frob"], "frob"),
    (["frobnicate"], "frobnicate"),
]


def _ids() -> list[str]:
    return [" ".join(c[0]).replace("{", "").replace("}", "")[:60] for c in BAD]


@pytest.mark.parametrize("case", BAD, ids=_ids())
def test_bad_value_is_a_usage_error(case: tuple, env: Env,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    argv, named = [env.fmt(a) for a in case[0]], case[1]
    expected = case[2] if len(case) > 2 else 2
    before = _tree(env.root)
    code = cli.main(["--config", str(env.config), *argv] if argv[0] != "--config" else argv)
    out, err = capsys.readouterr()
    text = out + err
    assert "Traceback" not in text
    assert code == expected, text
    assert env.fmt(named) in text, text
    assert _tree(env.root) == before, "a usage error changed the device directory"


@pytest.mark.parametrize("argv", [
    ["lint", "{file}"], ["demo", "--vitals", "0"], ["restore", "{file}"],
    ["rollback", "--to", "99", "--source", "{src}"], ["bundle", "verify", "nothere.zmb"],
    ["demo"], ["daemon"], ["apply", "{missing}"], ["frobnicate"],
])
def test_usage_error_with_json_prints_one_json_object(argv: list[str], env: Env,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    code = cli.main(["--config", str(env.config), "--json", *[env.fmt(a) for a in argv]])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err
    obj = json.loads(out)
    assert obj["ok"] is False and obj["error"]["kind"] in ("usage", "config")


@pytest.mark.parametrize("argv", [
    ["lint", "{src}"], ["status"], ["history"], ["gate"], ["recover"],
    ["schema", "ddl", "{spec}"], ["schema", "diff", "{spec}"],
    ["bundle", "verify", "{bundle}"], ["keygen", "{root}/k/new"],
    ["bundle", "build", "{src}", "-o", "{root}/o.zmb", "--key", "{key}", "--sequence", "3"],
])
def test_every_command_honours_json(argv: list[str], env: Env,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["--config", str(env.config), "--json", *[env.fmt(a) for a in argv]])
    out, _err = capsys.readouterr()
    assert isinstance(json.loads(out), dict), out  # exactly one object, nothing else


# -- a config or usage error touches nothing ------------------------------------------------
def _run(args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("NOTIFY_SOCKET", None)
    return subprocess.run([sys.executable, "-m", "zmonitor_migrated.cli", *args],
                          capture_output=True, text=True, cwd=cwd, env=full_env,
                          timeout=timeout)


def test_apply_with_a_config_error_touches_nothing(tmp_path: Path, shipped_bundle: Path
                                                   ) -> None:
    """Every path of this config points into an empty directory; the trust directory is
    missing, a configuration error: the directory must stay empty (no state dir, no
    backup dir, no journal, no history entry)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "database": str(empty / "db" / "zmonitor.db"), "state_dir": str(empty / "state"),
        "runtime_dir": str(empty / "run"), "inbox": str(empty / "inbox"),
        "backup_dir": str(empty / "backups"), "trust_dir": str(empty / "trusted.d"),
        "app_unit": None}))
    proc = _run(["--config", str(cfg), "apply", str(shipped_bundle)])
    assert proc.returncode == 2, proc.stderr
    assert "trust directory" in proc.stderr and "Traceback" not in proc.stderr
    assert list(empty.iterdir()) == []
    proc = _run(["--config", str(cfg), "rollback", "--to", "3", "--bundle",
                 str(shipped_bundle)])
    assert proc.returncode == 2 and list(empty.iterdir()) == [], proc.stderr


def test_apply_with_a_missing_config_file_touches_nothing(tmp_path: Path,
                                                          shipped_bundle: Path) -> None:
    proc = _run(["apply", str(shipped_bundle)], cwd=tmp_path,
                env={"ZMONITOR_MIGRATE_CONFIG": str(tmp_path / "nope.yaml")})
    assert proc.returncode == 2 and "nope.yaml does not exist" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# -- restore, rollback, re-apply on a device with its app running ---------------------------
def test_restore_of_a_bad_backup_stops_nothing(device: Device) -> None:
    before = device.db.read_bytes()
    for bad in ("/nonexistent.db", str(ROOT / "README.md")):
        proc = device.cli("restore", bad)
        assert proc.returncode == 2, proc.stderr
        assert "argument BACKUP" in proc.stderr and "Traceback" not in proc.stderr
    assert not any("stop" in c for c in device.calls())
    assert device.app_active()
    assert device.history() == [] and not (device.root / "state" / "journal.json").exists()
    assert device.db.read_bytes() == before


@pytest.mark.parametrize("to", ["99", "-1", "14"])
def test_rollback_usage_error_is_not_a_run(device: Device, to: str) -> None:
    proc = device.cli("rollback", "--to", to, "--source", str(SHIPPED))
    assert proc.returncode == 2, proc.stderr
    assert "--to" in proc.stderr and "Traceback" not in proc.stderr
    assert device.history() == []
    assert not (device.root / "state" / "journal.json").exists()
    status = device.cli("status", check=True).stdout
    assert "last run" not in status


def test_reapply_after_rollback_tells_the_truth(device: Device, shipped_bundle: Path) -> None:
    applied = device.cli("apply", str(shipped_bundle), check=True)
    # Progress lines an operator reads: the batched migration's place, no doubled words.
    log = applied.stderr
    assert "(2/4) batch" in log and "row changes" in log
    assert "rehearsal: rehearsal" not in log and "applying: applying" not in log
    assert " rows " not in log

    device.set_config(allow_unsigned_source=True)  # a developer machine: --source is unsigned
    rolled = device.cli("rollback", "--to", "12", "--source", str(SHIPPED), "--unsigned-source",
                        check=True)
    assert "sequence 0" not in rolled.stderr and "not verified" in rolled.stderr

    again = device.cli("apply", str(shipped_bundle))
    assert again.returncode == 3, again.stdout + again.stderr
    assert "nothing to do" not in again.stderr
    assert "0013, 0014" in again.stderr and "--sequence 2" in again.stderr

    status = device.cli("status", "--source", str(SHIPPED), check=True).stdout
    assert "pending (against" in status and ": 2" in status
    history = device.cli("history", check=True).stdout
    for text in (status, history):
        assert "None" not in text, text
    assert "version 10 → 14" in history and "version 14 → 12" in history
    assert "phases: received" in history and "database size:" in history
    phases = history.split("phases: ", 1)[1].splitlines()[0]
    names = [p.split()[0] for p in phases.split(", ")]
    assert names.index("received") < names.index("app_stopped") < names.index("committed")


def test_rollback_without_bundle_uses_the_archived_bundle(device: Device,
                                                         shipped_bundle: Path) -> None:
    refused = device.cli("rollback", "--to", "5")
    assert refused.returncode == 2 and "--bundle" in refused.stderr  # nothing applied yet
    applied = json.loads(device.cli("apply", str(shipped_bundle), "--json", check=True).stdout)
    archive = device.root / "state" / "archive"
    archive.mkdir()
    # What the daemon leaves after an applied run, next to a bundle that is not the one.
    shutil.copy(shipped_bundle, archive / f"{applied['run_id']}-zmonitor-1.zmb")
    (archive / "99999999T999999Z-junk.zmb").write_text("not a bundle")
    proc = device.cli("rollback", "--to", "12")
    assert proc.returncode == 0, proc.stderr
    assert "rolled back to version 12" in proc.stdout
    status = json.loads(device.cli("status", "--json", check=True).stdout)
    assert status["current_version"] == 12


def test_status_lists_the_replaced_database_a_restore_kept(device: Device,
                                                           shipped_bundle: Path) -> None:
    device.cli("apply", str(shipped_bundle), check=True)
    device.cli("restore", check=True)
    status = device.cli("status", check=True).stdout
    assert "replaced databases kept by restores: 1" in status, status
    assert "-replaced.db" in status


# -- WAL databases: status and schema diff ------------------------------------------------------
@pytest.fixture
def closed_wal_db(tmp_path: Path, sample_db_v10: Path) -> Path:
    db = tmp_path / "wal" / "zmonitor.db"
    db.parent.mkdir()
    shutil.copyfile(sample_db_v10, db)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    conn.close()
    assert not Path(f"{db}-wal").exists()
    return db


def test_status_reports_wal_for_a_closed_wal_database(env: Env, closed_wal_db: Path) -> None:
    proc = _run(["--config", str(env.config), "status", "--db", str(closed_wal_db)])
    assert proc.returncode == 0, proc.stderr
    assert "journal wal" in proc.stdout, proc.stdout
    assert sorted(p.name for p in closed_wal_db.parent.iterdir()) == ["zmonitor.db"]


def test_schema_diff_leaves_no_side_files(env: Env, closed_wal_db: Path) -> None:
    proc = _run(["--config", str(env.config), "schema", "diff",
                 str(SHIPPED / "schema" / "database.yaml"), "--db", str(closed_wal_db)])
    assert proc.returncode == 4, proc.stderr  # version 10 differs from the schema of 14
    assert sorted(p.name for p in closed_wal_db.parent.iterdir()) == ["zmonitor.db"]


# -- lint and build refuse what only the device would have found ------------------------------
BROKEN_SOURCES = {
    "post.yaml unknown key": ("checks/post.yaml", "[0]: unknown key 'expct'",
                              lambda t: t.replace("  expect: 0", "  expct: 0", 1)),
    "post.yaml not a list": ("checks/post.yaml", "top level", lambda t: "foo: bar\n"),
    "database.yaml foo: bar": ("schema/database.yaml", "unknown key 'foo'",
                               lambda t: "foo: bar\n"),
    "database.yaml bad column": ("schema/database.yaml", "tables.patients.columns[0].nullable",
                                 lambda t: t.replace("nullable: false", "nullable: maybe", 1)),
    "bundle.yaml typo": ("bundle.yaml", "unknown key 'devices_types'",
                         lambda t: t + "devices_types: [zmonitor-bedside]\n"),
}


def _expected_line(path: Path, needle: str) -> int:
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return i
    return 1


@pytest.mark.parametrize("command", ["lint", "build"])
@pytest.mark.parametrize("case", sorted(BROKEN_SOURCES))
def test_lint_and_build_refuse_invalid_source_yaml(case: str, command: str, tmp_path: Path,
                                                   release_key: tuple[Path, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rel, message, edit = BROKEN_SOURCES[case]
    src = tmp_path / "src"
    shutil.copytree(SHIPPED, src)
    target = src / rel
    target.write_text(edit(target.read_text()))
    needle = {"post.yaml unknown key": "expct:", "post.yaml not a list": "foo:",
              "database.yaml foo: bar": "foo:", "database.yaml bad column": "nullable: maybe",
              "bundle.yaml typo": "devices_types"}[case]
    line = _expected_line(target, needle)  # the line of the offending key itself
    if command == "lint":
        code = cli.main(["lint", str(src)])
    else:
        code = cli.main(["bundle", "build", str(src), "-o", str(tmp_path / "o.zmb"), "--key",
                         str(release_key[0]), "--sequence", "1"])
    out, err = capsys.readouterr()
    assert code == 3, out + err
    assert f"{rel}:{line}: error" in out + err, out + err
    assert message in out + err
    assert not (tmp_path / "o.zmb").exists()


def test_shipped_source_lints_clean(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["lint", str(SHIPPED)]) == 0
    assert "0 error(s)" in capsys.readouterr().out


# -- the demo -------------------------------------------------------------------------------
@pytest.fixture
def demo_run(tmp_path: Path) -> Iterator[subprocess.CompletedProcess[str]]:
    yield _run(["demo", "--workdir", "demo-work", "--vitals", "3000"], cwd=tmp_path,
               timeout=300)


@pytest.mark.slow
def test_demo_with_a_relative_workdir(demo_run: subprocess.CompletedProcess[str],
                                      tmp_path: Path) -> None:
    proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "demo-work" / "data" / "zmonitor.db").is_file()
    assert not (tmp_path / "demo-work" / "demo-work").exists()
    out = proc.stdout
    # Human text: no raw dict, no None, phases in run order, sizes, rows, the backup.
    assert "{'" not in out and "None" not in out, out
    assert "phases: received" in out and "database size:" in out and "rows: " in out
    assert "backup: " in out
    assert "(no unit)" not in proc.stderr
