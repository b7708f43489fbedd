"""The project's packages import each other without cycles, imports inside functions included.

One graph over pcmodel, training, service and benchmarks is read from the source (every `import`
statement anywhere in a module), so a cycle hidden in a function body fails here as surely as one at
the top, and so does one that runs through two packages. Each package is its own case, so a cycle
names the package it tangles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pcmodel", "training", "service", "benchmarks")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The modules of `modules` this file imports (a `from X import name` of a submodule counts as that submodule)."""
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


def graph(packages: tuple[str, ...] = PACKAGES, root: Path = ROOT) -> dict[str, set[str]]:
    """Every module of `packages` and the modules of `packages` it imports."""
    files = sorted(f for package in packages for f in (root / package).rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    return {module_name(f, root): imports(f, modules, root) for f in files}


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


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), set()) - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def cycle_through(edges: dict[str, set[str]], package: str) -> list[str] | None:
    """A cycle among the modules that share a cycle with a module of `package` (its strongly connected part).

    So a cycle in a package this one only imports fails that package's case, not this one's.
    """
    ours = [m for m in edges if m == package or m.startswith(package + ".")]
    reach = {m: reachable(edges, m) for m in edges}
    tangled = {m for m in edges if any(m in reach[p] and p in reach[m] for p in ours)}
    return find_cycle({m: edges[m] & tangled for m in tangled})


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


def test_a_cycle_fails_the_package_it_tangles_and_no_other():
    """p.x and p.y import each other and q imports p.x: p's case fails, q's does not; r <-> s fails both."""
    edges = {"p": set(), "p.x": {"p.y"}, "p.y": {"p.x"}, "q": set(), "q.a": {"p.x", "q"}}
    edges |= {"r.a": {"s.a"}, "s.a": {"r.a"}}
    assert cycle_through(edges, "p") == ["p.x", "p.y", "p.x"]
    assert cycle_through(edges, "q") is None
    assert cycle_through(edges, "r") == cycle_through(edges, "s") == ["r.a", "s.a", "r.a"]  # across packages


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    edges = graph()
    ours = {m: targets for m, targets in edges.items() if m.startswith(package + ".")}
    assert any(t.startswith(package + ".") for targets in ours.values() for t in targets)  # the graph is read
    cycle = cycle_through(edges, package)
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("pcmodel.energy", {"pcmodel.model", "pcmodel.engines"}),  # the mathematics calls nothing above it
        ("pcmodel.checkpoint", {"pcmodel.model"}),  # weight shapes come from the config
        ("pcmodel.images", {"pcmodel.model"}),
    ],
)
def test_dependencies_point_one_way(module, forbidden):
    seen = reachable(graph(), module)
    assert not {m for m in seen if any(m == f or m.startswith(f + ".") for f in forbidden)}
