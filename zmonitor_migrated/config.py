"""Configuration: one YAML file, every path configurable, every field type-checked.

Unknown keys and wrong types are refused with a message naming the key and the fix,
so a typo in the field never silently falls back to a default on a medical device.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

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
_INTS = {"backup_keep": 1, "signature_threshold": 1, "batch_size": 1, "max_bundle_bytes": 1,
         "max_bundle_members": 1, "max_validity_days": 1}
_FLOATS = {"max_downtime_s": 0.001, "health_check_s": 0.0, "stop_timeout_s": 0.1,
           "clock_slack_s": 0.0}
_STRS = {"device_type", "integrity_check", "downtime_integrity_check", "systemctl"}


def _fail(key: str, expected: str, value: object, path: Path | str) -> ConfigError:
    return ConfigError(
        f"config {path}: '{key}' must be {expected}, got {value!r} ({type(value).__name__}); "
        f"fix the value in the file or remove the key to use the default"
    )


def from_mapping(raw: dict[str, Any], source: Path | str = "<config>") -> Config:
    """Validate a parsed YAML mapping into a Config. Relative paths are resolved
    against the config file's directory, so a test config can use short names."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source}: the top level must be a mapping of keys to values")
    base = Path(source).parent if str(source) != "<config>" else Path.cwd()
    known = {f.name for f in dataclasses.fields(Config)} - {"extra"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"config {source}: unknown key(s) {', '.join(unknown)}; known keys are "
            f"{', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _PATHS or key == "metrics_path":
            if value is None and key == "metrics_path":
                values[key] = None
                continue
            if not isinstance(value, str) or not value:
                raise _fail(key, "a path string", value, source)
            p = Path(value)
            values[key] = p if p.is_absolute() else (base / p)
        elif key in _INTS:
            if isinstance(value, bool) or not isinstance(value, int) or value < _INTS[key]:
                raise _fail(key, f"an integer >= {_INTS[key]}", value, source)
            values[key] = value
        elif key in _FLOATS:
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or value < _FLOATS[key]:
                raise _fail(key, f"a number >= {_FLOATS[key]}", value, source)
            values[key] = float(value)
        elif key in _STRS:
            if not isinstance(value, str) or not value:
                raise _fail(key, "a non-empty string", value, source)
            values[key] = value
        elif key == "app_unit":
            if value is not None and (not isinstance(value, str) or not value):
                raise _fail(key, "a unit name or null (no unit to control)", value, source)
            values[key] = value
        elif key == "allow_unsigned_source":
            if not isinstance(value, bool):
                raise _fail(key, "true or false", value, source)
            values[key] = value
        elif key == "revoked_keys":
            if value is None:
                value = []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _fail(key, "a list of key ids (hex strings)", value, source)
            values[key] = tuple(v.lower() for v in value)
    for key in ("integrity_check", "downtime_integrity_check"):
        if values.get(key, "full") not in ("full", "quick"):
            raise _fail(key, "'full' or 'quick'", values[key], source)
    return Config(**values)


def load(path: Path | str | None = None, *, required: bool = False) -> Config:
    """Load the config from PATH, $ZMONITOR_MIGRATE_CONFIG or the default location.

    A missing default file yields the built-in defaults; a missing file that was
    asked for explicitly is an error.
    """
    explicit = path is not None or CONFIG_ENV in os.environ
    cfg_path = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit or required:
            raise ConfigError(
                f"config file {cfg_path} does not exist; create it (see README 'Configuration') "
                f"or point --config / ${CONFIG_ENV} at the right file"
            ) from None
        return Config()
    except OSError as exc:
        raise ConfigError(f"config file {cfg_path} cannot be read: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {cfg_path} is not valid YAML: {exc}") from None
    return from_mapping(raw or {}, cfg_path)
