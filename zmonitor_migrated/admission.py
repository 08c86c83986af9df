"""May this bundle be used on this device? The one verdict for ``apply``, ``rollback
--bundle`` and ``bundle verify``, so the three cannot drift apart.

``admit`` does, in order, and stops at the first refusal (``BundleRejected``, exit 3):

1. full verification of the file (``bundle.verify_bundle``: signature threshold over the
   exact manifest bytes, manifest schema, every payload file against the manifest);
2. the device policy (``verify.check_policy``): device type from the config, the
   anti-rollback floor from ``state_dir/anti-rollback.json`` (``device_state``), time
   (not before ``created``, not after ``expires``, validity at most
   ``max_validity_days``), the database's applied versions and their hashes;
3. the payload's own YAML: ``checks/post.yaml`` and ``schema/database.yaml`` must parse
   (before, only the rehearsal found a bad one, after the bundle had been accepted);
4. with ``record=True`` (``apply``, ``rollback --bundle``, under the run lock): the floor
   is seeded from the database's record if the state file does not exist yet, *before*
   the policy reads it, and raised to this bundle as soon as it passed 1-3 — before the
   rehearsal, before the app is stopped, whatever the run does next.

Why the floor moves at acceptance and not at the end of a successful run: the signer's
sequence says "this bundle supersedes every older one", whether or not this device can
run it today. Recorded only after success, a newer bundle that fails its rehearsal, finds
nothing pending, or is applied with ``--target`` would leave older bundles acceptable
(the replay this protects against). A failed run stays retryable: the same bundle again
(same sequence, same manifest sha256) is always allowed; the same sequence with another
manifest never is.

``record=False`` (``bundle verify``, ``apply --dry-run``) writes nothing: a missing state
file is read as the value seeding would write; a state dir this user cannot read is
reported (``floor_note``) and the floor is then not checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .archive import Caps
from .bundle import VerifiedBundle, verify_bundle
from .config import Config
from .device_state import (
    DeviceState,
    Floor,
    current_floor,
    device_state,
    floor_path,
    raise_floor,
    seed_floor,
)
from .post_checks import load_checks
from .schema_spec import load_spec
from .trust import TrustStore
from .verify import Decision, Purpose, check_policy

PAYLOAD_YAML = ("checks/post.yaml", "schema/database.yaml")


@dataclass(frozen=True)
class Admitted:
    bundle: VerifiedBundle
    decision: Decision
    state: DeviceState
    floor: Floor | None  # what the policy was checked against; None: could not be read
    recorded: Floor | None = None  # the floor after this bundle was recorded
    floor_note: str | None = None  # why the floor was not checked (``bundle verify`` only)


def check_payload_yaml(root: Path) -> None:
    """The YAML files the validation will use must parse now (``BundleRejected``)."""
    checks, spec = (root / p for p in PAYLOAD_YAML)
    if checks.is_file():
        load_checks(checks)
    if spec.is_file():
        load_spec(spec)


def _unreadable(state_dir: Path) -> str | None:
    """Why this user cannot read the floor, if that is the only problem (not corrupt)."""
    path = floor_path(state_dir)
    if state_dir.is_dir() and not os.access(state_dir, os.R_OK | os.X_OK):
        return f"the state dir {state_dir} is not readable by this user"
    if path.is_file() and not os.access(path, os.R_OK):
        return f"{path} is not readable by this user"
    return None


def admit(config: Config, bundle_path: Path, *, extract_to: Path, now: datetime,
          purpose: Purpose = Purpose.APPLY, record: bool,
          trust: TrustStore | None = None, **verify_options: Any) -> Admitted:
    """Verify, apply the device policy, parse the payload's YAML; record if asked.
    ``verify_options`` go to ``bundle.verify_bundle`` unchanged."""
    trust = trust or TrustStore.from_config(config)
    vb = verify_bundle(Path(bundle_path), trust, extract_to=extract_to,
                       caps=Caps.from_config(config), **verify_options)
    state = device_state(config.database)
    note = None if record else _unreadable(config.state_dir)
    floor: Floor | None = None
    if record:
        floor = seed_floor(config.state_dir, state)
    elif note is None:
        floor = current_floor(config.state_dir, state)
    decision = check_policy(
        vb.manifest, device_type=config.device_type,
        floor_sequence=floor.sequence if floor else 0,
        floor_manifest_sha256=floor.manifest_sha256 if floor else None,
        manifest_sha256=vb.manifest_sha256, applied=state.applied, now=now,
        clock_slack_s=config.clock_slack_s, max_validity_days=config.max_validity_days,
        rolled_back=bool(floor and floor.rolled_back_to is not None), purpose=purpose)
    check_payload_yaml(vb.source.root)
    recorded = None
    if record and floor is not None and vb.manifest.sequence > floor.sequence:
        recorded = raise_floor(config.state_dir, sequence=vb.manifest.sequence,
                               manifest_sha256=vb.manifest_sha256, name=vb.manifest.name)
    return Admitted(bundle=vb, decision=decision, state=state, floor=floor,
                    recorded=recorded, floor_note=note)


__all__ = ["Admitted", "admit", "check_payload_yaml"]
