"""Evaluation: prompt sets, cached generation with the authors' protocol, comparisons, evaluate() and the CLI."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image

from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.evaluation import (
    GenerationSettings,
    ModelSpec,
    Scorer,
    bootstrap_mean_ci,
    evaluate,
    image_grid,
    load_prompts,
    register_scorer,
    sample_images,
    summarise,
    win_rate,
    win_rate_table,
)
from trl_diffusion_sdpo.evaluation.generation import (
    load_base_pipeline,
    native_resolution,
    variant_pipeline,
)
from trl_diffusion_sdpo.testing import (
    build_tiny_flux2_klein_pipeline,
    build_tiny_flux2_pipeline,
    build_tiny_qwen_image_pipeline,
    build_tiny_sd_pipeline,
)

torch.set_num_threads(1)
FAST = GenerationSettings(num_inference_steps=2, height=32, width=32)


# -- prompts ---------------------------------------------------------------------------------------------------------


def test_text_file_prompts_skip_blank_lines_and_keep_order(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog  \na cat\n")
    assert load_prompts(str(path)) == ["a cat", "a dog", "a cat"]
    assert load_prompts(str(path), deduplicate=True) == ["a cat", "a dog"]
    assert load_prompts(str(path), limit=1) == ["a cat"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_dataset_prompts_name_the_missing_column_and_the_available_ones(tmp_path):
    Dataset.from_dict({"caption": ["x", "y"], "other": [1, 2]}).save_to_disk(str(tmp_path / "saved"))
    dataset = Dataset.from_dict({"caption": ["x", "y"], "other": [1, 2]})
    assert load_prompts(dataset) == ["x", "y"]  # caption found by default
    with pytest.raises(ValueError, match=r"no column 'Prompt'.*\['caption', 'other'\]"):
        load_prompts(dataset, column="Prompt")
    with pytest.raises(ValueError, match="no prompt column among"):
        load_prompts(Dataset.from_dict({"other": [1]}))


def _write_parquet(folder, split: str, column: str, values: list[str]) -> None:
    os.makedirs(folder / "data", exist_ok=True)
    Dataset.from_dict({column: values, "extra": list(range(len(values)))}).to_parquet(
        str(folder / "data" / f"{split}-00000-of-00001.parquet")
    )


def test_presets_load_through_datasets_from_a_local_copy(tmp_path):
    pickapic = tmp_path / "pickapic"
    _write_parquet(pickapic, "validation_unique", "caption", ["b", "a", "b", "c"])
    _write_parquet(pickapic, "train", "caption", ["not", "this", "split"])
    assert load_prompts("pickapic_v2", path=str(pickapic)) == ["b", "a", "c"]  # the split, deduplicated in order
    parti = tmp_path / "parti"
    _write_parquet(parti, "train", "Prompt", ["p1", "p2", "p1"])
    assert load_prompts("partiprompts", path=str(parti)) == ["p1", "p2", "p1"]
    with pytest.raises(ValueError, match="no column 'Prompt'"):
        load_prompts("partiprompts", path=str(pickapic), split="train")


def test_hpdv2_preset_reads_the_four_benchmark_files_in_order(tmp_path):
    os.makedirs(tmp_path / "benchmark")
    for style in ("anime", "concept-art", "paintings", "photo"):
        (tmp_path / "benchmark" / f"{style}.json").write_text(json.dumps([f"{style} 1", f"{style} 2"]))
    prompts = load_prompts("hpdv2", path=str(tmp_path))
    assert prompts[:3] == ["anime 1", "anime 2", "concept-art 1"] and len(prompts) == 8
    os.remove(tmp_path / "benchmark" / "photo.json")
    with pytest.raises(FileNotFoundError, match="photo.json"):
        load_prompts("hpdv2", path=str(tmp_path))


# -- comparison ------------------------------------------------------------------------------------------------------


def test_bootstrap_interval_is_seeded_and_matches_the_normal_approximation():
    values = np.random.default_rng(1).normal(2.0, 1.0, size=400)
    mean, low, high = bootstrap_mean_ci(values, n_resamples=2000, seed=0)
    assert (mean, low, high) == bootstrap_mean_ci(values, n_resamples=2000, seed=0)
    assert low < mean < high and mean == pytest.approx(values.mean())
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)
    assert bootstrap_mean_ci([3.0] * 10) == (3.0, 3.0, 3.0)
    assert bootstrap_mean_ci([3.0]) == (3.0, 3.0, 3.0)


def test_win_rates_count_ties_half_and_a_dominating_model_wins_everything():
    result = win_rate([1, 2, 3, 4], [0, 2, 5, 4], metric="m", model="a", opponent="b")
    assert (result.wins, result.ties, result.losses, result.win_rate) == (1, 2, 1, 0.5)
    assert win_rate([2, 3, 4], [1, 2, 3]).win_rate == 1.0
    assert win_rate([1, 1], [1, 1]).win_rate == 0.5
    table = win_rate_table({"base": {"m": [0, 0, 0]}, "dpo": {"m": [1, 1, 1]}, "sdpo": {"m": [2, 0, 1]}})
    pairs = [(r.model, r.opponent, r.win_rate) for r in table]
    assert pairs == [("dpo", "base", 1.0), ("sdpo", "base", pytest.approx(2.5 / 3)), ("sdpo", "dpo", 0.5)]
    with pytest.raises(ValueError, match="same samples"):
        win_rate([1, 2], [1])


def test_summary_clamps_a_floored_metric_and_its_interval():
    rows = summarise(
        {"m": {"clip": [-2.0, -1.0, -3.0], "raw": [-2.0, -1.0, -3.0]}},
        {"clip": "x100"},
        {"clip": 0.0},
        n_resamples=200,
    )
    clip, raw = rows
    assert (clip.mean, clip.ci_low, clip.ci_high, clip.scale) == (0.0, 0.0, 0.0, "x100")
    assert raw.mean == -2.0 and raw.ci_low < raw.mean < raw.ci_high


def test_image_grid_places_each_image_in_its_cell():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    grid = image_grid([[red, blue], [blue, red]])
    assert grid.size == (16, 16)
    assert grid.getpixel((4, 4)) == (255, 0, 0) and grid.getpixel((12, 4)) == (0, 0, 255)
    assert grid.getpixel((4, 12)) == (0, 0, 255)


def _ink(image: Image.Image) -> int:
    """Dark pixels: the text drawn on a white area."""
    return int((np.asarray(image.convert("L")) < 128).sum())


def _cells(grid: Image.Image) -> tuple[int, int, int]:
    """The left and top edges and the size of the grid's red cells (its images), found from the pixels."""
    red = np.argwhere((np.asarray(grid.convert("RGB")) == (255, 0, 0)).all(axis=-1))
    (top, left), (bottom, _) = red.min(axis=0), red.max(axis=0)
    return int(left), int(top), int(bottom - top + 1) // 2  # two rows of cells


