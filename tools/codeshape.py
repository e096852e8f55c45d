"""Fail when a function in keyvault/ reaches 80 lines or a module passes 600.

Run by `make lint`. The limits are the house style's: a function a reader takes in at
once, a module about one thing. Prints the largest function and module either way, so
the margin is visible in CI logs.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_FUNCTION_LINES = 79
MAX_MODULE_LINES = 600


def measure(root: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(function lengths, module lengths), each as (lines, where), largest first."""
    functions: list[tuple[int, str]] = []
    modules: list[tuple[int, str]] = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        modules.append((len(text.splitlines()), str(path)))
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                functions.append((length, f"{path}:{node.lineno} {node.name}"))
    return sorted(functions, reverse=True), sorted(modules, reverse=True)


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "keyvault")
    functions, modules = measure(root)
    too_long = [f for f in functions if f[0] > MAX_FUNCTION_LINES]
    too_big = [m for m in modules if m[0] > MAX_MODULE_LINES]
    for lines, where in too_long:
        print(f"error: function {where} has {lines} lines (max {MAX_FUNCTION_LINES}); split it")
    for lines, where in too_big:
        print(f"error: module {where} has {lines} lines (max {MAX_MODULE_LINES}); split it")
    print(
        f"codeshape: largest function {functions[0][0]} lines ({functions[0][1]}), "
        f"largest module {modules[0][0]} lines ({modules[0][1]})"
    )
    return 1 if too_long or too_big else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
