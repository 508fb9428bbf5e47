"""Preference data: loading, validation, per-image transforms and collators (:mod:`.preference`), and the latent
cache that encodes every pair once (:mod:`.latent_cache`)."""

from .latent_cache import CachedPreferenceCollator, LatentCache, build_latent_cache
from .preference import (
    DataReport,
    PairTransform,
    PreferenceCollator,
    PreferenceColumns,
    load_preference_dataset,
    prepare_preference_dataset,
)

__all__ = [
    "CachedPreferenceCollator",
    "DataReport",
    "LatentCache",
    "PairTransform",
    "PreferenceCollator",
    "PreferenceColumns",
    "build_latent_cache",
    "load_preference_dataset",
    "prepare_preference_dataset",
]
