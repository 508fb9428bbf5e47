"""The step's stages up to the predictions: batch -> latents -> noised pair, with the keyed draws they use.

* batch: a collated batch (live pixels and token ids, or a batch of the latent cache) becomes VAE posterior moments,
  prompt embeddings and time ids (:func:`encode_batch`); flips select the mirrored view, per pair or per image;
  random crops (:func:`~trl_diffusion_sdpo.data.random_crop.crop_pairs`, loaded by a run with ``random_crop``)
  and prompt dropout (:func:`drop_prompts`); a micro-batch that lost every row is
  left out or replayed (:class:`UsableBatches`).
* noised pair: forward noising by the family's noiser, or, with an inverting noiser (``noising="inversion"``,
  SmPO's default), the ReNoise inversion of the clean latents by the policy or the reference
  (:meth:`MicroBatchStages.inverting_network`), made without gradient before the predictions.
* keyed draws: every random choice of a training micro-batch comes from a generator seeded by ``(seed, optimizer
  step, micro-batch index)`` and is drawn for the global micro-batch (:class:`MicroBatchDraws`). A resumed run then
  draws exactly what the uninterrupted one did (no global RNG state), and a pair gets the same flip, prompt dropout,
  timestep, noise and posterior sample whatever the number of processes, as long as the global batch is the same.

The predictions, errors and objective come next (:mod:`.predictions`). :class:`MicroBatchStages` holds what the
stages need (the family, its noiser, the reference, the keyed draws and the augmentation settings) and runs them in
order; each stage is a public method or function taking what it needs as arguments, so tests can run or replace one
alone. The trainer's step then runs the objective (:mod:`.predictions`); transformers' step runs the backward.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import data as preference_data
from ..config._lazy import import_target
from ..families import ModelFamily, NoisedPair, PromptEmbeddings
from ..objectives import (
    PreferencePredictions,
)
from .predictions import predict_pairs

__all__ = [
    "Augmentation",
    "drop_prompts",
    "encode_batch",
    "EncodedBatch",
    "fixed_time_ids",
    "keyed_generator",
    "MicroBatchDraws",
    "MicroBatchStages",
    "NoisedMicroBatch",
    "prompt_inputs",
    "UsableBatches",
    "where_rows",
]


# ------------------------------------------------------------------ batch


@dataclass
class EncodedBatch:
    """A batch of ``B`` pairs ready for noising: ``mean``/``std`` ``[2B, C, h, w]`` (winners, then losers; float32,
    unscaled), one prompt embedding per pair, ``time_ids [2B, 6]``, and each image's loss mask ``[2B, 1, H, W]`` (in
    pixels, or at latent size from the cache) or ``None``."""

    mean: torch.Tensor
    std: torch.Tensor
    prompt_embeds: PromptEmbeddings
    time_ids: torch.Tensor
    loss_mask: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.mean.shape[0] // 2


def where_rows(condition: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor) -> torch.Tensor:
    """``if_true`` where ``condition`` is set, ``if_false`` elsewhere; ``condition`` indexes the leading dims
    (``[B]``: whole pairs, ``[B, 2]``: single images of ``[B, 2, ...]`` tensors)."""
    shape = (*condition.shape, *([1] * (if_false.dim() - condition.dim())))
    condition = condition.to(if_false.device).view(shape)
    return torch.where(condition, if_true.to(if_false), if_false)


def _pairs_to_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, 2, ...]`` (pairs) to ``[2B, ...]`` (winners, then losers)."""
    return x.transpose(0, 1).reshape(2 * x.shape[0], *x.shape[2:])


