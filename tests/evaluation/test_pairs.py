"""``pairs``: K samples per prompt from the tiny SD pipeline, scored by a test scorer, paired above a margin, written
as a dataset the trainer reads; pair choice checked against a brute-force computation, resumption by counting calls."""

from __future__ import annotations

import io
import itertools
import json
import os
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from tests.helpers.common import lora_config
from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.data.formats import load_preference_dataset
from trl_diffusion_sdpo.evaluation import GenerationSettings
from trl_diffusion_sdpo.evaluation.pairs import make_pairs, margin_summary, select_pairs
from trl_diffusion_sdpo.rewards.scorers import Scorer, register_scorer
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline
from trl_diffusion_sdpo.trainer import DiffusionSDPOTrainer

FAST = GenerationSettings(num_inference_steps=2, height=32, width=32)
PROMPTS = ["a red cube", "a blue ball", "a green tree"]


def redness(image: Image.Image) -> float:
    """The test's own computation of the score: mean of R minus mean of B, over 255."""
    array = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float((array[..., 0] - array[..., 2]).mean() / 255)


class CountingRedness(Scorer):
    name = "pairs-redness"
    scale = "mean(R - B) / 255"
    calls = 0

    def score(self, images, prompts) -> torch.Tensor:
        type(self).calls += len(images)
        return torch.tensor([redness(image) for image in images])


register_scorer("pairs-redness", CountingRedness, overwrite=True)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pairs-models")
    build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(root / "tok")).save_pretrained(str(root / "base"))
    build_tiny_sd_pipeline(seed=1, tokenizer_dir=str(root / "tok1")).unet.save_pretrained(str(root / "full" / "unet"))
    return {"base": str(root / "base"), "full": str(root / "full")}


@pytest.fixture
def count_calls(monkeypatch):
    state = {"calls": 0}
    original = StableDiffusionPipeline.__call__

    def counted(self, *args, **kwargs):
        state["calls"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counted)
    return state


def brute_force_pairs(scores: list[float], mode: str, margin: float) -> list[tuple[int, int]]:
    """Every ordered pair above the margin; for best-worst, the one with the largest gap if it is above."""
    ordered = [(i, j) for i, j in itertools.permutations(range(len(scores)), 2) if scores[i] - scores[j] > margin]
    if mode == "all":
        return sorted(ordered)
    widest = max(itertools.permutations(range(len(scores)), 2), key=lambda p: scores[p[0]] - scores[p[1]])
    return [widest] if widest in ordered else []


@pytest.mark.parametrize("mode", ["best-worst", "all"])
@pytest.mark.parametrize("margin", [0.0, 0.35, 0.79, 0.8])
def test_select_pairs_keeps_the_pairs_above_the_margin(mode, margin):
    scores = [0.3, 0.9, 0.1, 0.5, 0.5]
    assert sorted(select_pairs(scores, mode, margin)) == brute_force_pairs(scores, mode, margin)
    assert select_pairs([0.5, 0.5], mode, 0.0) == []  # a tie is no preference
    assert select_pairs([float("nan"), 0.2, 0.1], mode, 0.0) == [(1, 2)]  # a failed score is never paired


def test_select_pairs_and_summary_on_known_values():
    assert select_pairs([0.3, 0.9, 0.1, 0.5], "best-worst", 0.35) == [(1, 2)]
    assert sorted(select_pairs([0.3, 0.9, 0.1, 0.5], "all", 0.35)) == [(1, 0), (1, 2), (1, 3), (3, 2)]
    summary = margin_summary([0.1, 0.2, 0.3, 0.4, 0.5], 6, ["p"])
    assert summary["pairs"] == 5 and summary["prompts_with_pair"] == 5 and summary["margin_mean"] == pytest.approx(0.3)
    assert summary["q50"] == pytest.approx(0.3) and summary["q25"] == pytest.approx(0.2)
    assert summary["q10"] == pytest.approx(0.14) and summary["prompts_without_pair"] == ["p"]
    with pytest.raises(ValueError, match=re.escape("mode must be one of ['best-worst', 'all'], got 'best'.")):
        select_pairs([1.0, 0.0], "best", 0.0)
    with pytest.raises(ValueError, match="margin"):
        select_pairs([1.0, 0.0], "all", -0.1)


def _decoded(value) -> Image.Image:
    return value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value["bytes"]))


