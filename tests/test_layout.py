"""The package's layout rules (README, "Layout"): no import circles between dac_fast's modules (imports
inside functions count too: a lazy import is still a dependency), no module over 500 lines, modeling.py
under 600 with DacModel under 200, and every module opens with a docstring saying its job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dac_fast"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """dac_fast modules that ``path`` imports anywhere in its body (``from . import x`` names submodule x
    when there is one, else the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import dac_fast.io.x` -> the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_cycles() -> list[list[str]]:
    mods = modules()
    graph = {name: imported_modules(name, path, set(mods)) for name, path in mods.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_circles():
    assert import_cycles() == []


def test_import_graph_sees_imports():
    # the checker itself: it must find the edges it claims to check
    mods = modules()
    assert "dac_fast.configuration" in imported_modules("dac_fast.modeling", mods["dac_fast.modeling"], set(mods))


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_size_and_docstring(name):
    path = modules()[name]
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_LINES or name == "dac_fast.modeling", f"{path} is over {MAX_LINES} lines"
    if source.strip():
        assert ast.get_docstring(ast.parse(source)), f"{path} has no opening docstring saying its job"


def test_modeling_reads_like_transformers():
    tree = ast.parse((PACKAGE / "modeling.py").read_text())
    assert len((PACKAGE / "modeling.py").read_text().splitlines()) < 600
    dac_model = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DacModel")
    assert dac_model.end_lineno - dac_model.lineno + 1 < 200
