"""Fleet roll-out through Mender: mender-client 3.4 and mender-artifact from Debian 12
drive the zmonitor-migration update module installed by the .deb (standalone mode)."""

from __future__ import annotations

import re

import pytest

from .harness import APP, E2E, REPO, STATE, ZMonitor

pytestmark = pytest.mark.e2e

MODULE = "/usr/share/mender/modules/v3/zmonitor-migration"
# Where mender-client 3.4 looks for inventory scripts (its data dir + "inventory").
INVENTORY_DIR = "/usr/share/mender/inventory"
INVENTORY_LINE = re.compile(r"(zmonitor_[a-z0-9_]+)=([^=\x00-\x1f\x7f]*)")


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


def mender_inventory(zm: ZMonitor) -> dict[str, list[str]]:
    """What mender-client would send: every executable mender-inventory-* of its
    inventory dir run with an empty environment, every stdout line ``name=value`` (one
    line without ``=`` and mender-client drops the script's whole output)."""
    found = zm.run(f"find {INVENTORY_DIR} -maxdepth 1 -name 'mender-inventory-*' "
                   "-type f -perm /111").stdout.split()
    assert found == [f"{INVENTORY_DIR}/mender-inventory-zmonitor-migrated"], found
    res = zm.run(["env", "-i", found[0]], timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    out: dict[str, list[str]] = {}
    for line in res.stdout.splitlines():
        m = INVENTORY_LINE.fullmatch(line)
        assert m, f"not a name=value inventory line: {line!r}"
        assert m.group(2).isprintable() or not m.group(2), line
        out.setdefault(m.group(1), []).append(m.group(2))
    return out


def test_inventory_reports_an_applied_then_a_failed_run(mz: ZMonitor) -> None:
    inv = mender_inventory(mz)  # the baseline: no run yet
    assert inv["zmonitor_db_schema_version"] == ["4"]
    assert inv["zmonitor_migrate_last_outcome"] == ["none"]
    assert inv["zmonitor_migrate_operator_needed"] == ["no"]

    bundle = mz.build(mz.make_source("full"), 1, "zmonitor-s1")
    rc, out = mender(mz, "install", artifact(mz, bundle, "zmonitor-db-14"))
    assert rc == 0, out
    assert mender(mz, "commit")[0] == 0
    run = mz.history()[-1]
    inv = mender_inventory(mz)
    assert inv["zmonitor_db_schema_version"] == ["14"]
    assert inv["zmonitor_migrate_last_sequence"] == ["1"]
    assert inv["zmonitor_migrate_last_outcome"] == ["applied"]
    assert inv["zmonitor_migrate_last_run_id"] == [run["run_id"]]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
                        inv["zmonitor_migrate_last_run_at"][0])
    assert inv["zmonitor_migrate_run_in_progress"] == ["no"]
    assert inv["zmonitor_migrate_operator_needed"] == ["no"]
    assert "zmonitor_migrate_inventory_error" not in inv

    # A tampered bundle: refused before the app is touched, recorded as a failed run.
    data = bytearray(mz.dev.path(bundle).read_bytes())
    data[data.find(b"early_warning_score INTEGER")] ^= 0x20
    mz.dev.put(bytes(data), f"{E2E}/bundles/tampered.zmb")
    rc, out = mender(mz, "install", artifact(mz, f"{E2E}/bundles/tampered.zmb", "bad"))
    assert rc != 0, out
    inv = mender_inventory(mz)
    assert inv["zmonitor_db_schema_version"] == ["14"]
    assert inv["zmonitor_migrate_last_sequence"] == ["1"]
    assert inv["zmonitor_migrate_last_outcome"] == ["rejected"]
    assert inv["zmonitor_migrate_last_error"] == [mz.history()[-1]["error"]["kind"]]
    assert inv["zmonitor_migrate_operator_needed"] == ["no"]


def test_inventory_reports_an_unreadable_state_and_exits_0(mz: ZMonitor) -> None:
    mz.run(f"echo 'not json' > {STATE}/anti-rollback.json", check=True)
    inv = mender_inventory(mz)
    assert inv["zmonitor_migrate_operator_needed"] == ["yes"]
    assert any(e.startswith("anti-rollback state: ")
               for e in inv["zmonitor_migrate_inventory_error"])
    assert inv["zmonitor_db_schema_version"] == ["4"]
