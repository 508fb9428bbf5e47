"""The package writes no private state of other libraries' objects and replaces nothing in their modules.

A supplement to the behaviour tests (the UNet keeps its config object when trackers read it, tests/io/
test_trackers.py): a parse of every package module for

* a write or deletion of a single-underscore attribute (``x._a = ...``, ``x._a += ...``, ``x._a[:] = ...``,
  ``del x._a``, ``setattr(x, "_a", ...)``) on anything but ``self`` / ``cls``, where no class of the package defines
  ``_a`` itself (then ``x`` is taken to be one of the package's objects);
* a write to an attribute reached from an imported library module or name (``torch.nn.functional.f = ...``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import trl_diffusion_sdpo
from tests.helpers.source_scans import parsed

PACKAGE = Path(trl_diffusion_sdpo.__file__).parent
LIBRARIES = {
    "accelerate",
    "argparse",
    "datasets",
    "deepspeed",
    "diffusers",
    "huggingface_hub",
    "peft",
    "safetensors",
    "torch",
    "transformers",
}
#: writes still made, each to a library with no public way to the same result
KNOWN = {
    ("cli/help_topics.py", "_group_actions"),  # argparse: the short help's option groups, regrouped
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _package_names(trees: dict[Path, ast.Module]) -> set[str]:
    """The attribute names the package's own classes define: ``self._a = ...`` and class-body names."""
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    names.add(node.attr)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(item.name)
                    targets = item.targets if isinstance(item, ast.Assign) else []
                    targets += [item.target] if isinstance(item, ast.AnnAssign) else []
                    names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _library_names(tree: ast.Module) -> set[str]:
    """The names a module binds to a library's modules or objects by importing them."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in LIBRARIES)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in LIBRARIES:
                names.update(a.asname or a.name for a in node.names)
    return names


def _written_attributes(tree: ast.Module) -> list[tuple[int, ast.Attribute]]:
    """``(line, attribute)`` for each attribute a statement writes, deletes or assigns into (``x.a[:] = ...``)."""
    written = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        else:
            continue
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, ast.Attribute) and isinstance(part.ctx, (ast.Store, ast.Del)):
                    written.append((node.lineno, part))
                elif isinstance(part, ast.Subscript) and isinstance(part.ctx, (ast.Store, ast.Del)):
                    if isinstance(part.value, ast.Attribute):
                        written.append((node.lineno, part.value))
    return written


def other_libraries_state_written(package: Path) -> list[tuple[str, int, str]]:
    """``(module, line, attribute name)`` of each write the module docstring describes."""
    trees = {path: parsed(path.read_text(encoding="utf-8"), str(path)) for path in sorted(package.rglob("*.py"))}
    ours = _package_names(trees)
    found = []
    for path, tree in trees.items():
        module = path.relative_to(package).as_posix()
        libraries = _library_names(tree)
        for line, attribute in _written_attributes(tree):
            root = attribute.value
            while isinstance(root, ast.Attribute):
                root = root.value
            owner = root.id if isinstance(root, ast.Name) else None
            on_own = isinstance(attribute.value, ast.Name) and attribute.value.id in ("self", "cls")
            if owner in libraries or (_private(attribute.attr) and not on_own and attribute.attr not in ours):
                found.append((module, line, attribute.attr))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("setattr", "delattr")
            ):
                name = node.args[1] if len(node.args) > 1 else None
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    if _private(name.value) and name.value not in ours:
                        found.append((module, node.lineno, name.value))
    return found


def test_no_private_state_of_other_libraries_is_written():
    found = other_libraries_state_written(PACKAGE)
    unexpected = [entry for entry in found if (entry[0], entry[2]) not in KNOWN]
    assert unexpected == []


def test_the_scan_finds_each_kind_of_write(tmp_path):
    """Each kind of write the scan is for, planted in a module of its own, is found; the package's own are not."""
    (tmp_path / "planted.py").write_text(
        "import torch\n"
        "from torch.nn import functional as F\n\n\n"
        "class Own:\n"
        "    def __init__(self):\n"
        "        self._mine = 1\n\n\n"
        "def plant(model, scheduler, group, own):\n"
        "    model._internal_dict = {}\n"
        "    scheduler._last_lr += [1.0]\n"
        "    group._group_actions[:] = []\n"
        "    del model._hook\n"
        "    setattr(model, '_internal_dict', {})\n"
        "    torch.nn.functional.scaled_dot_product_attention = None\n"
        "    F.gelu = None\n"
        "    own._mine = 2\n"
        "    model.found_inf = None\n",
        encoding="utf-8",
    )
    found = other_libraries_state_written(tmp_path)
    assert sorted((line, name) for _, line, name in found) == [
        (11, "_internal_dict"),
        (12, "_last_lr"),
        (13, "_group_actions"),
        (14, "_hook"),
        (15, "_internal_dict"),
        (16, "scaled_dot_product_attention"),
        (17, "gelu"),
    ]
