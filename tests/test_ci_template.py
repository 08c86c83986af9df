"""The shipped CI workflow (zmonitor_migrated/data/ci/migration-check.yml) runs.

Every job's ``run:`` steps are executed in the workflow's order with bash, as GitHub's
runner does (``bash --noprofile --norc -eo pipefail``), in a copy of bundles/zmonitor
laid out as a migrations repository (keys/*.pub committed, a fixture file), for a
release tag with a signature threshold of 2: the check, the build and signature, the
co-signature and the device-style verification. Secrets and repository variables are
substituted from a table (test keys made here); ``uses:`` steps are the runner's own
(checkout: the repository copy is the working directory; artifacts: the same directory);
``pip install`` is a stand-in that records its argument, and ``zmonitor-migrate`` runs
this checkout. A job's ``if:`` is not evaluated: this scenario runs every job.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from author_helpers import FIXTURE_SQL, ROOT, SHIPPED

from zmonitor_migrated.keys import key_id, keygen, load_public_key

TEMPLATE = ROOT / "zmonitor_migrated" / "data" / "ci" / "migration-check.yml"
_EXPR = re.compile(r"\$\{\{\s*(.+?)\s*\}\}")


def evaluate(text: str, context: dict[str, str]) -> str:
    """The ``${{ a || 'b' }}`` expressions the template uses in env values."""
    def one(match: re.Match[str]) -> str:
        for part in match.group(1).split("||"):
            part = part.strip()
            if part.startswith("'") and part.endswith("'"):
                value = part[1:-1]
            else:
                assert re.fullmatch(r"(secrets|vars|github)\.[A-Za-z_]+", part), \
                    f"expression the test cannot evaluate: {part}"
                value = context.get(part, "")
            if value:
                return value
        return ""
    return _EXPR.sub(one, str(text))


def test_the_workflow_runs_check_build_cosign_and_verify(tmp_path: Path) -> None:
    workflow = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads 'on' as true
    assert set(triggers) == {"pull_request", "push"}
    assert list(workflow["jobs"]) == ["check", "release", "cosign", "publish"]

    repo = tmp_path / "repo"
    shutil.copytree(SHIPPED, repo)
    (repo / "fixtures").mkdir()
    shutil.copyfile(FIXTURE_SQL, repo / "fixtures" / "sample_data.sql")
    secrets_dir = tmp_path / "secrets"
    release_key, release_pub = keygen(str(secrets_dir / "release"))
    cosign_key, cosign_pub = keygen(str(secrets_dir / "clinical-safety"))
    (repo / "keys").mkdir()
    for pub in (release_pub, cosign_pub):
        shutil.copyfile(pub, repo / "keys" / Path(pub).name)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "zmonitor-migrate").write_text(
        f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m zmonitor_migrated.cli \"$@\"\n")
    pip_log = tmp_path / "pip.log"
    (bin_dir / "pip").write_text(f"#!/bin/sh\necho \"$@\" >> {pip_log}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)

    context = {"vars.ZMONITOR_MIGRATED_SPEC": "zmonitor-migrated==0.1.0",
               "vars.SIGNATURE_THRESHOLD": "2", "vars.TIMING_ROWS": "2000",
               "vars.MIGRATION_FIXTURE": "fixtures/sample_data.sql",
               "secrets.ZMONITOR_RELEASE_KEY": Path(release_key).read_text(),
               "secrets.ZMONITOR_COSIGN_KEY": Path(cosign_key).read_text()}
    runner_temp = tmp_path / "runner-temp"
    runner_temp.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("ZMONITOR_")}
    base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", GITHUB_WORKSPACE=str(repo),
                GITHUB_REF="refs/tags/release-42", GITHUB_REF_NAME="release-42",
                RUNNER_TEMP=str(runner_temp), CI="true")
    ran: list[str] = []
    for job_name, job in workflow["jobs"].items():
        for step in job["steps"]:
            if "run" not in step:
                assert step["uses"].split("@")[0] in (
                    "actions/checkout", "actions/setup-python", "actions/upload-artifact",
                    "actions/download-artifact"), step
                continue
            env = dict(base)
            for scope in (workflow.get("env", {}), job.get("env", {}), step.get("env", {})):
                env.update({k: evaluate(v, context) for k, v in scope.items()})
            done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                                   step["run"]], cwd=repo, env=env, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0, (job_name, step["name"], done.stdout, done.stderr)
            ran.append(f"{job_name}: {step['name']}")
            if step["name"] == "Check the migrations":
                assert "check passed" in done.stdout and "at version 4" in done.stdout
                assert "Estimated time" in done.stdout
            if step["name"].startswith("Verify"):
                verdict = done.stdout
    assert ran == ["check: Install zmonitor-migrate", "check: Check the migrations",
                   "release: Install zmonitor-migrate", "release: Build and sign the bundle",
                   "cosign: Install zmonitor-migrate", "cosign: Co-sign the bundle",
                   "publish: Install zmonitor-migrate",
                   "publish: Verify the bundle as a device would"]
    assert pip_log.read_text().split("\n").count(
        "install --disable-pip-version-check zmonitor-migrated==0.1.0") == 4
    assert (repo / "migration-check.json").is_file() and (repo / "migration-check.xml").is_file()
    assert [p.name for p in repo.glob("*.zmb")] == ["zmonitor-42.zmb"]
    assert "sequence 42: verified" in verdict and "2 required" in verdict
    for pub in (release_pub, cosign_pub):
        assert key_id(load_public_key(pub)) in verdict
    assert not list(runner_temp.glob("*.key")) and "PRIVATE" not in "".join(
        p.read_text(errors="replace") for p in repo.rglob("*") if p.is_file()
        and p.suffix != ".zmb")


def test_without_the_cosignature_a_threshold_of_2_refuses(tmp_path: Path) -> None:
    """The verification step is what makes the co-signing job matter: one signature is
    refused when the fleet needs two."""
    repo = tmp_path / "repo"
    shutil.copytree(SHIPPED, repo)
    release_key, release_pub = keygen(str(tmp_path / "release"))
    _, cosign_pub = keygen(str(tmp_path / "clinical-safety"))
    (repo / "keys").mkdir()
    for pub in (release_pub, cosign_pub):
        shutil.copyfile(pub, repo / "keys" / Path(pub).name)
    workflow = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    steps = {s.get("name"): s for job in workflow["jobs"].values() for s in job["steps"]}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "zmonitor-migrate").write_text(
        f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m zmonitor_migrated.cli \"$@\"\n")
    (bin_dir / "zmonitor-migrate").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZMONITOR_")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", GITHUB_WORKSPACE=str(repo),
               GITHUB_REF_NAME="release-7", RUNNER_TEMP=str(tmp_path), SOURCE=".",
               SIGNATURE_THRESHOLD="2", RELEASE_KEY=Path(release_key).read_text())
    for name in ("Build and sign the bundle", "Verify the bundle as a device would"):
        done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                               steps[name]["run"]], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=300)
        if name.startswith("Build"):
            assert done.returncode == 0, done.stderr
    assert done.returncode == 3
    assert "threshold-not-met" in done.stderr
