"""``benchmarks/studies/demo_base_fidelity.py``: its readings on drawings whose truth is known, its chance level
against the arithmetic of the palettes, the written result file's totals against its own rows, and a tiny run.

Run with ``python -m pytest benchmarks/tests``; the package's suite does not read the result files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.studies import demo_base_fidelity as study  # noqa: E402
from benchmarks.studies.online_measures import shape_templates  # noqa: E402
from trl_diffusion_sdpo.demo.shapes import BACKGROUNDS, COLOURS, SHAPES, Caption, all_captions  # noqa: E402


@pytest.fixture(scope="module")
def templates() -> dict[str, np.ndarray]:
    return shape_templates()


def test_drawings_read_as_their_captions_and_not_as_another(templates):
    captions = [c for c in all_captions() for _ in range(2)]
    images = study.drawings(captions, 32, seed=7)
    right = study.measure(images, captions, templates)
    assert {name: float(v.mean()) for name, v in right.items() if name != "colour_reward" and name != "shape_iou"} == {
        "drawn_as_captioned": 1.0,
        "shape_correct": 1.0,
        "colour_match": 1.0,
        "background_match": 1.0,
    }
    # one word changed: only that reading (and the conjunction) fails
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    recoloured = [Caption(colours[(colours.index(c.colour) + 1) % 6], c.shape, c.background) for c in captions]
    wrong = study.measure(images, recoloured, templates)
    assert wrong["colour_match"].sum() == 0 and wrong["drawn_as_captioned"].sum() == 0
    assert wrong["shape_correct"].all() and wrong["background_match"].all()
    reground = [Caption(c.colour, c.shape, backgrounds[1 - backgrounds.index(c.background)]) for c in captions]
    assert study.measure(images, reground, templates)["background_match"].sum() == 0
    reshaped = [Caption(c.colour, SHAPES[(SHAPES.index(c.shape) + 1) % 3], c.background) for c in captions]
    assert study.measure(images, reshaped, templates)["shape_correct"].sum() == 0


def test_chance_is_one_word_in_each_palette(templates):
    """Scored against every caption in turn, a drawing matches one of 6 colours, 2 backgrounds and 3 shapes."""
    captions = all_captions()
    found = study.chance(study.drawings(captions, 32, seed=3), templates)
    assert found["colour_match"] == pytest.approx(1 / 6)
    assert found["background_match"] == pytest.approx(1 / 2)
    assert found["shape_correct"] == pytest.approx(1 / 3)
    assert found["drawn_as_captioned"] == pytest.approx(1 / 36)


def test_the_written_result_file_holds_together():
    report = json.loads(study.OUTPUT.read_text())
    rows = report["per_caption"]
    assert [r["caption"] for r in rows] == [c.text for c in all_captions()]
    for name in study.MEASURES:  # equal samples per caption: the overall mean is the mean of the rows
        assert report["samples"][name] == pytest.approx(np.mean([r[name] for r in rows]), abs=1e-4), name
    for row in rows:
        low = min(row["shape_correct"], row["colour_match"], row["background_match"])
        assert row["drawn_as_captioned"] <= low + 1e-9, row
    majority = sum(r["drawn_as_captioned"] > 0.5 for r in rows)
    assert report["captions_drawn_as_captioned"] == {
        "rule": "more than half of the caption's samples drawn as captioned",
        "count": majority,
        "of": 36,
    }
    assert report["drawings"]["drawn_as_captioned"] == 1.0
    assert report["base"]["folder"] == "trl_diffusion_sdpo/demo/base"  # the shipped base, named from the root


@pytest.mark.slow
def test_a_tiny_run_writes_every_measure(tmp_path, capsys):
    out = tmp_path / "fidelity.json"
    assert study.main(["--per-caption", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["per_caption"]) == 36 and report["sampling"]["per_caption"] == 1
    for column in ("samples", "chance", "drawings", "vae_reconstructions"):
        assert set(report[column]) == set(study.MEASURES)
    assert report["base"]["source"] == "shipped"
    assert "captions drawn as captioned" in capsys.readouterr().out


@pytest.mark.slow
def test_another_base_is_recorded_with_its_recipe_and_no_machine_path(tmp_path):
    from trl_diffusion_sdpo.demo.pretrain import PretrainRecipe, pretrain_base, recipe_hash, save_base

    recipe = PretrainRecipe.tiny()
    folder = save_base(pretrain_base(recipe), recipe, tmp_path / "candidate", extra={"pretrain_seconds": 1.5})
    out = tmp_path / "fidelity.json"
    assert study.main(["--base", str(folder), "--per-caption", "1", "--json", str(out)]) == 0
    base = json.loads(out.read_text())["base"]
    assert base == {
        "source": "folder",
        "folder": "candidate",
        "recipe_hash": recipe_hash(recipe),
        "recipe": json.loads(json.dumps(recipe.to_dict())),
        "pretrain_seconds": 1.5,
    }
