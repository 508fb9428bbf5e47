"""The package's layers import one way, down: a lower layer never imports a higher one (see docs/design.md).

Every import statement of every module counts, wherever it stands (top level, inside a function, under
``TYPE_CHECKING``), since each one ties the lower layer to the higher one's names.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "trl_diffusion_sdpo"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# Every layer of the package: its subpackages and top-level modules.
LAYERS = tuple(sorted(p.stem for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()))

# layer (a subpackage or module, dotted under the package) -> the layers it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # the bottom layer: the value checks and the lazy-attribute helper, which import nothing of the package, only
    "config": tuple(layer for layer in LAYERS if layer not in ("config", "checks", "_lazy", "__init__")),
    "data": ("demo", "evaluation", "trainer"),
    "objectives": ("demo", "evaluation", "trainer"),
    "families": ("demo", "evaluation", "trainer", "step"),
    "step": ("demo", "evaluation", "trainer", "safeguards"),
    "safeguards": ("demo", "evaluation", "trainer"),
    "gradients": ("demo", "evaluation", "trainer", "step", "safeguards"),
    "engines": ("demo", "evaluation", "trainer", "step", "safeguards", "gradients"),
    "io": ("demo", "evaluation", "trainer"),
    "evaluation": ("demo", "trainer"),
    # the online trainer sits on the offline one; the demo's colour scorer reaches it by its registered name
    "online": ("demo",),
}

# Known violations being removed: exactly the violations found (a stale entry fails, so that the list empties as
# they are fixed). Empty: step/guard.py's tracker is given a save function, not the trainer.
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``from . import x`` counts as ``package.x``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # ``from . import trainer``
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == PACKAGE else None


def violations() -> set[tuple[str, str]]:
    found = set()
    for path in sorted(ROOT.rglob("*.py")):
        importer = module_name(path)
        forbidden = FORBIDDEN.get(layer_of(importer) or "", ())
        for imported in imported_modules(path):
            if layer_of(imported) in forbidden:
                found.add((importer, ".".join(imported.split(".")[:2])))
    return found


def test_the_import_walk_sees_relative_absolute_and_nested_imports(tmp_path, monkeypatch):
    package = tmp_path / PACKAGE
    (package / "step").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "step" / "__init__.py").write_text("from .. import trainer\n")
    (package / "step" / "a.py").write_text(
        "def f():\n    from ..evaluation.scorers import build_scorer\n    import trl_diffusion_sdpo.demo.run\n"
    )
    (package / "step" / "b.py").write_text("from ..families import ModelFamily\nfrom .a import f\n")
    monkeypatch.setattr(f"{__name__}.ROOT", package)
    assert violations() == {
        ("trl_diffusion_sdpo.step", "trl_diffusion_sdpo.trainer"),
        ("trl_diffusion_sdpo.step.a", "trl_diffusion_sdpo.evaluation"),
        ("trl_diffusion_sdpo.step.a", "trl_diffusion_sdpo.demo"),
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
    """The config may import the value checks and the lazy-attribute helper only; any other layer, at any depth of
    the config package and wherever the import stands, is a violation."""
    package = tmp_path / PACKAGE
    (package / "config").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config" / "__init__.py").write_text("from .._lazy import lazy_attributes\nfrom .rules import f\n")
    (package / "config" / "rules.py").write_text(
        "from ..checks import Range\n\ndef f():\n    from ..objectives import objective_class\n"
    )
    (package / "config" / "fields.py").write_text("import trl_diffusion_sdpo.io.preemption\n")
    monkeypatch.setattr(f"{__name__}.ROOT", package)
    assert violations() == {
        ("trl_diffusion_sdpo.config.rules", "trl_diffusion_sdpo.objectives"),
        ("trl_diffusion_sdpo.config.fields", "trl_diffusion_sdpo.io"),
    }


def test_no_benchmark_script_is_over_600_lines():
    """One script per question, each readable whole: a script that grows past 600 lines moves its parts into the
    shared harness or a module beside it (benchmarks/README.md)."""
    benchmarks = ROOT.parent / "benchmarks"
    long = {
        path.relative_to(benchmarks).as_posix(): n
        for path in benchmarks.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 600
    }
    assert not long, f"benchmark scripts over 600 lines: {long}"
