"""The CPU demo: a shortened run end to end through the CLI, the cache of the pretrained base, the reward."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from PIL import Image

from trl_diffusion_sdpo import cli
from trl_diffusion_sdpo.demo import pretrain as pretrain_module
from trl_diffusion_sdpo.demo.pretrain import PretrainRecipe, recipe_hash
from trl_diffusion_sdpo.demo.run import DemoRecipe
from trl_diffusion_sdpo.demo.shapes import COLOURS, Caption, all_captions, colour_reward, draw_shape, split_captions

METHOD_KEYS = {"winner_delta", "loser_delta", "reward_base", "reward_final", "implicit_acc_final"}


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_outputs(out, recipe: DemoRecipe) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    for method in ("dpo", "sdpo"):
        assert METHOD_KEYS <= set(summary[method]), method
        for key in METHOD_KEYS:
            assert _finite_number(summary[method][key]), (method, key, summary[method][key])
        assert 0.0 <= summary[method]["implicit_acc_final"] <= 1.0
        assert 0.0 <= summary[method]["reward_final"] <= 1.0
    assert "lambda_mean" not in summary["dpo"]
    assert _finite_number(summary["sdpo"]["lambda_mean"]) and 0.0 <= summary["sdpo"]["lambda_mean"] <= 1.0
    # Both methods are measured against the same base samples.
    assert summary["dpo"]["reward_base"] == summary["sdpo"]["reward_base"]
    assert summary["config"]["seed"] == recipe.seed
    assert summary["config"]["max_steps"] == recipe.max_steps
    assert summary["config"]["pretrain"]["unet_steps"] == recipe.pretrain.unet_steps
    findings = summary["findings"]
    for key in ("dpo_winner_and_loser_error_rise", "sdpo_winner_error_does_not_rise", "dpo_margin_grows",
                "sdpo_margin_grows"):
        assert isinstance(findings[key], bool), key
    assert findings["dpo_winner_and_loser_error_rise"] == (
        summary["dpo"]["winner_delta"] > 0 and summary["dpo"]["loser_delta"] > 0
    )
    sdpo = summary["sdpo"]
    assert findings["sdpo_reward_change"] == pytest.approx(sdpo["reward_final"] - sdpo["reward_base"])

    history = json.loads((out / "history.json").read_text())
    for method in ("dpo", "sdpo"):
        assert history[method]["step"] == list(range(1, recipe.max_steps + 1))
    assert len(history["sdpo"]["safeguard/lambda_mean"]) == recipe.max_steps

    with Image.open(out / "losses.png") as image:
        assert image.width >= 600 and image.height >= 300
    with Image.open(out / "lambda.png") as image:
        assert image.width >= 400 and image.height >= 200
    with Image.open(out / "samples.png") as image:
        tile = recipe.pretrain.image_size * 3
        # one row per held-out prompt, base / DPO / SDPO side by side
        assert image.height >= recipe.num_held_out_prompts * tile
        assert image.width >= 3 * recipe.grid_seeds * tile
    return summary


def test_quick_demo_writes_summary_figures_and_table_then_reuses_the_cached_base(tmp_path, monkeypatch, capsys):
    recipe = DemoRecipe.quick()
    cache = tmp_path / "cache"
    first = tmp_path / "first"
    assert cli.main(["demo", "--quick", "--output-dir", str(first), "--cache-dir", str(cache)]) == 0
    printed = capsys.readouterr().out
    summary = _check_outputs(first, recipe)
    assert summary["base_model"]["cache_hit"] is False
    assert (cache / recipe_hash(recipe.pretrain) / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # the console table: a header and one row per method with the same figures as summary.json
    assert "winner Δ" in printed and "loser Δ" in printed
    dpo_row = next(line for line in printed.splitlines() if line.startswith("Diffusion-DPO "))
    assert f"{summary['dpo']['winner_delta']:+.5f}" in dpo_row
    assert any(line.startswith("Diffusion-SDPO ") for line in printed.splitlines())

    # Second run: the base comes from the cache; pretraining must not run at all.
    def no_pretraining(_recipe):
        raise AssertionError("the cached base should have been loaded")

    monkeypatch.setattr(pretrain_module, "pretrain_base", no_pretraining)
    second = tmp_path / "second"
    assert cli.main(["demo", "--quick", "--output-dir", str(second), "--cache-dir", str(cache)]) == 0
    assert "loaded the pretrained base from the cache" in capsys.readouterr().out
    again = _check_outputs(second, recipe)
    assert again["base_model"]["cache_hit"] is True
    # Same seed, same cached base: the same numbers.
    for method in ("dpo", "sdpo"):
        for key in METHOD_KEYS:
            assert again[method][key] == pytest.approx(summary[method][key], rel=1e-5, abs=1e-7), (method, key)


def test_recipe_hash_is_stable_and_changes_with_any_knob():
    assert recipe_hash(PretrainRecipe()) == recipe_hash(PretrainRecipe())
    assert recipe_hash(PretrainRecipe(unet_steps=999)) != recipe_hash(PretrainRecipe())
    assert recipe_hash(PretrainRecipe(seed=1)) != recipe_hash(PretrainRecipe())


def test_demo_seed_drives_the_base_model_seed():
    assert DemoRecipe(seed=3).pretrain.seed == 3
    assert DemoRecipe.quick(seed=5).pretrain.seed == 5


def test_colour_reward_prefers_the_named_colours():
    rng = random.Random(0)
    captions = all_captions()
    images = np.stack([np.asarray(draw_shape(c, 32, rng), dtype=np.float64) / 255.0 for c in captions])
    right = colour_reward(images, captions)
    colours = list(COLOURS)
    wrong_colour = [Caption(colours[(colours.index(c.colour) + 1) % len(colours)], c.shape, c.background)
                    for c in captions]
    wrong_background = [Caption(c.colour, c.shape, "black" if c.background == "white" else "white") for c in captions]
    assert right.min() > 0.9
    assert np.all(right > colour_reward(images, wrong_colour))
    assert np.all(right > colour_reward(images, wrong_background) + 0.3)
    assert np.all((right >= 0.0) & (right <= 1.0))


def test_held_out_prompts_cover_every_colour_and_are_not_in_the_pairs():
    train, held_out = split_captions(6, seed=0)
    assert {c.colour for c in held_out} == set(COLOURS)
    assert not set(train) & set(held_out)
    assert len(train) + len(held_out) == len(all_captions())
    assert Caption.parse(held_out[0].text) == held_out[0]


def test_cli_demo_options():
    args = cli.build_parser().parse_args(["demo", "--output-dir", "x", "--quick", "--seed", "2", "--no-cache",
                                          "--cache-dir", "c"])
    assert (args.output_dir, args.quick, args.seed, args.no_cache, args.cache_dir) == ("x", True, 2, True, "c")


@pytest.mark.slow
def test_full_demo(tmp_path):
    """The full demo (minutes on a 2-core CPU): outputs well formed; the claim it was built to show is checked
    separately in docs/demo.md, since a different platform may change the numbers."""
    from trl_diffusion_sdpo.demo.run import run_demo

    recipe = DemoRecipe()
    run_demo(tmp_path / "out", recipe, cache_dir=tmp_path / "cache")
    _check_outputs(tmp_path / "out", recipe)
