"""Raw preference rows to training batches: the winner-first pixel pairs, ``time_ids``, token ids and, where the
dataset has score columns, the pair scores; with a loss mask, each pair's mask."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config._lazy import import_target
from .columns import ROW_INDEX_COLUMN, TIE_REASON, PreferenceColumns, order_pair
from .transforms import PairTransform, load_image, mirrored_time_ids

__all__ = ["PreferenceCollator", "pair_scores"]

logger = logging.getLogger(__name__)

#: the zero-padding of resized pairs for the trainer's random crop (:mod:`.random_crop`, loaded with ``random_crop``)
PADDED = "trl_diffusion_sdpo.data.random_crop:padded_pairs"
#: each pair's loss mask (:mod:`.masks`, loaded by data with a mask column)
PAIR_MASK = "trl_diffusion_sdpo.data.masks:pair_mask"
#: a batch of one placeholder pair (:mod:`.placeholder`, loaded by a process whose first micro-batch lost every row)
PLACEHOLDER = "trl_diffusion_sdpo.data.placeholder:placeholder_batch"


@dataclass
class PreferenceCollator:
    """Turn raw rows into ``pixel_values [B, 2, 3, R, R]`` (winner first), ``time_ids [B, 2, 6]`` and token ids;
    with a :class:`~.video.VideoPairTransform`, video pairs ``pixel_values [B, 2, 3, F, R, R]``.

    With ``with_flipped``, ``time_ids_flipped`` holds the ``time_ids`` of the mirrored views, for the trainer's flip.
    Nothing random is drawn here. With a random crop (``train`` and the transform's ``random_crop``) the images are
    only resized: ``pixel_values [B, 2, 3, H, W]`` holds them zero-padded to the largest, ``crop_sizes [B, 2, 2]``
    their ``(height, width)``, and the trainer crops with keyed draws
    (:func:`~.random_crop.crop_pairs`), so a resumed run crops exactly as the uninterrupted one.
    ``train=False`` gives the deterministic evaluation view: center crop.

    When ``columns`` have score columns (``loss_type="smpo"``) the batch also holds ``pair_scores [B, 2]`` float32,
    the ordered pair's (winner, loser) scores as the data gives them (:func:`pair_scores`); the objective makes its
    weights from them.

    Editing rows (``columns.source``) also give ``source_pixel_values [B, S, 3, R, R]``: each pair's ``S`` source
    images, resized and center-cropped as the edited images are; every row of a batch must have the same ``S``. A
    tokenizer that reads the sources (``tokenize.reads_sources``, a vision-language prompt encoder) is called as
    ``tokenize(prompts, sources)`` with the decoded images.

    With a loss mask (``columns.masked``) the batch holds ``loss_mask [B, 2, 1, R, R]``: each pair's mask
    (:func:`~.masks.pair_mask`) in [0, 1], once per image, laid out as ``pixel_values`` (resized and zero-padded alike
    for the trainer's crop, which then crops and flips it with its image). A row whose mask is empty or of the wrong
    size is skipped as a bad row, naming why.
    """

    columns: PreferenceColumns
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]]
    transform: PairTransform
    train: bool = True
    with_flipped: bool = False

    @property
    def crops_later(self) -> bool:
        """Whether the random crop is left to the trainer's keyed draws (training with ``random_crop``)."""
        return self.train and self.transform.random_crop

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels, time_ids, prompts, scores, sources, masks = [], [], [], [], [], []
        skipped = 0
        reasons: list[str] = []  # one per skipped row, for data.stream_guard's error
        for row in rows:
            # Rows of a map-style dataset were validated up front; this guards streamed rows.
            try:
                prompt = row[self.columns.prompt]
                if not isinstance(prompt, str):
                    raise ValueError(
                        f"column {self.columns.prompt!r}: prompt must be a string, got {type(prompt).__name__}"
                    )
                pair = order_pair(row, self.columns)  # a bad (marked) label or score raises, naming its column
                if pair is None:  # a tie
                    skipped += 1
                    reasons.append(TIE_REASON)
                    continue
                winner_column, loser_column = (self.columns.first, self.columns.second)
                if pair[0] is not row[self.columns.first]:
                    winner_column, loser_column = loser_column, winner_column
                load = self.transform.load  # images, or the clip of a video (VideoPairTransform)
                winner, loser = _load_from(pair[0], winner_column, load), _load_from(pair[1], loser_column, load)
                row_sources = self._sources(row, sources[0] if sources else None)
                mask = None
                if self.columns.masked:  # the loss masks' module, loaded by data with a mask column
                    mask = import_target(PAIR_MASK)(row, winner, loser, self.columns, self.transform, self.crops_later)
            except Exception as err:
                position = row.get(ROW_INDEX_COLUMN)
                where = f"streamed row {position}" if position is not None else "a bad row"
                logger.warning("Skipping %s: %s", where, err)
                skipped += 1
                reasons.append(f"{where}: {err}")
                continue
            if self.crops_later:
                pair_pixels, pair_ids = self.transform.resized_pair(winner, loser)
            else:
                pair_pixels, pair_ids = self.transform(winner, loser, train=self.train)
            pixels.append(pair_pixels)
            time_ids.append(pair_ids)
            prompts.append(prompt)
            scores.append(pair[2])
            if row_sources is not None:
                sources.append(row_sources)
            if mask is not None:
                masks.append([mask, mask])
        batch: dict[str, torch.Tensor] = {
            "time_ids": torch.stack(time_ids) if time_ids else torch.empty(0, 2, 6),
            "num_skipped": torch.tensor(skipped, dtype=torch.float32),
            "skip_reasons": reasons,
        }
        if self.crops_later:  # the random crop's module, loaded by a run that crops
            batch["pixel_values"], batch["crop_sizes"] = import_target(PADDED)(pixels, self.transform.pixel_shape)
        else:
            batch["pixel_values"] = torch.stack(pixels) if pixels else torch.empty(0, 2, *self.transform.pixel_shape)
        if self.with_flipped:
            batch["time_ids_flipped"] = mirrored_time_ids(batch["time_ids"])
        if self.columns.scored:
            batch["pair_scores"] = pair_scores(scores)
        if self.columns.masked:
            shape = (1, *self.transform.pixel_shape[1:])
            stacked = import_target(PADDED)(masks, shape)[0] if self.crops_later else _stacked_pairs(masks, shape)
            batch["loss_mask"] = stacked
        if self.columns.edits:
            batch["source_pixel_values"] = (
                torch.stack([torch.stack([self.transform.source(image) for image in row]) for row in sources])
                if sources
                else torch.empty(0, 1, *self.transform.pixel_shape)
            )
        batch.update(self._tokens(prompts, sources) if prompts else {})
        return batch

    def _sources(self, row: dict[str, Any], first: list[Any] | None) -> list[Any] | None:
        """An editing row's decoded source images (``None`` for text-to-image data); ``first``, the batch's first
        row's, sets how many each row must have."""
        if not self.columns.edits:
            return None
        return import_target("trl_diffusion_sdpo.data.editing:row_sources")(row, self.columns, first)

    def _tokens(self, prompts: list[str], sources: list[list[Any]]) -> dict[str, torch.Tensor]:
        if getattr(self.tokenize, "reads_sources", False):
            return self.tokenize(prompts, sources)
        return self.tokenize(prompts)

    def blank_batch(self) -> dict[str, torch.Tensor]:
        """A batch of one placeholder pair, shaped as :meth:`__call__` makes them: grey images (zero pixels), the
        empty prompt, ``time_ids`` of an uncropped ``R x R`` image, scores 0.

        For a process whose first micro-batch lost every row (ties, bad streamed rows) while its peers train: it must
        still run the step's forward and backward passes and their collectives, with weight zero, and has no earlier
        micro-batch to replay (:class:`~trl_diffusion_sdpo.step.stages.UsableBatches`).
        """
        placeholder = import_target(PLACEHOLDER)  # loaded by a process whose first micro-batch lost every row
        return placeholder(self.transform, self.columns, self.crops_later, self.with_flipped, self._tokens)


def pair_scores(scores: Sequence[tuple[float, float]] | torch.Tensor) -> torch.Tensor:
    """``pair_scores [B, 2]`` float32, the (winner, loser) scores of each ordered pair (``[0, 2]`` for no pair).

    Every collator hands the scores on through this one function, so the cached and uncached batches agree exactly.
    """
    return torch.as_tensor(scores, dtype=torch.float32).reshape(-1, 2)


def _stacked_pairs(pairs: list[list[torch.Tensor]], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.stack(pair) for pair in pairs]) if pairs else torch.empty(0, 2, *shape)


def _load_from(value: Any, column: str, load: Callable[[Any], Any] = load_image) -> Any:
    try:
        return load(value)
    except Exception as err:  # PIL and PyAV raise many types for corrupt data
        raise ValueError(f"column {column!r}: {err}") from None
