"""Configuration: one YAML file, every path configurable, every field type-checked.

Unknown keys and wrong types are refused with a message naming the key and the fix,
so a typo in the field never silently falls back to a default on a medical device.

Every field has exactly one validator in ``_VALIDATORS`` (a test checks the table
against the dataclass, so a new field cannot be silently ignored). Numbers are finite
and within the documented range of ``_INTS``/``_FLOATS`` (``bool`` is not a number,
``.nan``/``.inf`` are refused); strings and paths hold no control, separator or
bidi characters (``text.clean`` would change them) and are bounded; ``revoked_keys``
are exactly 64 hex digits each (``fullmatch``: a trailing newline is not an id). The
file itself is read with a size cap and only if it is a regular file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .fsutil import read_at_most
from .text import clean

DEFAULT_CONFIG_PATH = Path("/etc/zmonitor-migrated/config.yaml")
CONFIG_ENV = "ZMONITOR_MIGRATE_CONFIG"


@dataclass(frozen=True)
class Config:
    database: Path = Path("/var/lib/zmonitor/zmonitor.db")
    device_type: str = "zmonitor-bedside"
    app_unit: str | None = "zmonitor.service"
    state_dir: Path = Path("/var/lib/zmonitor-migrated")
    runtime_dir: Path = Path("/run/zmonitor-migrated")
    inbox: Path = Path("/var/lib/zmonitor-migrated/inbox")
    # Beside the database, so a backup is a hard link: under the service's
    # ProtectSystem=strict the state dir is another mount, where link(2) fails.
    backup_dir: Path = Path("/var/lib/zmonitor/migration-backups")
    backup_keep: int = 3
    trust_dir: Path = Path("/etc/zmonitor-migrated/trusted.d")
    signature_threshold: int = 1
    revoked_keys: tuple[str, ...] = ()
    max_downtime_s: float = 300.0
    batch_size: int = 50000  # at least this many rows per batch on the private copy
    health_check_s: float = 10.0
    stop_timeout_s: float = 60.0
    integrity_check: str = "full"  # pre-checks and rehearsal: "full" or "quick"
    downtime_integrity_check: str = "quick"  # the migrated copy, while the app is down
    clock_slack_s: float = 300.0
    # Longest validity (expires - created) a bundle may have: a signed bundle must not
    # stay replayable for decades on a device that never saw a newer one.
    max_validity_days: int = 730
    # 'rollback --source' runs unsigned SQL: developer machines only, never packaged.
    allow_unsigned_source: bool = False
    max_bundle_bytes: int = 512 * 1024 * 1024
    max_bundle_members: int = 10000
    metrics_path: Path | None = None
    systemctl: str = "systemctl"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.json"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "lock"

    @property
    def history_path(self) -> Path:
        return self.state_dir / "history.jsonl"

    @property
    def status_path(self) -> Path:
        return self.runtime_dir / "status.json"

    def with_overrides(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


_PATHS = {"database", "state_dir", "runtime_dir", "inbox", "backup_dir", "trust_dir"}
# key -> (min, max), both inclusive. Bounds are what a device can sensibly use; beyond
# them a value is a typo (and 1e11 seconds overflowed the expiry arithmetic).
_INTS: dict[str, tuple[int, int]] = {
    "backup_keep": (1, 1000),
    "signature_threshold": (1, 100),
    "batch_size": (1, 100_000_000),
    "max_bundle_bytes": (1, 1 << 40),  # up to 1 TiB
    "max_bundle_members": (1, 1_000_000),
    "max_validity_days": (1, 36_525),  # a century: more is a typo
}
_FLOATS: dict[str, tuple[float, float]] = {  # seconds
    "max_downtime_s": (0.001, 86_400.0),  # up to a day
    "health_check_s": (0.0, 3_600.0),
    "stop_timeout_s": (0.1, 3_600.0),
    "clock_slack_s": (0.0, 30 * 86_400.0),  # up to 30 days
}
_STRS = {"device_type", "integrity_check", "downtime_integrity_check", "systemctl"}
_CHOICES = {"integrity_check": ("full", "quick"), "downtime_integrity_check": ("full", "quick")}
MAX_STR_CHARS = 4096  # PATH_MAX
MAX_REVOKED = 1000
MAX_CONFIG_BYTES = 1 << 20
_KEY_ID = re.compile(r"[0-9a-fA-F]{64}")  # fullmatch only


def _fail(key: str, expected: str, value: object, path: Path | str) -> ConfigError:
    shown = clean(repr(value), limit=200)
    return ConfigError(
        f"config {clean(path)}: '{clean(key)}' must be {expected}, got {shown} "
        f"({type(value).__name__}); fix the value in the file or remove the key to use the "
        "default"
    )


def _text(key: str, value: Any, source: Path | str, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_STR_CHARS \
            or clean(value) != value:
        raise _fail(key, f"{what} (non-empty, at most {MAX_STR_CHARS} characters, no control "
                    "characters)", value, source)
    return value


def _path(key: str, value: Any, source: Path | str, base: Path) -> Path:
    p = Path(_text(key, value, source, "a path string"))
    return p if p.is_absolute() else (base / p)


def _optional_path(key: str, value: Any, source: Path | str, base: Path) -> Path | None:
    return None if value is None else _path(key, value, source, base)


def _int(key: str, value: Any, source: Path | str, _base: Path) -> int:
    lo, hi = _INTS[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(key, f"an integer from {lo} to {hi}", value, source)
    return value


def _float(key: str, value: Any, source: Path | str, _base: Path) -> float:
    lo, hi = _FLOATS[key]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    # The range test also refuses nan (every comparison is false) and inf; it runs on
    # the int itself, so a 400-digit integer is refused, not an OverflowError.
    if not number or not lo <= value <= hi or (isinstance(value, float)
                                               and not math.isfinite(value)):
        raise _fail(key, f"a number from {lo:g} to {hi:g} (seconds)", value, source)
    return float(value)


def _str(key: str, value: Any, source: Path | str, _base: Path) -> str:
    text = _text(key, value, source, "a string")
    choices = _CHOICES.get(key)
    if choices and text not in choices:
        raise _fail(key, " or ".join(repr(c) for c in choices), value, source)
    return text


def _app_unit(key: str, value: Any, source: Path | str, _base: Path) -> str | None:
    if value is None:
        return None
    return _text(key, value, source, "a unit name or null (no unit to control)")


def _revoked(key: str, value: Any, source: Path | str, _base: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(key, "a list of key ids (hex strings)", value, source)
    if len(value) > MAX_REVOKED:
        raise _fail(key, f"at most {MAX_REVOKED} key ids", f"{len(value)} ids", source)
    bad = [v for v in value if not _KEY_ID.fullmatch(v)]
    if bad:
        # A near miss ("<id>\n", a space, a cut-off id) would never match the key's id,
        # leaving the key trusted while the operator believes it revoked.
        raise _fail(key, "a list of key ids, each exactly 64 hex digits as printed by "
                    "'zmonitor-migrate keygen' (a mistyped id would leave the key trusted)",
                    bad[0], source)
    return tuple(v.lower() for v in value)


def _bool(key: str, value: Any, source: Path | str, _base: Path) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value, source)
    return value


_Validator = Callable[[str, Any, "Path | str", Path], Any]
_VALIDATORS: dict[str, _Validator] = {
    **{k: _path for k in _PATHS},
    "metrics_path": _optional_path,
    **{k: _int for k in _INTS},
    **{k: _float for k in _FLOATS},
    **{k: _str for k in _STRS},
    "app_unit": _app_unit,
    "revoked_keys": _revoked,
    "allow_unsigned_source": _bool,
}


def from_mapping(raw: dict[str, Any], source: Path | str = "<config>") -> Config:
    """Validate a parsed YAML mapping into a Config. Relative paths are resolved
    against the config file's directory, so a test config can use short names."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config {clean(source)}: the top level must be a mapping of keys "
                          "to values")
    base = Path(source).parent if str(source) != "<config>" else Path.cwd()
    known = {f.name for f in dataclasses.fields(Config)} - {"extra"}
    unknown = sorted(clean(repr(k) if not isinstance(k, str) else k, limit=100)
                     for k in raw if k not in known)
    if unknown:
        raise ConfigError(
            f"config {clean(source)}: unknown key(s) {', '.join(unknown)}; known keys are "
            f"{', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        validator = _VALIDATORS.get(key)
        if validator is None:  # a field added without a validator: never ignore it
            raise ConfigError(f"config {clean(source)}: '{key}' cannot be validated "
                              "(internal error: no validator); remove the key")
        values[key] = validator(key, value, source, base)
    return Config(**values)


def _read_config(cfg_path: Path) -> str:
    """The file's text: a regular file, at most MAX_CONFIG_BYTES, UTF-8."""
    fd = os.open(cfg_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"config file {clean(cfg_path)} is not a regular file; point "
                              f"--config / ${CONFIG_ENV} at the YAML file")
        data = read_at_most(fd, MAX_CONFIG_BYTES)
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {clean(cfg_path)} is larger than {MAX_CONFIG_BYTES} "
                          "bytes; it is not a zmonitor-migrated config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {clean(cfg_path)} is not UTF-8 text ({exc.reason} at "
                          f"byte {exc.start})") from None


def load(path: Path | str | None = None, *, required: bool = False) -> Config:
    """Load the config from PATH, $ZMONITOR_MIGRATE_CONFIG or the default location.

    A missing default file yields the built-in defaults; a missing file that was
    asked for explicitly is an error.
    """
    explicit = path is not None or CONFIG_ENV in os.environ
    cfg_path = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
    try:
        text = _read_config(cfg_path)
    except FileNotFoundError:
        if explicit or required:
            raise ConfigError(
                f"config file {cfg_path} does not exist; create it (see README 'Configuration') "
                f"or point --config / ${CONFIG_ENV} at the right file"
            ) from None
        return Config()
    except OSError as exc:
        raise ConfigError(f"config file {clean(cfg_path)} cannot be read: {exc.strerror}"
                          ) from None
    except ValueError:  # a NUL in the path
        raise ConfigError(f"config file {clean(cfg_path)}: not a valid path") from None
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # ValueError: an integer past Python's digit limit; RecursionError: deep nesting.
        raise ConfigError(f"config file {clean(cfg_path)} is not valid YAML: "
                          f"{clean(exc, limit=500)}") from None
    return from_mapping(raw or {}, cfg_path)
