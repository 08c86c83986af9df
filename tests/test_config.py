"""Config validation, table-driven over every field of ``Config``: each has a validator,
each number has bounds (below-min, above-max, inf, nan, bool, string and huge integers
refused), each string and path refuses control characters, revoked key ids match
completely. The file itself: a FIFO, an oversized or non-UTF-8 file, odd YAML."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from zmonitor_migrated import config as config_mod
from zmonitor_migrated.config import Config, from_mapping
from zmonitor_migrated.errors import ConfigError

FIELDS = sorted(f.name for f in dataclasses.fields(Config) if f.name != "extra")
NUMERIC = sorted({**config_mod._INTS, **config_mod._FLOATS})
TEXT = sorted(config_mod._PATHS | config_mod._STRS | {"metrics_path", "app_unit"})
KEY_ID = "0123456789abcdef" * 4
REPO = Path(__file__).resolve().parent.parent


def refused(key: str, value: Any) -> str:
    with pytest.raises(ConfigError) as info:
        from_mapping({key: value}, "/etc/test.yaml")
    assert f"'{key}'" in info.value.message
    assert info.value.exit_code == 2
    return info.value.message


def test_every_field_has_exactly_one_validator() -> None:
    assert sorted(config_mod._VALIDATORS) == FIELDS
    tables = [set(config_mod._PATHS), set(config_mod._INTS), set(config_mod._FLOATS),
              set(config_mod._STRS)]
    for i, a in enumerate(tables):
        for b in tables[i + 1:]:
            assert not a & b


def test_every_numeric_field_has_sane_bounds() -> None:
    for key, (lo, hi) in {**config_mod._INTS, **config_mod._FLOATS}.items():
        assert isinstance(lo, int | float) and isinstance(hi, int | float), key
        assert 0 <= lo < hi < 2**63, key
        default = getattr(Config(), key)
        assert lo <= default <= hi, key


def test_a_field_without_a_validator_is_never_silently_ignored(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a key missing from the type tables was accepted and dropped
    (``backup_keep: 7`` loaded as 3)."""
    monkeypatch.delitem(config_mod._VALIDATORS, "backup_keep")
    with pytest.raises(ConfigError, match="backup_keep"):
        from_mapping({"backup_keep": 7})


@pytest.mark.parametrize("key", FIELDS)
def test_every_field_round_trips_a_good_value(key: str, tmp_path: Path) -> None:
    default = getattr(Config(), key)
    value: Any = str(default) if isinstance(default, Path) else default
    if key == "revoked_keys":
        value = [KEY_ID.upper()]
    if key == "metrics_path":
        value = "/var/lib/node_exporter/zmonitor.prom"
    cfg = from_mapping({key: value}, tmp_path / "c.yaml")
    got = getattr(cfg, key)
    if key == "revoked_keys":
        assert got == (KEY_ID,)
    elif isinstance(got, Path):
        assert str(got) == value
    else:
        assert got == value


def _below(key: str) -> float:
    lo = {**config_mod._INTS, **config_mod._FLOATS}[key][0]
    return lo - 1 if key in config_mod._INTS else lo - max(abs(lo) / 2, 0.001)


def _above(key: str) -> float:
    hi = {**config_mod._INTS, **config_mod._FLOATS}[key][1]
    return hi + 1 if key in config_mod._INTS else hi * 1.5


BAD_NUMBERS = {
    "below-min": _below, "above-max": _above,
    "inf": lambda k: float("inf"), "-inf": lambda k: float("-inf"),
    "nan": lambda k: float("nan"), "true": lambda k: True, "false": lambda k: False,
    "string": lambda k: "5", "null": lambda k: None, "list": lambda k: [5],
    "huge-int": lambda k: 10**400, "1e11": lambda k: 1e11,
}


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
@pytest.mark.parametrize("key", NUMERIC)
def test_every_numeric_field_refuses(key: str, case: str) -> None:
    message = refused(key, BAD_NUMBERS[case](key))
    assert "from" in message and "to" in message  # the range is named


