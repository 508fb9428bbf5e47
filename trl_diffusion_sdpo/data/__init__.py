"""Preference data: loading, validation, per-image transforms and collators (:mod:`.preference`), and the latent
cache that encodes every pair once (:mod:`.latent_cache`)."""

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

__all__ = [
    "CachedPreferenceCollator",
    "DataReport",
    "LatentCache",
    "PairTransform",
    "PreferenceCollator",
    "PreferenceColumns",
    "add_reward_scores",
    "build_latent_cache",
    "load_preference_dataset",
    "order_pair",
    "pair_weights",
    "prepare_preference_dataset",
]
