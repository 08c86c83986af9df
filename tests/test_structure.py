"""The package's shape stays what docs/ARCHITECTURE.md promises a new maintainer: no
function longer than a screen, and no private name reached across modules (a private
name is a module's own business; a name another module needs is made public)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "zmonitor_migrated"
MAX_FUNCTION_LINES = 60
MODULES = sorted(PACKAGE.glob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_function_is_longer_than_a_screen(path: Path) -> None:
    long = [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(_tree(path))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"split into named steps: {long}"


def _modules_imported(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
            names.update(alias.asname or alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_private_name_is_used_across_modules(path: Path) -> None:
    tree = _tree(path)
    siblings = _modules_imported(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            found += [f"from .{node.module or ''} import {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id in siblings and node.attr.startswith("_")
              and not node.attr.startswith("__")):
            found.append(f"{node.value.id}.{node.attr}")
    assert not found, f"make these public in their module, or keep them there: {found}"


def test_every_module_is_in_the_architecture_module_map() -> None:
    text = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    module_map = text[text.index("## Module map"):]
    missing = [p.name for p in MODULES
               if p.name != "__init__.py" and f"`{p.name}`" not in module_map]
    assert not missing, f"say in one sentence what each does, in docs/ARCHITECTURE.md: {missing}"
