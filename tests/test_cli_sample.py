"""``zmonitor-migrate sample OUT.db``: a sample database at an older version for trials;
its arguments are checked while they are parsed, and an existing file is never
overwritten."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from zmonitor_migrated import cli


def _sample(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["sample", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_makes_a_database_at_the_version_asked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_db = tmp_path / "trial.db"
    code, out, err = _sample(capsys, str(out_db), "--version", "4", "--vitals", "250",
                             "--json")
    assert code == 0, err
    assert json.loads(out) == {"ok": True, "database": str(out_db), "version": 4,
                               "vitals": 250, "source": json.loads(out)["source"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial.db"]  # no temp left
    conn = sqlite3.connect(f"file:{out_db}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 4
        assert conn.execute("SELECT count(*) FROM vitals").fetchone()[0] == 250
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_sample_never_overwrites_an_existing_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_db = tmp_path / "zmonitor.db"
    out_db.write_bytes(b"the monitor's real data")
    code, _out, err = _sample(capsys, str(out_db), "--vitals", "10")
    assert code == 2
    assert "already exists" in err and "never overwritten" in err
    assert out_db.read_bytes() == b"the monitor's real data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zmonitor.db"]


@pytest.mark.parametrize("args, named", [
    (["--version", "0"], "--version"),
    (["--version", "15"], "--version"),  # above the shipped source's last version
    (["--version", "ten"], "--version"),
    (["--vitals", "0"], "--vitals"),
    (["--vitals", "5000001"], "--vitals"),
    (["--source", "{root}"], "--source"),  # not a migration source
])
def test_sample_refuses_bad_arguments_creating_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        named: str) -> None:
    out_db = tmp_path / "trial.db"
    code, _out, err = _sample(capsys, str(out_db), *[a.format(root=tmp_path) for a in args])
    assert code == 2 and f"argument {named}" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["missing-dir/trial.db", "."])
def test_sample_refuses_an_output_that_cannot_be_a_new_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    code, _out, err = _sample(capsys, str(tmp_path / where))
    assert code == 2 and "argument OUT.db" in err, err
    assert list(tmp_path.iterdir()) == []