@pytest.mark.parametrize("key", NUMERIC)
def test_every_numeric_field_accepts_its_bounds(key: str) -> None:
    lo, hi = {**config_mod._INTS, **config_mod._FLOATS}[key]
    assert getattr(from_mapping({key: lo}), key) == lo
    assert getattr(from_mapping({key: hi}), key) == hi


BAD_TEXT = {
    "newline": "a\nb", "nul": "a\x00b", "escape": "a\x1b[2Jb", "bidi": "a\u202eb",
    "line-separator": "a\u2028b", "empty": "", "number": 5, "list": ["a"],
    "too-long": "a" * 5000,
}


@pytest.mark.parametrize("case", sorted(BAD_TEXT))
@pytest.mark.parametrize("key", TEXT)
def test_every_text_field_refuses(key: str, case: str) -> None:
    message = refused(key, BAD_TEXT[case])
    assert "\n" not in message and "\x00" not in message


@pytest.mark.parametrize("bad", [KEY_ID + "\n", KEY_ID + " ", " " + KEY_ID, KEY_ID[:-1],
                                 KEY_ID + "0", KEY_ID[:-1] + "g", "", KEY_ID + "\r\n"])
def test_revoked_key_ids_must_match_completely(bad: str) -> None:
    """A trailing newline passed ``^…$``; the id then never matched and the key stayed
    trusted."""
    message = refused("revoked_keys", [KEY_ID, bad])
    assert "64 hex digits" in message


def test_revoked_keys_other_shapes() -> None:
    refused("revoked_keys", KEY_ID)
    refused("revoked_keys", [5])
    refused("revoked_keys", [KEY_ID] * 1001)
    assert from_mapping({"revoked_keys": None}).revoked_keys == ()


# -- the file itself -----------------------------------------------------------------------

def _load_with_timeout(path: Path) -> Config | Exception | None:
    out: list[Config | Exception] = []

    def run() -> None:
        try:
            out.append(config_mod.load(path))
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(15)
    if t.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # unblock the stuck open
        return None
    return out[0]


@pytest.mark.parametrize("case", ["fifo", "directory", "oversized", "not-utf8", "non-str-key",
                                  "deep-nesting", "huge-int-literal", "top-level-list"])
def test_a_hostile_config_file_is_a_config_error(tmp_path: Path, case: str) -> None:
    path = tmp_path / "config.yaml"
    if case == "fifo":
        os.mkfifo(path)
    elif case == "directory":
        path.mkdir()
    elif case == "oversized":
        path.write_text("# " + "x" * (2 << 20) + "\n")
    elif case == "not-utf8":
        path.write_bytes(b"device_type: \xff\xfe\n")
    elif case == "non-str-key":
        path.write_text("1: 2\nnull: 3\nfoo: 4\n")
    elif case == "deep-nesting":
        path.write_text("revoked_keys: " + "[" * 50_000 + "]" * 50_000 + "\n")
    elif case == "huge-int-literal":
        path.write_text("batch_size: " + "9" * 5000 + "\n")
    else:
        path.write_text("- a\n- b\n")
    result = _load_with_timeout(path)
    assert result is not None, "config.load hung"
    assert isinstance(result, ConfigError), repr(result)


@pytest.mark.parametrize("value", ["100000000000", "1.0e+11", ".nan", ".inf", "true"])
def test_out_of_range_clock_slack_through_the_real_cli(tmp_path: Path, value: str) -> None:
    """``clock_slack_s: 1e11`` gave an OverflowError traceback; now exit 2 naming the key."""
    path = tmp_path / "config.yaml"
    path.write_text(f"clock_slack_s: {value}\n")
    assert yaml.safe_load(path.read_text())["clock_slack_s"] is not None
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "zmonitor_migrated.cli", "--config",
                           str(path), "status"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "clock_slack_s" in proc.stderr and "Traceback" not in proc.stderr
