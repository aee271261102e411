"""No import cycles between the project's modules (layerwise/, orchestration/, serve/), and orchestration's
capabilities import each other in one direction only (LAYERS, as the README's layout lists them).

The graph is built from the source, not by importing it: one node per module, one edge per `import` of
another project module. Imports inside functions count as much as those at the top of a file: the lazy
imports here only defer a heavy dependency (torch, Ray, MLflow), they do not remove it, and a cycle through
one is still two modules that each need the other (the CLI's commands and the baselines command were such
a pair). An edge goes to the module named; importing a.b.c also runs a/__init__ and a/b/__init__, but an
`__init__` that re-exports its submodules would then close a loop with every submodule that imports a
sibling, which Python resolves and which says nothing about the design.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("layerwise", "orchestration", "serve")
# orchestration's subpackages, each importing only those after it (and outputs.py, loading.py, the library).
LAYERS = ("cli", "study", "baselines", "search", "pipeline", "scale", "distributed", "tracking")


def project_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under the packages (a package is its
    __init__)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _targets(node: ast.AST, module: str, is_package: bool, modules: Mapping[str, Path]) -> list[str]:
    """The project modules one import statement names ("from a.b import c" names a.b.c if that is a
    module, else a.b)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's own package, up level - 1 more
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[:len(package) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (top level or inside functions)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for target in _targets(node, name, path.name == "__init__.py", modules):
                while target and target not in modules:  # "import a.b.func" style names: the module part
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cyclic_components(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components that hold a cycle (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # recursion depth is bounded by the number of modules (~100)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle per cyclic component, as a path [a, b, ..., a]: the shortest one through the component's
    first member (breadth-first search back to it)."""
    return [_shortest_cycle(graph, set(c), c[0]) for c in cyclic_components(graph)]


def _shortest_cycle(graph: Mapping[str, Iterable[str]], members: set[str], start: str) -> list[str]:
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt not in members:
                    continue
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is in a cycle but no path leads back to it")


def describe(graph: Mapping[str, Iterable[str]]) -> str:
    """Each cycle as a path, with every module of its component (all of them import each other)."""
    lines = []
    for component, cycle in zip(cyclic_components(graph), find_cycles(graph)):
        lines.append("  " + " -> ".join(cycle))
        if len(component) > len(cycle) - 1:
            lines.append(f"    (one of the cycles among: {', '.join(component)})")
    return "import cycles:\n" + "\n".join(lines)


def test_the_project_has_no_import_cycle():
    modules = project_modules(ROOT)
    assert len(modules) > 90 and {"layerwise.models.recommender", "orchestration.cli.main", "serve.app"} <= set(modules)
    graph = import_graph(modules)
    assert not find_cycles(graph), describe(graph)


def test_capabilities_import_downwards_only():
    packages = {p.parent.name for p in (ROOT / "orchestration").glob("*/__init__.py")}
    assert packages == set(LAYERS), "place every orchestration subpackage in LAYERS"
    upward = set()
    for module, targets in import_graph(project_modules(ROOT)).items():
        for target in targets:
            a, b = (_layer(module), _layer(target))
            if a is not None and b is not None and LAYERS.index(b) < LAYERS.index(a):
                upward.add(f"{module} -> {target}")
    assert not upward, f"imports up the layers {LAYERS}: {sorted(upward)}"


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "orchestration" and len(parts) > 1 and parts[1] in LAYERS else None


def test_the_finder_reports_each_cycle_as_a_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"g"}, "g": {"f"}}
    assert sorted(find_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"], ["f", "g", "f"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_a_cycle_added_to_a_copy_of_the_tree_is_found(tmp_path):
    # The real tree plus one deliberate back edge, a lazy import inside a function: the MLflow helper
    # reaching up into the command line, which imports it.
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    runs = tmp_path / "orchestration" / "tracking" / "runs.py"
    runs.write_text(runs.read_text() + "\n\ndef _back_edge():\n    from orchestration.cli import main\n")
    graph = import_graph(project_modules(tmp_path))
    components = cyclic_components(graph)
    assert len(components) == 1, describe(graph)
    assert {"orchestration.tracking.runs", "orchestration.cli.main"} <= set(components[0])
    (cycle,) = find_cycles(graph)
    assert cycle[0] == cycle[-1] and all(b in graph[a] for a, b in zip(cycle, cycle[1:]))  # a real path


def test_relative_imports_resolve_like_python(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("from ..top import thing\n")
    (package / "top.py").write_text("def thing():\n    from .sub.leaf import x\n")
    graph = import_graph(project_modules(tmp_path, ["pkg"]))
    assert graph["pkg.sub"] == {"pkg.sub.leaf"} and graph["pkg.sub.leaf"] == {"pkg.top"}
    assert graph["pkg.top"] == {"pkg.sub.leaf"}
    assert find_cycles(graph) == [["pkg.sub.leaf", "pkg.top", "pkg.sub.leaf"]]


def _reachable(graph: Mapping[str, Iterable[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_evaluation_never_reaches_compression():
    """A model is judged the same way whoever made it: nothing layerwise.evaluation imports, directly or
    through another module, is part of layerwise.compression."""
    modules = project_modules(ROOT)
    graph = import_graph(modules)
    evaluation = [name for name in modules if name.startswith("layerwise.evaluation.")]
    assert {"layerwise.evaluation.evaluate", "layerwise.evaluation.metrics", "layerwise.evaluation.stats"} <= set(evaluation)
    leaks = {name: sorted(m for m in _reachable(graph, name) if m.startswith("layerwise.compression"))
             for name in evaluation}
    assert not any(leaks.values()), f"evaluation reaches compression: { {k: v for k, v in leaks.items() if v} }"


def test_the_rule_sees_a_leak_in_a_copy_of_the_tree(tmp_path):
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "layerwise", copy / "layerwise", ignore=shutil.ignore_patterns("__pycache__"))
    noise = copy / "layerwise" / "evaluation" / "noise.py"
    noise.write_text(noise.read_text() + "\n\ndef _leak():\n    from layerwise.compression.select import topk\n")
    graph = import_graph(project_modules(copy, ("layerwise",)))
    assert "layerwise.compression.select" in _reachable(graph, "layerwise.evaluation.noise")
