"""The generation stage of online training: a micro-batch of prompts becomes a micro-batch of preference pairs.

    prompts -> K samples each (the policy, eval mode, no gradient, adapters on; seeded per image)
    -> decoded images -> rewards -> pairs (best-worst, or all above the margin) -> the pairs' clean latents

The pairs leave in the latent cache's batch form (``latent_mean``/``latent_std`` ``[P, 2, C, h, w]``, the prompt
embeddings, ``time_ids``), so the offline step trains on them unchanged. Where the family's pipeline ends its
sampler with latents in the denoiser's layout (``ModelFamily.sampled_latents_are_denoiser_latents``: SD, SDXL, SD3)
those are the pairs' latents (``latent_std`` zero), not a VAE round trip of the decoded images; any other family's
paired images are encoded again from their decoded pixels.

Every image's noise comes from its own generator, seeded from the run's seed, the generation's index, the prompt's
row in the global micro-batch and the sample's index: the samples do not depend on the number of processes, on
``generation_batch_size``, or on a resume.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.transforms import image_pixels
from ..evaluation.pairs import select_pairs
from ..families import ModelFamily, PromptEmbeddings
from ..families.latents import unscale_latents
from ..rewards import RewardFunctions
from ..step.stages import fixed_time_ids

__all__ = ["GeneratedPairs", "GenerationSettings", "GenerationStage", "image_seed", "sample_diversity", "select_pairs"]

logger = logging.getLogger(__name__)

PROMPT_COLUMN = "prompt"


def image_seed(seed: int, generation: int, row: int, sample: int) -> int:
    """The noise seed of sample ``sample`` of the prompt at row ``row`` of the global micro-batch, in generation
    ``generation`` (independent streams: numpy's ``SeedSequence`` over the four integers)."""
    return int(np.random.SeedSequence([seed, generation, row, sample]).generate_state(1, dtype=np.uint32)[0])


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """What the stage samples and how it pairs: the config's fields of the same names, and the guidance scale.

    Keyword-only, so that the fields stand in those two groups rather than in the order their defaults impose."""

    # what each prompt's samples are
    num_generations: int
    resolution: int
    sample_steps: int | None = None
    sample_guidance_scale: float | None = None
    seed: int
    generation_batch_size: int | None = None  # images per sampling call: memory only, the samples do not depend on it
    # how they become pairs, and what latents a pair trains on
    pair_mode: str
    reward_margin: float
    pair_latents: str = "sampled"

    @classmethod
    def from_config(cls, args, family: ModelFamily) -> GenerationSettings:
        """The config's values; the guidance, where the config leaves it, the family's sampling default."""
        settings = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
        if settings.sample_guidance_scale is None:
            settings = dataclasses.replace(settings, sample_guidance_scale=family.sampling_guidance_scale())
        return settings


@dataclass
class GeneratedPairs:
    """One micro-batch's generation: the pair batch (the latent cache's form) and what to log about it."""

    batch: dict[str, Any]
    rewards: torch.Tensor  # [N, K] every sample's reward (float64)
    per_function: dict[str, torch.Tensor]  # name -> [N, K]
    pairs: list[tuple[int, int, int]]  # (prompt row, chosen sample, rejected sample)
    diversity: torch.Tensor  # [N]: the RMS pixel distance between two samples of the prompt, averaged over pairs
    seconds: float
    images: list[list[Image.Image]] = field(default_factory=list)  # [N][K]

    @property
    def num_prompts(self) -> int:
        return self.rewards.shape[0]

    def metrics(self) -> dict[str, torch.Tensor]:
        """The generation's metrics as scalars (float32), named as they are logged."""
        rewards = self.rewards
        chosen = torch.tensor([rewards[r, i] for r, i, _ in self.pairs], dtype=torch.float64)
        rejected = torch.tensor([rewards[r, j] for r, _, j in self.pairs], dtype=torch.float64)
        paired_rows = {r for r, _, _ in self.pairs}
        values = {
            "online/reward_mean": rewards.mean(),
            "online/reward_std": rewards.std(dim=1, unbiased=False).mean(),
            "online/prompts_without_pair": torch.tensor(1.0 - len(paired_rows) / max(self.num_prompts, 1)),
            "online/pairs": torch.tensor(float(len(self.pairs))),
            "online/diversity": self.diversity.mean(),
        }
        for name, scores in self.per_function.items():
            values[f"online/reward/{name}"] = scores.mean()
        if self.pairs:
            values["online/chosen_reward"] = chosen.mean()
            values["online/rejected_reward"] = rejected.mean()
            values["online/reward_margin"] = (chosen - rejected).mean()
        return {name: value.float() for name, value in values.items()}


def _pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """8-bit PIL images as ``[N, 3, H, W]`` floats in [-1, 1], as the collator reads dataset images."""
    return torch.stack([image_pixels(image.convert("RGB")) for image in images])


def sample_diversity(pixels: torch.Tensor) -> torch.Tensor:
    """Per prompt, the mean over its samples' pairs of the RMS distance of their pixels: ``pixels [P, S, ...]`` (``S``
    samples of each of ``P`` prompts, values in [0, 1]) -> ``[P]`` in float64."""
    prompts, samples = pixels.shape[:2]
    flat = pixels.double().reshape(prompts, samples, -1)
    distances = torch.cdist(flat, flat) / flat.shape[-1] ** 0.5
    return distances.sum(dim=(1, 2)) / (samples * (samples - 1))


class GenerationStage:
    """Samples, scores and pairs a micro-batch's prompts with the policy.

    Args:
        family: the model family; its pipeline samples (its denoiser is the policy, adapters included).
        rewards: the reward functions.
        settings: what to sample and how to pair.
        encode_prompts: ``prompts -> PromptEmbeddings`` (one row per prompt), the trainer's cached encoding.
        device: where the pair batch goes.
        autocast: the context the policy's forward runs under (the training's mixed precision).
    """

    def __init__(
        self,
        family: ModelFamily,
        rewards: RewardFunctions,
        settings: GenerationSettings,
        encode_prompts: Callable[[list[str]], PromptEmbeddings],
        device: torch.device | str,
        autocast: Callable[[], Any] | None = None,
    ) -> None:
        self.family, self.rewards, self.settings = family, rewards, settings
        self.encode_prompts, self.device = encode_prompts, device
        self.autocast = autocast
        self.direct_latents = settings.pair_latents == "sampled" and family.sampled_latents_are_denoiser_latents
        if settings.pair_latents == "sampled" and not self.direct_latents:
            logger.info(
                "%s: the paired images are encoded again from their decoded pixels (its pipeline's latents are not "
                "in the denoiser's layout).",
                type(family).__name__,
            )

    # ------------------------------------------------------------------ sampling

    def sample(
        self, prompts: list[str], generation: int, first_row: int
    ) -> tuple[list[list[Image.Image]], torch.Tensor | None]:
        """``(images [N][K], latents [N, K, ...] or None)``: K samples of each prompt; ``first_row`` is the first
        prompt's row in the global micro-batch."""
        s, pipeline = self.settings, self.family.pipeline
        k = s.num_generations
        seeds = [image_seed(s.seed, generation, first_row + r, j) for r in range(len(prompts)) for j in range(k)]
        chunk = s.generation_batch_size or len(prompts) * k
        # A call of whole prompts passes each prompt once with num_images_per_prompt=K: the pipeline encodes it once
        # and repeats its embeddings, the noise still drawn per image; a chunk that splits a prompt's samples passes
        # every sample's prompt.
        per_prompt = k if chunk % k == 0 else 1
        listed = prompts if per_prompt > 1 else [p for p in prompts for _ in range(k)]
        per_call = chunk // per_prompt  # entries of `listed` per call
        kwargs: dict[str, Any] = {"height": s.resolution, "width": s.resolution, "output_type": "pil"}
        if s.sample_steps is not None:
            kwargs["num_inference_steps"] = s.sample_steps
        if s.sample_guidance_scale is not None:
            kwargs["guidance_scale"] = s.sample_guidance_scale
        images: list[Image.Image] = []
        latents: list[torch.Tensor] = []
        denoiser = self.family.denoiser
        was_training = denoiser.training
        denoiser.eval()
        pipeline.set_progress_bar_config(disable=True)
        try:
            for start in range(0, len(listed), per_call):
                final: dict[str, torch.Tensor] = {}

                def keep(pipe, step, timestep, tensors, final=final):
                    final["latents"] = tensors["latents"]
                    return tensors

                call_seeds = seeds[start * per_prompt : (start + per_call) * per_prompt]
                generators = [torch.Generator().manual_seed(seed) for seed in call_seeds]
                context = self.autocast() if self.autocast is not None else torch.autocast("cpu", enabled=False)
                with torch.no_grad(), context:
                    out = pipeline(
                        prompt=listed[start : start + per_call],
                        num_images_per_prompt=per_prompt,
                        generator=generators,
                        callback_on_step_end=keep,
                        callback_on_step_end_tensor_inputs=["latents"],
                        **kwargs,
                    )
                images.extend(out.images)
                latents.append(final["latents"].detach().float())
        finally:
            denoiser.train(was_training)
        grouped = [images[r * k : (r + 1) * k] for r in range(len(prompts))]
        if not self.direct_latents:
            return grouped, None
        stacked = torch.cat(latents)
        return grouped, stacked.reshape(len(prompts), k, *stacked.shape[1:])

    # ------------------------------------------------------------------ the stage

    def __call__(self, inputs: dict[str, Any], generation: int, first_row: int) -> GeneratedPairs:
        """The pair batch of one micro-batch of prompt rows (``inputs``: the prompt collator's lists)."""
        started = time.perf_counter()
        prompts = list(inputs[PROMPT_COLUMN])
        columns = {name: list(values) for name, values in inputs.items() if name != PROMPT_COLUMN}
        images, latents = self.sample(prompts, generation, first_row)
        k = self.settings.num_generations
        flat_images = [image for samples in images for image in samples]
        flat_columns = {name: [v for v in values for _ in range(k)] for name, values in columns.items()}
        reward, per_function = self.rewards([p for p in prompts for _ in range(k)], flat_images, flat_columns)
        rewards = reward.reshape(len(prompts), k)
        pairs = [
            (row, i, j)
            for row in range(len(prompts))
            for i, j in select_pairs(rewards[row].tolist(), self.settings.pair_mode, self.settings.reward_margin)
        ]
        batch = self.pair_batch(prompts, images, latents, pairs)
        return GeneratedPairs(
            batch=batch,
            rewards=rewards,
            per_function={name: scores.reshape(len(prompts), k) for name, scores in per_function.items()},
            pairs=pairs,
            diversity=sample_diversity((torch.stack([_pixels(row) for row in images]) + 1) / 2),
            seconds=time.perf_counter() - started,
            images=images,
        )

    def pair_batch(
        self,
        prompts: list[str],
        images: list[list[Image.Image]],
        latents: torch.Tensor | None,
        pairs: list[tuple[int, int, int]],
    ) -> dict[str, Any]:
        """The pairs in the latent cache's batch form: ``latent_mean``/``latent_std`` ``[P, 2, C, h, w]`` (unscaled
        VAE latents, float32), ``prompt_embeds`` (and ``pooled_prompt_embeds``), ``time_ids [P, 2, 6]``."""
        if not pairs:
            return self.empty_batch()
        rows = [r for r, _, _ in pairs]
        if latents is not None:
            chosen = torch.stack([latents[r, i] for r, i, _ in pairs])
            rejected = torch.stack([latents[r, j] for r, _, j in pairs])
            scaled = torch.stack([chosen, rejected], dim=1)  # [P, 2, C, h, w], the denoiser's latent space
            shape = scaled.shape
            mean = unscale_latents(scaled.reshape(-1, *shape[2:]), self.family.latents_config()).reshape(shape)
            std = torch.zeros_like(mean)
        else:
            chosen_px = _pixels([images[r][i] for r, i, _ in pairs])
            rejected_px = _pixels([images[r][j] for r, _, j in pairs])
            vae = self.family.vae
            pixels = torch.cat([chosen_px, rejected_px]).to(vae.device)
            with torch.no_grad():
                m, sd = self.family.encode_moments(pixels)
            half = len(pairs)
            mean = torch.stack([m[:half], m[half:]], dim=1)
            std = torch.stack([sd[:half], sd[half:]], dim=1)
        return self._batch(mean, std, self.encode_prompts([prompts[r] for r in rows]))

    def empty_batch(self) -> dict[str, Any]:
        """A micro-batch without pairs (``time_ids`` with no row): the step leaves it out (one process) or replays
        with weight zero (several), as it does a micro-batch whose rows were all invalid."""
        return {
            "time_ids": torch.zeros(0, 2, 6, device=self.device),
            "num_skipped": torch.tensor(0.0, device=self.device),
            "skip_reasons": [],
        }

    def blank_batch(self) -> dict[str, Any]:
        """One placeholder pair (zero latents, the empty prompt), for a process whose first micro-batch has no pair
        while its peers train: it still runs the step's passes and collectives, with weight zero."""
        zeros = torch.zeros(1, 2, *self.family.latent_shape(self.settings.resolution))
        return self._batch(zeros, zeros, self.encode_prompts([""]))

    def _batch(self, mean: torch.Tensor, std: torch.Tensor, embeds: PromptEmbeddings) -> dict[str, Any]:
        """``P`` pairs' moments ``[P, 2, C, h, w]`` and prompt embeddings in the latent cache's batch form, with the
        uncropped square's ``time_ids``."""
        pairs = mean.shape[0]
        batch: dict[str, Any] = {
            "latent_mean": mean.to(self.device),
            "latent_std": std.to(self.device),
            "prompt_embeds": embeds.encoder_hidden_states,
            "time_ids": fixed_time_ids(self.settings.resolution, 2 * pairs, self.device).reshape(pairs, 2, 6),
            "num_skipped": torch.tensor(0.0, device=self.device),
            "skip_reasons": [],
        }
        if embeds.pooled is not None:
            batch["pooled_prompt_embeds"] = embeds.pooled
        return batch