def _ink_of_words(text: str) -> list[int]:
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    inks = []
    for word in text.split():
        canvas = Image.new("RGB", (600, 40), "white")
        ImageDraw.Draw(canvas).text((2, 2), word, fill="black", font=font)
        inks.append(_ink(canvas))
    return inks


def test_image_grid_labels_are_drawn_whole_on_small_cells():
    """32-pixel images (the tiny base's) under labels several times wider: every character of every label is drawn
    (the ink equals each label's words rendered alone), within its own cell's width or the label column."""
    cells = [Image.new("RGB", (32, 32), (255, 0, 0))] * 2
    columns, rows = ["yellow square on white", "red circle on white"], ["base model", "diffusion-sdpo-lora"]
    grid = image_grid([cells, cells], row_labels=rows, column_labels=columns, cell=32)
    assert image_grid([cells], column_labels=columns).width == 2 * 64  # labelled small images: 64-pixel cells
    left, top, cell = _cells(grid)
    assert grid.size == (left + 2 * cell, top + 2 * cell)
    for c, label in enumerate(columns):
        band = grid.crop((left + c * cell, 0, left + (c + 1) * cell, top))
        assert _ink(band) == pytest.approx(sum(_ink_of_words(label)), rel=0.05), label
    for r, label in enumerate(rows):
        band = grid.crop((0, top + r * cell, left, top + (r + 1) * cell))
        assert _ink(band) == pytest.approx(sum(_ink_of_words(label)), rel=0.05), label


