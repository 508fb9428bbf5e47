"""Preference data, one question per module: how files on disk are read (:mod:`.formats`), how Pick-a-Pic's label
form becomes TRL's preference form, the one training reads (:mod:`.pickapic`), is a dataset usable and which image
wins (:mod:`.validation`; an editing row's sources in :mod:`.editing`, a row's loss mask in :mod:`.masks`), how it
is prepared for training (:mod:`.preparation`), how images become pixels (:mod:`.transforms`), how video clips are
read (:mod:`.video`), how rows become batches (:mod:`.collators`), how images are scored for SmPO (:mod:`.scoring`),
the latent cache that encodes every pair once (:mod:`.latent_cache`), and its sharded, resumable form for datasets
one process cannot hold (:mod:`.sharded_cache`).

Each module is imported when it is used, the names below resolving on first access."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config._lazy import lazy_attributes

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from .collators import PreferenceCollator, pair_scores
    from .columns import PreferenceColumns, order_pair
    from .formats import (
        detect_format,
        hub_dataset_problem,
        load_preference_data,
        load_preference_dataset,
        resolve_path,
    )
    from .latent_cache import (
        CachedPreferenceCollator,
        LatentCache,
        build_latent_cache,
        cached_moments,
        cached_prompt_embeds,
        cached_time_ids,
    )
    from .pickapic import as_trl_form, pickapic_to_trl
    from .preparation import prepare_preference_dataset
    from .scoring import RewardFn, add_reward_scores
    from .sharded_cache import ShardedLatentCache, build_sharded_latent_cache, load_sharded_latent_cache
    from .transforms import PairTransform, load_image
    from .validation import DataReport, resolve_columns
    from .video import VideoClip, VideoPairTransform, read_video

# Public name -> the module that defines it, imported when the name is first used: a run loads the data formats,
# caches and scoring it uses.
_EXPORTS = {
    "PreferenceCollator": ".collators",
    "pair_scores": ".collators",
    "PreferenceColumns": ".columns",
    "order_pair": ".columns",
    "detect_format": ".formats",
    "load_preference_data": ".formats",
    "hub_dataset_problem": ".formats",
    "resolve_path": ".formats",
    "CachedPreferenceCollator": ".latent_cache",
    "LatentCache": ".latent_cache",
    "build_latent_cache": ".latent_cache",
    "cached_moments": ".latent_cache",
    "cached_prompt_embeds": ".latent_cache",
    "cached_time_ids": ".latent_cache",
    "pickapic_to_trl": ".pickapic",
    "as_trl_form": ".pickapic",
    "load_preference_dataset": ".formats",
    "prepare_preference_dataset": ".preparation",
    "RewardFn": ".scoring",
    "add_reward_scores": ".scoring",
    "ShardedLatentCache": ".sharded_cache",
    "build_sharded_latent_cache": ".sharded_cache",
    "load_sharded_latent_cache": ".sharded_cache",
    "PairTransform": ".transforms",
    "load_image": ".transforms",
    "DataReport": ".validation",
    "resolve_columns": ".validation",
    "VideoClip": ".video",
    "VideoPairTransform": ".video",
    "read_video": ".video",
}

__all__ = [
    "CachedPreferenceCollator",
    "DataReport",
    "LatentCache",
    "PairTransform",
    "PreferenceCollator",
    "PreferenceColumns",
    "RewardFn",
    "ShardedLatentCache",
    "VideoClip",
    "VideoPairTransform",
    "add_reward_scores",
    "as_trl_form",
    "build_latent_cache",
    "build_sharded_latent_cache",
    "cached_moments",
    "cached_prompt_embeds",
    "cached_time_ids",
    "detect_format",
    "hub_dataset_problem",
    "load_image",
    "load_preference_data",
    "load_preference_dataset",
    "load_sharded_latent_cache",
    "order_pair",
    "pair_scores",
    "pickapic_to_trl",
    "prepare_preference_dataset",
    "read_video",
    "resolve_columns",
    "resolve_path",
]

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
