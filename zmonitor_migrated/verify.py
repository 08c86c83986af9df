"""Is this manifest signed by enough keys we trust, and may this device apply it?

Pure functions over bytes and values: reading the archive (with its size caps) is
``archive``'s job, the device's state comes from ``device_state``, the clock is a
parameter. Nothing here touches a file.

``verify_manifest(manifest, signatures, trust)`` checks, in order, and stops at the
first failure:

1. sizes: manifest <= 1 MiB, signatures <= 64 KiB (``too-large``);
2. ``signatures.json`` is canonical JSON ``[{"keyid": hex, "sig": base64}, …]`` sorted by
   key id without duplicates, every signature 64 bytes in canonical base64
   (``malformed``) — so no byte of it can change without being noticed;
3. every signature by a trusted, non-revoked key verifies over the exact manifest bytes
   (``bad-signature``: the manifest or a signature was altered — refused even if other
   signatures would reach the threshold);
4. at least ``trust.threshold`` distinct trusted, non-revoked keys signed; when none did,
   the refusal says why: ``revoked-key`` if a revoked key signed, ``untrusted-key`` if
   only unknown keys did, else ``threshold-not-met`` (also for k-1 of k);
5. only then is the manifest parsed (``Manifest.from_json``, ``malformed``).

``check_policy(...)`` then decides for one device, in order: ``wrong-device``;
``rollback`` for a sequence below the anti-rollback floor or equal to it with another
manifest hash; the floor's own bundle again is ``already-applied`` (a no-op, even once
expired) for ``apply`` when the database has every migration of it or it was rolled
back, otherwise it is checked like a new bundle (a retry); ``not-yet-valid`` (created
after the device time plus the clock slack); ``validity-too-long`` (expires - created
over ``max_validity_days``); ``expired`` (with clock slack); ``rollback`` for a bundle
that lacks versions the database already has; ``applied-migration-changed`` when a
version the device applied has another sha256. ``admission.admit`` is the one caller
that feeds it the device's state, for ``apply``, ``rollback --bundle`` and ``bundle
verify`` alike.

Example::

    manifest = verify_manifest(manifest_bytes, signatures_bytes, trust)
    decision = check_policy(manifest, device_type="zmonitor-bedside", floor_sequence=4,
                            floor_manifest_sha256="ab…", manifest_sha256=sha,
                            applied={1: "ab…"}, now=datetime.now(UTC), clock_slack_s=300,
                            max_validity_days=730)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import BundleRejected
from .keys import key_id
from .manifest import MAX_MANIFEST_BYTES, Manifest, format_time, parse_json
from .trust import TrustStore

MAX_SIGNATURES_BYTES = 64 * 1024
_KEY_ID = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes

    def to_dict(self) -> dict[str, str]:
        return {"keyid": self.keyid, "sig": base64.b64encode(self.sig).decode("ascii")}


def sign_manifest_bytes(manifest: bytes, key: Ed25519PrivateKey) -> Signature:
    return Signature(keyid=key_id(key.public_key()), sig=key.sign(manifest))


def signatures_to_json(signatures: list[Signature] | tuple[Signature, ...]) -> bytes:
    """Canonical ``signatures.json``: one entry per key, sorted by key id."""
    unique = {s.keyid: s for s in signatures}
    return json.dumps([unique[k].to_dict() for k in sorted(unique)], sort_keys=True,
                      separators=(",", ":")).encode("ascii")


def _sig_malformed(message: str) -> BundleRejected:
    return BundleRejected(f"signatures.json: {message}; the bundle is corrupt or was altered. "
                          "Rebuild it or sign it again with 'zmonitor-migrate bundle sign'",
                          kind="malformed")


def parse_signatures(data: bytes) -> tuple[Signature, ...]:
    if len(data) > MAX_SIGNATURES_BYTES:
        raise BundleRejected(f"signatures.json is {len(data)} bytes, over the "
                             f"{MAX_SIGNATURES_BYTES} byte limit", kind="too-large")
    raw = parse_json(data, "signatures.json")
    if not isinstance(raw, list):
        raise _sig_malformed("must be a list of {keyid, sig} objects")
    out: list[Signature] = []
    for entry in raw:
        if not isinstance(entry, dict) or set(entry) != {"keyid", "sig"}:
            raise _sig_malformed("every entry must be an object with exactly keyid and sig")
        kid, sig_text = entry["keyid"], entry["sig"]
        if not isinstance(kid, str) or not _KEY_ID.match(kid):
            raise _sig_malformed(f"keyid {kid!r} is not 64 lowercase hex digits")
        if not isinstance(sig_text, str):
            raise _sig_malformed(f"sig of key {kid} is not a string")
        try:
            sig = base64.b64decode(sig_text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise _sig_malformed(f"sig of key {kid} is not base64") from None
        # canonical base64 only: otherwise the unused low bits of the last character
        # could change without changing the signature
        if len(sig) != 64 or base64.b64encode(sig).decode("ascii") != sig_text:
            raise _sig_malformed(f"sig of key {kid} is not a canonical base64 Ed25519 "
                                 "signature (64 bytes)")
        out.append(Signature(kid, sig))
    ids = [s.keyid for s in out]
    if ids != sorted(set(ids)):
        raise _sig_malformed("entries must be sorted by keyid, one per key")
    if signatures_to_json(out) != data:
        raise _sig_malformed("the bytes are not in canonical form")
    return tuple(out)


def verify_signatures(manifest: bytes, signatures: bytes, trust: TrustStore) -> tuple[str, ...]:
    """Key ids of the trusted, non-revoked keys whose signatures verify; raises unless
    there are at least ``trust.threshold`` of them."""
    if len(manifest) > MAX_MANIFEST_BYTES:
        raise BundleRejected(f"manifest.json is {len(manifest)} bytes, over the "
                             f"{MAX_MANIFEST_BYTES} byte limit", kind="too-large")
    sigs = parse_signatures(signatures)
    valid: list[str] = []
    revoked: list[str] = []
    unknown: list[str] = []
    for s in sigs:
        if trust.is_revoked(s.keyid):
            revoked.append(s.keyid)
            continue
        public_key = trust.usable_key(s.keyid)
        if public_key is None:
            unknown.append(s.keyid)
            continue
        try:
            public_key.verify(s.sig, manifest)
        except InvalidSignature:
            raise BundleRejected(
                f"the signature of trusted key {s.keyid} does not match the manifest: the "
                "manifest or the signature was altered after signing. Do not use this file; "
                "get the bundle again from the release", kind="bad-signature") from None
        valid.append(s.keyid)
    if len(valid) >= trust.threshold:
        return tuple(valid)
    notes = []
    if revoked:
        notes.append(f"revoked key(s) {', '.join(revoked)} no longer count")
    if unknown:
        notes.append(f"key(s) {', '.join(unknown)} are not in the trust store")
    detail = f" ({'; '.join(notes)})" if notes else ""
    if not valid and revoked:
        kind = "revoked-key"
        fix = "re-sign the bundle with a current release key"
    elif not valid and unknown:
        kind = "untrusted-key"
        fix = ("sign it with a trusted key, or add the signer's .pub to the trust directory "
               "if it is a genuine release key")
    else:
        kind = "threshold-not-met"
        fix = "add signatures with 'zmonitor-migrate bundle sign BUNDLE --key OTHER.key'"
    raise BundleRejected(
        f"{len(valid)} of the required {trust.threshold} trusted signature(s) are present"
        f"{detail}; {fix}", kind=kind)


def verify_manifest(manifest: bytes, signatures: bytes, trust: TrustStore) -> Manifest:
    """Signatures first, over the exact bytes; only then parse the manifest."""
    verify_signatures(manifest, signatures, trust)
    return Manifest.from_json(manifest)


def manifest_sha256(manifest: bytes) -> str:
    return hashlib.sha256(manifest).hexdigest()


class Decision(StrEnum):
    APPLY = "apply"
    ALREADY_APPLIED = "already-applied"


class Purpose(StrEnum):
    """What the verified bundle is for: the same policy, one difference. Only ``apply``
    knows "nothing to do": a rollback always uses the bundle, so every check applies."""

    APPLY = "apply"
    ROLLBACK = "rollback"


def check_time(manifest: Manifest, *, now: datetime, clock_slack_s: float,
               max_validity_days: int) -> None:
    """Not before ``created`` (minus slack), not after ``expires`` (plus slack), and not
    valid for longer than the device allows."""
    slack = timedelta(seconds=clock_slack_s)
    if manifest.created - slack > now:
        raise BundleRejected(
            f"bundle {manifest.name} sequence {manifest.sequence} was created at "
            f"{format_time(manifest.created)}, after the device time {format_time(now)} "
            f"(slack {clock_slack_s:g} s): it is not valid yet. If the device clock is "
            "behind, fix it (timedatectl); otherwise rebuild the bundle with a correct "
            "--created", kind="not-yet-valid")
    validity = manifest.expires - manifest.created
    if validity > timedelta(days=max_validity_days):
        raise BundleRejected(
            f"bundle {manifest.name} sequence {manifest.sequence} is valid for "
            f"{validity.total_seconds() / 86400:g} days ({format_time(manifest.created)} to "
            f"{format_time(manifest.expires)}), over this device's max_validity_days="
            f"{max_validity_days}; rebuild it with --valid-days {max_validity_days} or less",
            kind="validity-too-long")
    check_expiry(manifest, now=now, clock_slack_s=clock_slack_s)


def check_expiry(manifest: Manifest, *, now: datetime, clock_slack_s: float) -> None:
    if now - timedelta(seconds=clock_slack_s) > manifest.expires:
        raise BundleRejected(
            f"bundle {manifest.name} sequence {manifest.sequence} expired at "
            f"{format_time(manifest.expires)} (device time {format_time(now)}, slack "
            f"{clock_slack_s:g} s); build a new bundle with a later --expires, or fix the "
            "device clock if it is wrong", kind="expired")


def check_floor(manifest: Manifest, *, floor_sequence: int,
                floor_manifest_sha256: str | None, manifest_sha256: str) -> bool:
    """Anti-rollback. True for the floor's own bundle again (same sequence, same
    manifest bytes); raises for an older sequence or the same one with other content."""
    if manifest.sequence == floor_sequence and floor_manifest_sha256 == manifest_sha256:
        return True
    if manifest.sequence <= floor_sequence:
        same = "the same sequence with different content" \
            if manifest.sequence == floor_sequence else "an older sequence"
        raise BundleRejected(
            f"bundle sequence {manifest.sequence} is {same}: this device already accepted "
            f"sequence {floor_sequence}. Bundles only move forward; build a new bundle with "
            f"--sequence {floor_sequence + 1} or higher", kind="rollback")
    return False


def _all_applied(manifest: Manifest, applied: Mapping[int, str | None]) -> bool:
    return all(m.version in applied and (not applied[m.version]
                                         or str(applied[m.version]).lower() == m.sha256)
               for m in manifest.migrations)


def check_policy(manifest: Manifest, *, device_type: str, floor_sequence: int,
                 floor_manifest_sha256: str | None, manifest_sha256: str,
                 applied: Mapping[int, str | None], now: datetime, clock_slack_s: float,
                 max_validity_days: int, rolled_back: bool = False,
                 purpose: Purpose = Purpose.APPLY) -> Decision:
    """May this verified manifest be used on this device now? The floor comes from the
    device's anti-rollback state (``device_state.Floor``), never from the database."""
    if device_type not in manifest.device_types:
        raise BundleRejected(
            f"bundle {manifest.name} is for device type(s) {', '.join(manifest.device_types)}, "
            f"this device is {device_type!r}; use the bundle built for this device type",
            kind="wrong-device")
    same = check_floor(manifest, floor_sequence=floor_sequence,
                       floor_manifest_sha256=floor_manifest_sha256,
                       manifest_sha256=manifest_sha256)
    # The same bundle again is a no-op (even once expired) when the database has all of it,
    # or when it was rolled back; otherwise it is a retry and checked like a new one.
    if same and purpose == Purpose.APPLY and (rolled_back or _all_applied(manifest, applied)):
        return Decision.ALREADY_APPLIED
    check_time(manifest, now=now, clock_slack_s=clock_slack_s,
               max_validity_days=max_validity_days)
    in_bundle = {m.version: m for m in manifest.migrations}
    ahead = sorted(v for v in applied if v not in in_bundle)
    if ahead:
        raise BundleRejected(
            f"the database already has version(s) {', '.join(map(str, ahead))}, which this "
            f"bundle (up to version {manifest.last_version}) does not contain; applying it "
            "would go backwards. Use a bundle that contains every applied migration",
            kind="rollback")
    for version, file_hash in sorted(applied.items()):
        if not file_hash:
            continue  # recorded without a hash (hand-applied); the engine's plan decides
        mig = in_bundle[version]
        if mig.sha256 != file_hash.lower():
            raise BundleRejected(
                f"migration {version} ({mig.path}) was applied on this device with sha256 "
                f"{file_hash} but the bundle carries {mig.sha256}: an applied migration must "
                "never change. Restore the original file and add the change as a new "
                "migration", kind="applied-migration-changed")
    return Decision.APPLY