def encode_batch(
    inputs: dict[str, torch.Tensor], family: ModelFamily, flip: torch.Tensor | None, dtype: torch.dtype
) -> EncodedBatch:
    """Encode a collated batch (live or cached); ``flip`` (``[B]`` or ``[B, 2]`` booleans) selects mirrored views
    (``[B]`` for editing data: a pair is mirrored with its sources)."""
    if flip is not None:
        inputs = dict(inputs, time_ids=where_rows(flip, inputs["time_ids_flipped"], inputs["time_ids"]))
    mask = inputs.get("loss_mask")  # [B, 2, 1, H, W] in pixels, or at latent size from the cache
    if mask is not None and flip is not None:  # mirrored with its image (areas of a mirror are mirrored areas)
        mask = where_rows(flip, mask.flip(-1), mask)
    if "latent_mean" in inputs:  # a batch of the latent cache: nothing left to encode
        if flip is not None:
            for key in ("latent_mean", "latent_std", "source_latents")[: 3 if "source_latents" in inputs else 2]:
                inputs[key] = where_rows(flip, inputs[f"{key}_flipped"], inputs[key])
        mean, std = preference_data.cached_moments(inputs)
        mask = None if mask is None else _pairs_to_rows(mask)
        return EncodedBatch(
            mean,
            std,
            preference_data.cached_prompt_embeds(inputs, dtype),
            preference_data.cached_time_ids(inputs),
            mask,
        )
    pixel_values = inputs["pixel_values"]  # [B, 2, 3, H, W]
    if flip is not None:
        pixel_values = where_rows(flip, pixel_values.flip(-1), pixel_values)
    mean, std = family.encode_moments(_pairs_to_rows(pixel_values))
    embeds = family.encode_prompts(prompt_inputs(inputs))
    if "source_pixel_values" in inputs:  # editing: the pair's source images, encoded once for both branches
        sources = inputs["source_pixel_values"]  # [B, S, 3, H, W]; a pair is mirrored with its sources
        if flip is not None:
            sources = where_rows(flip, sources.flip(-1), sources)
        embeds.source_latents = family.encode_sources(sources)
    mask = None if mask is None else _pairs_to_rows(mask)
    return EncodedBatch(mean, std, embeds, _pairs_to_rows(inputs["time_ids"]), mask)


def prompt_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a family's ``encode_prompts`` reads from a collated batch: its tokenizer's outputs, the keys starting
    with ``input_ids`` (token ids) or ``prompt_`` (what else the tokenizer made, such as a vision-language encoder's
    image patches)."""
    return {k: v for k, v in inputs.items() if k.startswith(("input_ids", "prompt_"))}


def drop_prompts(embeds: PromptEmbeddings, drop: torch.Tensor, empty: PromptEmbeddings) -> PromptEmbeddings:
    """Replace the prompt embeddings of the rows where ``drop`` is set by ``empty``'s (classifier-free dropout); an
    editing pair keeps its source latents (the instruction is dropped, not the image)."""
    hidden = embeds.encoder_hidden_states
    hidden = where_rows(drop, empty.encoder_hidden_states.to(hidden).expand_as(hidden), hidden)
    pooled = embeds.pooled
    if pooled is not None:
        pooled = where_rows(drop, empty.pooled.to(pooled).expand_as(pooled), pooled)
    return PromptEmbeddings(hidden, pooled, embeds.source_latents)


def fixed_time_ids(resolution: int, rows: int, device: torch.device | str) -> torch.Tensor:
    """SDXL ``time_ids`` as the Diffusion-SDPO authors fix them: ``(res, res, 0, 0, res, res)`` for every image."""
    # Filled on the device: a tensor built from a Python list would be a host-to-device copy, which waits.
    ids = torch.full((rows, 6), float(resolution), dtype=torch.float32, device=device)
    ids[:, 2:4] = 0.0
    return ids


class UsableBatches:
    """What to train on when a micro-batch's rows were all dropped (the collator skips human ties and bad streamed
    rows).

    On one process such a micro-batch is left out (``None``). With several processes, whose collectives must all
    run, it is replaced by this process's last good micro-batch, to be weighted zero (``replay``) and kept out of
    the metrics; before the first good one, by ``blank(mode)`` (one placeholder pair, see
    :meth:`~trl_diffusion_sdpo.data.collators.PreferenceCollator.blank_batch`), weighted zero the same way.
    ``blank`` returns ``None`` where the data cannot make one (then the first micro-batch must hold a row).
    """

    def __init__(self, blank: Callable[[str], dict[str, torch.Tensor] | None] | None = None) -> None:
        self._last: dict[str, dict[str, torch.Tensor]] = {}  # per mode
        self._blank = blank

    def __call__(
        self, inputs: dict[str, torch.Tensor], mode: str, num_processes: int = 1, process_index: int = 0
    ) -> tuple[dict[str, torch.Tensor] | None, bool]:
        """``(inputs, replay)``: the micro-batch to use, and whether it is a zero-weighted replay."""
        if inputs["time_ids"].shape[0] > 0:
            if num_processes > 1:
                self._last[mode] = inputs
            return inputs, False
        if num_processes == 1:
            return None, False
        if mode not in self._last:
            blank = self._blank(mode) if self._blank is not None else None
            if blank is None:
                raise RuntimeError(
                    f"Every row of the first {mode} micro-batch on process {process_index} was invalid, and with "
                    "several processes a micro-batch cannot be left out. Clean the data or raise the per-device "
                    "batch size."
                )
            self._last[mode] = blank
        return self._last[mode], True


# ------------------------------------------------------------------ noised pair


@dataclass(frozen=True)
class Augmentation:
    """The training-time augmentation settings (see the fields of the same names in ``DiffusionSDPOConfig``)."""

    resolution: int
    random_flip: bool = False
    random_crop: bool = False
    independent_augmentation: bool = False
    proportion_empty_prompts: float = 0.0
    fixed_time_ids: bool = False

    @classmethod
    def from_config(cls, args) -> Augmentation:
        """The config's fields of the same names."""
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


