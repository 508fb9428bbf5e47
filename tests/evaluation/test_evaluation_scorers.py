"""The core's scorers (PickScore, CLIP score) load through their real loading code from local folders and compute
what their papers define; the registry builds custom scorers and names the known ones."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from tests.helpers.evaluation import coloured_images, save_tiny_clip
from trl_diffusion_sdpo.rewards.scorers import (
    CLIPScoreScorer,
    PickScoreScorer,
    Scorer,
    available_scorers,
    build_scorer,
    register_scorer,
)

torch.set_num_threads(1)
PROMPTS = ["a red cube", "two blue spheres", "a green field", "an orange cat"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return save_tiny_clip(str(tmp_path_factory.mktemp("clip")))


def reference_cosine(folder: str, images, prompts) -> torch.Tensor:
    """Through CLIPModel.forward: logits_per_image = logit_scale.exp() * cos, so its diagonal over the scale."""
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image.diagonal() / model.logit_scale.exp()


def test_pickscore_is_the_raw_cosine_by_default_and_x100_on_request(tiny_clip):
    images = coloured_images(4)
    expected = reference_cosine(tiny_clip, images, PROMPTS)
    raw = PickScoreScorer(model=tiny_clip, processor=tiny_clip, device="cpu")
    assert raw.scale == "raw cosine"
    torch.testing.assert_close(raw(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    x100 = PickScoreScorer(model=tiny_clip, processor=tiny_clip, multiplier="x100", device="cpu")
    assert x100.scale == "x100 cosine"
    torch.testing.assert_close(x100(images, PROMPTS), 100 * expected, atol=1e-3, rtol=1e-5)
    with pytest.raises(
        ValueError, match=re.escape("multiplier must be one of ['raw', 'x100', 'logit_scale'], got 'x10'.")
    ):
        PickScoreScorer(model=tiny_clip, processor=tiny_clip, multiplier="x10")


def test_clip_score_conventions_scale_and_clamp_the_mean_not_each_pair(tiny_clip):
    images = coloured_images(4)
    cosine = reference_cosine(tiny_clip, images, PROMPTS)
    torchmetrics = CLIPScoreScorer("torchmetrics", model=tiny_clip, device="cpu")
    sdpo = build_scorer("clip-cosine", model=tiny_clip, device="cpu")
    with pytest.raises(
        ValueError, match=re.escape("convention must be one of ['torchmetrics', 'cosine'], got 'openai'.")
    ):
        CLIPScoreScorer("openai", model=tiny_clip, device="cpu")
    torch.testing.assert_close(torchmetrics(images, PROMPTS), 100 * cosine, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(sdpo(images, PROMPTS), cosine, atol=1e-5, rtol=1e-5)
    assert (torchmetrics.name, sdpo.name) == ("clip", "clip_cosine")
    assert "x100" in torchmetrics.scale and "raw" in sdpo.scale
    mixed = torch.tensor([-3.0, 1.0])  # per-pair values keep their sign; only the mean is clamped
    assert torchmetrics.aggregate(mixed) == 0.0 and sdpo.aggregate(mixed) == -1.0
    assert torchmetrics.aggregate(torch.tensor([-1.0, 3.0])) == 1.0


class ConstantScorer(Scorer):
    name = "constant"
    scale = "units"

    def __init__(self, value: float = 1.0) -> None:
        self.value = value

    def score(self, images, prompts) -> torch.Tensor:
        return torch.full((len(images),), self.value)


def test_registry_builds_custom_scorers_and_names_the_known_ones_on_a_typo():
    register_scorer("test-constant", ConstantScorer, overwrite=True)
    scorer = build_scorer("test-constant", value=2.5)
    assert scorer(coloured_images(2), ["a", "b"]).tolist() == [2.5, 2.5]
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("test-constant", ConstantScorer)
    with pytest.raises(KeyError) as error:
        build_scorer("pickscor")
    for name in ("pickscore", "hpsv2", "imagereward", "aesthetic", "clip", "clip-cosine", "test-constant"):
        assert name in str(error.value) and name in available_scorers()
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer(coloured_images(2), ["a"])


class PairingScorer(Scorer):
    """The image's red value plus 1000 times the number in its prompt: a score that tells both apart."""

    name = "pairing"

    def score(self, images, prompts) -> torch.Tensor:
        return torch.tensor([image.getpixel((0, 0))[0] + 1000.0 * int(p) for image, p in zip(images, prompts)])


def test_score_files_pairs_each_file_with_its_prompt_across_batches(tmp_path):
    paths, prompts = [], []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(path)
        paths.append(str(path))
        prompts.append(str(i + 1))
    batches = list(PairingScorer().score_files(paths, prompts, batch_size=2, desc="test", progress=False))
    assert [len(b) for b in batches] == [2, 2, 1]  # one list per batch, as callers keep each before the next
    assert [v for b in batches for v in b] == [1000.0 * (i + 1) + 10 * i for i in range(5)]