def test_image_grid_wraps_a_long_caption_between_words():
    """A long caption over 32-pixel images: each line of the label holds whole words, in order (its ink is the sum
    of some next words' inks, never a part of one), and the cell widened only as far as the longest word needs."""
    from PIL import ImageDraw, ImageFont

    from trl_diffusion_sdpo.evaluation.compare import MAX_WORD_CELL

    font = ImageFont.load_default()
    caption = "a photograph of an astronaut riding a horse across the surface of the moon at dawn, cinematic lighting"
    cells = [Image.new("RGB", (32, 32), (255, 0, 0))]
    grid = image_grid([cells, cells], column_labels=[caption], cell=32)
    left, top, cell = _cells(grid)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max(measure.textlength(word, font=font) for word in caption.split())
    assert widest + 4 <= cell <= widest + 6  # the longest word fits; the images are not blown up further
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3] + 2
    words, lines = _ink_of_words(caption), []
    for i in range((top - 2) // line_height):
        band = grid.crop((left, 1 + i * line_height, left + cell, 1 + (i + 1) * line_height))
        lines.append(_ink(band))
    lines = [ink for ink in lines if ink]
    assert len(lines) > 3  # the caption does wrap
    position = 0
    for ink in lines:  # each line is the next whole words
        total = 0
        while position < len(words) and total < ink * 0.97:
            total, position = total + words[position], position + 1
        assert total == pytest.approx(ink, rel=0.03), (lines, words)
    assert position == len(words)
    long_word = "x" * 200  # wider than MAX_WORD_CELL: the cell stops there and the word is broken
    assert _cells(image_grid([cells, cells], column_labels=[long_word], cell=32))[2] == MAX_WORD_CELL


def test_interval_plot_keeps_its_title_and_labels_inside_the_image(tmp_path):
    """Nothing drawn touches the saved image's border: a clipped title or axis label would."""
    pytest.importorskip("matplotlib")  # the `plots` extra
    from trl_diffusion_sdpo.evaluation.compare import MetricSummary, plot_intervals

    rows = [
        MetricSummary(model=name, metric="colour", mean=m, ci_low=m - 0.01, ci_high=m + 0.01, n=4, scale="[0, 1]")
        for name, m in (("base", 0.41), ("tuned", 0.45))
    ]
    path = plot_intervals(rows, "colour", str(tmp_path / "colour.png"))
    pixels = np.asarray(Image.open(path).convert("L"))
    border = np.concatenate([pixels[:3].ravel(), pixels[-3:].ravel(), pixels[:, :3].ravel(), pixels[:, -3:].ravel()])
    assert (border > 200).all()


# -- generation ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """A saved tiny base pipeline, a LoRA folder for it, and a full-UNet checkpoint folder."""
    root = tmp_path_factory.mktemp("models")
    base = build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(root / "tok"))
    base.save_pretrained(str(root / "base"))
    unet = base.unet
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    lora_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(root / "lora"), unet_lora_layers=lora_state)
    other = build_tiny_sd_pipeline(seed=1, tokenizer_dir=str(root / "tok1"))
    other.unet.save_pretrained(str(root / "full" / "unet"))
    return {"base": str(root / "base"), "lora": str(root / "lora"), "full": str(root / "full")}


@pytest.mark.parametrize(
    "build", [build_tiny_flux2_pipeline, build_tiny_flux2_klein_pipeline, build_tiny_qwen_image_pipeline]
)
def test_the_newer_flow_pipelines_sample_with_the_protocol_settings(build, tmp_path):
    """FLUX.2's pipelines take no negative prompt (sampling passed one and failed); Qwen-Image takes one."""
    pipe = build(seed=0, tokenizer_dir=str(tmp_path / "tok"))
    settings = GenerationSettings(num_inference_steps=2, guidance_scale=1.0, height=32, width=32)
    images = sample_images(pipe, ["a red cube", "a blue ball"], [0, 0], settings)
    assert [image.size for image in images] == [(32, 32), (32, 32)]
    again = sample_images(pipe, ["a red cube"], [0], settings)  # the seed, not the batch, fixes the noise
    assert np.array_equal(np.asarray(again[0]), np.asarray(images[0]))


