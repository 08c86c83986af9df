"""What a run starts from: a bundle admitted for this device, or a source directory.

``verify_bundle`` is the hand-off from verification to the pipeline: the early signature
check and private copy (``bundle.receive``), then ``admission.admit`` (the same verdict as
``bundle verify`` and ``rollback --bundle``), reduced to the ``Verified`` facts a run
needs. A bundle that is already applied is ``AlreadyApplied`` (nothing to do), one that
was applied before a rollback is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import bundle as bundle_mod
from .admission import admit
from .archive import Caps
from .config import Config
from .errors import BundleRejected
from .sources import Source
from .trust import TrustStore
from .verify import Decision, Purpose


@dataclass
class Verified:
    """What verification hands to the run: the manifest and the checked payload."""

    name: str
    sequence: int
    manifest_sha256: str
    source: Source
    declared_loss: set[str]



def verify_bundle(config: Config, bundle_path: Path, run_dir: Path, now: datetime, *,
                  record: bool = True, purpose: str = "apply",
                  tick: Callable[[], None] | None = None) -> Verified:
    """Early signature check and private copy (``bundle.receive``), then
    ``admission.admit``: full verification, device policy with the anti-rollback floor
    (recorded here, before the rehearsal, unless ``record`` is off), the payload's YAML.
    Raises BundleRejected, or AlreadyApplied for a no-op. ``tick`` (the watchdog
    heartbeat) is called between bounded reads of the bundle."""
    caps = Caps.from_config(config)
    trust = TrustStore.from_config(config)
    private = bundle_mod.receive(Path(bundle_path), run_dir, trust, caps=caps, tick=tick)
    adm = admit(config, private, extract_to=run_dir / "payload", now=now,
                purpose=Purpose(purpose), record=record, trust=trust, tick=tick)
    vb = adm.bundle
    if adm.decision == Decision.ALREADY_APPLIED:
        applied = adm.state.applied
        pending = [m.version for m in vb.manifest.migrations if m.version not in applied]
        if pending:  # rolled back since: "nothing to do" would be untrue
            raise BundleRejected(
                f"bundle {vb.manifest.name} sequence {vb.manifest.sequence} was applied "
                f"before, but the database was rolled back since: version "
                f"{max(applied, default=0)}, {len(pending)} migration(s) of this bundle pending "
                f" ({', '.join(f'{v:04d}' for v in pending)}). A bundle is applied "
                "once (anti-rollback); to re-apply, build the same source with a higher "
                f"sequence ('zmonitor-migrate bundle build SRC -o NEW.zmb --key KEY "
                f"--sequence {vb.manifest.sequence + 1}') and apply that bundle",
                kind="rollback")
        raise AlreadyApplied(vb.manifest.name, vb.manifest.sequence)
    return Verified(name=vb.manifest.name, sequence=vb.manifest.sequence,
                    manifest_sha256=vb.manifest_sha256, source=vb.source,
                    declared_loss=set(vb.manifest.declared_row_loss))


def verify_for_rollback(config: Config, bundle_path: Path, run_dir: Path,
                        now: datetime | None = None,
                        tick: Callable[[], None] | None = None) -> Verified:
    """For ``rollback --bundle``: the same admission as apply (signature, device type,
    anti-rollback floor, time, applied hashes, payload YAML), never "nothing to do"."""
    return verify_bundle(config, bundle_path, run_dir, now or datetime.now(UTC),
                         purpose="rollback", tick=tick)


class AlreadyApplied(Exception):
    """The bundle was applied before and the database still has all of it: a no-op."""

    def __init__(self, name: str, sequence: int) -> None:
        super().__init__(f"bundle {name} sequence {sequence} is already applied")
        self.name, self.sequence = name, sequence