@dataclass
class NoisedMicroBatch:
    """A micro-batch up to the noised pair: what the predictions need."""

    noised: NoisedPair
    prompt_embeds: PromptEmbeddings
    time_ids: torch.Tensor | None
    loss_mask: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.noised.noisy.shape[0] // 2


class MicroBatchStages:
    """The stages of a micro-batch up to the predictions, with its keyed draws.

    Args:
        family: the model family (encoding, conditioning, the denoiser's call).
        noiser: the family's noiser (``draw`` and ``noise_pairs``; DDPM or flow matching).
        draws: where each micro-batch's random draws come from.
        reference: the reference's ``predict``, or ``None`` for reference-free objectives.
        augmentation: flips, crops, prompt dropout and SDXL's time ids.
        dtype: the compute dtype of the prompt embeddings.
        tokenize: the family's prompt tokenizer (for the empty prompt of prompt dropout).
        device: where the empty prompt's tokens go to be encoded.
        empty_prompt: the empty prompt's embeddings if known (a latent cache stores them), else encoded at first use.
    """

    def __init__(
        self,
        family: ModelFamily,
        noiser,
        draws: MicroBatchDraws,
        reference: Callable[..., torch.Tensor] | None,
        augmentation: Augmentation,
        dtype: torch.dtype,
        tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
        device: torch.device | str,
        empty_prompt: PromptEmbeddings | None = None,
    ) -> None:
        self.family, self.noiser, self.draws, self.reference = family, noiser, draws, reference
        self.augmentation, self.dtype, self.tokenize = augmentation, dtype, tokenize
        self.device, self.empty_prompt = device, empty_prompt
        settings = getattr(noiser, "settings", None) if getattr(noiser, "inverts", False) else None
        if settings is not None and settings.network == "reference" and reference is None:
            raise ValueError(
                "inversion_network='reference' needs a reference model, and this objective uses none; set "
                "inversion_network='policy' (as SmPO does) or noising='forward'."
            )

    def predict(
        self, policy: torch.nn.Module, inputs: dict[str, torch.Tensor], mode: str, step: int, separate_branches: bool
    ) -> PreferencePredictions:
        """batch -> latents -> noised pair -> predictions of ``policy`` (and the reference) for optimizer step
        ``step``; ``separate_branches``: one forward pass per branch (the parameter-space safeguard's two passes)."""
        return self.predict_noised(policy, self.noised_pair(policy, inputs, mode, step), separate_branches)

    def noised_pair(
        self, policy: torch.nn.Module, inputs: dict[str, torch.Tensor], mode: str, step: int
    ) -> NoisedMicroBatch:
        """batch -> latents -> noised pair (by forward noising, or by inverting with ``policy`` or the reference):
        the micro-batch's draws, and any inversion, are taken here, once."""
        generator = self.draws.generator(mode, step)
        encoded, time_ids = self.encode(inputs, generator, mode)
        inverting = self.inverting_network(policy, encoded.prompt_embeds, time_ids)
        # Forward noising calls the stage as (generator, mode, encoded): a replaced stage of that form keeps working.
        noised = (
            self.noise(generator, mode, encoded)
            if inverting is None
            else self.noise(generator, mode, encoded, inverting)
        )
        mask = encoded.loss_mask  # at the size of the latents the errors are taken on (the family's layout)
        mask = None if mask is None else self.family.latent_mask(mask, tuple(noised.target.shape))
        return NoisedMicroBatch(noised, encoded.prompt_embeds, time_ids, mask)

    def predict_noised(
        self, policy: torch.nn.Module, batch: NoisedMicroBatch, separate_branches: bool, with_reference: bool = True
    ) -> PreferencePredictions:
        """The predictions of ``policy`` (and the reference) on a noised pair (may run twice on the same one);
        ``with_reference=False``: the policy's only (the held-out probe keeps the reference's from its first)."""
        return predict_pairs(
            policy,
            self.reference if with_reference else None,
            self.family,
            batch.noised,
            batch.prompt_embeds,
            batch.time_ids,
            separate_branches,
            batch.loss_mask,
        )

    def encode(
        self, inputs: dict[str, torch.Tensor], generator: torch.Generator, mode: str
    ) -> tuple[EncodedBatch, torch.Tensor | None]:
        """batch and latents: flips (per pair, or per image), random crops and prompt dropout (training only), then
        the VAE moments and prompt embeddings (or the cached ones); the denoiser's time ids where it takes them."""
        aug, train = self.augmentation, mode == "train"
        flip, drop, crop = self.draws.augmentation(
            generator,
            mode,
            inputs["time_ids"].shape[0],
            independent=aug.independent_augmentation,
            cropping=aug.random_crop and train,
        )
        if "crop_sizes" in inputs:  # resized, not yet cropped, by the collator (random_crop)
            inputs = import_target("trl_diffusion_sdpo.data.random_crop:crop_pairs")(inputs, crop, aug.resolution)
        encoded = encode_batch(inputs, self.family, flip if train and aug.random_flip else None, self.dtype)
        if train and aug.proportion_empty_prompts > 0:
            encoded.prompt_embeds = drop_prompts(
                encoded.prompt_embeds, drop < aug.proportion_empty_prompts, self.empty_prompt_embeds()
            )
        time_ids = None
        if self.family.needs_time_ids:
            time_ids = encoded.time_ids
            if aug.fixed_time_ids:
                time_ids = fixed_time_ids(aug.resolution, time_ids.shape[0], time_ids.device)
        return encoded, time_ids

    def noise(
        self,
        generator: torch.Generator,
        mode: str,
        encoded: EncodedBatch,
        inverting: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        """The noised pair: one noise level and one noise per pair (shared by winner and loser) and one posterior
        sample per image, drawn for the global micro-batch; this process keeps its rows. An inverting noiser
        (ReNoise inversion) then inverts the clean latents with ``inverting`` (:meth:`inverting_network`), walking
        the grid up to the largest level of the global micro-batch (every process calls the network equally often)."""
        shape = tuple(encoded.mean.shape[1:])
        noiser = self.noiser
        n, rows = self.draws.span(mode, encoded.num_pairs)
        all_levels, all_noise = noiser.draw(n, shape, generator, generator.device)
        all_eps = torch.randn((n, 2, *shape), generator=generator, device=generator.device)
        levels, noise, eps = self.draws.local((all_levels, all_noise, all_eps), rows)
        noised = noiser.noise_pairs(encoded.mean, encoded.std, levels, noise, eps, self.family.latents_config())
        if getattr(noiser, "inverts", False):
            if inverting is None:
                raise ValueError("an inverting noiser needs its network (see MicroBatchStages.inverting_network)")
            noised = noiser.invert(noised, inverting, all_levels.max().item())
        return noised

    def inverting_network(
        self, policy: torch.nn.Module, prompt_embeds: PromptEmbeddings, time_ids: torch.Tensor | None
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """The network that inverts (``None`` under forward noising): ``(sample, timestep, rows) -> output`` on rows
        of the ``2B``-row batch (winners, then losers), each with its pair's prompt and its own time ids, without
        autograd; the policy (SmPO's code) or the reference, as the noiser's settings say."""
        if not getattr(self.noiser, "inverts", False):
            return None
        return self.noiser.network(self.family, policy, self.reference, prompt_embeds, time_ids)

    def empty_prompt_embeds(self) -> PromptEmbeddings:
        """The empty prompt's embeddings (prompt dropout), encoded once."""
        if self.empty_prompt is None:
            tokens = {k: v.to(self.device) for k, v in self.tokenize([""]).items()}
            self.empty_prompt = self.family.encode_prompts(tokens)
        return self.empty_prompt


# ------------------------------------------------------------------ keyed draws


def keyed_generator(seed: int, step: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by a hash of ``(seed, step, index)`` (independent streams for neighbouring keys)."""
    key = f"{seed}/{step}/{index}".encode()
    derived = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    return torch.Generator(device=device).manual_seed(derived)


class MicroBatchDraws:
    """Where a micro-batch's random draws come from, and which of them this process keeps.

    Training: a generator keyed by ``(seed, optimizer step, micro-batch within the step)``; evaluation: one CPU
    generator seeded with the run's ``seed`` for a whole ``evaluate()`` (:meth:`start_evaluation`). Every draw is made
    for the global micro-batch (``num_processes`` times the per-device batch) and each process keeps its own rows.
    """

    def __init__(
        self,
        seed: int,
        train_rows: int,
        eval_rows: int,
        process_index: int,
        num_processes: int,
        device: torch.device | str,
    ) -> None:
        self.seed, self.device = seed, device
        self.rows_per_process = {"train": train_rows, "eval": eval_rows}
        self.process_index, self.num_processes = process_index, num_processes
        self._step, self._index = -1, 0  # which micro-batch of which step the training draws are for
        self._eval_generator: torch.Generator | None = None

    @classmethod
    def for_process(cls, args: Any, accelerator: Any) -> MicroBatchDraws:
        """The draws of ``accelerator``'s process for a run with ``args`` (its seed, batch sizes and device)."""
        return cls(
            args.seed,
            args.per_device_train_batch_size,
            args.per_device_eval_batch_size,
            accelerator.process_index,
            accelerator.num_processes,
            args.device,
        )

    def generator(self, mode: str, step: int) -> torch.Generator:
        """The generator of the next micro-batch of optimizer step ``step`` (or of the running evaluation)."""
        if mode == "eval" and self._eval_generator is not None:
            return self._eval_generator
        if step != self._step:
            self._step, self._index = step, 0
        self._index += 1
        return keyed_generator(self.seed, step, self._index - 1, self.device)

    def start_evaluation(self, eval_seed: int) -> None:
        self._eval_generator = torch.Generator().manual_seed(eval_seed)

    def end_evaluation(self) -> None:
        self._eval_generator = None

    def span(self, mode: str, local_rows: int) -> tuple[int, slice]:
        """``(n, rows)``: every process draws ``n`` rows, for the global micro-batch (same generator state), and
        keeps ``rows``, its own (``process_index * rows_per_process`` onwards)."""
        rows_per_process = max(self.rows_per_process[mode], local_rows)
        start = self.process_index * rows_per_process
        return self.num_processes * rows_per_process, slice(start, start + local_rows)

    def local(self, tensors: tuple[torch.Tensor, ...], rows: slice) -> tuple[torch.Tensor, ...]:
        """This process's ``rows`` of each of ``tensors`` (drawn for the global micro-batch), on the training
        device."""
        return tuple(t[rows].to(self.device) for t in tensors)

    def augmentation(
        self, generator: torch.Generator, mode: str, batch: int, independent: bool, cropping: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``flip`` booleans (``[B]``, or ``[B, 2]`` when each image of a pair is augmented on its own), ``drop``
        uniforms ``[B]`` (prompt dropout) and, when ``cropping``, crop fractions (``[B, 2]`` top and left per pair, or
        ``[B, 4]`` per image).

        The winner's flip and the dropout are the first two rows of the draw whatever the options (a generator fills
        rows in order), so the options add rows without changing the others."""
        rows = (3 if independent else 2) + (2 * (2 if independent else 1) if cropping else 0)
        n, local = self.span(mode, batch)
        draws = self.local(tuple(torch.rand((rows, n), generator=generator, device=generator.device)), local)
        flip = torch.stack([draws[0], draws[2]], dim=1) < 0.5 if independent else draws[0] < 0.5
        crop = None
        if cropping:
            first = 3 if independent else 2
            crop = torch.stack(draws[first:], dim=1)  # [B, 2] or [B, 4]: (top, left) per pair or per image
        return flip, draws[1], crop