def test_true_cfg_scale_sets_qwen_images_guidance_and_is_refused_where_a_pipeline_has_none(tmp_path):
    pipe = build_tiny_qwen_image_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"))
    base = dict(num_inference_steps=2, guidance_scale=1.0, height=32, width=32)

    def pixels(**settings) -> np.ndarray:
        return np.asarray(sample_images(pipe, ["a red cube"], [0], GenerationSettings(**base, **settings))[0])

    default, four, off = pixels(), pixels(true_cfg_scale=4.0), pixels(true_cfg_scale=1.0)
    assert np.array_equal(default, four)  # unset: the pipeline's 4.0, guided because a negative prompt is passed
    assert not np.array_equal(default, off)  # 1.0: no guidance
    # An unset value leaves the image cache's names as they were before the setting existed (hashes of the old key).
    assert GenerationSettings().key() == "37aa75dd5b76" and GenerationSettings(**base).key() == "8428b664565f"
    assert GenerationSettings(true_cfg_scale=4.0).key() != GenerationSettings().key()
    klein = build_tiny_flux2_klein_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok2"))
    with pytest.raises(ValueError, match="true_cfg_scale is set, but Flux2KleinPipeline takes none"):
        sample_images(klein, ["a red cube"], [0], GenerationSettings(**base, true_cfg_scale=2.0))


def test_protocol_defaults_and_native_resolution(model_dirs):
    settings = GenerationSettings()
    assert (settings.num_inference_steps, settings.guidance_scale, settings.negative_prompt) == (50, 8.5, "")
    pipe = load_base_pipeline(model_dirs["base"], settings, torch.device("cpu"))
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert native_resolution(pipe) == pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"dtype": "fp16"}, "dtype must be one of ['float32', 'bfloat16', 'float16'], got 'fp16'."),
        ({"scheduler": "ddim"}, "scheduler must be one of ['euler', 'model'], got 'ddim'."),
    ],
    ids=["dtype", "scheduler"],
)
def test_generation_settings_name_the_allowed_dtypes_and_schedulers(setting, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GenerationSettings(**setting)


def test_every_prompt_starts_from_the_seeds_noise_whatever_the_batch(model_dirs):
    pipe = load_base_pipeline(model_dirs["base"], FAST, torch.device("cpu"))
    seen = []
    original = pipe.prepare_latents

    def record(*args, **kwargs):
        latents = original(*args, **kwargs)
        seen.append(latents.clone())
        return latents

    pipe.prepare_latents = record
    batched = sample_images(pipe, ["a cat", "a dog"], [0, 0], FAST, batch_size=2)
    single = sample_images(pipe, ["a dog"], [0], FAST, batch_size=1)
    other_seed = sample_images(pipe, ["a dog"], [1], FAST, batch_size=1)
    torch.testing.assert_close(seen[0][0], seen[0][1])  # both prompts of the batch: the same noise
    torch.testing.assert_close(seen[0][1], seen[1][0])  # and the same as a batch of one
    assert not torch.equal(seen[1][0], seen[2][0])
    np.testing.assert_allclose(np.asarray(batched[1], dtype=float), np.asarray(single[0], dtype=float), atol=2)
    assert batched[0].size == (32, 32) and other_seed[0].size == (32, 32)


def test_lora_variant_changes_the_images_and_is_unloaded_afterwards(model_dirs):
    device = torch.device("cpu")
    pipe = load_base_pipeline(model_dirs["base"], FAST, device)
    before = np.asarray(sample_images(pipe, ["a cat"], [0], FAST)[0])
    with variant_pipeline(pipe, ModelSpec("lora", model_dirs["lora"]), FAST, device) as lora_pipe:
        with_lora = np.asarray(sample_images(lora_pipe, ["a cat"], [0], FAST)[0])
    after = np.asarray(sample_images(pipe, ["a cat"], [0], FAST)[0])
    assert not np.array_equal(before, with_lora)
    np.testing.assert_array_equal(before, after)


def test_unknown_model_folder_says_what_it_expected(tmp_path):
    os.makedirs(tmp_path / "empty")
    spec = ModelSpec("x", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="model_index.json"):
        with variant_pipeline(None, spec, FAST, torch.device("cpu")):
            pass
    assert ModelSpec.parse("dpo=/a/b") == ModelSpec("dpo", "/a/b")
    assert ModelSpec.parse("/a/ckpt/") == ModelSpec("ckpt", "/a/ckpt/")


class RednessScorer(Scorer):
    """Mean red minus mean blue channel, in [−1, 1]: cheap, deterministic, and differs between models."""

    name = "redness"
    scale = "mean(R - B) / 255"

    def score(self, images, prompts) -> torch.Tensor:
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float64) for image in images]
        return torch.tensor([(a[..., 0] - a[..., 2]).mean() / 255 for a in arrays])


