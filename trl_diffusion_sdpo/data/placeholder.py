"""A batch of one placeholder pair, for a process whose first micro-batch lost every row (ties, bad streamed rows)
while its peers train: with several processes it must still run the step's forward and backward passes and their
collectives, with weight zero, and has no earlier micro-batch to replay
(:class:`~trl_diffusion_sdpo.step.stages.UsableBatches`). One process leaves such a micro-batch out, and a process
whose rows are valid never loads this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from .collators import pair_scores
from .columns import PreferenceColumns
from .transforms import PairTransform, mirrored_time_ids

__all__ = ["placeholder_batch"]


def placeholder_batch(
    transform: PairTransform,
    columns: PreferenceColumns,
    crops_later: bool,
    with_flipped: bool,
    tokens: Callable[[list[str], list[list[Any]]], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """:meth:`~.collators.PreferenceCollator.blank_batch` of a collator with these ``transform``, ``columns``,
    ``crops_later`` (the random crop left to the trainer), ``with_flipped`` and prompt ``tokens``: grey images (zero
    pixels), the empty prompt, ``time_ids`` of an uncropped ``R x R`` image, scores 0."""
    shape = transform.pixel_shape
    height, width = shape[-2:]
    # Grey is zero in [-1, 1] pixels up to 8-bit rounding: the editing placeholder's source, like its images.
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32).expand(1, 2, 6).clone()
    batch: dict[str, torch.Tensor] = {
        "pixel_values": torch.zeros(1, 2, *shape),
        "time_ids": ids,
        "num_skipped": torch.tensor(0.0),
        "skip_reasons": [],
    }
    if crops_later:  # already R x R: the crop keeps it whole
        batch["crop_sizes"] = torch.tensor([height, width], dtype=torch.float32).expand(1, 2, 2).clone()
    if with_flipped:
        batch["time_ids_flipped"] = mirrored_time_ids(ids)
    if columns.scored:
        batch["pair_scores"] = pair_scores([(0.0, 0.0)])
    if columns.masked:  # the whole image: a placeholder's loss is weighted zero anyway
        batch["loss_mask"] = torch.ones(1, 2, 1, height, width)
    grey = [[Image.new("RGB", (width, height), (127, 127, 127))]] if columns.edits else []
    if columns.edits:
        batch["source_pixel_values"] = torch.stack([transform.source(grey[0][0])])[None]
    batch.update(tokens([""], grey))
    return batch
