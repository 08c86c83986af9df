"""One cleaning function for every string that leaves the process as text.

Inbox file names, manifest fields, SQL error text and exception messages are hostile:
a newline in a file name must not start a second sd_notify assignment
(``WATCHDOG=trigger``), a second journal line (``<1>ALERT …``), a second history line
or a second Prometheus sample, and an escape sequence must not repaint an operator's
terminal. Every sink (log lines, sd_notify, ``status.json``, the history, metrics,
printed ``status``/``history``) passes its strings through ``clean`` instead of each
call site guessing which of its arguments came from outside.

``clean`` replaces, with a visible escape so nothing is hidden from the operator:

- C0 controls, DEL and C1 controls (``\\n``, ``\\r``, ``\\t``, ``\\x1b``, ``\\x85`` …);
- every other character Python's ``str.splitlines`` breaks on (U+2028, U+2029 …) and
  the other Unicode line/paragraph separators (``\\u2028``);
- bidirectional overrides and isolates (U+202A–U+202E, U+2066–U+2069, U+200E/F,
  U+061C), which make a line read differently from what it holds (``\\u202e``);
- lone surrogates: a byte that was not UTF-8, decoded with ``surrogateescape``
  (U+DC80–U+DCFF), is shown as the byte it was (``\\xff``); any other as ``\\udXXX``.
  The result always encodes as UTF-8.

Backslashes are left alone (text stays readable); the formats that give a backslash a
meaning (Prometheus label values, quoted alert fields) escape it themselves, see
``prom_label`` and ``quoted``. ``clean`` is idempotent.

A ``limit`` truncates long text (after cleaning) and says how much was cut: journald
splits a line longer than its ``LineMax`` (48 KiB) into two entries and parses a
priority prefix at the start of the second, so an unbounded line could still fake one.
"""

from __future__ import annotations

import re
import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Categories: Cc controls (C0, DEL, C1), Cs surrogates, Zl/Zp line and paragraph separators.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
# Fast path: most text is plain printable ASCII.
_PLAIN = re.compile(r"[ -~]*")


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the original byte
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def _needs_escape(ch: str) -> bool:
    # Every character str.splitlines breaks on (\v, \f, \x1c-\x1e, \x85, U+2028/9) is
    # in Cc, Zl or Zp; the test suite checks that against splitlines itself.
    return ch in _BIDI or unicodedata.category(ch) in _ESCAPED_CATEGORIES


def clean(text: object, *, limit: int | None = None) -> str:
    """``text`` as one line of printable text; ``str()`` of anything else first."""
    s = text if isinstance(text, str) else str(text)
    if not _PLAIN.fullmatch(s):
        s = "".join(_escape(ch) if _needs_escape(ch) else ch for ch in s)
    if limit is not None and len(s) > limit:
        cut = len(s) - limit
        s = s[:limit] + f"…[{cut} more characters]"
    return s


def quoted(text: object, *, limit: int | None = None) -> str:
    """A double-quoted field value (``msg="…"``): cleaned, then ``\\`` and ``"`` escaped,
    so the value ends exactly at its closing quote (the POSIX shell / logfmt rules)."""
    body = clean(text, limit=limit).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{body}"'


_TOKEN = re.compile(r"[A-Za-z0-9._:+@/-]+")


def token(text: object, *, limit: int | None = 200) -> str:
    """A bare field value (``run=<id>``) when it is one safe word, else ``quoted``: a
    value can never carry a space and so never start another field."""
    s = clean(text, limit=limit)
    return s if _TOKEN.fullmatch(s) else quoted(s)


def prom_label(text: object, *, limit: int | None = 200) -> str:
    """A Prometheus text-format label value (without the quotes): cleaned, then
    backslash, double quote and newline escaped as the exposition format requires."""
    return clean(text, limit=limit).replace("\\", "\\\\").replace('"', '\\"') \
        .replace("\n", "\\n")


def clean_tree(value: object, *, limit: int | None = None) -> object:
    """``clean`` applied to every string (keys too) of a JSON-like value."""
    if isinstance(value, str):
        return clean(value, limit=limit)
    if isinstance(value, dict):
        return {clean(k, limit=limit) if isinstance(k, str) else k:
                clean_tree(v, limit=limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_tree(v, limit=limit) for v in value]
    return value
