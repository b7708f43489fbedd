"""pcmodel's modules import each other without cycles, imports inside functions included.

The graph is read from the source (every `import` statement anywhere in a module), so a cycle hidden
in a function body fails here as surely as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pcmodel"


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str], root: Path = PACKAGE.parent) -> set[str]:
    """The pcmodel modules this file imports (a `from X import name` of a submodule counts as that submodule)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if node.module is None:  # `from . import x` runs the package's __init__ too: an edge to it
                found.add(base)
            for alias in node.names:  # a submodule by name, else a name defined in `base`
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports(f, modules) for f in files}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_from_dot_import_counts_the_package(tmp_path):
    """`from . import x` inside package p imports p first: p -> p.x -> p is a cycle when p imports p.x."""
    package = tmp_path / "p"
    package.mkdir()
    (package / "__init__.py").write_text("from .x import f\n")
    (package / "x.py").write_text("def f():\n    from . import y\n")
    (package / "y.py").write_text("")
    modules = {"p", "p.x", "p.y"}
    assert imports(package / "x.py", modules, root=tmp_path) == {"p", "p.y"}


def test_the_detector_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_pcmodel_has_no_import_cycles():
    edges = graph()
    assert "pcmodel.engines.state" in edges and "pcmodel.energy" in edges["pcmodel.model"]  # the graph is read
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("pcmodel.energy", {"pcmodel.model", "pcmodel.engines"}),  # the mathematics calls nothing above it
        ("pcmodel.checkpoint", {"pcmodel.model"}),  # weight shapes come from the config
        ("pcmodel.images", {"pcmodel.model"}),
    ],
)
def test_dependencies_point_one_way(module, forbidden):
    edges = graph()
    seen, todo = set(), [module]
    while todo:
        for nxt in edges[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    assert not {m for m in seen if any(m == f or m.startswith(f + ".") for f in forbidden)}
