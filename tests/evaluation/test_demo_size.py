"""The demo's size: the README's first command runs the default demo, a subset of the full comparison (``--full``)
small enough to finish in minutes, and its timed record is of that size.

The work a recipe plans (``DemoRecipe.planned_work``) is checked against counts made here by hand from the demo's
description; the timed runs' file (``benchmarks/results/demo/cpu-demo-time.json``, written by
``benchmarks/smoke/demo_time.py`` from each run's ``summary.json``) records the work its runs did, which must be the
default's, and, where they ran on idle cores, their wall time, which must fit the time the README promises."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from trl_diffusion_sdpo.cli import demo as demo_cli
from trl_diffusion_sdpo.cli import demo_run
from trl_diffusion_sdpo.demo.methods import DEFAULT_GUARDS, DEFAULT_METHODS, GUARDS, METHODS
from trl_diffusion_sdpo.demo.recipe import BreakingRegime, DemoRecipe

ROOT = Path(__file__).resolve().parents[2]
DEMO_TIME = ROOT / "benchmarks" / "results" / "demo" / "cpu-demo-time.json"
# What the README's first command may take on two idle cores.
MINUTES = 3


def test_the_default_demo_is_the_full_comparison_with_fewer_rows() -> None:
    """The default trains a strict subset of ``--full``'s methods and of its breaking regime's guards, and nothing
    else differs: its rows are the full comparison's rows, trained alike, and its work is a fraction of it."""
    default, full = DemoRecipe(), DemoRecipe.full()
    assert full.methods == tuple(METHODS) and default.methods == DEFAULT_METHODS
    assert full.breaking.methods == tuple(GUARDS) and default.breaking.methods == DEFAULT_GUARDS
    for subset, whole in ((default.methods, full.methods), (default.breaking.methods, full.breaking.methods)):
        assert set(subset) < set(whole) and subset[0] == "dpo" and list(subset) == [k for k in whole if k in subset]
    regime = dataclasses.replace(full.breaking, methods=default.breaking.methods)
    assert dataclasses.replace(full, methods=default.methods, breaking=regime) == default
    assert default.planned_work()["pair_steps"] < full.planned_work()["pair_steps"]
    expected = DemoRecipe(seed=3, seeds=(5,), methods=tuple(METHODS), breaking=BreakingRegime(methods=tuple(GUARDS)))
    assert DemoRecipe.full(seed=3, seeds=(5,)) == expected
    quick = DemoRecipe.quick()  # the smoke run still runs every method's and guard's code path
    assert quick.methods == tuple(METHODS) and quick.breaking.methods == tuple(GUARDS)


def test_planned_work_counts_what_the_demo_trains_and_samples() -> None:
    """Counted by hand: 36 captions, 6 held out (30 for pairs); the comparison's runs of 50 steps of 8 pairs, each
    evaluated on 6 prompts x 16 seeds after the base; the breaking regime's rows of 50 steps of 2 pairs, sampled at
    steps 25 and 50 on 6 prompts x 4 seeds after the base, with all 8 rows the rewinding row's probe on one pair per
    pair caption."""
    assert len(GUARDS) == 8 and GUARDS["guard-rewind"].probes and not any(GUARDS[k].probes for k in DEFAULT_GUARDS)
    for recipe, runs, rows, probe in ((DemoRecipe(), 2 * 3, 2, 0), (DemoRecipe.full(), 5 * 3, 8, 30 * 2)):
        assert recipe.planned_work() == {
            "training_runs": runs + rows,
            "optimizer_steps": runs * 50 + rows * 50,
            "pair_steps": runs * 50 * 8 + rows * 50 * 2,
            "sampled_images": 30 * 6 * 2 + (1 + runs) * 6 * 16 + probe + (1 + rows * 2) * 6 * 4,
        }
    without = DemoRecipe(breaking=None, seeds=(0,), methods=("dpo",), pairs_per_prompt=1, eval_seeds_per_prompt=2)
    assert without.planned_work() == {
        "training_runs": 1,
        "optimizer_steps": 50,
        "pair_steps": 400,
        "sampled_images": 30 * 2 + 2 * 6 * 2,
    }


def test_the_timed_runs_are_the_default_demos_and_on_idle_cores_fit_the_minutes_it_promises() -> None:
    """Each timed run did the default's work (a change of the default's size needs a new timing); a run timed on idle
    cores (the load while it ran at most the cores: the demo's own thread and little else) took at most ``MINUTES``.
    On a loaded machine the wall time says how long the demo waited for a core, and its CPU seconds stretch with the
    load, so neither bounds the idle time."""
    record = json.loads(DEMO_TIME.read_text())
    assert [step["command"].split(" --output-dir")[0] for step in record["steps"]] == ["trl-diffusion-sdpo demo"] * 2
    for step in record["steps"]:
        assert step["demo_plan"] == DemoRecipe().planned_work(), step["step"]
        if step["load_1min_during"]["median"] <= record["machine"]["cpu_cores"]:
            assert step["wall_s"] <= MINUTES * 60, step["step"]


def test_full_and_quick_reach_their_recipes_and_exclude_each_other(monkeypatch, tmp_path, capsys) -> None:
    seen: list[DemoRecipe] = []
    # replaced where the command looks it up (cli.demo_run imports it at its top)
    monkeypatch.setattr(demo_run, "run_demo", lambda output_dir, recipe, **kwargs: seen.append(recipe))
    for flags, expected in (
        ([], DemoRecipe(seed=2)),
        (["--full"], DemoRecipe.full(seed=2)),
        (["--quick"], DemoRecipe.quick(seed=2)),
        (["--full", "--methods", "dpo"], DemoRecipe.full(seed=2, methods=("dpo",))),
    ):
        assert demo_cli.main([*flags, "--seed", "2", "--output-dir", str(tmp_path)]) == 0
        assert seen.pop() == dataclasses.replace(expected, threads=1), flags
    with pytest.raises(SystemExit):
        demo_cli.main(["--full", "--quick", "--output-dir", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_demo_page_and_the_help_state_the_default_and_full_methods(monkeypatch) -> None:
    """docs/demo.md's option table and ``--help`` name the default's methods and ``--full``'s, as the code has them."""
    default, full = " ".join(DEFAULT_METHODS), " ".join(METHODS)
    rows = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^\| `(--[\w-]+)[^`]*` \| (.*) \|$", (ROOT / "docs/demo.md").read_text(), re.M)
    }
    assert f"default `{default}`" in rows["--methods"] and f"`{full}`" in rows["--full"]
    assert "every method" in rows["--quick"]
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal's width, breaking names at hyphens
    help_text = " ".join(demo_cli.build_parser().format_help().split())
    assert f"(default: {default};" in help_text and f"every method ({full})" in help_text
