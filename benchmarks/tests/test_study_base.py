"""Which base each stored result was measured on: the studies train the benchmark's base
(``stability_map.STUDY_BASE``), the shipped base's own evidence and the demo's figures the base that ships; the docs
name each by its recipe hash.

Run with ``python -m pytest benchmarks/tests``; the package's suite does not read the result files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.studies.stability_map import BASES, STUDY_BASE  # noqa: E402
from trl_diffusion_sdpo.demo.pretrain import PretrainRecipe, recipe_hash, shipped_base_record  # noqa: E402

HASH = re.compile(r'"recipe_hash": "([0-9a-f]{16})"')
#: result files measured on the shipped base; every other file that records a base ran on the benchmark's
SHIPPED_RESULTS = ("cpu-demo-base-fidelity.json", "shipped-base")
SHIPPED_DORMANT = "cpu-stability-dormant-shipped-base.json"


def _recorded(path: Path) -> set[str]:
    return set(HASH.findall(path.read_text()))


def test_the_two_bases_are_the_shipped_recipe_and_a_shorter_one():
    assert BASES == {"benchmark": STUDY_BASE, "shipped": PretrainRecipe()}
    assert shipped_base_record()["recipe_hash"] == recipe_hash(PretrainRecipe()) != recipe_hash(STUDY_BASE)
    shorter = {"vae_steps": 500, "unet_steps": 1000}
    assert {k: v for k, v in STUDY_BASE.to_dict().items() if k not in shorter} == {
        k: v for k, v in PretrainRecipe().to_dict().items() if k not in shorter
    }


def test_every_stored_result_ran_on_the_base_its_name_says():
    study, shipped = recipe_hash(STUDY_BASE), recipe_hash(PretrainRecipe())
    found = {
        path: hashes for path in sorted((ROOT / "benchmarks/results").rglob("*.json")) if (hashes := _recorded(path))
    }
    assert len(found) >= 12
    for path, hashes in found.items():
        expected = shipped if any(name in path.name for name in SHIPPED_RESULTS) else study
        assert hashes == {expected}, f"{path.relative_to(ROOT)} records {sorted(hashes)}, not {expected}"
    # the demo's figures are the shipped base's
    assert _recorded(ROOT / "docs/images/demo_summary.json") == {shipped}


def test_the_docs_name_each_base_by_its_hash():
    demo = (ROOT / "docs/demo.md").read_text()
    what_it_does, benchmark = demo.split("## What it does", 1)[1], demo.split("### The benchmark's base", 1)[1]
    assert recipe_hash(PretrainRecipe()) in what_it_does.split("\n2. ", 1)[0]
    assert recipe_hash(STUDY_BASE) in benchmark.split("\n## ", 1)[0]
    assert "(../demo.md#the-benchmarks-base)" in (ROOT / "docs/research/stability.md").read_text()


def test_the_demo_page_carries_the_shipped_bases_guard_and_dormant_tables():
    """docs/demo.md's blocks are the tables of the shipped base's result files, as the stability page's are of the
    benchmark's."""
    from benchmarks.studies import stability_dormant as dormant
    from benchmarks.studies import stability_guards as guards

    page = (ROOT / "docs/demo.md").read_text()
    folder = ROOT / "benchmarks/results/safeguard-comparison"
    for (start, end), text in (
        ((guards.TABLES_START, guards.TABLES_END), guards.tables(folder / "cpu-stability-guards-shipped-base.json")),
        ((dormant.DORMANT_START, dormant.DORMANT_END), dormant.dormant_tables(folder / SHIPPED_DORMANT)),
    ):
        block = page.split(start, 1)[1].split(end, 1)[0]
        assert block.strip() == text.strip(), f"stale: rewrite docs/demo.md's {start} block"
