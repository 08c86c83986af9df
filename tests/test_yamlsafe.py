"""Every YAML file a bundle carries is parsed within bounds, each failure a refusal.

``bundle.yaml`` (``sources``), ``checks/post.yaml`` (``post_checks``) and
``schema/database.yaml`` (``schema_spec``) all go through ``yamlsafe.parse``: deep
nesting, aliases, several documents, hostile scalars and oversize text are
``BundleRejected``, never ``RecursionError``, ``ValueError`` or a crash of libyaml.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from zmonitor_migrated import post_checks, schema_spec, yamlsafe
from zmonitor_migrated.errors import BundleRejected

HOSTILE = {
    "deep nesting (libyaml overflows the C stack, PyYAML recurses)": "[" * 100_000,
    "deep mappings": "a: " * 5_000 + "1",
    "alias expansion": "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n",
    "two documents": "tables: {}\n---\ntables: {}\n",
    "int over the digit limit": "version: " + "9" * 5000 + "\n",
    "date of month 13": "version: 2026-13-01\n",
    "unhashable key": "? [a, b]\n: 1\n",
    "not YAML": "tables: [unclosed\n",
    "too many nodes": "[" + ", ".join(["1"] * 300_000) + "]",
    "oversize text": "# " + "x" * (yamlsafe.MAX_CHARS + 1),
}
PARSERS: dict[str, Callable[[str], object]] = {
    "database.yaml": lambda t: schema_spec.parse_spec(t, "database.yaml"),
    "post.yaml": lambda t: post_checks.parse_checks(t, "post.yaml"),
    "yamlsafe": lambda t: yamlsafe.parse(t, "x.yaml"),
}


@pytest.mark.parametrize("parser", sorted(PARSERS))
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_yaml_is_a_refusal(parser: str, case: str) -> None:
    with pytest.raises(BundleRejected):
        PARSERS[parser](HOSTILE[case])


def test_the_shipped_files_still_parse() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "bundles" / "zmonitor"
    assert schema_spec.parse_spec((root / "schema" / "database.yaml").read_text()).tables
    assert post_checks.parse_checks((root / "checks" / "post.yaml").read_text())
