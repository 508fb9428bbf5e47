"""Every cross-reference in the package's docstrings names something that exists.

A docstring names another object with a Sphinx role (``:mod:``, ``:func:``, ``:class:``, ``:meth:``, ``:attr:``, and
``:data:``, ``:exc:``, ``:obj:``, ``:const:``), which the API pages turn into a link (docs/_griffe_docstrings.py). A
reference to a module that was moved or removed renders as plain code and misleads the reader; ``mkdocs build
--strict`` does not see it, since such links are optional. This reads every module's source (no import of the package
is needed for the walk) and resolves each reference as Sphinx and mkdocstrings would:

* ``~`` (show the last part only) and ``Title <target>`` are read for their target;
* a target with leading dots (``.step.guard``, ``..gradients.zero3``) is relative: it is looked up in the current
  module, then in its package, then in each package above it;
* a bare or dotted name is looked up in the current class, the current module (its definitions and imports), each
  package above it, and at last as an absolute name.

Names of the package resolve statically, through definitions, imports (relative ones included, and those under
``TYPE_CHECKING`` that a lazy ``__getattr__`` serves) and class bases, with class members read from the class body
and from ``self.x = ...`` in its methods. A name outside the package (``torch.Tensor``,
``diffusers.DiffusionPipeline``) is imported, module first, then attributes.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from functools import cache
from pathlib import Path

from tests.helpers.layering import PACKAGE, ROOT, module_name
from tests.helpers.source_scans import parsed

# :role:`target`, with an optional py: domain, as docs/_griffe_docstrings.py reads them
ROLE = re.compile(r":(?:py:)?(?P<role>mod|func|class|meth|attr|data|exc|obj|const):`(?P<body>[^`]+)`")


@dataclasses.dataclass
class Scope:
    """What one module binds: ``names`` maps a name to ``("module" | "import", dotted target)``, ``("class",
    qualified name)`` or ``("value", "")``; ``classes`` maps a class's qualified name (``Outer.Inner``) to its
    members and the dotted names of its bases (as written, resolved in this module)."""

    names: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    classes: dict[str, tuple[set[str], list[str]]] = dataclasses.field(default_factory=dict)
    stars: list[str] = dataclasses.field(default_factory=list)  # modules whose names ``import *`` brings
    lazy: bool = False  # a module-level __getattr__ serves further names


@dataclasses.dataclass(frozen=True)
class Reference:
    path: Path
    line: int
    module: str
    cls: str | None  # the qualified name of the class whose docstring (or method's) holds it
    role: str
    body: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: :{self.role}:`{self.body}`"


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` of a Name/Attribute chain (a class base, a decorator), else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    if isinstance(node, ast.Subscript):  # Generic[T], Protocol[...]
        return _dotted(node.value)
    return None


def _targets(node: ast.stmt) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return node.targets
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return [node.target]
    return []


def _names(targets: list[ast.expr]) -> list[str]:
    found = []
    for target in targets:
        if isinstance(target, ast.Name):
            found.append(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            found += _names(list(target.elts))
    return found


def _statements(body: list[ast.stmt]):
    """The statements of a block, those under ``if``/``try``/``with`` included (not inside functions or classes)."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)) or node.__class__.__name__ == "TryStar":
            for field in ("body", "orelse", "finalbody"):
                yield from _statements(getattr(node, field, []))
            for handler in getattr(node, "handlers", []):
                yield from _statements(handler.body)


