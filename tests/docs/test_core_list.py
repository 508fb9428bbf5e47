"""docs/design.md's table of the core names the parts and modules that benchmarks/tools/reviewer_figures.py counts
(``tests.helpers.core.CORE``), and every module it names exists."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.core import CORE

ROOT = Path(__file__).resolve().parents[2]


def _documented() -> dict[str, tuple[str, ...]]:
    text = (ROOT / "docs" / "design.md").read_text()
    table = text.split("<!-- core: begin -->")[1].split("<!-- core: end -->")[0]
    rows = [line.strip("|").split("|") for line in table.strip().splitlines()[2:]]
    return {
        part.strip(): tuple(name.strip().strip("`") for name in modules.split(",")) for part, _lines, modules in rows
    }


def test_the_design_documents_core_is_the_one_the_figures_count() -> None:
    assert _documented() == CORE


def test_every_core_module_exists() -> None:
    package = ROOT / "trl_diffusion_sdpo"
    missing = [name for files in CORE.values() for name in files if not (package / name).is_file()]
    assert not missing, f"core modules that no longer exist (rename them in CORE and docs/design.md): {missing}"
