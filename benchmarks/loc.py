"""Lines of code per module: physical lines that hold code, not blank lines, comments or docstrings.

    python benchmarks/loc.py              # the core, each adapter module and their budgets
    python benchmarks/loc.py FILE...      # any files

A line counts when it holds at least one token other than a comment, a newline, indentation or a
docstring (a string literal standing alone as the first statement of a module, class or function).
A statement spread over several lines counts every line it occupies that has a token on it.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Budgets: the core (``layerlock_plugin/`` without ``reference/``) in total, each adapter module alone.
CORE_BUDGET = 1500
ADAPTER_BUDGET = 250
_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
         tokenize.ENCODING, tokenize.ENDMARKER}


def docstring_lines(tree: ast.AST) -> set[int]:
    """Line numbers (1-based) covered by docstrings of the module, its classes and functions."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.update(range(first.lineno, first.end_lineno + 1))
    return out


def count_code_lines(source: str) -> int:
    """Code lines of one Python source text (see the module docstring)."""
    skip = docstring_lines(ast.parse(source))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in _SKIP:
            continue
        lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in skip)
    return len(lines)


def core_files(root: Path = ROOT) -> list[Path]:
    """The core: ``layerlock_plugin/*.py`` (``reference/`` is not core)."""
    return sorted((root / "layerlock_plugin").glob("*.py"))


def adapter_files(root: Path = ROOT) -> list[Path]:
    """Every adapter module: ``adapters/**/*.py``."""
    return sorted((root / "adapters").rglob("*.py"))


def counts(files: list[Path], root: Path = ROOT) -> dict[str, int]:
    """``{path relative to root: code lines}``."""
    return {str(f.relative_to(root)): count_code_lines(f.read_text()) for f in files}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        for name in argv:
            print(f"{count_code_lines(Path(name).read_text()):6d}  {name}")
        return 0
    core = counts(core_files())
    for name, n in core.items():
        print(f"{n:6d}  {name}")
    total = sum(core.values())
    print(f"{total:6d}  core total (budget {CORE_BUDGET}){'' if total <= CORE_BUDGET else '  OVER'}")
    for name, n in counts(adapter_files()).items():
        print(f"{n:6d}  {name}{'' if n <= ADAPTER_BUDGET else f'  OVER (budget {ADAPTER_BUDGET})'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
