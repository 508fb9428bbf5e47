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
from .registry import available_scorers, register_scorer, scorer_factory

if TYPE_CHECKING:
    from .aesthetic import AestheticMLP, AestheticScorer
    from .base import EditScorer, Scorer, build_scorer, scores_edits
    from .clip_score import CLIPScoreScorer
    from .edit_reward import EditRewardScorer, editreward_to_transformers
    from .hps import HPSv2Scorer, open_clip_to_transformers
    from .hps_v3 import HPSv3Scorer, hpsv3_to_transformers
    from .image_reward import ImageRewardModel, ImageRewardScorer, blip_to_transformers
    from .pickscore import PickScoreScorer

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

__all__ = [
    "AestheticMLP",
    "AestheticScorer",
    "CLIPScoreScorer",
    "EditRewardScorer",
    "EditScorer",
    "HPSv2Scorer",
    "HPSv3Scorer",
    "ImageRewardModel",
    "ImageRewardScorer",
    "PickScoreScorer",
    "Scorer",
    "available_scorers",
    "blip_to_transformers",
    "build_scorer",
    "editreward_to_transformers",
    "hpsv3_to_transformers",
    "open_clip_to_transformers",
    "register_scorer",
    "scorer_factory",
    "scores_edits",
]

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
