"""``benchmarks/tools/rerun_cell.py``: one recorded cell of the studies' evidence rerun from the repository (the
stored benchmark's base, the result file's recorded settings) and compared with its record.

Run with ``python -m pytest benchmarks/tests`` (``-m slow`` for the rerun itself)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.tools import rerun_cell  # noqa: E402
from benchmarks.tools.rerun_cell import (  # noqa: E402
    differences,
    first_departure,
    largest_difference,
    recorded_recipe,
)


def test_the_first_departure_is_the_first_step_past_the_files_rounding():
    recorded = [0.693147, 0.690001, 0.7, 4.16248]
    assert first_departure(recorded, [0.693147, 0.690001]) is None  # a shorter rerun: its steps agree
    assert first_departure(recorded, [0.693147, 0.690002, 0.7, 4.16248]) is None  # one unit: a rounding boundary
    assert first_departure(recorded, [0.693147, 0.690003, 0.7, 4.16248]) == 2
    assert first_departure(recorded, [0.693147, 0.690001, 0.7, 4.16251]) == 4
    assert first_departure([-0.0123457], [-0.0123459]) == 1


def test_the_recorded_recipe_is_the_files_and_names_what_it_no_longer_uses():
    report = json.loads((ROOT / rerun_cell.RECORD).read_text())
    recipe, dropped = recorded_recipe(report)
    for name, value in report["recipe"].items():
        if name not in dropped:
            assert getattr(recipe, name) == (tuple(value) if isinstance(value, list) else value), name
    assert dropped == sorted(set(report["recipe"]) - set(recipe.to_dict()))
    assert recipe.pretrain == rerun_cell.STUDY_BASE


def test_the_cell_is_recorded_and_a_departure_is_reported():
    report = json.loads((ROOT / rerun_cell.RECORD).read_text())
    runs = [report["runs"][rerun_cell._run_key(4, 2e-4, 5000.0, key)] for key in rerun_cell.METHOD_KEYS]
    assert all(str(rerun_cell.STEP) in run["reward_change"] for run in runs)
    agreeing = {
        "base": {
            "recipe_hash": {"recorded": "a", "rerun": "a"},
            "reward": {"recorded": 0.87, "rerun": 0.87},
            "pairs": {"recorded": 123, "rerun": 123},
        },
        "runs": {
            "dpo": {
                "reward_change": {"recorded": -0.17, "rerun": -0.1701},
                "first_step_departing": {"reference_winner": None, "reference_loser": None, "loss": 3},
                "largest_difference": {"loss": largest_difference([0.693147, 91.6957], [0.693147, 91.7106])},
            }
        },
    }
    assert differences(agreeing, 5e-4) == []  # the loss from step 3 on within rounding: 1.6e-4 of its magnitude
    run = agreeing["runs"]["dpo"]
    run["reward_change"]["rerun"] = -0.1706  # 6e-4 from the record: past the 5e-4 tolerance
    assert differences(agreeing, 5e-4) == ["dpo: reward change -0.1706, recorded -0.1700"]
    run["reward_change"]["rerun"] = -0.04
    run["first_step_departing"]["reference_winner"] = 1
    run["largest_difference"]["loss"] = largest_difference([0.693147, 91.6957], [0.693147, 12.5])
    assert differences(agreeing, 5e-4) == [
        "dpo: reward change -0.0400, recorded -0.1700",
        "dpo: reference_winner departs from the record at step 1",
        "dpo: loss 12.5 at step 2, recorded 91.6957",
    ]


@pytest.mark.slow
def test_the_recorded_cell_reruns_to_its_recorded_values(tmp_path):
    """Seed 4 at lr 2e-4, step 50, Diffusion-DPO and mu=0.5, from the stored base and the file's settings."""
    out = tmp_path / "rerun.json"
    status = rerun_cell.main(["--json", str(out)])
    result = json.loads(out.read_text())
    assert result["differences"] == [] and status == 0, result["differences"]
