"""``zmonitor-migrate keygen`` and ``zmonitor-migrate bundle build|sign|verify``.

Thin commands over ``keys`` and ``bundle``: parse, call, print. Each handler is
``handler(args, config) -> int``; failures are raised as ``MigrateError`` subclasses and
the main CLI maps them to exit codes (3 for every ``BundleRejected``) and, with ``--json``,
to ``{"ok": false, "error": {"kind": …, "message": …}}``. With ``--json`` a handler prints
exactly one JSON object on stdout.

- ``keygen NAME`` writes ``NAME.key`` (0600) and ``NAME.pub`` and prints the key id.
- ``bundle build SRC -o OUT --key K [--key K2] --sequence N [--expires ISO | --valid-days D]
  [--created ISO]``: ``created`` defaults to ``$SOURCE_DATE_EPOCH`` or now, the validity to
  90 days.
- ``bundle sign B --key K`` adds a signature in place.
- ``bundle verify B [--trust DIR] [--threshold K]``: the verdict ``apply`` would give on
  this device, without side effects: the same ``admission.admit`` (the payload is
  checked in a temporary directory that is removed; nothing is recorded). The trust
  store is ``--trust`` or the configured ``trust_dir``, with the configured revoked keys;
  ``--threshold`` may only raise the configured ``signature_threshold`` (a lower value is
  a usage error). The device type is the configured one; the anti-rollback floor is read
  from the state file (or the database's record a first apply would seed) and shown,
  unless this user cannot read the state dir (then it is shown as not checked); applied
  hashes are checked when the database exists. Exit 0 for "apply" and for "already
  applied".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from . import bundle as bundle_mod
from .admission import Admitted, admit
from .archive import Caps
from .cli_args import existing_dir, existing_file, float_range, int_range, new_file, source_dir
from .config import Config
from .errors import UsageError
from .keys import key_id, keygen, load_private_key, load_public_key
from .manifest import format_time
from .trust import TrustStore
from .verify import Purpose, manifest_sha256

DEFAULT_VALID_DAYS = 90
MAX_VALID_DAYS = 3650  # a signed bundle valid for more than ten years is a mistake


def register(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``keygen`` and ``bundle build|sign|verify`` to the main parser's subcommands."""
    kg = subparsers.add_parser(
        "keygen", parents=[common_parent], help="make an Ed25519 signing key pair",
        description="Write NAME.key (private, mode 0600) and NAME.pub (copy it into the "
                    "devices' trust directory).")
    kg.add_argument("name", metavar="NAME", help="path prefix, e.g. keys/release")
    _add_json(kg)
    kg.set_defaults(func=handle_keygen)

    bundle = subparsers.add_parser(
        "bundle", help="build, co-sign or verify a signed migration bundle",
        description="Signed migration bundles (.zmb).")
    actions = bundle.add_subparsers(dest="bundle_command", metavar="{build,sign,verify}")
    actions.required = True

    build = actions.add_parser("build", parents=[common_parent],
                               help="lint a migration source and pack it into a signed bundle")
    build.add_argument("src", metavar="SRC", type=source_dir, help="migration source directory")
    build.add_argument("-o", "--output", required=True, type=new_file, metavar="OUT",
                       help="bundle file to write (.zmb)")
    build.add_argument("--key", action="append", required=True, type=existing_file, dest="keys",
                       metavar="KEY", help="private key (NAME.key); repeat for more signers")
    build.add_argument("--sequence", required=True, type=int_range(1), metavar="N",
                       help="bundle sequence; must be above the last one a device applied")
    validity = build.add_mutually_exclusive_group()
    validity.add_argument("--expires", metavar="ISO", help="expiry time, e.g. "
                          "2026-01-31T00:00:00Z")
    validity.add_argument("--valid-days", type=float_range(0, MAX_VALID_DAYS), metavar="D",
                          help=f"expire D days after creation (default {DEFAULT_VALID_DAYS})")
    build.add_argument("--created", metavar="ISO", help="creation time (default "
                       "$SOURCE_DATE_EPOCH or now); fix it to rebuild byte-identically")
    _add_json(build)
    build.set_defaults(func=handle_build)

    sign = actions.add_parser("sign", parents=[common_parent],
                              help="add a signature to an existing bundle")
    sign.add_argument("bundle", metavar="BUNDLE", type=existing_file)
    sign.add_argument("--key", required=True, type=existing_file, metavar="KEY",
                      help="private key (NAME.key) of the additional signer")
    _add_json(sign)
    sign.set_defaults(func=handle_sign)

    verify = actions.add_parser("verify", parents=[common_parent],
                                help="verify a bundle fully, without side effects")
    verify.add_argument("bundle", metavar="BUNDLE", type=existing_file)
    verify.add_argument("--trust", type=existing_dir, metavar="DIR", default=None,
                        help="directory of trusted .pub keys (default: config trust_dir)")
    verify.add_argument("--threshold", type=int_range(1), metavar="K", default=None,
                        help="signatures required (default and minimum: config "
                             "signature_threshold)")
    _add_json(verify)
    verify.set_defaults(func=handle_verify)


