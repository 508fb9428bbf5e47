"""Evaluation of text-to-video models (Wan, HunyuanVideo 1.5): sample clips with the pipeline, score them frame by
frame with the image scorers, a clip's score being the mean over its frames.

A frame-wise image reward measures per-frame quality and prompt alignment, not motion or temporal consistency;
docs/wan.md lists the video reward models (VideoReward / VideoAlign, VideoScore) and what adding one would take.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..rewards.scorers.base import Scorer

__all__ = ["sample_videos", "score_videos"]


def sample_videos(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_frames: int,
    height: int,
    width: int,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    negative_prompt: str = "",
    max_sequence_length: int | None = None,
) -> list[list[Image.Image]]:
    """One clip (a list of ``num_frames`` RGB frames) per (prompt, seed) pair, in order; each clip is sampled alone
    with a CPU generator seeded by its seed, so equal seeds give every prompt the same initial noise on any device.
    Defaults: 50 steps, the pipeline's own scheduler and guidance (``guidance_scale=None``: Wan's ``__call__``
    default 5.0, HunyuanVideo 1.5's guider, 6.0 as shipped). A pipeline that guides through a ``guider`` component
    (HunyuanVideo 1.5) samples with a copy of it at ``guidance_scale``; its own guider is put back afterwards."""
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts and {len(seeds)} seeds; they are paired.")
    extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    guider = getattr(pipe, "guider", None)
    swap = guidance_scale is not None and "guidance_scale" not in inspect.signature(pipe.__call__).parameters
    if guidance_scale is not None and not swap:
        extra["guidance_scale"] = guidance_scale
    elif swap and guider is None:
        raise ValueError(f"{type(pipe).__name__} takes no guidance_scale and has no guider; leave guidance_scale None")
    videos: list[list[Image.Image]] = []
    try:
        if swap:
            pipe.guider = guider.new(guidance_scale=guidance_scale)
        for prompt, seed in zip(prompts, seeds):
            output = pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                num_frames=num_frames,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                generator=torch.Generator("cpu").manual_seed(int(seed)),
                output_type="np",
                **extra,
            )
            frames = np.asarray(output.frames[0])  # [F, H, W, 3] in [0, 1]
            videos.append([Image.fromarray((frame * 255).round().clip(0, 255).astype(np.uint8)) for frame in frames])
    finally:
        if swap:
            pipe.guider = guider
    return videos


def score_videos(scorer: Scorer, videos: Sequence[Sequence[Image.Image]], prompts: Sequence[str]) -> torch.Tensor:
    """``[len(videos)]`` float32: each clip's frames scored with its prompt by ``scorer``, averaged over frames."""
    if len(videos) != len(prompts):
        raise ValueError(f"{scorer.name}: got {len(videos)} videos but {len(prompts)} prompts; they are paired.")
    scores = [scorer(list(frames), [prompt] * len(frames)).double().mean() for frames, prompt in zip(videos, prompts)]
    return torch.stack(scores).float() if scores else torch.zeros(0)
