"""Scoring both images of every row with a reward model, for SmPO's smoothed preferences
(:func:`add_reward_scores`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from datasets import Dataset, Features, IterableDataset, Value
from PIL import Image

from ..data.columns import is_tie
from ..data.pickapic import as_trl_form
from ..data.progress import datasets_progress_bars
from ..data.transforms import load_image
from ..data.validation import resolve_layout, row_problem, score_columns_of, uses_scores, with_undecoded_images

__all__ = ["RewardFn", "add_reward_scores"]

logger = logging.getLogger(__name__)

RewardFn = Callable[[list[Image.Image], list[str]], "Sequence[float] | torch.Tensor"]


def add_reward_scores(
    dataset: Dataset | IterableDataset,
    args: Any,
    reward_fn: RewardFn | None,
    split: str = "train",
    batch_size: int = 16,
) -> Dataset | IterableDataset:
    """Write SmPO's two score columns with ``reward_fn`` when ``loss_type="smpo"`` and the dataset has neither.

    ``reward_fn(images, prompts)`` gets the decoded RGB images and their prompts (each row's first images, then its
    second images, ``2 * rows`` of each per call) and returns one finite score per image (a sequence or tensor).
    The scores go to the ``score_0`` and ``score_1`` columns (float64) through ``dataset.map(...,
    batched=True)``: cached by the dataset's fingerprint for a map-style dataset, lazily for an
    ``IterableDataset``. Rows that cannot be scored (bad prompt, label or image) and human ties (dropped anyway) get
    NaN and no call; validation then reports or skips the bad ones.

    Returns the dataset unchanged when both score columns exist (``reward_fn`` is then not used) or when no
    ``reward_fn`` is given (:func:`resolve_columns` then names the missing columns). Raises ``ValueError`` for a
    ``reward_fn`` with another loss type, or when only one of the two score columns exists.
    """
    if reward_fn is None:
        return dataset
    if not uses_scores(args):
        raise ValueError(
            f"reward_funcs are only used by loss_type='smpo' (to score both images of a pair for SmPO's smoothed "
            f"preferences) and other objectives that read pair scores; loss_type={getattr(args, 'loss_type', None)!r} "
            "does not use them. Remove reward_funcs or set loss_type='smpo'."
        )
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable as reward_fn(images, prompts), got {type(reward_fn).__name__}")
    dataset = as_trl_form(dataset, args, split)  # scores follow the chosen and rejected images
    names = dataset.column_names
    if names is None:  # a streamed dataset without features: read the column names off its first row
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError(f"The {split} dataset is empty")
        names = list(first.keys())
    score_columns = score_columns_of(args)
    present = [c for c in score_columns if c in names]
    if len(present) == 2:
        logger.info("The %s dataset has score columns %s; reward_fn is not used for it", split, list(score_columns))
        return dataset
    if present:
        raise ValueError(
            f"The {split} dataset has score column {present[0]!r} but not "
            f"{[c for c in score_columns if c not in present][0]!r}; provide both or neither (reward_fn then scores "
            "both images of every row)."
        )
    layout = resolve_layout(names, args)
    dataset = with_undecoded_images(dataset, layout)

    def score(batch: dict[str, list]) -> dict[str, list[float]]:
        size = len(batch[layout.prompt])
        scored: list[int] = []
        firsts, seconds, prompts = [], [], []
        for i in range(size):
            row = {k: batch[k][i] for k in batch}
            if row_problem(row, layout)[0] or is_tie(row, layout):
                continue
            scored.append(i)
            firsts.append(load_image(row[layout.first]))
            seconds.append(load_image(row[layout.second]))
            prompts.append(row[layout.prompt])
        score_0, score_1 = [math.nan] * size, [math.nan] * size
        if scored:
            values = reward_fn(firsts + seconds, prompts + prompts)
            values = torch.as_tensor(values).detach().reshape(-1).to("cpu", torch.float64).tolist()
            if len(values) != 2 * len(scored):
                raise ValueError(f"reward_fn returned {len(values)} scores for {2 * len(scored)} images")
            for j, i in enumerate(scored):
                score_0[i], score_1[i] = values[j], values[len(scored) + j]
        return {score_columns[0]: score_0, score_columns[1]: score_1}

    features = dataset.features
    if features is not None:
        features = Features({**features, score_columns[0]: Value("float64"), score_columns[1]: Value("float64")})
    kwargs: dict[str, Any] = {"desc": f"Scoring {split} images with reward_fn"} if isinstance(dataset, Dataset) else {}
    with datasets_progress_bars(not getattr(args, "disable_tqdm", False)):
        return dataset.map(score, batched=True, batch_size=batch_size, features=features, **kwargs)