def _add_json(parser: argparse.ArgumentParser) -> None:
    # The common options may already provide --json (every command takes it).
    with contextlib.suppress(argparse.ArgumentError):
        parser.add_argument("--json", action="store_true",
                            help="print one JSON object on stdout")


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, sort_keys=True))
    else:
        print(text)


def parse_time(value: str, what: str) -> datetime:
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{what} {value!r} is not an ISO-8601 time; write it like "
                         "2026-01-31T00:00:00Z") from None
    if t.tzinfo is None:
        raise UsageError(f"{what} {value!r} has no time zone; add Z for UTC "
                         "(e.g. 2026-01-31T00:00:00Z)")
    return t.astimezone(UTC)


def _created(args: argparse.Namespace) -> datetime:
    if args.created:
        return parse_time(args.created, "--created")
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return datetime.fromtimestamp(int(epoch), UTC)
        except (ValueError, OverflowError):
            raise UsageError(f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix time in "
                             "seconds") from None
    return datetime.now(UTC).replace(microsecond=0)


def handle_keygen(args: argparse.Namespace, config: Config) -> int:
    priv, pub = keygen(args.name)
    kid = key_id(load_public_key(pub))
    _emit(args, {"ok": True, "private_key": str(priv), "public_key": str(pub), "keyid": kid},
          f"wrote {priv} (private, mode 0600: keep it off the devices and out of git)\n"
          f"wrote {pub} (copy it into each device's trust directory)\n"
          f"key id {kid}")
    return 0


def handle_build(args: argparse.Namespace, config: Config) -> int:
    created = _created(args)
    if args.expires:
        expires = parse_time(args.expires, "--expires")
    else:
        days = args.valid_days if args.valid_days is not None else DEFAULT_VALID_DAYS
        if days <= 0:
            raise UsageError(f"--valid-days must be positive, got {days:g}")
        expires = created + timedelta(days=days)
    manifest = bundle_mod.build(args.src, args.output, list(args.keys), args.sequence,
                                created=created, expires=expires)
    sha = manifest_sha256(manifest.to_json())
    signed_by = [key_id(load_private_key(k).public_key()) for k in args.keys]
    _emit(args, {"ok": True, "bundle": str(args.output), "name": manifest.name,
                 "sequence": manifest.sequence, "manifest_sha256": sha,
                 "created": format_time(manifest.created),
                 "expires": format_time(manifest.expires), "files": len(manifest.files),
                 "migrations": [m.version for m in manifest.migrations],
                 "signed_by": sorted(set(signed_by))},
          f"built {args.output}: bundle {manifest.name} sequence {manifest.sequence}, "
          f"{len(manifest.migrations)} migration(s), {len(manifest.files)} file(s)\n"
          f"manifest sha256 {sha}\n"
          f"valid {format_time(manifest.created)} to {format_time(manifest.expires)}, "
          f"signed by {', '.join(sorted(set(signed_by)))}")
    return 0


