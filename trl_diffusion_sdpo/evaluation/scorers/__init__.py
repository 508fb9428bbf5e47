"""Reward models for evaluation, one module each, behind the `Scorer` interface and a name registry.

The built-in scorers are registered here by name: ``pickscore``, ``hpsv2``, ``hpsv2.1``, ``hpsv3``,
``imagereward``, ``aesthetic``, ``clip`` (torchmetrics convention), ``clip-cosine`` (SDPO's) and, for edits,
``editreward`` (an `EditScorer`: it reads each edit's source image too); each module is
imported when its scorer is first built, so listing or importing the package loads no model code. `register_scorer`
adds your own (the CPU demo registers ``colour`` in :mod:`trl_diffusion_sdpo.demo.scorer`); a reward model of edits
subclasses `EditScorer`, whose ``score`` also receives each edited image's source image(s).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..._lazy import lazy_attributes
from .registry import available_scorers, register_scorer
from .registry import scorer_factory as scorer_factory  # importable here, not a user's

if TYPE_CHECKING:
    from .base import EditScorer, Scorer, build_scorer, scores_edits

# Built-in scorer name -> "module:factory", imported on first use.
_BUILTIN_SCORERS = {
    "aesthetic": "aesthetic:AestheticScorer",
    "clip": "clip_score:CLIPScoreScorer",
    "clip-cosine": "clip_score:clip_cosine_scorer",
    "editreward": "edit_reward:EditRewardScorer",
    "hpsv2": "hps:HPSv2Scorer",
    "hpsv2.1": "hps:hps_v21_scorer",
    "hpsv3": "hps_v3:HPSv3Scorer",
    "imagereward": "image_reward:ImageRewardScorer",
    "pickscore": "pickscore:PickScoreScorer",
}
for _name, _factory in _BUILTIN_SCORERS.items():
    register_scorer(_name, f"{__name__}.{_factory}")

_EXPORTS = {
    "EditScorer": ".base",
    "Scorer": ".base",
    "build_scorer": ".base",
    "scores_edits": ".base",
    "AestheticMLP": ".aesthetic",
    "AestheticScorer": ".aesthetic",
    "CLIPScoreScorer": ".clip_score",
    "EditRewardScorer": ".edit_reward",
    "editreward_to_transformers": ".edit_reward",
    "HPSv2Scorer": ".hps",
    "HPSv3Scorer": ".hps_v3",
    "hpsv3_to_transformers": ".hps_v3",
    "ImageRewardModel": ".image_reward",
    "ImageRewardScorer": ".image_reward",
    "PickScoreScorer": ".pickscore",
    "blip_to_transformers": ".image_reward",
    "open_clip_to_transformers": ".hps",
}

# What users import: the interface and the registry. Each built-in scorer is reached by its registered name
# (build_scorer("hpsv2")); its class and weight conversion stay importable from here, by name.
__all__ = ["EditScorer", "Scorer", "available_scorers", "build_scorer", "register_scorer", "scores_edits"]

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