def _import_target(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _class_members(node: ast.ClassDef) -> set[str]:
    members = set()
    for child in _statements(node.body):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members.add(child.name)
        members.update(_names(_targets(child)))
    for child in ast.walk(node):  # self.x = ... in its methods
        for target in _targets(child) if isinstance(child, ast.stmt) else []:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                members.add(target.attr)
    return members


def scope_of(tree: ast.Module, module: str, is_package: bool) -> Scope:
    """What ``tree`` (module ``module``) binds at its top level and in its classes."""
    package = module if is_package else module.rpartition(".")[0]
    scope = Scope()

    def add_class(node: ast.ClassDef, prefix: str) -> None:
        name = f"{prefix}{node.name}"
        bases = [b for b in (_dotted(base) for base in node.bases) if b]
        scope.classes[name] = (_class_members(node), bases)
        for child in _statements(node.body):
            if isinstance(child, ast.ClassDef):
                add_class(child, f"{name}.")

    for node in _statements(tree.body):
        if isinstance(node, ast.ClassDef):
            scope.names[node.name] = ("class", node.name)
            add_class(node, "")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scope.names[node.name] = ("value", "")
            scope.lazy |= node.name == "__getattr__"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    scope.names[alias.asname] = ("import", alias.name)
                else:
                    head = alias.name.split(".")[0]
                    scope.names[head] = ("import", head)
        elif isinstance(node, ast.ImportFrom):
            source = _import_target(node, package)
            for alias in node.names:
                if alias.name == "*":
                    scope.stars.append(source)
                else:
                    scope.names[alias.asname or alias.name] = ("import", f"{source}.{alias.name}")
        else:
            names = _names(_targets(node))
            for name in names:
                scope.names.setdefault(name, ("value", ""))
            scope.lazy |= "__getattr__" in names  # __getattr__, __dir__ = lazy_attributes(...)
    return scope


def _has(obj: object, name: str) -> bool:
    """``obj.name`` exists, or is a field or annotation of a class in ``obj``'s MRO (a dataclass field with a
    default factory, a ``TypedDict`` key)."""
    if hasattr(obj, name):
        return True
    for klass in getattr(obj, "__mro__", ()):
        if name in getattr(klass, "__dataclass_fields__", {}) or name in vars(klass).get("__annotations__", {}):
            return True
    return False


@cache
def imported(dotted: str) -> bool:
    """``dotted`` names a module that imports, or an attribute chain of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # an absent module, or one that cannot be imported here: try the shorter prefix
            continue
        for name in parts[cut:]:
            if not _has(obj, name):
                return False
            obj = getattr(obj, name, None)
        return True
    return False


def _collect(node: ast.AST, path: Path, module: str, cls: str | None, found: list[Reference]) -> None:
    """The roles in the string statements under ``node``, with the class each sits in."""
    for child in ast.iter_child_nodes(node):
        if (
            isinstance(child, ast.Expr)
            and isinstance(child.value, ast.Constant)
            and isinstance(child.value.value, str)
        ):
            text = child.value.value
            for match in ROLE.finditer(text):
                line = child.value.lineno + text[: match.start()].count("\n")
                found.append(Reference(path, line, module, cls, match["role"], match["body"]))
        inner = cls
        if isinstance(child, ast.ClassDef):
            inner = f"{cls}.{child.name}" if cls else child.name
        _collect(child, path, module, inner, found)


class Index:
    """The package's modules under ``root`` (a folder named as the package), parsed once, and the resolution of a
    dotted name against them; names outside the package are imported."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.package = root.name
        self.paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
        self.trees = {name: parsed(path.read_text(), str(path)) for name, path in self.paths.items()}
        self.scopes = {
            name: scope_of(tree, name, self.paths[name].name == "__init__.py") for name, tree in self.trees.items()
        }

    def resolves(self, dotted: str, seen: frozenset[str] = frozenset()) -> bool:
        if dotted in seen:  # an import that leads back to itself
            return False
        seen = seen | {dotted}
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            module = ".".join(parts[:cut])
            if module in self.scopes:
                return self._in_module(module, parts[cut:], seen)
        if parts[0] == self.package:
            return False
        return imported(dotted)

    def _in_module(self, module: str, rest: list[str], seen: frozenset[str]) -> bool:
        if not rest:
            return True
        scope = self.scopes[module]
        kind, target = scope.names.get(rest[0], (None, ""))
        if kind == "import":
            return self.resolves(".".join([target, *rest[1:]]), seen)
        if kind == "class":
            return self._in_class(module, target, rest[1:], seen)
        if kind == "value":
            # an attribute of a value (an enum member, a registry entry) is only known at run time
            return len(rest) == 1 or imported(".".join([module, *rest]))
        if any(self.resolves(".".join([star, *rest]), seen) for star in scope.stars):
            return True
        return scope.lazy and imported(".".join([module, *rest]))

    def _in_class(self, module: str, qualified: str, rest: list[str], seen: frozenset[str]) -> bool:
        if not rest:
            return True
        scope = self.scopes[module]
        members, bases = scope.classes[qualified]
        name = rest[0]
        if f"{qualified}.{name}" in scope.classes:
            return self._in_class(module, f"{qualified}.{name}", rest[1:], seen)
        if name in members:
            return len(rest) == 1 or imported(".".join([module, qualified, *rest]))
        for base in bases:
            head, _, tail = base.partition(".")
            kind, target = scope.names.get(head, (None, ""))
            if kind == "class" and not tail:
                if self._in_class(module, target, rest, seen):
                    return True
            elif kind == "import" and self.resolves(".".join([target, *([tail] if tail else []), *rest]), seen):
                return True
            elif kind is None and imported(".".join(["builtins", base, *rest])):  # object, Exception, dict, ...
                return True
        return False

    def references(self) -> list[Reference]:
        """Every role in a docstring or another string statement (an attribute's docstring) of the package."""
        found: list[Reference] = []
        for module, tree in self.trees.items():
            _collect(tree, self.paths[module], module, None, found)
        return found

    def candidates(self, reference: Reference) -> list[str]:
        """The dotted names a reference may mean, in the order they are tried."""
        body = reference.body.strip()
        titled = re.fullmatch(r".*?<(?P<target>[^>]+)>", body)
        target = (titled["target"] if titled else body).lstrip("~!").strip()
        if target.endswith("()"):
            target = target[:-2]
        module = reference.module
        ancestors = [".".join(module.split(".")[:end]) for end in range(module.count(".") + 1, 0, -1)]
        if target.startswith("."):
            relative = target.lstrip(".")
            return [f"{base}.{relative}" for base in ancestors]
        inner = [f"{module}.{reference.cls}.{target}"] if reference.cls else []
        return [*inner, *(f"{base}.{target}" for base in ancestors), target]

    def unresolved(self) -> list[Reference]:
        return [r for r in self.references() if not any(self.resolves(c) for c in self.candidates(r))]


@cache
def package_index() -> Index:
    return Index(ROOT)


def test_every_docstring_reference_resolves() -> None:
    broken = package_index().unresolved()
    shown = "\n".join(str(r.path.relative_to(ROOT.parent)) + str(r)[len(str(r.path)) :] for r in broken)
    assert not broken, f"{len(broken)} docstring references name nothing that exists:\n{shown}"


def test_the_check_reads_the_package_and_its_references() -> None:
    """The walk sees the package's references, module and class docstrings and attribute docstrings alike."""
    index = package_index()
    found = index.references()
    assert len(found) > 500
    roles = {r.role for r in found}
    assert {"mod", "func", "class", "meth", "attr"} <= roles
    assert any(r.cls for r in found) and any(r.cls is None for r in found)
    assert f"{PACKAGE}.trainer" in index.scopes


def _planted(tmp_path: Path, sources: dict[str, str]) -> Index:
    root = tmp_path / "planted"
    for name, text in sources.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Index(root)


RESOLVING = {
    "__init__.py": (
        '"""See :mod:`.sub.mod` and :class:`~planted.sub.mod.Thing`."""\n'
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .sub.mod import Thing\n"
        "def __getattr__(name): ...\n"
    ),
    "sub/__init__.py": '"""The sub-package: :func:`.mod.helper`, :class:`planted.Thing`, :class:`.Child`."""\n'
    "from .mod import *\n",
    "sub/mod.py": (
        '"""Relative to the module, then its packages: :mod:`..sub`, :func:`.helper`, :class:`Thing`,\n'
        ":attr:`Thing.size`, :meth:`Thing.grow`, :meth:`Child.grow` (inherited), :class:`torch.nn.Module`,\n"
        ':meth:`Layer.forward` (inherited from torch), :class:`the thing <planted.sub.mod.Thing>`, :mod:`.sub`."""\n'
        "import torch\n"
        "from torch import nn\n"
        "class Thing:\n"
        '    """:meth:`grow` and :attr:`weight`, the class\'s own."""\n'
        "    size = 1\n"
        "    def __init__(self):\n        self.weight = 0\n"
        "    def grow(self):\n        pass\n"
        "class Child(Thing):\n    pass\n"
        "class Layer(nn.Module):\n    pass\n"
        "def helper():\n    pass\n"
    ),
}


def test_the_check_resolves_relative_titled_inherited_and_imported_references(tmp_path) -> None:
    index = _planted(tmp_path, RESOLVING)
    assert len(index.references()) == 17
    assert index.unresolved() == []


def test_a_planted_reference_to_a_removed_module_fails_naming_file_line_and_reference(tmp_path) -> None:
    """A reference to a module that does not exist, to a missing function of one that does, or to a missing member
    of a class, fails, named with its file and line."""
    sources = dict(RESOLVING)
    sources["sub/mod.py"] += (
        '\n\ndef other():\n    """Moved:\n\n    :mod:`.step.guard` is gone, :func:`.mod.absent` never was,\n'
        '    :meth:`Thing.shrink` neither, nor :class:`torch.NoSuchThing`."""\n'
    )
    index = _planted(tmp_path, sources)
    broken = [(r.path.name, r.line, r.body) for r in index.unresolved()]
    assert broken == [
        ("mod.py", 24, ".step.guard"),
        ("mod.py", 24, ".mod.absent"),
        ("mod.py", 25, "Thing.shrink"),
        ("mod.py", 25, "torch.NoSuchThing"),
    ]
    lines = (tmp_path / "planted" / "sub" / "mod.py").read_text().splitlines()
    assert ":mod:`.step.guard`" in lines[23] and ":meth:`Thing.shrink`" in lines[24]  # the lines named
