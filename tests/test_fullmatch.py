"""A pattern that validates text from outside matches all of it.

Python's ``$`` also matches before a final newline, so ``^[0-9a-f]{64}$`` accepts
``"<id>\\n"``. Every such pattern in the package uses ``\\Z``; these cases fail as soon
as one goes back to ``$``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zmonitor_migrated import backup, fsutil, manifest, schema_spec, sources, sqlscript
from zmonitor_migrated.errors import BundleRejected

PACKAGE = Path(__file__).resolve().parent.parent / "zmonitor_migrated"


@pytest.mark.parametrize("value", ["migrations/schema/0001_a.sql\n", "bundle.yaml\n"])
def test_payload_path_with_trailing_newline_refused(value: str) -> None:
    with pytest.raises(BundleRejected):
        manifest.check_path(value)


@pytest.mark.parametrize("pattern", [manifest._TIME, manifest._SHA256, manifest._SEGMENT,
                                     manifest._WORD, sqlscript.IDENT, sources.NAME_RE,
                                     sources.ROLLBACK_RE, fsutil._TEMP,
                                     schema_spec._LITERAL],
                         ids=lambda p: p.pattern[:40])
def test_no_pattern_accepts_a_trailing_newline(pattern: re.Pattern[str]) -> None:
    samples = ["2026-01-01T00:00:00Z", "a" * 64, "0" * 64, "abc", "vitals",
               "0001_initial_schema.sql", "0001_rollback.sql", ".x.tmp-12", "NULL", "42"]
    matched = [s for s in samples if pattern.match(s)]
    assert matched, "the sample set no longer exercises this pattern"
    for s in matched:
        assert not pattern.match(s + "\n"), f"{pattern.pattern!r} accepts {s!r} + newline"


def test_backup_listing_ignores_a_planted_name_with_a_newline(tmp_path: Path) -> None:
    db = tmp_path / "zmonitor.db"
    good = tmp_path / "zmonitor-20260101T000000Z-v10.db"
    planted = tmp_path / "zmonitor-20260101T000001Z-v10.db\n"
    for p in (good, planted):
        p.write_bytes(b"x")
    assert backup.list_backups(db, tmp_path) == [good]


def test_no_dollar_anchor_left_in_validating_patterns() -> None:
    """A new pattern written with ``$`` is caught here, before it reaches a review."""
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            pattern_line = "re.compile(" in line or line.lstrip().startswith(("r\"", "r'", "rf\""))
            if pattern_line and re.search(r"\$[\"']", line) and "MULTILINE" not in line:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, "use \\Z, not $, to end a validating pattern:\n" + "\n".join(offenders)
