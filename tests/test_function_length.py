"""Functions stay short enough to read at a glance: at most MAX_LINES lines (docstring included) outside tests."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60


def long_functions(limit: int = MAX_LINES) -> list[str]:
    out = []
    for base in ("klrl", "hydra_plugins", "benchmarks"):
        for path in sorted((ROOT / base).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > limit:
                        out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_is_longer_than_the_limit():
    assert not long_functions(), "\n".join(long_functions())
