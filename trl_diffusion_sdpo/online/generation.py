"""The generation stage of online training: a micro-batch of prompts becomes a micro-batch of preference pairs.

    prompts (and an edit's source images) -> K samples each (the policy, eval mode, no gradient, adapters on;
    seeded per image) -> decoded images or clips -> rewards -> pairs (best-worst, or all above the margin)
    -> the pairs' clean latents (and an edit's source latents)

The pairs leave in the latent cache's batch form (``latent_mean``/``latent_std`` ``[P, 2, C, h, w]``, the prompt
embeddings, ``time_ids``), so the offline step trains on them unchanged. Where the family's pipeline ends its
sampler with latents in the denoiser's layout (``ModelFamily.sampled_latents_are_denoiser_latents``: SD, SDXL, SD3)
those are the pairs' latents (``latent_std`` zero), not a VAE round trip of the decoded images; any other family's
paired images are encoded again from their decoded pixels.

Each family's own pipeline samples, with the keywords its family gives
(:meth:`~trl_diffusion_sdpo.families.ModelFamily.sampling_keywords`): an editing family (FLUX.1 Kontext,
Qwen-Image-Edit and Plus, FLUX.2 with references) samples each prompt's K edits in one call with the row's sources
(``source_image`` or ``source_images``, resized and center-cropped at the training resolution, as offline data is),
and its pairs carry the sources' latents as the offline step encodes them; a video family (Wan, HunyuanVideo 1.5)
samples ``num_frames``-frame clips, and a clip's reward is the mean of the functions' scores of
``video_reward_frames`` of its frames, spaced uniformly from the first to the last. The reward functions receive the
sources as the ``source_images`` column (decoded, one list per image), as the offline scorers do.

With ``async_rewards`` the rewards run in a background thread: each sampling call's images are scored while the next
call samples (:meth:`GenerationStage.start` samples and submits, :meth:`GenerationStage.finish` waits for the scores
in submission order and pairs), and the trainer starts the next micro-batch of the optimizer step before finishing
this one. Scores are joined to images by submission order, never by arrival.

Every image's noise comes from its own generator, seeded from the run's seed, the generation's index, the prompt's
row in the global micro-batch and the sample's index: the samples do not depend on the number of processes, on
``generation_batch_size``, or on a resume.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.columns import SOURCE_IMAGE, SOURCE_IMAGES
from ..data.transforms import PairTransform, image_pixels, load_image, resized_size
from ..evaluation.pairs import select_pairs
from ..families import ModelFamily, PromptEmbeddings
from ..families.noising import unscale_latents
from ..rewards.functions import RewardFunctions
from ..step.stages import fixed_time_ids

__all__ = [
    "GeneratedPairs",
    "GenerationSettings",
    "GenerationStage",
    "PendingGeneration",
    "frame_indices",
    "image_seed",
    "sample_diversity",
    "select_pairs",
    "source_images",
]

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
    # when the rewards run: after the micro-batch's sampling, or in a background thread beside the next sampling call
    async_rewards: bool = False
    # video: frames scored per clip
    video_reward_frames: int | None = None

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
    images: list[list[Any]] = field(default_factory=list)  # [N][K]: PIL images, or a video family's lists of frames
    prompts: list[str] = field(default_factory=list)  # [N]

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


@dataclass
class PendingGeneration:
    """A micro-batch sampled, its scores submitted (one future per scoring call, in the images' order)."""

    prompts: list[str]
    images: list[list[Any]]  # [N][K]: images, or a video family's clips
    latents: torch.Tensor | None
    sources: list[list[Image.Image]] | None  # each prompt's source images (editing families)
    scores: list[Future]  # each: (reward, per function) of the next images in order
    seconds: float  # the sampling's

    def cancel(self) -> None:
        for future in self.scores:
            future.cancel()


def _pixels(images: Sequence[Any]) -> torch.Tensor:
    """8-bit PIL images as ``[N, 3, H, W]`` floats in [-1, 1], as the collator reads dataset images; clips (lists of
    frames) as ``[N, 3, F, H, W]``."""

    def one(item: Any) -> torch.Tensor:
        if isinstance(item, Image.Image):
            return image_pixels(item.convert("RGB"))
        return torch.stack([image_pixels(frame.convert("RGB")) for frame in item], dim=1)

    return torch.stack([one(item) for item in images])


def _center_square(image: Image.Image, resolution: int) -> Image.Image:
    """``image`` resized (shorter side ``resolution``, bilinear) and center-cropped to a square, as
    :class:`~trl_diffusion_sdpo.data.transforms.PairTransform` crops a source."""
    width, height = resized_size(*image.size, resolution)
    if (width, height) != image.size:
        image = image.resize((width, height), resample=Image.Resampling.BILINEAR)
    top, left = round((height - resolution) / 2), round((width - resolution) / 2)
    return image.crop((left, top, left + resolution, top + resolution))


def frame_indices(num_frames: int, count: int | None) -> list[int]:
    """The frames of a ``num_frames``-frame clip that its reward scores: ``count`` spaced uniformly from the first to
    the last (rounded to the nearest frame), or every frame for ``None`` or ``count >= num_frames``."""
    if count is None or count >= num_frames:
        return list(range(num_frames))
    if count == 1:
        return [0]
    return sorted({round(i * (num_frames - 1) / (count - 1)) for i in range(count)})


def source_images(columns: dict[str, list[Any]], settings: GenerationSettings) -> list[list[Image.Image]] | None:
    """Each prompt row's source images, decoded to RGB (``None`` for prompts without a source column); a ValueError
    names the column and row of a value that is no image."""
    single, several = SOURCE_IMAGE, SOURCE_IMAGES
    if single not in columns and several not in columns:
        return None
    column = single if single in columns else several
    out = []
    for row, value in enumerate(columns[column]):
        values = [value] if column == single else value
        if column == several and (isinstance(value, (str, bytes, dict)) or not value):
            raise ValueError(f"Prompt row {row}, column {column!r}: expected a non-empty list of source images")
        try:
            out.append([load_image(v) for v in values])
        except ValueError as err:
            raise ValueError(f"Prompt row {row}, column {column!r}: {err}") from None
    return out


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
        encode_prompts: ``(prompts, sources) -> PromptEmbeddings`` (one row per prompt), the trainer's cached
            encoding; ``sources`` (each prompt's source images, or None) for a family whose prompt encoding reads them.
        device: where the pair batch goes.
        autocast: the context the policy's forward runs under (the training's mixed precision).
    """

    def __init__(
        self,
        family: ModelFamily,
        rewards: RewardFunctions,
        settings: GenerationSettings,
        encode_prompts: Callable[..., PromptEmbeddings],
        device: torch.device | str,
        autocast: Callable[[], Any] | None = None,
    ) -> None:
        self.family, self.rewards, self.settings = family, rewards, settings
        self.encode_prompts, self.device = encode_prompts, device
        self.autocast = autocast
        # One thread: the calls are scored in order, and a local reward model is never called from two threads.
        self.scoring = ThreadPoolExecutor(1, thread_name_prefix="rewards") if settings.async_rewards else None
        self.direct_latents = settings.pair_latents == "sampled" and family.sampled_latents_are_denoiser_latents
        if settings.pair_latents == "sampled" and not self.direct_latents:
            logger.info(
                "%s: the paired images are encoded again from their decoded pixels (its pipeline's latents are not "
                "in the denoiser's layout).",
                type(family).__name__,
            )

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        prompts: list[str],
        generation: int,
        first_row: int,
        sources: list[list[Image.Image]] | None = None,
        on_images: Callable[[int, list[Any]], None] | None = None,
    ) -> tuple[list[list[Any]], torch.Tensor | None]:
        """``(samples [N][K], latents [N, K, ...] or None)``: K samples of each prompt (images, or a video family's
        clips), an edit's with its row's ``sources``; ``first_row`` is the first prompt's row in the global
        micro-batch. ``on_images(start, samples)`` receives each sampling call's samples (``start``: the first one's
        index) as soon as they are decoded."""
        s, pipeline, family = self.settings, self.family.pipeline, self.family
        k = s.num_generations
        seeds = [image_seed(s.seed, generation, first_row + r, j) for r in range(len(prompts)) for j in range(k)]
        chunk = min(s.generation_batch_size or len(prompts) * k, family.max_samples_per_call or len(prompts) * k)
        kwargs: dict[str, Any] = {"output_type": "pil"}
        if s.sample_steps is not None:
            kwargs["num_inference_steps"] = s.sample_steps
        if s.sample_guidance_scale is not None:
            kwargs["guidance_scale"] = s.sample_guidance_scale
        # One call per chunk: (prompt(s), the samples' indices, the family's keywords). An edit's samples are drawn
        # in calls of their own (num_images_per_prompt), never two edits in one: the editing pipelines read a list of
        # images as a batch or as references, not both.
        calls: list[tuple[str | list[str], range, dict[str, Any]]] = []
        if sources is None:
            keywords = family.sampling_keywords(s.resolution)
            # A call of whole prompts passes each prompt once with num_images_per_prompt=K: the pipeline encodes it
            # once and repeats its embeddings, the noise still drawn per image. A chunk that splits a prompt's
            # samples, and a video pipeline (num_videos_per_prompt), get every sample's prompt.
            per_prompt = k if chunk % k == 0 and not family.video else 1
            listed = prompts if per_prompt > 1 else [p for p in prompts for _ in range(k)]
            per_call = chunk // per_prompt  # entries of `listed` per call
            repeat = {"num_images_per_prompt": per_prompt} if per_prompt > 1 else {}
            for start in range(0, len(listed), per_call):
                entries = listed[start : start + per_call]
                samples = range(start * per_prompt, (start + len(entries)) * per_prompt)
                calls.append((entries, samples, {**keywords, **repeat}))
        else:
            for row, prompt in enumerate(prompts):
                keywords = family.sampling_keywords(s.resolution, self.pipeline_sources(sources[row]))
                for start in range(0, k, chunk):
                    samples = range(row * k + start, row * k + min(start + chunk, k))
                    calls.append((prompt, samples, {**keywords, "num_images_per_prompt": len(samples)}))
        images: list[Any] = []
        latents: list[torch.Tensor] = []
        denoiser = self.family.denoiser
        was_training = denoiser.training
        denoiser.eval()
        pipeline.set_progress_bar_config(disable=True)
        try:
            for prompt, samples, keywords in calls:
                final: dict[str, torch.Tensor] = {}

                def keep(pipe, step, timestep, tensors, final=final):
                    final["latents"] = tensors["latents"]
                    return tensors

                # the sampler's latents are read only where they are trained on (HunyuanVideo 1.5 takes no callback)
                callback = (
                    {"callback_on_step_end": keep, "callback_on_step_end_tensor_inputs": ["latents"]}
                    if self.direct_latents
                    else {}
                )
                generators = [torch.Generator().manual_seed(seeds[i]) for i in samples]
                context = self.autocast() if self.autocast is not None else torch.autocast("cpu", enabled=False)
                with torch.no_grad(), context:
                    out = pipeline(prompt=prompt, generator=generators, **callback, **kwargs, **keywords)
                media = family.sampled_media(out)
                if on_images is not None:
                    on_images(len(images), list(media))
                images.extend(media)
                if self.direct_latents:
                    latents.append(final["latents"].detach().float())
        finally:
            denoiser.train(was_training)
        grouped = [images[r * k : (r + 1) * k] for r in range(len(prompts))]
        if not self.direct_latents:
            return grouped, None
        stacked = torch.cat(latents)
        return grouped, stacked.reshape(len(prompts), k, *stacked.shape[1:])

    def pipeline_sources(self, sources: list[Image.Image]) -> list[Image.Image]:
        """An edit's sources as the pipeline receives them: resized and center-cropped at the training resolution, as
        the offline data crops them, then at ``source_resolution`` where the family encodes them at another size."""
        resolution = self.settings.resolution
        size = self.family.source_resolution or resolution
        out = []
        for image in sources:
            square = _center_square(image, resolution)
            out.append(square if size == resolution else square.resize((size, size), Image.Resampling.BICUBIC))
        return out

    def source_latents(self, sources: list[list[Image.Image]]) -> torch.Tensor:
        """Each pair's source latents ``[P, S, C, h, w]`` (float32), as the offline step encodes an editing pair's
        sources: the data's center crop at the training resolution, then the family's
        :meth:`~trl_diffusion_sdpo.families.ModelFamily.encode_sources`."""
        transform = PairTransform(self.settings.resolution)
        pixels = torch.stack([torch.stack([transform.source(image) for image in row]) for row in sources])
        with torch.no_grad():
            return self.family.encode_sources(pixels).float().to(self.device)

    # ------------------------------------------------------------------ the stage

    def __call__(self, inputs: dict[str, Any], generation: int, first_row: int) -> GeneratedPairs:
        """The pair batch of one micro-batch of prompt rows (``inputs``: the prompt collator's lists)."""
        return self.finish(self.start(inputs, generation, first_row))

    def start(self, inputs: dict[str, Any], generation: int, first_row: int) -> PendingGeneration:
        """Sample a micro-batch and submit its scoring: at once, or (``async_rewards``) each sampling call's images
        to the background thread while the next call samples."""
        started = time.perf_counter()
        prompts = list(inputs[PROMPT_COLUMN])
        columns = {name: list(values) for name, values in inputs.items() if name != PROMPT_COLUMN}
        sources = source_images(columns, self.settings)
        if sources is not None:  # the reward functions read the decoded sources, as the offline scorers do
            columns["source_images"] = sources
            if SOURCE_IMAGE in columns:
                columns[SOURCE_IMAGE] = [row[0] for row in sources]
        k = self.settings.num_generations
        flat_prompts = [p for p in prompts for _ in range(k)]
        flat_columns = {name: [v for v in values for _ in range(k)] for name, values in columns.items()}
        scores: list[Future] = []
        score = self.score_clips if self.family.video else self.rewards

        def submit(start: int, images: list[Any]) -> None:
            end = start + len(images)
            part = {name: values[start:end] for name, values in flat_columns.items()}
            scores.append(self._submit(functools.partial(score, flat_prompts[start:end], images, part)))

        images, latents = self.sample(
            prompts, generation, first_row, sources, submit if self.scoring is not None else None
        )
        if self.scoring is None:
            submit(0, [image for samples in images for image in samples])
        return PendingGeneration(prompts, images, latents, sources, scores, time.perf_counter() - started)

    def _submit(self, score: Callable[[], Any]) -> Future:
        """``score()`` run by the background thread, or now (its result or error held in a finished future)."""
        if self.scoring is not None:
            return self.scoring.submit(score)
        future: Future = Future()
        try:
            future.set_result(score())
        except Exception as err:  # raised by finish, where the trainer handles a reward's failure
            future.set_exception(err)
        return future

    def finish(self, pending: PendingGeneration) -> GeneratedPairs:
        """Wait for a sampled micro-batch's scores (joined to its images in submission order) and pair it."""
        started = time.perf_counter()
        prompts, images, latents, sources = pending.prompts, pending.images, pending.latents, pending.sources
        k = self.settings.num_generations
        parts = [future.result() for future in pending.scores]
        reward = torch.cat([part[0] for part in parts])
        per_function = {name: torch.cat([part[1][name] for part in parts]) for name in parts[0][1]}
        rewards = reward.reshape(len(prompts), k)
        pairs = [
            (row, i, j)
            for row in range(len(prompts))
            for i, j in select_pairs(rewards[row].tolist(), self.settings.pair_mode, self.settings.reward_margin)
        ]
        batch = self.pair_batch(prompts, images, latents, pairs, sources)
        return GeneratedPairs(
            batch=batch,
            rewards=rewards,
            per_function={name: scores.reshape(len(prompts), k) for name, scores in per_function.items()},
            pairs=pairs,
            diversity=sample_diversity((torch.stack([_pixels(row) for row in images]) + 1) / 2),
            seconds=pending.seconds + time.perf_counter() - started,
            images=images,
            prompts=prompts,
        )

    def score_clips(
        self, prompts: list[str], clips: list[list[Image.Image]], columns: dict[str, list[Any]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each clip's reward (and each function's score): the mean over its scored frames
        (:func:`frame_indices` of ``video_reward_frames``), each frame scored as an image with its clip's prompt and
        columns."""
        picked = [frame_indices(len(clip), self.settings.video_reward_frames) for clip in clips]
        owner = [c for c, indices in enumerate(picked) for _ in indices]
        frames = [clip[i] for clip, indices in zip(clips, picked) for i in indices]
        total, per_function = self.rewards(
            [prompts[c] for c in owner], frames, {name: [values[c] for c in owner] for name, values in columns.items()}
        )
        index = torch.tensor(owner)
        counts = torch.tensor([len(indices) for indices in picked], dtype=torch.float64)

        def clip_mean(scores: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(clips), dtype=torch.float64).index_add_(0, index, scores.double()) / counts

        return clip_mean(total), {name: clip_mean(scores) for name, scores in per_function.items()}

    def pair_batch(
        self,
        prompts: list[str],
        images: list[list[Any]],
        latents: torch.Tensor | None,
        pairs: list[tuple[int, int, int]],
        sources: list[list[Image.Image]] | None = None,
    ) -> dict[str, Any]:
        """The pairs in the latent cache's batch form: ``latent_mean``/``latent_std`` ``[P, 2, C, h, w]`` (unscaled
        VAE latents, float32; ``[P, 2, C, F', h, w]`` for clips), ``prompt_embeds`` (and ``pooled_prompt_embeds``),
        ``time_ids [P, 2, 6]``, and an edit's ``source_latents [P, S, C, h, w]``."""
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
        pair_sources = None if sources is None else [sources[r] for r in rows]
        batch = self._batch(mean, std, self.encode_prompts([prompts[r] for r in rows], pair_sources))
        if pair_sources is not None:
            batch["source_latents"] = self.source_latents(pair_sources)
        return batch

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
        family, resolution = self.family, self.settings.resolution
        shape = family.latent_shape(resolution, family.num_frames) if family.video else family.latent_shape(resolution)
        zeros = torch.zeros(1, 2, *shape)
        if not family.edits or family.sources_optional:
            return self._batch(zeros, zeros, self.encode_prompts([""], None))
        grey = [[Image.new("RGB", (resolution, resolution), (128, 128, 128))]]  # zero in [-1, 1] pixels
        batch = self._batch(zeros, zeros, self.encode_prompts([""], grey))
        batch["source_latents"] = self.source_latents(grey)
        return batch

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
