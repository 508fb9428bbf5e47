"""Preference pairs from the base model: sample two images per prompt, rank them with the colour reward."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from diffusers import StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from .shapes import Caption, colour_reward

__all__ = ["make_preference_pairs", "sample_images"]


@torch.no_grad()
def sample_images(
    pipeline: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 64,
    desc: str | None = None,
) -> np.ndarray:
    """One image per ``(prompt, seed)``: ``[N, H, W, 3]`` floats in [0, 1]. Same prompt and seed, same image."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    pipeline.set_progress_bar_config(disable=True)
    chunks = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=True if desc is None else None, dynamic_ncols=True):
        stop = start + batch_size
        generators = [torch.Generator().manual_seed(s) for s in seeds[start:stop]]
        out = pipeline(
            prompt=prompts[start:stop],
            generator=generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type="np",
        )
        chunks.append(out.images)
    return np.clip(np.concatenate(chunks), 0.0, 1.0)


def to_pil(image: np.ndarray) -> Image.Image:
    """``[H, W, 3]`` floats in [0, 1] -> an 8-bit RGB PIL image."""
    return Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8))


@dataclass
class PairStats:
    """What pair construction produced (reported in ``summary.json``)."""

    num_sampled: int
    num_kept: int
    mean_reward_chosen: float
    mean_reward_rejected: float
    mean_margin: float


def make_preference_pairs(
    pipeline: StableDiffusionPipeline,
    captions: list[Caption],
    pairs_per_prompt: int,
    min_margin: float,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    scores: bool = False,
) -> tuple[Dataset, PairStats]:
    """Sample two images per pair from ``pipeline``; the higher colour reward is ``chosen``.

    Pairs whose rewards differ by less than ``min_margin`` are dropped (near-ties carry no preference, as Pick-a-Pic
    ties are dropped). Returns a TRL-form dataset (``prompt``, ``chosen``, ``rejected`` as PIL images); with
    ``scores``, also the colour rewards of the two images as ``score_0`` (chosen) and ``score_1`` (rejected), the
    score columns SmPO weights its pairs with (the demo's own run does not use them).
    """
    pair_captions = [c for c in captions for _ in range(pairs_per_prompt)]
    prompts = [c.text for c in pair_captions for _ in range(2)]
    seeds = [seed + i for i in range(len(prompts))]
    images = sample_images(
        pipeline, prompts, seeds, num_inference_steps, guidance_scale, desc="Sampling preference pairs"
    )
    rewards = colour_reward(images, [c for c in pair_captions for _ in range(2)]).reshape(-1, 2)
    images = images.reshape(len(pair_captions), 2, *images.shape[1:])
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    chosen_rewards, rejected_rewards = [], []
    for caption, pair, reward in zip(pair_captions, images, rewards):
        if abs(reward[0] - reward[1]) < min_margin:
            continue
        win = int(reward[1] > reward[0])
        rows["prompt"].append(caption.text)
        rows["chosen"].append(to_pil(pair[win]))
        rows["rejected"].append(to_pil(pair[1 - win]))
        chosen_rewards.append(reward[win])
        rejected_rewards.append(reward[1 - win])
    if not rows["prompt"]:
        raise ValueError(f"No pair has a reward margin of at least {min_margin}; lower min_margin")
    stats = PairStats(
        num_sampled=len(pair_captions),
        num_kept=len(rows["prompt"]),
        mean_reward_chosen=float(np.mean(chosen_rewards)),
        mean_reward_rejected=float(np.mean(rejected_rewards)),
        mean_margin=float(np.mean(np.array(chosen_rewards) - np.array(rejected_rewards))),
    )
    if scores:
        rows["score_0"], rows["score_1"] = [float(r) for r in chosen_rewards], [float(r) for r in rejected_rewards]
    return Dataset.from_dict(rows), stats
