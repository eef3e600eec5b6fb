"""The library stays legible: no function over 40 lines of code, no module over 400 lines, and no module that
imports another's underscore names (a helper two modules share is an internal API, named without one)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parent.parent / "cekd_losses"
MODULES = sorted(LIBRARY.rglob("*.py"))


def code_lines(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function that hold code: its docstring, blank lines and comment lines left out."""
    first = node.body[0]
    docstring = (
        isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    )
    skipped = set(range(first.lineno, first.end_lineno + 1)) if docstring and first.end_lineno else set()
    return sum(
        1
        for number in range(node.lineno, (node.end_lineno or node.lineno) + 1)
        if number not in skipped and lines[number - 1].strip() and not lines[number - 1].strip().startswith("#")
    )


def test_the_measure_counts_code_only():
    source = 'def f(x):\n    """Doc\n    string."""\n\n    # a comment\n    return x\n'
    function = ast.parse(source).body[0]
    assert isinstance(function, ast.FunctionDef) and code_lines(source.splitlines(), function) == 2


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(LIBRARY)))
def test_a_module_is_short_its_functions_shorter_and_its_imports_public(path):
    source = path.read_text()
    lines = source.splitlines()
    assert len(lines) <= 400, f"{path.name}: {len(lines)} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert code_lines(lines, node) <= 40, f"{path.name}:{node.lineno} {node.name}"
        if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module is not None:
            private = [alias.name for alias in node.names if alias.name.startswith("_")]
            assert not private, f"{path.name}:{node.lineno} imports {private} from {node.module}"