register_scorer("test-redness", RednessScorer, overwrite=True)


@pytest.fixture
def count_calls(monkeypatch):
    """Count StableDiffusionPipeline calls; ``fail_after`` makes the call after that many raise (an interruption)."""
    state = {"calls": 0, "fail_after": None}
    original = StableDiffusionPipeline.__call__

    def counted(self, *args, **kwargs):
        if state["fail_after"] is not None and state["calls"] >= state["fail_after"]:
            raise KeyboardInterrupt("interrupted")
        state["calls"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counted)
    return state


def test_evaluate_writes_tables_plots_grid_and_a_second_run_generates_nothing(
    tmp_path, model_dirs, count_calls, monkeypatch, caplog
):
    pytest.importorskip("matplotlib")  # the `plots` extra draws the interval plots this run writes
    out = str(tmp_path / "eval")
    kwargs = dict(
        prompts=["a red cube", "a blue ball", "a tree"],
        scorers=["test-redness"],
        output_dir=out,
        settings=FAST,
        batch_size=2,
        device="cpu",
        n_resamples=200,
        progress=False,
    )
    models = {"lora": model_dirs["lora"], "full": model_dirs["full"]}
    result = evaluate(model_dirs["base"], models, **kwargs)
    assert result.generated == {"base": 3, "lora": 3, "full": 3} and count_calls["calls"] == 6  # 2 batches x 3
    assert {(r.model, r.metric) for r in result.summary} == {(m, "redness") for m in ("base", "lora", "full")}
    assert [(r.model, r.opponent) for r in result.win_rates] == [("lora", "base"), ("full", "base"), ("full", "lora")]
    for name in (
        "scores.csv",
        "summary.csv",
        "summary.json",
        "win_rates.csv",
        "win_rates.json",
        "grid.png",
        "plots/redness.png",
        "run.json",
    ):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "scores.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and rows[0]["prompt"] == "a red cube" and rows[0]["seed"] == "0"
    base_red = RednessScorer()([Image.open(p) for p in result.image_paths["base"]], ["x"] * 3)
    assert [float(r["redness"]) for r in rows[:3]] == pytest.approx(base_red.tolist())
    assert result.scores["base"]["redness"] != result.scores["full"]["redness"]  # different UNets, other images

    count_calls["calls"] = 0
    with pytest.raises(FileExistsError, match=r"holds an earlier run's files \(run.json, scores.csv, summary.csv"):
        evaluate(model_dirs["base"], models, **kwargs)  # the first run's tables, before anything is sampled
    assert count_calls["calls"] == 0
    kwargs["overwrite"] = True
    again = evaluate(model_dirs["base"], models, **kwargs)
    assert count_calls["calls"] == 0 and again.generated == {"base": 0, "lora": 0, "full": 0}
    assert again.scores == result.scores

    # Without matplotlib (the plots extra; None in sys.modules is how a missing one imports) the tables stay.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    shutil.rmtree(os.path.join(out, "plots"))
    bare = evaluate(model_dirs["base"], models, **kwargs)
    assert (
        bare.scores == result.scores and os.path.isfile(bare.files["summary"]) and os.path.isfile(bare.files["grid"])
    )
    assert not os.path.exists(os.path.join(out, "plots")) and not [k for k in bare.files if k.startswith("plot/")]
    assert 'pip install "trl-diffusion-sdpo[plots]"' in caplog.text

    count_calls["calls"] = 0  # other settings are other images
    other = evaluate(model_dirs["base"], {}, **{**kwargs, "settings": GenerationSettings(3, height=32, width=32)})
    assert other.generated == {"base": 3} and count_calls["calls"] == 2


def test_an_interrupted_evaluation_resumes_where_it_stopped(tmp_path, model_dirs, count_calls):
    kwargs = dict(
        prompts=["p0", "p1", "p2", "p3"],
        scorers=["test-redness"],
        output_dir=str(tmp_path / "eval"),
        settings=FAST,
        batch_size=1,
        device="cpu",
        progress=False,
    )
    count_calls["fail_after"] = 3
    with pytest.raises(KeyboardInterrupt):
        evaluate(model_dirs["base"], {"lora": model_dirs["lora"]}, **kwargs)
    pngs = [f for _, _, files in os.walk(tmp_path / "eval" / "images") for f in files if f.endswith(".png")]
    assert len(pngs) == 3 and not any(f.endswith(".tmp") for _, _, fs in os.walk(tmp_path) for f in fs)
    count_calls.update(calls=0, fail_after=None)
    result = evaluate(model_dirs["base"], {"lora": model_dirs["lora"]}, **kwargs)  # it left no table: no overwrite
    assert result.generated == {"base": 1, "lora": 4} and count_calls["calls"] == 5


