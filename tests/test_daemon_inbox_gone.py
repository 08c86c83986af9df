"""The daemon outlives its inbox vanishing (a package removal deletes the empty inbox
directory; a person may too): one warning, no traceback, no warning per pass, and the
inbox is handled again once it is back."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from conftest import Device
from test_daemon import Daemon, drop


def _err(tmp_path: Path) -> str:
    return (tmp_path / "daemon.stderr").read_text()


def test_the_daemon_outlives_its_inbox_vanishing(device: Device, tmp_path: Path) -> None:
    device.env["WATCHDOG_USEC"] = "400000"  # idle passes every 0.1 s: many while it is gone
    daemon = Daemon(device, tmp_path, journal=True)
    try:
        daemon.ready()
        # After READY=1 the inbox watch is set up; the first idle pass comes after it.
        daemon.wait_for(lambda: daemon.messages.count("WATCHDOG=1") >= 2,
                        label="the first idle pass")
        inbox = device.root / "inbox"
        shutil.rmtree(inbox)
        daemon.wait_for(lambda: "is gone" in _err(tmp_path), label="the inbox-gone warning")
        pings = daemon.messages.count("WATCHDOG=1")
        daemon.wait_for(lambda: daemon.messages.count("WATCHDOG=1") >= pings + 5,
                        label="five more idle passes")
        inbox.mkdir()
        daemon.wait_for(lambda: "is back" in _err(tmp_path), label="the inbox-back notice")
        junk = tmp_path / "zmonitor-junk.zmb"
        junk.write_bytes(b"not a bundle\n")
        drop(junk, inbox)
        rejected = device.root / "state" / "rejected"
        daemon.wait_for(lambda: rejected.is_dir() and any(
            p.name.startswith("zmonitor-junk.zmb") for p in rejected.iterdir()),
            label="the inbox handled again")
        time.sleep(0.2)
    finally:
        code, err = daemon.terminate()
    assert code == 0, err
    assert "Traceback" not in err, err
    gone = [line for line in err.splitlines() if "is gone" in line]
    assert len(gone) == 1, err  # said once, not at every pass
    assert gone[0].startswith("<4>idle: the inbox ") and "install -d -m 0700" in gone[0]
    assert "cannot list the inbox" not in err, err
    assert f"<5>idle: the inbox {inbox} is back; watching it" in err