def test_pairs_are_the_right_ones_and_a_rerun_samples_and_scores_nothing(tmp_path, model_dirs, count_calls):
    out = str(tmp_path / "round0")
    kwargs = dict(prompts=PROMPTS, num_images=3, scorer="pairs-redness", mode="all", output_dir=out, seed=5,
                  settings=FAST, batch_size=3, device="cpu", progress=False)  # fmt: skip
    CountingRedness.calls = 0
    result = make_pairs(model_dirs["base"], **kwargs)
    assert count_calls["calls"] == 3 and result.generated == 9 and CountingRedness.calls == 9  # one batch per seed set

    # Scores recomputed from the cached images; pairs from the brute force; the dataset as the trainer loads it.
    scores = [[redness(Image.open(p)) for p in paths] for paths in result.image_paths]
    assert sum(result.scores, []) == pytest.approx(sum(scores, []))
    assert len({s for row in scores for s in row}) == 9  # distinct seeds give distinct images
    expected = [(p, i, j) for p, row in zip(PROMPTS, scores) for i, j in brute_force_pairs(row, "all", 0.0)]
    dataset = load_preference_dataset(result.dataset_dir)
    assert sorted((r["prompt"], r["chosen_seed"] - 5, r["rejected_seed"] - 5) for r in dataset) == sorted(expected)
    for row in dataset:
        k = PROMPTS.index(row["prompt"])
        i, j = row["chosen_seed"] - 5, row["rejected_seed"] - 5
        assert row["chosen_score"] == pytest.approx(scores[k][i])
        assert row["rejected_score"] == pytest.approx(scores[k][j])
        assert row["margin"] == row["chosen_score"] - row["rejected_score"] > 0
        assert np.array_equal(np.asarray(_decoded(row["chosen"])), np.asarray(Image.open(result.image_paths[k][i])))
        assert np.array_equal(np.asarray(_decoded(row["rejected"])), np.asarray(Image.open(result.image_paths[k][j])))
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["pairs"] == len(expected) == len(dataset)

    # A rerun with a margin between the prompts' widest gaps: nothing sampled or scored, the narrow prompts dropped.
    count_calls["calls"] = CountingRedness.calls = 0
    gaps = sorted((max(row) - min(row), p) for p, row in zip(PROMPTS, scores))
    margin = (gaps[0][0] + gaps[1][0]) / 2
    with pytest.raises(FileExistsError, match="holds an earlier run's files \\(dataset\\)"):  # the first run's pairs
        make_pairs(model_dirs["base"], **{**kwargs, "mode": "best-worst", "margin": margin})
    again = make_pairs(model_dirs["base"], **{**kwargs, "mode": "best-worst", "margin": margin, "overwrite": True})
    assert count_calls["calls"] == 0 and again.generated == 0 and CountingRedness.calls == 0
    assert again.summary["prompts_without_pair"] == [gaps[0][1]] and again.summary["pairs"] == 2
    kept = load_preference_dataset(again.dataset_dir)
    assert sorted(kept["margin"]) == pytest.approx([g for g, _ in gaps[1:]])
    assert min(kept["margin"]) > margin
    with pytest.raises(ValueError, match="No pair .* margin=1.0"):  # nothing above: no (stale) dataset is left
        make_pairs(model_dirs["base"], **{**kwargs, "margin": 1.0, "overwrite": True})
    assert not os.path.exists(again.dataset_dir) and count_calls["calls"] == 0


def test_make_pairs_refuses_an_unknown_mode_before_sampling(tmp_path, model_dirs, count_calls):
    with pytest.raises(ValueError, match=re.escape("mode must be one of ['best-worst', 'all'], got 'best'.")):
        make_pairs(model_dirs["base"], prompts=PROMPTS, num_images=2, scorer="pairs-redness", mode="best",
                   output_dir=str(tmp_path / "p"), settings=FAST, device="cpu", progress=False)  # fmt: skip
    assert count_calls["calls"] == 0 and not os.path.exists(tmp_path / "p" / "images")


def test_the_pairs_dataset_trains_smpo_with_its_scores(tmp_path, model_dirs, make_config):
    result = make_pairs(model_dirs["base"], prompts=PROMPTS[:2], num_images=2, scorer="pairs-redness",
                        output_dir=str(tmp_path / "p"), settings=FAST, batch_size=2, device="cpu",
                        progress=False)  # fmt: skip
    dataset = load_preference_dataset(result.dataset_dir)
    dataset = dataset.rename_columns({"chosen_score": "score_0", "rejected_score": "score_1"})  # the schema's names
    assert len(dataset) == 2
    args = make_config(max_steps=1, loss_type="smpo", smpo_score_min=-1.0, smpo_score_max=1.0)
    trainer = DiffusionSDPOTrainer(
        build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok")),
        args=args,
        train_dataset=dataset,
        peft_config=lora_config(),
    )
    seen = []
    inner = trainer.objective

    class Recording:
        def __getattr__(self, name):
            return getattr(inner, name)

        def __call__(self, predictions, errors, *, pair_scores=None):
            seen.append(pair_scores.detach().cpu().clone())
            return inner(predictions, errors, pair_scores=pair_scores)

    trainer.objective = Recording()
    trainer.train()
    assert trainer.state.global_step == 1
    written = sorted(zip(dataset["score_0"], dataset["score_1"]))
    got = sorted(map(tuple, torch.cat(seen).tolist()))  # (winner, loser) as written, float32 on the way
    assert len(got) == len(written)
    for pair, expected in zip(got, written):
        assert pair == pytest.approx(expected)


def test_cli_pairs_samples_from_a_tuned_model_and_prints_the_margins(tmp_path, model_dirs, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    common = ["--prompts", str(prompts), "--num-images", "2", "--scorer", "pairs-redness", "--steps", "2",
              "--resolution", "32", "--batch-size", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(["pairs", "--base", model_dirs["base"], "--output-dir", str(tmp_path / "b"), *common]) == 0
    printed = capsys.readouterr().out
    assert "pairs from" in printed and "margin: mean" in printed and "--dataset_name" in printed
    assert main(["pairs", "--base", model_dirs["base"], "--model", model_dirs["full"], "--output-dir",
                 str(tmp_path / "t"), *common]) == 0  # fmt: skip
    base_rows = load_preference_dataset(str(tmp_path / "b" / "dataset"))
    tuned_rows = load_preference_dataset(str(tmp_path / "t" / "dataset"))
    assert base_rows["chosen_score"] != tuned_rows["chosen_score"]  # another UNet, other samples
    with open(tmp_path / "t" / "run.json") as f:
        assert json.load(f)["model"]["path"] == model_dirs["full"]
    with pytest.raises(SystemExit, match="hpsv3"):
        main(["pairs", "--base", model_dirs["base"], "--scorer-arg", "hpsv3.base=x", *common])
