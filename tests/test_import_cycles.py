"""No import cycles between project modules (lazy, relative and TYPE_CHECKING imports included).

The module graph is parsed as `tests/test_layering.py` parses imports (every `import`, lazy ones
inside functions and under TYPE_CHECKING included), with relative imports resolved and
`from pkg import name` pointing at `pkg.name` when that is a module. A cycle is a strongly connected
component of more than one module.

    python -m tests.test_import_cycles      # every cycle in the tree, with its edges
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests import test_layering


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages under `root`."""
    names = {}
    for pkg in test_layering.PROJECT:
        for path in (root / pkg).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file."""
    names = module_names(root)

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in names:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in names}
    for module, path in names.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            else:
                continue
            graph[module] |= {t for t in map(owner, targets) if t is not None and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted.

    >>> cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}})
    [['a', 'b']]
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    recursion = sys.getrecursionlimit()
    sys.setrecursionlimit(max(recursion, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(recursion)
    return sorted(found)


def describe(graph: dict[str, set[str]], component: list[str]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(component)))}" for m in component)


def test_the_project_has_no_import_cycle():
    graph = import_graph(test_layering.ROOT)
    assert len(graph) > 40 and "trainer.loop" in graph["iro.cli"] | graph["trainer.jobs_cli"]
    found = cycles(graph)
    assert found == [], [describe(graph, c) for c in found]


def test_the_check_sees_lazy_relative_and_type_checking_cycles(tmp_path):
    pkg = tmp_path / "trainer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from trainer import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")  # lazy and relative
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from trainer.d import X\n")
    (pkg / "d.py").write_text("import trainer.c\n")
    (pkg / "e.py").write_text("from trainer.a import g\n")  # imports a, no cycle
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["trainer.a", "trainer.b"], ["trainer.c", "trainer.d"]]


if __name__ == "__main__":
    graph = import_graph(test_layering.ROOT)
    for component in cycles(graph):
        print(describe(graph, component))
    print(f"{len(cycles(graph))} import cycles among {len(graph)} modules")
