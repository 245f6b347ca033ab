"""The seam's budgets, checked on the source: lines of code (benchmarks/loc.py), no adapter reaching into
private state, and a docstring (with tensor shapes where tensors go in or out) on every public name of
the core."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_loc", ROOT / "benchmarks" / "loc.py")
loc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = loc
_spec.loader.exec_module(loc)

#: Private attributes of *host* objects that adapters use because the host offers no public one.
HOST_PRIVATE = {
    ("torch", "_foreach_mul_"), ("torch", "_foreach_add_"),  # V-JEPA's own EMA update, name-paired here
    ("module", "_orig_mod"),  # torch.compile's OptimizedModule holds the module only there
    ("m", "_pos_embed"),  # timm's ViT stem (what its forward_intermediates runs), for the sparse target pass
}


def test_the_counter_counts_code_lines_only():
    source = '"""Module docstring,\n\nover lines."""\n\n# a comment\nx = (1,\n     2)  # trailing\n\n\ndef f():\n    """Doc."""\n    return x\n'
    assert loc.count_code_lines(source) == 4  # x = (1, / 2) / def f(): / return x


def test_core_and_adapter_line_budgets():
    core = loc.counts(loc.core_files())
    assert sum(core.values()) <= loc.CORE_BUDGET, core
    over = {name: n for name, n in loc.counts(loc.adapter_files()).items() if n > loc.ADAPTER_BUDGET}
    assert not over, over


def _private_accesses(path: Path) -> list[tuple[str, str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = ast.unparse(node.value)
            if base not in ("self", "cls"):  # an object's own private state is its business
                out.append((base, node.attr, node.lineno))
    return out


@pytest.mark.parametrize("path", loc.adapter_files(), ids=lambda p: p.name)
def test_adapters_use_no_private_state(path):
    bad = [a for a in _private_accesses(path) if (a[0], a[1]) not in HOST_PRIVATE]
    assert not bad, f"{path.name} reaches into private attributes: {bad}"


def _public_defs(tree: ast.Module):
    """(qualified name, node) of module-level public functions/classes and public methods of public classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node.name, node
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                        yield f"{node.name}.{item.name}", item


def _mentions_tensors(node: ast.AST) -> bool:
    if not isinstance(node, ast.FunctionDef):
        return False
    annotations = [a.annotation for a in node.args.args + node.args.kwonlyargs] + [node.returns]
    return any(a is not None and "Tensor" in ast.unparse(a) and "Optimizer" not in ast.unparse(a) for a in annotations)


@pytest.mark.parametrize("path", loc.core_files(), ids=lambda p: p.name)
def test_every_public_core_name_has_a_docstring_with_shapes(path):
    missing, shapeless = [], []
    for name, node in _public_defs(ast.parse(path.read_text())):
        doc = ast.get_docstring(node)
        if not doc:
            missing.append(name)
        elif _mentions_tensors(node) and "[" not in doc:
            shapeless.append(name)
    assert not missing, f"{path.name}: no docstring on {missing}"
    assert not shapeless, f"{path.name}: tensors in or out but no shape in the docstring of {shapeless}"
