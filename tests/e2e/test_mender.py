"""Fleet roll-out through Mender: mender-client 3.4 and mender-artifact from Debian 12
drive the zmonitor-migration update module installed by the .deb (standalone mode)."""

from __future__ import annotations

import pytest

from .harness import APP, E2E, REPO, ZMonitor

pytestmark = pytest.mark.e2e

MODULE = "/usr/share/mender/modules/v3/zmonitor-migration"


@pytest.fixture
def mz(zm: ZMonitor) -> ZMonitor:
    """The baseline device plus a clean standalone Mender state."""
    zm.run("rm -rf /var/lib/mender/mender-store* /var/lib/mender/modules/v3/payloads")
    zm.run("mkdir -p \"$(readlink -m /var/lib/mender)\" /etc/mender "
           "&& echo device_type=zmonitor-bedside > /var/lib/mender/device_type "
           "&& echo artifact_name=factory > /etc/mender/artifact_info", check=True)
    zm.dev.put((REPO / "packaging/mender/make-artifact.sh").read_bytes(),
               f"{E2E}/make-artifact.sh", 0o755)
    return zm


def artifact(zm: ZMonitor, bundle: str, name: str) -> str:
    out = f"{E2E}/bundles/{name}.mender"
    zm.run(["rm", "-f", out])
    res = zm.run([f"{E2E}/make-artifact.sh", bundle, out, name, "zmonitor-bedside"])
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def mender(zm: ZMonitor, *args: str) -> tuple[int, str]:
    res = zm.run(["mender", *args], timeout=400)
    return res.returncode, res.stdout + res.stderr


def shown_artifact(zm: ZMonitor) -> str:
    res = zm.run(["mender", "show-artifact"])
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_module_answers_the_v3_queries(mz: ZMonitor) -> None:
    assert mz.run([MODULE, "SupportsRollback", "/tmp"]).stdout.strip() == "Yes"
    assert mz.run([MODULE, "NeedsArtifactReboot", "/tmp"]).stdout.strip() == "No"
    res = mz.run([MODULE, "SomeFutureState", "/tmp"])
    assert (res.returncode, res.stdout) == (0, "")


def test_mender_install_then_commit_applies_the_bundle(mz: ZMonitor) -> None:
    bundle = mz.build(mz.make_source("full"), 1, "zmonitor-s1")
    art = artifact(mz, bundle, "zmonitor-db-14")
    rc, out = mender(mz, "install", art)
    assert rc == 0, out
    assert mz.version() == 14
    assert mz.is_active(APP) == "active"
    rc, out = mender(mz, "commit")
    assert rc == 0, out
    assert shown_artifact(mz) == "zmonitor-db-14"
    assert mz.version() == 14
    assert mz.history()[-1]["outcome"] == "applied"


def test_mender_install_then_rollback_restores_the_backup(mz: ZMonitor) -> None:
    bundle = mz.build(mz.make_source("full"), 1, "zmonitor-s1")
    art = artifact(mz, bundle, "zmonitor-db-14")
    rc, out = mender(mz, "install", art)
    assert rc == 0, out
    assert mz.version() == 14
    rc, out = mender(mz, "rollback")
    assert rc == 0, out
    assert mz.version() == 4
    assert mz.sql("PRAGMA integrity_check") == "ok"
    mz.wait_for("the app active", lambda: mz.is_active(APP) == "active", 60)
    assert shown_artifact(mz) == "factory"


def test_tampered_inner_bundle_fails_artifact_install(mz: ZMonitor) -> None:
    bundle = mz.build(mz.make_source("full"), 1, "zmonitor-s1")
    data = bytearray(mz.dev.path(bundle).read_bytes())
    idx = data.find(b"early_warning_score INTEGER")
    assert idx > 0
    data[idx] ^= 0x20
    tampered = f"{E2E}/bundles/tampered.zmb"
    mz.dev.put(bytes(data), tampered)
    art = artifact(mz, tampered, "zmonitor-db-tampered")
    pid = mz.prop(APP, "MainPID")
    before = mz.sql("SELECT count(*) FROM schema_version")
    rc, out = mender(mz, "install", art)
    assert rc != 0, out
    assert "ArtifactInstall" in out or "zmonitor-migration" in out, out
    assert mz.version() == 4
    assert mz.sql("SELECT count(*) FROM schema_version") == before
    assert mz.is_active(APP) == "active"
    assert mz.prop(APP, "MainPID") == pid, "the app was restarted"
    assert shown_artifact(mz) == "factory"


def test_module_states_run_twice_are_safe(mz: ZMonitor) -> None:
    """What a power cut makes mender do: repeat a state. Driven by hand, as mender does."""
    bundle = mz.build(mz.make_source("full"), 1, "zmonitor-s1")
    files = f"{E2E}/module-files"
    mz.run(["rm", "-rf", files])
    mz.run(["mkdir", "-p", f"{files}/files", f"{files}/tmp"])
    mz.run(["cp", bundle, f"{files}/files/"])
    for _ in range(2):
        res = mz.run([MODULE, "ArtifactInstall", files])
        assert res.returncode == 0, res.stdout + res.stderr
        assert mz.version() == 14
    runs = len(mz.history())
    pid = mz.prop(APP, "MainPID")
    assert mz.run([MODULE, "ArtifactCommit", files]).returncode == 0
    assert mz.run([MODULE, "ArtifactCommit", files]).returncode == 0
    assert len(mz.history()) == runs and mz.prop(APP, "MainPID") == pid
    for _ in range(2):
        res = mz.run([MODULE, "ArtifactRollback", files])
        assert res.returncode == 0, res.stdout + res.stderr
        assert mz.version() == 4
    rolled_back_pid = mz.prop(APP, "MainPID")
    res = mz.run([MODULE, "ArtifactFailure", files])
    assert res.returncode == 0, res.stdout + res.stderr
    assert mz.is_active(APP) == "active"
    assert mz.prop(APP, "MainPID") == rolled_back_pid, "recover restarted a running app"
