"""Reward models for evaluation, one module each, behind the `Scorer` interface and a name registry.

Importing this package registers ``pickscore``, ``hpsv2``, ``hpsv2.1``, ``imagereward``, ``aesthetic``, ``clip``
(torchmetrics convention) and ``clip-cosine`` (SDPO's); `register_scorer` adds your own.
"""

from .aesthetic import AestheticMLP, AestheticScorer
from .base import Scorer, available_scorers, build_scorer, register_scorer
from .clip_score import CLIPScoreScorer
from .hps import HPSv2Scorer, open_clip_to_transformers
from .image_reward import ImageRewardModel, ImageRewardScorer, blip_to_transformers
from .pickscore import PickScoreScorer

__all__ = [
    "AestheticMLP",
    "AestheticScorer",
    "CLIPScoreScorer",
    "HPSv2Scorer",
    "ImageRewardModel",
    "ImageRewardScorer",
    "PickScoreScorer",
    "Scorer",
    "available_scorers",
    "blip_to_transformers",
    "build_scorer",
    "open_clip_to_transformers",
    "register_scorer",
]
