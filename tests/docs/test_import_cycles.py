"""The package has no import cycle: no module imports, directly or through others, a module that imports it back.

Every import statement counts, wherever it stands (top level, inside a function, under ``TYPE_CHECKING``), as for
the layering rule (tests/docs/test_layering.py): a function-level import defers the cycle to the call, it does not
untie it.
An import of a package (``from ..families import X``) counts as an import of its ``__init__``.
"""

from __future__ import annotations

import ast

from tests.helpers.layering import ROOT, module_name
from tests.helpers.source_scans import parsed


def imports_of(path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports. ``from . import x`` imports submodule ``x`` (the package's
    ``__init__`` only where ``x`` is a name defined there); ``from .m import Name`` imports ``m``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(parsed(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")  # the longest prefix that is a module of the package
            known = [".".join(parts[:end]) for end in range(len(parts), 0, -1) if ".".join(parts[:end]) in modules]
            if known:
                found.add(known[0])
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
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
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_cycle_finder_sees_a_two_module_and_a_three_module_cycle():
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert cycles(graph) == [["a", "b"], ["c", "d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []
