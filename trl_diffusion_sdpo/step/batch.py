"""Stage 1 of the step: a collated batch becomes VAE posterior moments, prompt embeddings and time ids.

Two sources, one output: a live batch (pixels and token ids, encoded here by the family's frozen VAE and text
encoders) or a batch of the latent cache (moments and embeddings read back). Flips select the mirrored view, per
pair or per image; prompt dropout substitutes the empty prompt's embeddings. Every draw comes in as an argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data.latent_cache import cached_moments, cached_prompt_embeds, cached_time_ids
from ..families import ModelFamily, PromptEmbeddings

__all__ = [
    "EncodedBatch",
    "UsableBatches",
    "crop_pairs",
    "drop_prompts",
    "encode_batch",
    "fixed_time_ids",
    "prompt_inputs",
    "where_rows",
]


@dataclass
class EncodedBatch:
    """A batch of ``B`` pairs ready for noising: ``mean``/``std`` ``[2B, C, h, w]`` (winners, then losers; float32,
    unscaled), one prompt embedding per pair, ``time_ids [2B, 6]``."""

    mean: torch.Tensor
    std: torch.Tensor
    prompt_embeds: PromptEmbeddings
    time_ids: torch.Tensor

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
    if "latent_mean" in inputs:  # a batch of the latent cache: nothing left to encode
        if flip is not None:
            for key in ("latent_mean", "latent_std", "source_latents")[: 3 if "source_latents" in inputs else 2]:
                inputs[key] = where_rows(flip, inputs[f"{key}_flipped"], inputs[key])
        mean, std = cached_moments(inputs)
        return EncodedBatch(mean, std, cached_prompt_embeds(inputs, dtype), cached_time_ids(inputs))
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
    return EncodedBatch(mean, std, embeds, _pairs_to_rows(inputs["time_ids"]))


def prompt_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a family's ``encode_prompts`` reads from a collated batch: its tokenizer's outputs, the keys starting
    with ``input_ids`` (token ids) or ``prompt_`` (what else the tokenizer made, such as a vision-language encoder's
    image patches)."""
    return {k: v for k, v in inputs.items() if k.startswith(("input_ids", "prompt_"))}


def crop_pairs(inputs: dict[str, torch.Tensor], fractions: torch.Tensor, resolution: int) -> dict[str, torch.Tensor]:
    """Random-crop a batch of resized pairs (``pixel_values [B, 2, 3, H, W]`` zero-padded, or video pairs
    ``[B, 2, 3, F, H, W]``; ``crop_sizes [B, 2, 2]`` their ``(h, w)``) to ``resolution``, on the device with no host
    read.

    ``fractions [B, 2]`` (``(top, left)`` uniforms in [0, 1) shared by the pair) or ``[B, 2, 2]`` (one per image)
    give the offsets as torchvision's ``RandomCrop`` draws them, each valid offset equally likely:
    ``offset = min(floor(f * (size - res + 1)), size - res)``. Returns the inputs with the cropped ``pixel_values``,
    ``time_ids`` holding the offsets, and ``time_ids_flipped`` (when present) the offsets in the mirrored view
    (``width - res - left``).
    """
    pixels, sizes = inputs["pixel_values"], inputs["crop_sizes"].to(inputs["pixel_values"].device)
    leading = pixels.shape[2:-2]  # (3,) for images, (3, F) for video clips: every frame gets its video's crop
    pixels = pixels.reshape(*pixels.shape[:2], -1, *pixels.shape[-2:])
    batch, _, channels, height, width = pixels.shape
    fractions = fractions.to(sizes).reshape(batch, -1, 2).expand(batch, 2, 2)
    margin = sizes - resolution
    offsets = torch.minimum(torch.floor(fractions * (margin + 1)), margin)  # [B, 2, (top, left)]
    span = torch.arange(resolution, device=pixels.device)
    rows = (offsets[..., 0].long().reshape(-1, 1) + span)[:, :, None]  # [2B, R, 1]
    cols = (offsets[..., 1].long().reshape(-1, 1) + span)[:, None, :]  # [2B, 1, R]
    images = torch.arange(2 * batch, device=pixels.device)[:, None, None]
    flat = pixels.reshape(2 * batch, channels, height, width).permute(0, 2, 3, 1)  # [2B, H, W, C]
    cropped = flat[images, rows, cols].permute(0, 3, 1, 2).reshape(batch, 2, *leading, resolution, resolution)
    time_ids = inputs["time_ids"].clone()
    time_ids[..., 2:4] = offsets.to(time_ids)
    out = dict(inputs, pixel_values=cropped, time_ids=time_ids)
    if "time_ids_flipped" in inputs:
        flipped = time_ids.clone()
        flipped[..., 3] = (sizes[..., 1] - resolution - offsets[..., 1]).to(flipped)
        out["time_ids_flipped"] = flipped
    return out


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
