"""What an operator sees of a run that did not end by itself: its downtime is recorded
(history and metrics), an operator's stop is a warning and not a failure alert, and a
recovery is logged at warning priority.

Priorities are read the way journald would keep them: the child's stderr is a file
whose device and inode are put in ``$JOURNAL_STREAM``, so the product writes the
``<N>`` prefixes it writes under systemd.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, Device, make_device
from fault_helpers import journal_phase

from zmonitor_migrated.journal import Journal, Phase


def _journal_env(dev: Device, err: Path) -> tuple[dict[str, str], object]:
    """An env whose JOURNAL_STREAM names ERR, opened for the child's stderr."""
    stream = err.open("w")
    st = os.fstat(stream.fileno())
    return {**dev.env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stream


def _cli(dev: Device, err: Path, *args: str) -> subprocess.Popen[str]:
    env, stream = _journal_env(dev, err)
    return subprocess.Popen(
        [sys.executable, "-m", "zmonitor_migrated.cli", "--config", str(dev.config_path),
         *args], stdout=subprocess.PIPE, stderr=stream, text=True, env=env, cwd=ROOT,
        start_new_session=True)


def _wait_phase(proc: subprocess.Popen[str], journal: Path, phase: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal_phase(journal) == phase:
            return
        time.sleep(0.002)
    raise AssertionError(f"the run never reached {phase} (exit {proc.poll()})")


def _metric(dev: Device, name: str) -> float:
    text = (dev.root / "metrics" / "zmonitor_migrate.prom").read_text()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, text
    return float(m.group(1))


def test_journal_downtime_runs_from_the_stop_to_the_last_start(tmp_path: Path) -> None:
    j = Journal(path=tmp_path / "j.json", run_id="r")
    j.phases = [("received", 100.0), ("app_stopped", 110.0), ("backed_up", 111.0),
                ("applying", 112.0)]
    assert j.downtime_s() is None  # killed: the app is not started yet
    j.phases += [("failed", 150.0), ("restoring", 150.0), ("restored", 151.0),
                 ("app_started", 152.5), ("closed", 153.0)]
    assert j.downtime_s() == 42.5  # started again by the recovery
    j.phases = [("received", 100.0), ("verified", 101.0), ("closed", 102.0)]
    assert j.downtime_s() is None  # never stopped
    j.phases = [("app_stopped", 110.0), ("app_started", 90.0)]
    assert j.downtime_s() is None  # clock set back in between: unknown, not negative


def test_a_run_killed_in_its_downtime_then_recovered_records_the_downtime(
        tmp_path: Path, big_db_v10: Path, slow_bundle: Path,
        release_key: tuple[Path, Path]) -> None:
    dev = make_device(tmp_path / "dev", big_db_v10, release_key[1])
    assert dev.systemctl("start", "zmonitor.service").returncode == 0
    try:
        jpath = dev.root / "state" / "journal.json"
        run = _cli(dev, tmp_path / "apply.err", "apply", str(slow_bundle))
        _wait_phase(run, jpath, "applying")
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        assert not dev.app_active(), "the kill left the app stopped (the downtime goes on)"
        time.sleep(0.3)  # the app stays down until recover starts it
        rec = _cli(dev, tmp_path / "recover.err", "recover")
        assert rec.wait(timeout=120) == 0, (tmp_path / "recover.err").read_text()
        assert dev.app_active()
        err = (tmp_path / "recover.err").read_text()
        # A recovery is news for biomed: warning priority, not info.
        assert re.search(r"^<4>recover: run \S+ was interrupted in phase applying; "
                         r"recovery: discard$", err, re.M), err
        assert re.search(r"^<4>recover: run \S+: recovered-old, downtime \d+\.\d\d s$",
                         err, re.M), err

        record = dev.history()[-1]
        assert record["recovered"] is True and record["outcome"] == "recovered-old"
        phases = Journal.load(jpath).phases  # type: ignore[union-attr]
        stopped = next(t for p, t in phases if p == Phase.APP_STOPPED.value)
        started = [t for p, t in phases if p == Phase.APP_STARTED.value][-1]
        assert record["downtime_s"] == round(started - stopped, 3)
        assert record["downtime_s"] >= 0.3  # type: ignore[operator]

        shown = dev.cli("history", check=True).stdout
        assert f"downtime {record['downtime_s']:.2f} s" in shown, shown
        assert "app not stopped" not in shown
        assert _metric(dev, "zmonitor_migrate_last_downtime_seconds") == \
            round(float(record["downtime_s"]), 3)  # type: ignore[arg-type]
        assert _metric(dev, "zmonitor_migrate_downtime_seconds_total") == \
            round(float(record["downtime_s"]), 3)  # type: ignore[arg-type]
    finally:
        dev.systemctl("stop", "zmonitor.service")


def test_an_operator_stop_mid_run_is_a_warning_not_a_failure_alert(
        tmp_path: Path, big_db_v10: Path, slow_bundle: Path,
        release_key: tuple[Path, Path]) -> None:
    dev = make_device(tmp_path / "dev", big_db_v10, release_key[1])
    assert dev.systemctl("start", "zmonitor.service").returncode == 0
    try:
        run = _cli(dev, tmp_path / "apply.err", "apply", str(slow_bundle))
        _wait_phase(run, dev.root / "state" / "journal.json", "applying")
        os.kill(run.pid, signal.SIGTERM)  # what systemctl stop sends
        assert run.wait(timeout=120) == 5
        err = (tmp_path / "apply.err").read_text()
        assert "alert=migration-failed" not in err, err
        assert re.search(r"^<4>interrupted: run interrupted by operator \(SIGTERM\): ", err,
                         re.M), err
        assert not re.search(r"^<[0-3]>", err, re.M), err  # nothing above warning
        assert dev.app_active()
        record = dev.history()[-1]
        assert record["outcome"] == "interrupted"
        assert record["error"]["kind"] == "interrupted"  # type: ignore[index]
        assert isinstance(record["downtime_s"], float) and record["downtime_s"] > 0
    finally:
        dev.systemctl("stop", "zmonitor.service")
