"""The package's layers import one way, down: a layer imports only the layers below it (docs/design.md's table).

Every import counts, wherever it stands (top level, inside a function, under ``TYPE_CHECKING``), and so does a
module named to ``importlib.import_module`` or in a lazy-attribute table (``{"Name": ".module"}``): each one ties the
lower layer to the higher one's names. ``__main__`` modules are entry points, above every layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.layering import PACKAGE, ROOT, module_name
from tests.helpers.source_scans import parsed

# Bottom to top: a layer may import the layers before it in this tuple, never one after it.
ORDER: tuple[str, ...] = (
    "config",  # the config, its rules and defaults, value checks, optional extras, lazy attributes
    "testing",  # tiny pipelines built from configs
    "objectives",
    "families",
    "data",
    "engines",
    "step",
    "safeguards",
    "rewards",
    "evaluation",
    "callbacks",
    "io",
    "trainer",
    "online",
    "demo",
    "cli",
)

ENTRY_POINTS = {"__main__"}

# Known violations being removed: exactly the violations found (a stale entry fails, so that the list empties).
ALLOWED: set[tuple[str, str]] = set()


def _absolute(module: str, level: int, package: str) -> str:
    if not level:
        return module
    base = package.split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``from . import x`` counts as ``package.x``), names a string
    for ``importlib.import_module`` (relative with a package argument too), or lists in a lazy-attribute table."""
    name = module_name(path, ROOT)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(parsed(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node.module or "", node.level, package)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # ``from . import trainer``
        elif (
            isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                target = node.args[0].value
                dots = len(target) - len(target.lstrip("."))
                found.add(_absolute(target.lstrip("."), dots, package) if dots else target)
        elif isinstance(node, ast.Dict):  # a lazy-attribute table: {"Name": ".module"}
            for value in node.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value.startswith("."):
                    target = value.value
                    dots = len(target) - len(target.lstrip("."))
                    if target.lstrip(".").replace(".", "").replace("_", "").isalnum():
                        found.add(_absolute(target.lstrip("."), dots, package))
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == PACKAGE else None


def violations() -> set[tuple[str, str]]:
    found = set()
    for path in sorted(ROOT.rglob("*.py")):
        if path.stem in ENTRY_POINTS:
            continue
        importer = module_name(path, ROOT)
        layer = layer_of(importer)
        if layer not in ORDER:
            continue
        above = set(ORDER[ORDER.index(layer) + 1 :])
        for imported in imported_modules(path):
            if layer_of(imported) in above:
                found.add((importer, ".".join(imported.split(".")[:2])))
    return found


def test_every_entry_of_the_package_is_a_layer():
    """The top level holds the layers of ORDER and nothing else (at most 16 entries, each named by docs/design.md)."""
    entries = {
        p.stem
        for p in ROOT.iterdir()
        if (p.suffix == ".py" and p.stem not in {"__init__", *ENTRY_POINTS}) or (p / "__init__.py").is_file()
    }
    assert entries == set(ORDER)
    assert len(entries) <= 16
    for page in ("docs/design.md", "CONTRIBUTING.md"):
        text = (ROOT.parent / page).read_text()
        missing = [layer for layer in ORDER if f"`{layer}/`" not in text and f"`{layer}.py`" not in text]
        assert not missing, f"{page} does not name the layers: {missing}"


def test_the_import_walk_sees_relative_absolute_nested_and_importlib_loads(tmp_path, monkeypatch):
    package = tmp_path / PACKAGE
    (package / "step").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "step" / "__init__.py").write_text("from .. import trainer\n")
    (package / "step" / "a.py").write_text(
        "def f():\n    from ..evaluation.scorers import build_scorer\n    import trl_diffusion_sdpo.demo.run\n"
    )
    (package / "step" / "b.py").write_text("from ..families import ModelFamily\nfrom .a import f\n")
    (package / "step" / "c.py").write_text(
        "import importlib\n\ndef g():\n    importlib.import_module('trl_diffusion_sdpo.io.preemption')\n"
        "    importlib.import_module('..online', __package__)\n"
    )
    (package / "step" / "d.py").write_text("EXPORTS = {'Thing': '..callbacks.guards', 'x': '.a'}\n")
    monkeypatch.setattr(f"{__name__}.ROOT", package)
    assert violations() == {
        ("trl_diffusion_sdpo.step", "trl_diffusion_sdpo.trainer"),
        ("trl_diffusion_sdpo.step.a", "trl_diffusion_sdpo.evaluation"),
        ("trl_diffusion_sdpo.step.a", "trl_diffusion_sdpo.demo"),
        ("trl_diffusion_sdpo.step.c", "trl_diffusion_sdpo.io"),
        ("trl_diffusion_sdpo.step.c", "trl_diffusion_sdpo.online"),
        ("trl_diffusion_sdpo.step.d", "trl_diffusion_sdpo.callbacks"),
    }


def test_no_layer_imports_a_higher_one():
    unexpected = violations() - ALLOWED
    assert not unexpected, "imports up the layering (importer, imported):\n" + "\n".join(map(str, sorted(unexpected)))


def test_each_allowed_violation_still_exists():
    """The allow-list is exactly the violations found: a fixed one left in it fails, as a new one does."""
    found = violations()
    assert found == ALLOWED, (
        f"fixed, remove from ALLOWED in tests/docs/test_layering.py: {sorted(ALLOWED - found)}; "
        f"new upward imports: {sorted(found - ALLOWED)}"
    )


def test_the_config_is_the_bottom_layer(tmp_path, monkeypatch):
    """The config imports no other layer, at any depth of the config package and wherever the import stands."""
    package = tmp_path / PACKAGE
    (package / "config").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config" / "__init__.py").write_text("from ._lazy import lazy_attributes\nfrom .rules import f\n")
    (package / "config" / "rules.py").write_text(
        "from .checks import Range\n\ndef f():\n    from ..objectives import objective_class\n"
    )
    (package / "config" / "fields.py").write_text("import trl_diffusion_sdpo.callbacks.interruptions\n")
    monkeypatch.setattr(f"{__name__}.ROOT", package)
    assert violations() == {
        ("trl_diffusion_sdpo.config.rules", "trl_diffusion_sdpo.objectives"),
        ("trl_diffusion_sdpo.config.fields", "trl_diffusion_sdpo.callbacks"),
    }


def test_only_the_command_line_declares_options():
    """Every command's options live in ``cli/``: a parser built anywhere else is a second home for an option."""
    declaring = sorted(
        path.relative_to(ROOT).as_posix()
        for path in ROOT.rglob("*.py")
        if "cli" not in path.relative_to(ROOT).parts[:1]
        and any(word in path.read_text() for word in ("add_argument(", "ArgumentParser(", "HfArgumentParser("))
    )
    assert declaring == [], f"modules outside cli/ that declare command-line options: {declaring}"
