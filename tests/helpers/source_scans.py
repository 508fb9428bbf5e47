"""Reads of the source that the suite's rules and benchmarks/tools/reviewer_figures.py share: a module's source
parsed, a private attribute of the trainer read from another module, and ``is_online`` read at all."""

from __future__ import annotations

import ast
from functools import cache


@cache
def _parsed(source: str) -> ast.Module:
    return ast.parse(source)


def parsed(source: str, filename: str = "<unknown>") -> ast.Module:
    """``ast.parse(source)``, parsed once per process for each text: the suite's rules walk the same modules, each its
    own way. The tree is shared between callers, so no caller may change it. A syntax error names ``filename``."""
    try:
        return _parsed(source)
    except SyntaxError:
        ast.parse(source, filename=filename)  # raises the same error, naming the file
        raise


def is_private(name: str) -> bool:
    """One leading underscore, not a dunder."""
    return name.startswith("_") and not name.startswith("__")


def _is_trainer(node: ast.expr) -> bool:
    """``trainer`` or ``self.trainer``."""
    if isinstance(node, ast.Name):
        return node.id == "trainer"
    return isinstance(node, ast.Attribute) and node.attr == "trainer" and isinstance(node.value, ast.Name)


def _getattr_name(node: ast.AST) -> tuple[ast.expr, str] | None:
    """``(object, name)`` of a ``getattr(object, "name", ...)`` call, else ``None``."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "getattr"
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    ):
        return node.args[0], node.args[1].value
    return None


def private_trainer_reads_in(source: str) -> list[tuple[int, str]]:
    """``(line, attribute)`` of each read of a private attribute of the trainer in ``source``."""
    found = []
    for node in ast.walk(parsed(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and is_private(node.attr):
            if _is_trainer(node.value):
                found.append((node.lineno, node.attr))
        elif (named := _getattr_name(node)) is not None and is_private(named[1]) and _is_trainer(named[0]):
            found.append((node.lineno, named[1]))
    return sorted(found)


def is_online_reads_in(source: str) -> list[int]:
    """Lines of each read of ``is_online`` in ``source``: ``x.is_online`` (loaded) or ``getattr(x, "is_online")``."""
    found = []
    for node in ast.walk(parsed(source)):
        if isinstance(node, ast.Attribute) and node.attr == "is_online" and isinstance(node.ctx, ast.Load):
            found.append(node.lineno)
        elif (named := _getattr_name(node)) is not None and named[1] == "is_online":
            found.append(node.lineno)
    return sorted(found)
