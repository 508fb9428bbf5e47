"""Preference data: loading, validation, per-image transforms and collators (:mod:`.preference`), the latent
cache that encodes every pair once (:mod:`.latent_cache`), and its sharded, resumable form for datasets one process
cannot hold (:mod:`.sharded_cache`)."""

from .latent_cache import CachedPreferenceCollator, LatentCache, build_latent_cache
from .preference import (
    DataReport,
    PairTransform,
    PreferenceCollator,
    PreferenceColumns,
    add_reward_scores,
    load_preference_dataset,
    order_pair,
    pair_weights,
    prepare_preference_dataset,
)
from .sharded_cache import ShardedLatentCache, build_sharded_latent_cache, load_sharded_latent_cache

__all__ = [
    "CachedPreferenceCollator",
    "DataReport",
    "LatentCache",
    "PairTransform",
    "PreferenceCollator",
    "PreferenceColumns",
    "ShardedLatentCache",
    "add_reward_scores",
    "build_latent_cache",
    "build_sharded_latent_cache",
    "load_preference_dataset",
    "load_sharded_latent_cache",
    "order_pair",
    "pair_weights",
    "prepare_preference_dataset",
]
