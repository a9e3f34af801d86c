"""The import graph of gatekv/: no cycles, and kernels/ depends on nothing above it (docs/architecture.md).

The graph is read from the source with `ast`, not by importing: every `import` and `from ... import` statement
counts, at module level and inside functions alike (a lazy import is still an arrow). An edge goes to the module
named: `from gatekv.x import y` points at `gatekv.x.y` when y is a submodule, else at the package `gatekv.x`.
Parent packages that Python initialises on the way are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gatekv"
PACKAGE = "gatekv"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The gatekv module that `name` (a dotted module path) denotes, or None if it is not gatekv's."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    # `import gatekv.x.attr` cannot happen, but `from gatekv.x.y import z` names module gatekv.x.y
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in modules else None


def import_graph() -> dict[str, set[str]]:
    """module -> the gatekv modules it imports (anywhere in its body)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _resolve(alias.name, modules)
                    if target:
                        targets.add(target)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    # relative: the package this module lives in, then `level - 1` steps up
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                parent = _resolve(source, modules)
                if parent is None:
                    continue
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if submodule in modules else parent)
        targets.discard(module)  # `from gatekv.x import y` inside gatekv/x/__init__.py resolves to itself
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (breadth-first)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in component {component}")


def test_graph_sees_every_module_and_lazy_imports():
    graph = import_graph()
    assert "gatekv.compress" in graph and "gatekv.kernels.reference" in graph
    # a function-level import is an edge: the CLI imports its commands' modules lazily
    assert any(target.startswith("gatekv.training") for target in graph["gatekv.cli"])


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    if cycles:
        pytest.fail("import cycles in gatekv/:\n" + "\n".join("  " + " -> ".join(cycle) for cycle in cycles))


def test_kernels_import_no_gatekv_module_outside_kernels():
    wrong = {
        module: sorted(t for t in targets if not t.startswith("gatekv.kernels"))
        for module, targets in import_graph().items()
        if module.startswith("gatekv.kernels")
    }
    wrong = {module: targets for module, targets in wrong.items() if targets}
    assert not wrong, f"kernels/ may import only torch, triton, flash-attn and kernels/ itself: {wrong}"
