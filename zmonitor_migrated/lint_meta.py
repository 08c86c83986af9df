"""Lint of a source's YAML files: ``bundle.yaml``, ``checks/post.yaml``, ``schema/database.yaml``.

The device validates a migrated database against ``post.yaml`` and ``database.yaml``;
a file it cannot parse would be found only there, at the rehearsal, naming a temporary
path. Here each file goes through the very parser the device uses, at ``lint`` and at
``bundle build``, and a refusal becomes a ``Problem`` with the source's own file name
and the line of the offending key (from the YAML node marks). ``bundle.yaml`` keys are
checked against the fields the builder reads, so a typo (``devices_types``) is refused
instead of silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import yaml

from .errors import BundleRejected
from .post_checks import parse_checks
from .schema_spec import parse_spec
from .sources import Problem

BUNDLE_KEYS = ("name", "app", "device_types", "description", "declared_row_loss")
POST = "checks/post.yaml"
SCHEMA = "schema/database.yaml"
# The largest YAML file read here; a source's metadata is a few kilobytes.
MAX_BYTES = 4 * 1024 * 1024


def lint_meta(root: Path) -> list[Problem]:
    """Every problem of the source's YAML files (missing optional files are fine)."""
    root = Path(root)
    problems = _bundle_keys(root)
    problems += _parsed(root, POST, "post-yaml", lambda text, name: parse_checks(text, name))
    problems += _parsed(root, SCHEMA, "schema-yaml", lambda text, name: parse_spec(text, name))
    return problems


def _read(path: Path) -> str | None:
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise BundleRejected(f"{path.name}: larger than {MAX_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


def _parsed(root: Path, rel: str, code: str, parse: Callable[[str, str], object]
            ) -> list[Problem]:
    try:
        text = _read(root / rel)
    except (OSError, BundleRejected) as exc:
        return [Problem("error", rel, 1, code, f"cannot read: {exc}")]
    if text is None:
        return []
    try:
        parse(text, rel)
    except BundleRejected as exc:
        message = exc.message.removeprefix(f"{rel}: ")
        return [Problem("error", rel, _line_of(text, message), code, message)]
    return []


def _bundle_keys(root: Path) -> list[Problem]:
    rel = "bundle.yaml"
    try:
        text = _read(root / rel)
    except (OSError, BundleRejected):
        return []  # reading bundle.yaml is the source loader's job; it reports it
    if text is None:
        return []
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []  # the source loader refuses invalid YAML with its own message
    if not isinstance(node, yaml.MappingNode):
        return []
    problems = []
    for key, _value in node.value:
        name = key.value if isinstance(key, yaml.ScalarNode) else None
        if name not in BUNDLE_KEYS:
            problems.append(Problem(
                "error", rel, key.start_mark.line + 1, "bundle-yaml",
                f"unknown key {name!r} (allowed: {', '.join(BUNDLE_KEYS)}); a misspelt key "
                "would be ignored, so it is refused"))
    return problems


# -- where in the file ---------------------------------------------------------------------
def _line_of(text: str, message: str) -> int:
    """The line a parser's message points at. The parsers name the place as a path
    (``tables.vitals.columns[2].type``, ``[3] (name).sql``, ``top level``) before ``: ``;
    it is followed through the composed YAML nodes as deep as it goes."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        return mark.line + 1 if mark is not None else 1
    except yaml.YAMLError:
        return 1
    if node is None:
        return 1
    where = message.split(": ", 1)[0]
    where = re.sub(r" \([^)]*\)", "", where).removeprefix("top level")
    line = node.start_mark.line + 1
    for token in re.findall(r"\[(\d+)\]|([^.\[\]]+)", where):
        child = _child(node, int(token[0]) if token[0] else token[1])
        if child is None:
            break
        key_line, node = child
        line = key_line
    unknown = re.search(r"unknown key '([^']*)'", message)
    if unknown and isinstance(node, yaml.MappingNode):
        for key, _value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == unknown.group(1):
                return key.start_mark.line + 1
    return line


def _child(node: yaml.Node, step: int | str) -> tuple[int, yaml.Node] | None:
    if isinstance(step, int) and isinstance(node, yaml.SequenceNode) \
            and 0 <= step < len(node.value):
        item = node.value[step]
        return item.start_mark.line + 1, item
    if isinstance(step, str) and isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == step:
                return key.start_mark.line + 1, value
    return None


__all__ = ["BUNDLE_KEYS", "lint_meta"]