def test_evaluate_rejects_an_unknown_scorer_before_generating(tmp_path, model_dirs, count_calls):
    with pytest.raises(KeyError, match=r"scorer 'pickscor' is no registered scorer \(did you mean pickscore\?\)"):
        evaluate(model_dirs["base"], {}, prompts=["a"], scorers=["pickscor"], output_dir=str(tmp_path))
    assert count_calls["calls"] == 0


def test_cli_evaluate_end_to_end(tmp_path, model_dirs, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    out = tmp_path / "cli"
    code = main(
        [
            "evaluate",
            "--base",
            model_dirs["base"],
            "--model",
            f"lora={model_dirs['lora']}",
            "--prompts",
            str(prompts),
            "--scorer",
            "test-redness",
            "--output-dir",
            str(out),
            "--steps",
            "2",
            "--resolution",
            "32",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--bootstrap-resamples",
            "100",
            "--no-progress",
        ]
    )
    assert code == 0
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert {(r["model"], r["metric"]) for r in summary} == {("base", "redness"), ("lora", "redness")}
    with open(out / "win_rates.json") as f:
        assert [(r["model"], r["opponent"], r["n"]) for r in json.load(f)] == [("lora", "base", 2)]
    assert "lora vs base [redness]" in capsys.readouterr().out


def test_evaluate_and_pairs_pass_prompts_and_output_folder_and_turn_their_bars_off_off_a_terminal(monkeypatch):
    from trl_diffusion_sdpo.cli import evaluate as evaluate_command
    from trl_diffusion_sdpo.cli import pairs as pairs_command
    from trl_diffusion_sdpo.cli import sample

    class Called(Exception):
        """Ends the command where it hands its keywords to the library."""

    received = {}

    def recorder(command: str):
        def call(*args, **kwargs):
            received[command] = kwargs
            raise Called

        return call

    monkeypatch.setattr(evaluate_command, "evaluate", recorder("evaluate"))
    monkeypatch.setattr(pairs_command, "make_pairs", recorder("pairs"))
    for terminal in (False, True):
        monkeypatch.setattr(sample, "on_terminal", lambda terminal=terminal: terminal)
        for command in ("evaluate", "pairs"):
            with pytest.raises(Called):
                main([command, "--base", "b", "--prompts", "p.txt", "--output-dir", "out"])
            kwargs = received.pop(command)
            assert (kwargs["prompts"], kwargs["output_dir"], kwargs["progress"]) == ("p.txt", "out", terminal), command


def test_the_shared_sampling_flags_become_keywords_that_evaluate_and_make_pairs_both_take():
    import inspect

    from trl_diffusion_sdpo.cli.main import build_parser
    from trl_diffusion_sdpo.cli.sample import sampling_keywords
    from trl_diffusion_sdpo.evaluation.pairs import make_pairs

    flags = ["--prompt-column", "text", "--prompt-split", "test", "--limit", "3", "--cache-dir", "imgs", "--steps",
             "7", "--guidance-scale", "2.5", "--resolution", "64", "--scheduler", "model", "--dtype", "bfloat16",
             "--true-cfg-scale", "3.0", "--batch-size", "2", "--score-batch-size", "5", "--device", "cpu",
             "--no-progress", "--overwrite"]  # fmt: skip
    expected = {
        "settings": GenerationSettings(
            num_inference_steps=7,
            guidance_scale=2.5,
            height=64,
            width=64,
            scheduler="model",
            dtype="bfloat16",
            true_cfg_scale=3.0,
        ),
        "prompt_kwargs": {"column": "text", "split": "test", "limit": 3},
        "batch_size": 2,
        "score_batch_size": 5,
        "cache_dir": "imgs",
        "device": "cpu",
        "progress": False,
        "overwrite": True,
    }
    for command in ("evaluate", "pairs"):
        assert sampling_keywords(build_parser().parse_args([command, "--base", "b", *flags])) == expected, command
    defaults = sampling_keywords(build_parser().parse_args(["pairs", "--base", "b"]))
    assert defaults.pop("settings") == GenerationSettings()  # the authors' protocol: Euler, 50 steps, guidance 8.5
    assert defaults.pop("prompt_kwargs") == {}
    for function in (evaluate, make_pairs):
        signature = inspect.signature(function)
        signature.bind("b", **expected)  # raises TypeError on a keyword the function lacks
        assert defaults == {name: signature.parameters[name].default for name in defaults}, function.__name__


def test_scorer_arg_flags_are_parsed_and_a_flag_for_a_scorer_not_run_is_refused_by_both_commands():
    from trl_diffusion_sdpo.cli.main import main, scorer_arguments

    parsed = scorer_arguments(
        ["hpsv3.checkpoint=/m/HPSv3", "hpsv3.batch_size=4", "pickscore.x=[1, 2]"], ["hpsv3", "pickscore"]
    )
    assert parsed == {"hpsv3": {"checkpoint": "/m/HPSv3", "batch_size": 4}, "pickscore": {"x": [1, 2]}}
    with pytest.raises(SystemExit, match="should read NAME.KEY=VALUE"):
        scorer_arguments(["hpsv3=1"], ["hpsv3"])
    # Refused before any model is loaded (the base folder does not exist), naming the flag and the scorers run.
    for argv in (
        ["evaluate", "--base", "missing", "--scorer", "pickscore", "--scorer-arg", "hps.version=v2.1"],
        ["evaluate", "--base", "missing", "--scorer-arg", "hps.version=v2.1"],  # the default scorer, pickscore
        ["pairs", "--base", "missing", "--scorer", "pickscore", "--scorer-arg", "hps.version=v2.1"],
    ):
        with pytest.raises(SystemExit, match=r"--scorer_arg names \['hps'\], but the scorers are \['pickscore'\]"):
            main(argv)


class DeviceRecordingScorer(RednessScorer):
    name = "device_recording"
    devices: list = []

    def __init__(self, device=None) -> None:
        DeviceRecordingScorer.devices.append(device)


register_scorer("test-device", DeviceRecordingScorer, overwrite=True)


def test_evaluate_hands_its_device_to_scorers_that_take_one(tmp_path, model_dirs):
    DeviceRecordingScorer.devices.clear()
    evaluate(
        model_dirs["base"],
        {},
        prompts=["a"],
        scorers=["test-device", "test-redness"],
        settings=FAST,
        output_dir=str(tmp_path),
        device="cpu",
        n_resamples=10,
        progress=False,
    )
    assert DeviceRecordingScorer.devices == ["cpu"]  # and RednessScorer(), which takes none, was built without it


def test_sdxl_sampling_encodes_the_empty_negative_prompt_at_the_requested_size(tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from trl_diffusion_sdpo.evaluation.generation import _prepare
    from trl_diffusion_sdpo.testing import build_tiny_sdxl_pipeline

    pipe = _prepare(build_tiny_sdxl_pipeline(tokenizer_dir=str(tmp_path)), FAST, torch.device("cpu"))
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and native_resolution(pipe) == 64
    negatives = []
    original = StableDiffusionXLPipeline.encode_prompt

    def record(self, *args, **kwargs):
        negatives.append(kwargs.get("negative_prompt"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "encode_prompt", record)
    images = sample_images(pipe, ["a cat", "a dog"], [0, 0], FAST, batch_size=2)
    # "" is encoded by both text encoders; None would make SDXL use zero embeddings (force_zeros_for_empty_prompt).
    assert negatives == [["", ""]] and pipe.config.force_zeros_for_empty_prompt
    assert [image.size for image in images] == [(32, 32), (32, 32)]


# by default a half of the grid in which every family and every layout appears; the rest: slow
@pytest.mark.parametrize(
    ("layout", "family"),
    [
        pytest.param("output_folder", "sd3", marks=pytest.mark.slow),
        ("output_folder", "flux"),
        ("transformer_folder", "sd3"),
        pytest.param("transformer_folder", "flux", marks=pytest.mark.slow),
    ],
)
def test_a_flow_model_full_tuning_output_is_evaluated_with_its_transformer(tmp_path, family, layout):
    """SD3/FLUX full tuning saves ``transformer/`` (no ``unet/``): evaluate swaps it into the base pipeline."""
    from trl_diffusion_sdpo.testing import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    build = build_tiny_sd3_pipeline if family == "sd3" else build_tiny_flux_pipeline
    build(seed=0, tokenizer_dir=str(tmp_path / "tok")).save_pretrained(str(tmp_path / "base"))
    tuned = build(seed=1, tokenizer_dir=str(tmp_path / "tok1")).transformer
    tuned.save_pretrained(str(tmp_path / "out" / "transformer"))  # what save_model writes for a full-tuned model
    path = tmp_path / "out" if layout == "output_folder" else tmp_path / "out" / "transformer"
    device = torch.device("cpu")
    base = load_base_pipeline(str(tmp_path / "base"), FAST, device)
    before = np.asarray(sample_images(base, ["a cat"], [0], FAST)[0])
    with variant_pipeline(base, ModelSpec("full", str(path)), FAST, device) as pipe:
        assert type(pipe) is type(base) and pipe.transformer is not base.transformer
        for key, value in tuned.state_dict().items():
            torch.testing.assert_close(pipe.transformer.state_dict()[key], value)
        tuned_images = np.asarray(sample_images(pipe, ["a cat"], [0], FAST)[0])
    assert not np.array_equal(before, tuned_images)


def test_a_transformer_output_is_refused_for_a_unet_base(tmp_path, model_dirs):
    from trl_diffusion_sdpo.testing import build_tiny_sd3_pipeline

    build_tiny_sd3_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok")).transformer.save_pretrained(
        str(tmp_path / "out" / "transformer")
    )
    base = load_base_pipeline(model_dirs["base"], FAST, torch.device("cpu"))
    with pytest.raises(ValueError, match="holds a transformer"):
        with variant_pipeline(base, ModelSpec("x", str(tmp_path / "out")), FAST, torch.device("cpu")):
            pass


def test_evaluate_help_lists_the_registered_scorers_and_prompt_presets(capsys):
    from trl_diffusion_sdpo.evaluation import PROMPT_PRESETS, available_scorers

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    packed = "".join(out.split())  # argparse wraps lines, also at the hyphen of clip-cosine
    assert "registered:" + ",".join(available_scorers()) + ";" in packed  # read from the registry when asked
    assert "Preset(" + ",".join(PROMPT_PRESETS) + ")" in packed
    assert "%%" not in out and "95%intervals" in packed and "transformer/" in out


def test_hpdv3_preset_reads_the_test_pairs_prompts_deduplicated_from_a_local_copy(tmp_path):
    """HPDv3's test.json as published: a JSON array of pair records (``path1`` preferred); each prompt once, in the
    order of its first pair. A record without a string prompt is named."""
    records = [
        {
            "prompt": "a cat",
            "choice_dist": [12, 7],
            "confidence": 0.99,
            "path1": "images/1.jpg",
            "path2": "images/2.jpg",
            "model1": "flux",
            "model2": "infinity",
        },
        {
            "prompt": "a dog",
            "choice_dist": None,
            "confidence": None,
            "path1": "images/3.jpg",
            "path2": "images/4.jpg",
            "model1": "mj",
            "model2": "sd3",
        },
        {
            "prompt": "a cat",
            "choice_dist": [9, 1],
            "confidence": 0.9,
            "path1": "images/5.jpg",
            "path2": "images/6.jpg",
            "model1": "kolors",
            "model2": "flux",
        },
    ]
    (tmp_path / "test.json").write_text(json.dumps(records))
    (tmp_path / "train.json").write_text(json.dumps([{"prompt": "not the test split"}]))
    assert load_prompts("hpdv3", path=str(tmp_path)) == ["a cat", "a dog"]
    assert load_prompts("hpdv3", path=str(tmp_path), deduplicate=False) == ["a cat", "a dog", "a cat"]
    records[1] = {"caption": "a dog", "path1": "images/3.jpg", "path2": "images/4.jpg"}
    (tmp_path / "test.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"record 1 has no string 'prompt' \(found \['caption', 'path1', 'path2'\]\)"):
        load_prompts("hpdv3", path=str(tmp_path))
    os.remove(tmp_path / "test.json")
    with pytest.raises(FileNotFoundError, match="test.json"):
        load_prompts("hpdv3", path=str(tmp_path))
