"""Everything the trainer reads data through, built once: datasets, collators, reports, the latent cache.

Three sources, one result (:class:`TrainingData`): a preference dataset encoded live, the same dataset encoded once
into a latent cache (``cache_latents``), or a cache written by ``trl-diffusion-sdpo cache`` (read streamed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

# its names resolve on first use: the latent cache's with cache_latents only, the scoring with reward functions, the
# video transform for video data
from .. import data as preference_data
from ..config._lazy import import_target
from ..families import ModelFamily, PromptEmbeddings, registered_families
from .collators import PreferenceCollator
from .columns import SOURCE_IMAGE, SOURCE_IMAGES, PreferenceColumns
from .preparation import prepare_preference_dataset
from .transforms import PairTransform
from .validation import DataReport

if TYPE_CHECKING:
    from .scoring import RewardFn
    from .video import VideoPairTransform

__all__ = ["PrebuiltTrainingData", "TrainingData", "eval_collator_for", "prepare_training_data"]

#: the latent cache of a split (``cache_latents``; :mod:`.latent_cache`, loaded by a run that caches)
LATENT_CACHE = "trl_diffusion_sdpo.data.latent_cache:latent_cache_for"


@runtime_checkable
class PrebuiltTrainingData(Protocol):
    """A training set encoded before the run that brings its own columns, report, collator and empty prompt: the
    cache ``trl-diffusion-sdpo cache`` writes (:class:`~.sharded_cache.ShardedLatentCache`). The trainer reads it as
    it is, once it has checked that it was encoded as this run would encode it."""

    dataset: Any
    empty_prompt: PromptEmbeddings | None

    @property
    def columns(self) -> PreferenceColumns: ...

    def check_matches(self, family: ModelFamily, args: Any) -> None: ...

    def report(self) -> DataReport: ...

    def collator(self) -> Any: ...


@dataclass
class TrainingData:
    """The datasets and collators of a run, the data reports, and what the step needs from a cache."""

    train_dataset: Any
    eval_dataset: Any  # None, a dataset, or a dict of them by name
    collator: Any
    eval_collator: Any  # a collator, or a dict of them with the eval datasets' names
    report: DataReport
    eval_report: DataReport | dict[str, DataReport] | None
    empty_prompt: PromptEmbeddings | None  # a cache's stored empty-prompt embeddings (prompt dropout)
    encoders_idle: bool  # no image or prompt is encoded during training: the VAE and text encoders stay on the CPU


def eval_collator_for(eval_collator: Any, eval_dataset: Any) -> Any:
    """The collator of one evaluation: of the named eval datasets (``eval_collator`` a dict of collators by name)
    transformers asks for each by name; an evaluation of a dataset given directly takes the first."""
    if isinstance(eval_collator, dict):
        return eval_collator[eval_dataset] if isinstance(eval_dataset, str) else next(iter(eval_collator.values()))
    return eval_collator


def prepare_training_data(
    train_dataset,
    eval_dataset,
    args,
    family: ModelFamily,
    reward_fn: RewardFn | None = None,
) -> TrainingData:
    """Validate and prepare the datasets for ``args`` (a ``DiffusionSDPOConfig``) and ``family``; encode them into
    a latent cache with ``cache_latents``. SmPO: images are scored with ``reward_fn`` where score columns are absent.
    """
    _check_media(args, family)
    prebuilt = train_dataset if isinstance(train_dataset, PrebuiltTrainingData) else None
    if prebuilt is not None:
        prebuilt.check_matches(family, args)
        train_dataset, columns, report = prebuilt.dataset, prebuilt.columns, prebuilt.report()
    else:
        train_dataset = _scored(train_dataset, args, reward_fn, "train")
        train_dataset, columns, report = prepare_preference_dataset(train_dataset, args, "train")
    check_sources(columns, args, family)
    transform = _pair_transform(args, family, columns)
    tokenize = family.prompt_tokenizer()
    collator = PreferenceCollator(columns, tokenize, transform, train=True, with_flipped=args.random_flip)
    empty_prompt: PromptEmbeddings | None = None
    if prebuilt is not None:
        collator = prebuilt.collator()
        empty_prompt = prebuilt.empty_prompt
    if args.cache_latents and prebuilt is None:
        # Encode once (main process first, the others load), then train from the cache.
        train_cache = import_target(LATENT_CACHE)(train_dataset, columns, args, family, "train")
        train_dataset, empty_prompt = train_cache.dataset, train_cache.empty_prompt
        collator = preference_data.CachedPreferenceCollator(with_flipped=args.random_flip)
    # One evaluation set, or several by name (a dict, as transformers takes it: each evaluated under eval_<name>).
    evals = {
        name: _eval_split(dataset, split, args, family, reward_fn, tokenize, transform)
        for name, dataset, split in _named_eval_sets(eval_dataset)
    }
    if isinstance(eval_dataset, dict):
        eval_dataset = {name: dataset for name, (dataset, _, _) in evals.items()}
        eval_collator = {name: collator for name, (_, collator, _) in evals.items()}
        eval_report = {name: report for name, (_, _, report) in evals.items()}
    else:
        eval_dataset, eval_collator, eval_report = evals.get(
            None, (None, PreferenceCollator(columns, tokenize, transform, train=False), None)
        )
    return TrainingData(
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        collator=collator,
        eval_collator=eval_collator,
        report=report,
        eval_report=eval_report,
        empty_prompt=empty_prompt,
        encoders_idle=args.cache_latents or (prebuilt is not None and eval_dataset is None),
    )


def _named_eval_sets(eval_dataset) -> list[tuple[str | None, Any, str]]:
    """``(name, dataset, split)`` of each evaluation set: one unnamed (``split`` "eval"), or each of a dict's, whose
    split reads ``eval_<name>`` (the prefix of its metrics); none for ``None``."""
    if eval_dataset is None:
        return []
    if not isinstance(eval_dataset, dict):
        return [(None, eval_dataset, "eval")]
    if not eval_dataset:
        raise ValueError("eval_dataset is an empty dict: give at least one named evaluation dataset, or None")
    return [(name, dataset, f"eval_{name}") for name, dataset in eval_dataset.items()]


def _eval_split(dataset, split: str, args, family: ModelFamily, reward_fn, tokenize, transform) -> tuple[Any, ...]:
    """An evaluation set validated (and encoded into a latent cache with ``cache_latents``): ``(dataset, collator,
    report)``. Its own columns: two sets may name theirs differently."""
    dataset = _scored(dataset, args, reward_fn, split)
    dataset, columns, report = prepare_preference_dataset(dataset, args, split)
    check_sources(columns, args, family, split)
    collator = PreferenceCollator(columns, tokenize, transform, train=False)
    if args.cache_latents:
        dataset = import_target(LATENT_CACHE)(dataset, columns, args, family, split).dataset
        collator = preference_data.CachedPreferenceCollator()
    return dataset, collator, report


def _check_media(args, family: ModelFamily) -> None:
    """Video settings for a video family, none for an image family, before any row is read."""
    if family.video != (args.num_frames is not None):
        raise ValueError(
            f"{family.name} trains on {'videos' if family.video else 'images'}, but num_frames is "
            f"{args.num_frames!r}: "
            + ("set num_frames (frames per clip)" if family.video else "leave num_frames unset for image models")
        )


def check_sources(columns: PreferenceColumns, args, family: ModelFamily, split: str = "train") -> None:
    """Editing data for an editing family and text-to-image data for the others, and the settings editing cannot
    take, before any row is encoded: a ValueError naming the column or the field."""
    if family.sources_optional and not columns.edits:  # text-to-image data on a family that also edits (FLUX.2)
        return
    if family.edits and not columns.edits:
        raise ValueError(
            f"{family.name} edits a source image, but the {split} dataset has no source column: add "
            f"{SOURCE_IMAGE!r} (one image per row) or {SOURCE_IMAGES!r} (a list), or rename the dataset's source "
            "column to one of them (docs/editing.md)"
        )
    if columns.edits and not family.edits:
        raise ValueError(
            f"the {split} dataset has a source column {columns.source!r}, but {family.name} is a text-to-image "
            f"family: load an editing pipeline ({_editing_pipelines()}), or drop the column"
        )
    if not columns.edits:
        return
    # the editing data's settings, checked by its module (loaded by data with a source column)
    import_target("trl_diffusion_sdpo.data.editing:check_editing_settings")(columns, args, family)


def _editing_pipelines() -> str:
    return ", ".join(name for family in registered_families() if family.edits for name in family.pipeline_classes)


def _pair_transform(args, family: ModelFamily, columns: PreferenceColumns) -> PairTransform | VideoPairTransform:
    """The image transform, or the video clip transform when the family trains on videos (``num_frames`` set)."""
    if columns.clip is None:
        return PairTransform(args.resolution, args.random_crop, independent=args.independent_augmentation)
    return preference_data.VideoPairTransform(args.resolution, columns.clip, random_crop=args.random_crop)


def _scored(dataset, args, reward_fn: RewardFn | None, split: str) -> Any:
    """``dataset`` with SmPO's score columns written by ``reward_fn`` (:func:`~.scoring.add_reward_scores`); as it
    is without reward functions, which leave it unchanged."""
    return dataset if reward_fn is None else preference_data.add_reward_scores(dataset, args, reward_fn, split)
