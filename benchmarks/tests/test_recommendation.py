"""``benchmarks/studies/recommendation.py``: the one rendering of the safeguard recommendation that the README,
``docs/safeguard.md`` and the demo (through the shipped file's ``text``) quote, and the rule that picks its rows.

Run with ``python -m pytest benchmarks/tests``; the package's suite reads the shipped file and the pages only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.studies.recommendation import (  # noqa: E402
    PAGES,
    SHIPPED,
    START,
    choose,
    load_rows,
    marked_block,
    render,
)

SCRIPT = ROOT / "benchmarks" / "studies" / "recommendation.py"


@pytest.mark.parametrize("page", PAGES)
def test_each_marked_block_is_the_generated_text(page: str) -> None:
    text = (ROOT / page).read_text()
    assert START in text, f"{page} has no generated recommendation block"
    assert marked_block(text) == render(load_rows(), page), f"{page}'s block differs: run {SCRIPT.name}"


def test_the_shipped_text_the_demo_quotes_is_the_generated_text() -> None:
    from trl_diffusion_sdpo.demo.report import safeguard_recommendation

    assert load_rows()["text"] == render(load_rows())
    assert safeguard_recommendation()["text"] == render(load_rows())


def test_the_rule_picks_the_cheapest_insurance_of_the_comparison() -> None:
    """From the comparison's result file itself (not the shipped rows): of the safeguards whose paired reward
    difference from Diffusion-DPO at lr 2e-4, 200 steps has an interval above 0, the one whose mean difference at
    lr 2e-5, 200 steps is highest."""
    comparison = json.loads((ROOT / load_rows()["source"]).read_text())
    settings = {(s["learning_rate"], s["steps"]): s for s in comparison["settings"].values()}
    sick, healthy = settings[(2e-4, 200)]["methods"], settings[(2e-5, 200)]["methods"]
    pays = [
        key
        for key, entry in sick.items()
        if key != "dpo" and entry["reward_minus_dpo_by_step"]["200"]["ci95"][0] > 0 and key in healthy
    ]
    best = max(pays, key=lambda k: healthy[k]["reward_minus_dpo_by_step"]["200"]["mean"])
    assert choose(load_rows())["default"]["method"] == best


def test_the_generator_rewrites_a_stale_block(tmp_path: Path) -> None:
    """``python benchmarks/studies/recommendation.py --root DIR`` puts the generated text back into each page's block
    and ``--check`` then finds nothing to do."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for page in PAGES:
        target = tmp_path / page
        target.parent.mkdir(parents=True, exist_ok=True)
        stale = (ROOT / page).read_text().replace(marked_block((ROOT / page).read_text()), "- Old advice: mu=0.9.")
        target.write_text(stale)
    run = [sys.executable, str(SCRIPT), "--root", str(tmp_path)]
    check = subprocess.run([*run, "--check"], env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 1 and all(page in check.stdout for page in PAGES), check.stdout
    assert subprocess.run(run, env=env, capture_output=True, text=True, timeout=300).returncode == 0
    for page in PAGES:
        assert (tmp_path / page).read_text() == (ROOT / page).read_text()
    assert subprocess.run([*run, "--check"], env=env, capture_output=True, timeout=300).returncode == 0
    assert SHIPPED.is_file()


ONLINE_FILES = (
    "benchmarks/results/online/cpu-online-comparison-tiny.json",
    "benchmarks/results/online/cpu-online-hacking-demo.json",
)


def test_the_online_line_is_refused_when_a_safeguard_holds_where_online_diffusion_dpo_breaks(tmp_path) -> None:
    """The generator reads the online default's evidence, not a copy of it: a hacking-regime file where a safeguard
    keeps every measure Diffusion-DPO loses makes it raise instead of rendering "no safeguard"."""
    from benchmarks.studies.recommendation import online_evidence

    for name in ONLINE_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    assert online_evidence(tmp_path)["breaks_on"]  # as shipped: renders
    hacking = json.loads((tmp_path / ONLINE_FILES[1]).read_text())
    for entry in hacking["analysis"]["goal"].values():
        entry["settings"]["sdpo-output-auto"]["met"] = True
    (tmp_path / ONLINE_FILES[1]).write_text(json.dumps(hacking))
    with pytest.raises(ValueError, match="revisit OnlineDiffusionSDPOConfig"):
        online_evidence(tmp_path)
