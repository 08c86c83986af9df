"""Untrusted YAML, parsed within bounds: the one way this package reads YAML from a bundle.

The parser is not linear in every input and the composer recurses once per nesting
level (libyaml's overflows the C stack at about 100,000 levels; PyYAML's own raises
RecursionError at about 900), so the parser's event stream is walked first, iteratively
and without building a tree: too deep, too many nodes, an alias (exponential
expansion) or a second document is refused as soon as it is seen. Only then is the text
loaded with a safe loader. Every failure is a ``BundleRejected`` naming the file;
nothing else escapes.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import BundleRejected

MAX_DEPTH = 32
MAX_EVENTS = 10_000
MAX_CHARS = 4 * 1024 * 1024  # a config-like file; more is a mistake or an attack


def _refuse(path: Path | str, problem: str) -> BundleRejected:
    return BundleRejected(f"{path} {problem}; fix the file and rebuild the bundle",
                          kind="malformed")


def _yaml_loader() -> type:
    """libyaml's safe loader when present (fast on large input), else PyYAML's own."""
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # type: ignore[no-any-return]


def _check_yaml_shape(text: str, path: Path | str, max_depth: int, max_events: int) -> None:
    """Walk the parser's events (iterative, no tree built) before anything is composed:
    refuses deep nesting (the composer recurses once per level; libyaml's overflows the C
    stack), aliases (exponential expansion), more than one document and too many
    nodes, each as soon as it is seen."""
    depth = 0
    documents = 0
    for count, event in enumerate(yaml.parse(text, Loader=_yaml_loader()), start=1):
        if count > max_events:
            raise _refuse(path, f"has more than {max_events} YAML nodes")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > max_depth:
                raise _refuse(path, f"nests deeper than {max_depth} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            raise _refuse(path, "uses a YAML alias (*name); write the value out")
        elif isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise _refuse(path, "holds more than one YAML document")


def parse(text: str, path: Path | str, *, max_depth: int = MAX_DEPTH,
          max_events: int = MAX_EVENTS, max_chars: int = MAX_CHARS) -> object:
    """The plain data of one YAML document, or ``BundleRejected`` naming ``path``."""
    if len(text) > max_chars:
        raise BundleRejected(f"{path} holds {len(text)} characters, over {max_chars}; "
                             "it is not a file this product writes", kind="too-large")
    try:
        _check_yaml_shape(text, path, max_depth, max_events)
        return yaml.load(text, Loader=_yaml_loader())  # a safe loader: plain data only
    except BundleRejected:
        raise
    except yaml.YAMLError as exc:
        raise _refuse(path, f"is not valid YAML: {_short(exc)}") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
        # The safe constructor still raises these for hostile scalars (a date of month
        # 13, an int over Python's digit limit, an unhashable key).
        raise _refuse(path, f"cannot be read as YAML: {type(exc).__name__}: "
                      f"{_short(exc)}") from None


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())  # parser messages span lines; a reason is one line
    return text if len(text) <= limit else text[:limit] + "..."
