"""No module of cosmoslib imports one that imports it back, through any chain of imports.

The layer test (``test_layout.py``) keeps imports pointing down the layers; inside one layer two
modules could still import each other, at module level or from inside a function (a circle that
only breaks at run time because the second import is deferred). This test reads every module
with ``ast`` -- module-level *and* function-local imports -- builds the graph of
module -> imported module, and fails on any cycle, naming it.

An edge goes to the module actually imported: ``from cosmoslib.protocol import units`` is an
edge to ``cosmoslib.protocol.units`` (a submodule), ``from cosmoslib.models import load_model``
one to the package ``cosmoslib.models`` (its ``__init__``). Tests are left out: nothing imports them.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


def _module_name(path: Path, package: Path) -> tuple[str, bool]:
    """Dotted name of a source file and whether it is a package (``__init__``)."""
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _targets(node: ast.AST, module: str, is_pkg: bool, known: set[str]) -> list[str]:
    """The modules of ``known`` an import statement loads (deepest match of each name)."""
    def deepest(dotted: str) -> str | None:
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in known:
                return ".".join(parts[:n])
        return None

    found: list[str] = []
    if isinstance(node, ast.Import):
        found = [deepest(a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the module's package, one level up per extra dot
            base_parts = module.split(".") if is_pkg else module.split(".")[:-1]
            base_parts = base_parts[:len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            full = f"{base}.{alias.name}"
            found.append(full if full in known else deepest(base))
    return [t for t in found if t is not None and t != module]


def import_graph(package: Path) -> dict[str, set[str]]:
    """``{module: {modules it imports}}`` for every module under ``package`` (tests excluded),
    counting imports at module level and inside functions and classes alike."""
    files = [p for p in sorted(package.rglob("*.py")) if "tests" not in p.relative_to(package).parts]
    names = {p: _module_name(p, package) for p in files}
    known = {name for name, _ in names.values()}
    graph: dict[str, set[str]] = {}
    for path, (module, is_pkg) in names.items():
        edges = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            edges.update(_targets(node, module, is_pkg, known))
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected group of modules that import each other
    (Tarjan's algorithm, iterative), each found by a shortest path back to its first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
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
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return [_cycle_through(graph, group) for group in groups]


def _cycle_through(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest cycle from ``group[0]`` back to itself, staying inside ``group``."""
    start, members = group[0], set(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    return [*group, group[0]]  # not reached for a strongly connected group


def test_no_module_imports_one_that_imports_it_back():
    cycles = import_cycles(import_graph(PACKAGE))
    assert not cycles, "import cycles in cosmoslib: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_module_level_and_local_imports():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50  # every module of the package is read
    # module level: the runner plans and computes through the units, never the other way round
    assert "cosmoslib.protocol.units" in graph["cosmoslib.protocol.evaluate"]
    assert "cosmoslib.protocol.units" in graph["cosmoslib.protocol.distributed"]
    assert "cosmoslib.protocol.evaluate" not in graph["cosmoslib.protocol.distributed"]
    assert "cosmoslib.protocol.evaluate" not in graph["cosmoslib.protocol.units"]


def _package(tmp_path: Path, sources: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **sources}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_a_cycle_through_a_function_local_import_is_found_and_named(tmp_path):
    root = _package(tmp_path, {
        "runner.py": "from pkg import workers\n",
        "workers.py": """
            def task():
                from pkg import runner  # deferred: breaks only at run time
                return runner
        """,
        "leaf.py": "import pkg.runner\n",
    })
    cycles = import_cycles(import_graph(root))
    assert cycles == [["pkg.runner", "pkg.workers", "pkg.runner"]]


def test_longer_and_relative_cycles_are_found(tmp_path):
    root = _package(tmp_path, {
        "sub/__init__.py": "",
        "sub/a.py": "from . import b\n",
        "sub/b.py": "from .c import thing\n",
        "sub/c.py": "from pkg.sub.a import x\nthing = 1\n",
        "ok.py": "from pkg.sub import a\n",
    })
    cycles = import_cycles(import_graph(root))
    assert cycles == [["pkg.sub.a", "pkg.sub.b", "pkg.sub.c", "pkg.sub.a"]]


def test_imports_into_a_package_namespace_are_edges_to_its_init(tmp_path):
    root = _package(tmp_path, {
        "models/__init__.py": "from pkg.models.adapter import load\n",
        "models/adapter.py": "from pkg.models import registry\nload = 1\n",
        "models/registry.py": "",
        "cache.py": "from pkg.models import load\n",
    })
    graph = import_graph(root)
    assert graph["pkg.cache"] == {"pkg.models"}
    assert graph["pkg.models.adapter"] == {"pkg.models.registry"}  # a submodule, not the package
    assert import_cycles(graph) == []
