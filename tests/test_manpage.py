"""The man page (packaging/debian/zmonitor-migrate.1) stays true to the code.

The commands come from the argparse parser ``cli.build_parser`` builds, the exit codes
from the ``exit_code`` of every error class in ``errors``, so adding either without
documenting it fails here. The page is also rendered with groff / man when installed:
lintian reports their warnings as ``groff-message`` / ``manpage-has-errors-from-man``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from zmonitor_migrated import cli, errors
from zmonitor_migrated.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEBIAN = ROOT / "packaging" / "debian"
PAGE = DEBIAN / "zmonitor-migrate.1"

_TOKEN = re.compile(r'"((?:[^"]|"")*)"|(\S+)')
_FONT = re.compile(r"\\f(?:\[[^]]*\]|\(..|.)")
# Macros that alternate fonts between their arguments and join them without spaces.
_ALTERNATING = {"BI", "BR", "IB", "IR", "RB", "RI"}


def _plain(line: str) -> str:
    """The text one roff line shows, without fonts or escapes."""
    text = line
    macro = None
    if line.startswith("."):
        macro, _, text = line[1:].partition(" ")
    args = [q.replace('""', '"') if q or not u else u for q, u in _TOKEN.findall(text)]
    joined = ("" if macro in _ALTERNATING else " ").join(args)
    joined = _FONT.sub("", joined).replace("\\-", "-").replace("\\(dq", '"')
    return joined.replace("\\&", "").replace("\\%", "").replace("\\ ", " ")


def _sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        if line.startswith(".SH "):
            current = sections.setdefault(line[4:].strip().strip('"'), [])
        else:
            current.append(line)
    return sections


def _tags(lines: list[str]) -> list[str]:
    """The tag (first line after ``.TP``) of every tagged paragraph, as plain text."""
    return [_plain(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line == ".TP"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _commands(parser: argparse.ArgumentParser,
              prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                             argparse.ArgumentParser]]:
    """Every command path the parser accepts, e.g. ``("apply",)``, ``("bundle", "build")``,
    with its own parser (leaves only: ``bundle`` itself does nothing)."""
    for name, sub in _subparsers(parser).items():
        path = (*prefix, name)
        if _subparsers(sub):
            yield from _commands(sub, path)
        else:
            yield path, sub


def _exit_codes() -> set[int]:
    return {cls.exit_code for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.MigrateError)}


def test_the_package_installs_the_page() -> None:
    listed = (DEBIAN / "zmonitor-migrated.manpages").read_text(encoding="utf-8").split()
    # build-deb.sh copies packaging/debian/ to debian/ in the source tree it builds.
    assert f"debian/{PAGE.name}" in listed


def test_every_command_is_in_commands() -> None:
    tags = [tag.split() for tag in _tags(_sections()["COMMANDS"])]
    commands = [path for path, _ in _commands(build_parser())]
    assert len(commands) > 5, commands
    missing = [" ".join(path) for path in commands
               if not any(tag[:len(path)] == list(path) for tag in tags)]
    assert not missing, f"commands missing from the COMMANDS section of {PAGE}: {missing}"


def _paragraphs(lines: list[str]) -> dict[str, str]:
    """Tag -> plain text of its tagged paragraph (up to the next tag at any level)."""
    out: dict[str, str] = {}
    for i, line in enumerate(lines[:-1]):
        if line == ".TP":
            body = []
            for nxt in lines[i + 2:]:
                if nxt == ".TP":
                    break
                body.append(_plain(nxt))
            out[_plain(lines[i + 1])] = " ".join(body)
    return out


def test_commands_that_refuse_json_say_so() -> None:
    paragraphs = _paragraphs(_sections()["COMMANDS"])
    refusing = [path for path, sub in _commands(build_parser())
                if sub.get_default("func") in cli._NO_JSON]
    assert refusing, "no command refuses --json any more: drop this test"
    for path in refusing:
        [text] = [t for tag, t in paragraphs.items() if tag.split()[:len(path)] == list(path)]
        assert re.search(r"[Rr]efuses --json", text), f"{' '.join(path)}: {text}"


def test_every_option_is_in_the_page() -> None:
    text = "\n".join(_plain(line) for line in PAGE.read_text(encoding="utf-8").splitlines())
    parsers = [build_parser(), *(sub for _, sub in _commands(build_parser()))]
    options = {opt for p in parsers for action in p._actions for opt in action.option_strings}
    missing = sorted(opt for opt in options
                     if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text))
    assert not missing, f"options missing from {PAGE}: {missing}"


def test_every_exit_code_is_in_exit_status() -> None:
    documented = {int(tag) for tag in _tags(_sections()["EXIT STATUS"]) if tag.isdigit()}
    codes = _exit_codes() | {0}  # 0: success, the one status no error class carries
    assert len(codes) > 3, codes
    missing = sorted(codes - documented)
    assert not missing, f"exit codes missing from the EXIT STATUS section of {PAGE}: {missing}"


def test_the_page_renders_without_warnings() -> None:
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80"}
    renderers = []
    if shutil.which("groff"):
        renderers.append(["groff", "-man", "-Tutf8", "-ww", "-z", str(PAGE)])
    if shutil.which("man"):
        # What lintian runs for manpage-has-errors-from-man.
        renderers.append(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                          str(PAGE)])
    if not renderers:
        reason = "neither groff nor man is installed: the page was not rendered"
        print(reason)
        pytest.skip(reason)
    for cmd in renderers:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{cmd[0]} exited {done.returncode}: {done.stderr}"
        assert done.stderr == "", f"{cmd[0]} warns about {PAGE}:\n{done.stderr}"
