"""The Mender update module's own log (packaging/mender/zmonitor-migration): what an
operator reads in mender's output for an applied bundle and for a refused one. The
module runs as a shell script with the real CLI behind it, on a test device."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, Device

MENDER = ROOT / "packaging" / "mender" / "zmonitor-migration"


def _install(device: Device, tmp_path: Path, bundle: Path) -> subprocess.CompletedProcess[str]:
    cli = device.root / "zmonitor-migrate"
    cli.write_text(f"#!/bin/sh\nexec {sys.executable} -m zmonitor_migrated.cli \"$@\"\n")
    cli.chmod(0o755)
    files = tmp_path / "mender-files"
    (files / "files").mkdir(parents=True)
    shutil.copy(bundle, files / "files" / bundle.name)
    env = {**device.env, "ZMONITOR_MIGRATE_CONFIG": str(device.config_path),
           "ZMONITOR_MIGRATE": str(cli)}
    return subprocess.run(["sh", str(MENDER), "ArtifactInstall", str(files)], env=env,
                          capture_output=True, text=True, timeout=180)


def test_a_rejected_bundle_is_logged_with_its_kind_and_reason(
        device: Device, shipped_bundle: Path, tmp_path: Path) -> None:
    forged = tmp_path / "zmonitor-forged.zmb"
    forged.write_bytes(b"not a bundle at all\n" * 64)
    proc = _install(device, tmp_path, forged)
    assert proc.returncode == 3, proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "not applied" in ln)
    assert re.fullmatch(r"zmonitor-migration\[ArtifactInstall\]: zmonitor-forged\.zmb not "
                        r"applied: bundle rejected \[malformed\]: \S.*, exit 3", line), line
    assert "outcome ," not in proc.stderr and "->  ," not in proc.stderr


def test_an_applied_bundle_is_logged_with_its_outcome_and_versions(
        device: Device, shipped_bundle: Path, tmp_path: Path) -> None:
    proc = _install(device, tmp_path, shipped_bundle)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^zmonitor-migration\[ArtifactInstall\]: run \S+: outcome applied, "
                     r"version 10 -> 14, exit 0$", proc.stderr, re.M), proc.stderr
