"""A normal install (a wheel into a fresh virtual environment) runs the demo from any
working directory: the shipped bundle source travels inside the package.

The wheel is built from this checkout; pip installs the runtime dependencies from the
machine's configured index. The demo then runs from an unrelated directory with no
PYTHONPATH, so nothing can come from the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "NOTIFY_SOCKET", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list[str], *, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of the checkout: a build leaves build/ and *.egg-info behind.
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        path = ROOT / name
        if not os.path.lexists(path) or name.startswith(("tests/", "bench/")):
            continue
        dest = src / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            dest.symlink_to(os.readlink(path))
        else:
            dest.write_bytes(path.read_bytes())
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
         cwd=out)
    (found,) = out.glob("zmonitor_migrated-*.whl")
    return found


def test_wheel_carries_the_shipped_source(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    prefix = "zmonitor_migrated/data/bundles/zmonitor/"
    shipped = sorted(n for n in names if n.startswith(prefix))
    source = ROOT / "bundles" / "zmonitor"  # the path migration authors use (a symlink)
    repo = sorted(f"{prefix}{p.relative_to(source)}" for p in source.rglob("*")
                  if p.is_file())
    assert len(repo) > 20 and shipped == repo


def test_demo_from_a_wheel_install_in_an_unrelated_directory(wheel: Path,
                                                             tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
         cwd=tmp_path)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import zmonitor_migrated, zmonitor_migrated.status as s; "
                  "print(zmonitor_migrated.__file__); print(s.default_source())"],
                 cwd=elsewhere).stdout.splitlines()
    assert all(str(venv) in line for line in where), where  # nothing from the checkout
    proc = _run([str(venv / "bin" / "zmonitor-migrate"), "demo", "--vitals", "3000",
                 "--workdir", "work"], cwd=elsewhere)
    assert "-> applied: version 10 → 14" in proc.stdout, proc.stdout
    assert (elsewhere / "work" / "data" / "zmonitor.db").is_file()
    assert "Traceback" not in proc.stdout + proc.stderr