def handle_sign(args: argparse.Namespace, config: Config) -> int:
    signed_by = bundle_mod.sign(args.bundle, args.key, caps=Caps.from_config(config))
    _emit(args, {"ok": True, "bundle": str(args.bundle), "signed_by": list(signed_by)},
          f"signed {args.bundle}; it now carries {len(signed_by)} signature(s): "
          f"{', '.join(signed_by)}")
    return 0


def _threshold(args: argparse.Namespace, config: Config) -> int:
    """``--threshold`` may ask for more signatures than the device, never fewer: the
    verdict must be the one ``apply`` gives on this device."""
    if args.threshold is None:
        return config.signature_threshold
    if args.threshold < config.signature_threshold:
        raise UsageError(f"--threshold {args.threshold} is below the configured "
                         f"signature_threshold {config.signature_threshold}; bundle verify "
                         "gives this device's verdict, so it can only require more "
                         f"signatures: drop --threshold or give {config.signature_threshold} "
                         "or more")
    return args.threshold


def _floor_text(adm: Admitted) -> tuple[dict[str, Any], str]:
    floor = adm.floor
    if floor is None:
        return ({"checked": False, "note": adm.floor_note},
                f"anti-rollback: not checked ({adm.floor_note})")
    origin = "state file" if floor.stored else (
        "the database's record (seeded into the state file at the next apply)"
        if floor.origin == "database" else "nothing recorded yet")
    return ({"checked": True, "sequence": floor.sequence,
             "manifest_sha256": floor.manifest_sha256, "stored": floor.stored,
             "origin": floor.origin, "rolled_back_to": floor.rolled_back_to},
            f"anti-rollback floor: {floor.describe()}, from {origin}")


def handle_verify(args: argparse.Namespace, config: Config) -> int:
    trust = TrustStore.from_config(config, directory=args.trust,
                                   threshold=_threshold(args, config))
    with tempfile.TemporaryDirectory(prefix="zmonitor-verify-") as tmp:
        adm = admit(config, args.bundle, extract_to=Path(tmp) / "payload",
                    now=datetime.now(UTC), purpose=Purpose.APPLY, record=False, trust=trust)
    vb, manifest = adm.bundle, adm.bundle.manifest
    db = config.database
    floor_obj, floor_line = _floor_text(adm)
    where = f"database {db}" if adm.state.exists else f"no database at {db}"
    versions = [m.version for m in manifest.migrations]
    span = f"versions {versions[0]}-{versions[-1]}" if versions else "no migrations"
    _emit(args, {"ok": True, "bundle": str(args.bundle), "name": manifest.name,
                 "sequence": manifest.sequence, "manifest_sha256": vb.manifest_sha256,
                 "created": format_time(manifest.created),
                 "expires": format_time(manifest.expires),
                 "device_types": list(manifest.device_types), "files": len(manifest.files),
                 "migrations": versions, "signed_by": list(vb.signed_by),
                 "threshold": trust.threshold, "decision": adm.decision.value,
                 "device_type": config.device_type, "anti_rollback": floor_obj,
                 "trust_dir": str(args.trust or config.trust_dir),
                 "database": str(db) if adm.state.exists else None},
          f"bundle {manifest.name} sequence {manifest.sequence}: verified\n"
          f"  signed by {len(vb.signed_by)} trusted key(s), {trust.threshold} required: "
          f"{', '.join(vb.signed_by)}"
          + ("" if args.trust is None else f" (trust dir {args.trust}, not the "
             "configured one: the device's verdict may differ)") + "\n"
          f"  {len(manifest.files)} file(s), {len(versions)} migration(s) ({span}), "
          f"valid {format_time(manifest.created)} to {format_time(manifest.expires)}\n"
          f"  {floor_line}\n"
          f"  policy: device {config.device_type}, {where}: {adm.decision.value}")
    return 0
