"""Reward models for evaluation behind the `Scorer` interface and a name registry.

The built-in scorers are registered here by name: ``pickscore``, ``clip`` (torchmetrics convention) and
``clip-cosine`` (SDPO's), which wrap transformers' CLIP and ship with the package; ``hpsv2``, ``hpsv2.1``, ``hpsv3``,
``imagereward``, ``aesthetic`` and, for edits, ``editreward`` (an `EditScorer`: it reads each edit's source image too),
ports of published reward models in the ``trl_diffusion_sdpo_rewards`` distribution (the ``rewards`` extra). Each
module is imported when its scorer is first built, so listing or importing the package loads no model code, and a
port that is not installed is named with the command that installs it. `register_scorer` adds your own (the CPU demo
registers ``colour`` in :mod:`trl_diffusion_sdpo.demo.scorer`); a reward model of edits subclasses `EditScorer`, whose
``score`` also receives each edited image's source image(s).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...config._lazy import lazy_attributes
from .registry import REWARD_PORTS, available_scorers, register_scorer
from .registry import scorer_factory as scorer_factory  # importable here, not a user's

if TYPE_CHECKING:
    from .base import EditScorer, Scorer, build_scorer, scores_edits

# Built-in scorer name -> "module:factory", imported on first use: PickScore and CLIP score only wrap transformers'
# CLIP and stay here; the ports of published reward models are a distribution of their own (registry.REWARD_PORTS).
_BUILTIN_SCORERS = {
    "clip": f"{__name__}.clip_score:CLIPScoreScorer",
    "clip-cosine": f"{__name__}.clip_score:clip_cosine_scorer",
    "pickscore": f"{__name__}.pickscore:PickScoreScorer",
    "aesthetic": f"{REWARD_PORTS}.aesthetic:AestheticScorer",
    "editreward": f"{REWARD_PORTS}.edit_reward:EditRewardScorer",
    "hpsv2": f"{REWARD_PORTS}.hps:HPSv2Scorer",
    "hpsv2.1": f"{REWARD_PORTS}.hps:hps_v21_scorer",
    "hpsv3": f"{REWARD_PORTS}.hps_v3:HPSv3Scorer",
    "imagereward": f"{REWARD_PORTS}.image_reward:ImageRewardScorer",
}
for _name, _factory in _BUILTIN_SCORERS.items():
    register_scorer(_name, _factory)

_EXPORTS = {
    "EditScorer": ".base",
    "Scorer": ".base",
    "build_scorer": ".base",
    "scores_edits": ".base",
    "CLIPScoreScorer": ".clip_score",
    "PickScoreScorer": ".pickscore",
}

# What users import: the interface and the registry. Each built-in scorer is reached by its registered name
# (build_scorer("pickscore")); its class stays importable from here, by name, and a port's from
# trl_diffusion_sdpo_rewards.
__all__ = ["EditScorer", "Scorer", "available_scorers", "build_scorer", "register_scorer", "scores_edits"]

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
