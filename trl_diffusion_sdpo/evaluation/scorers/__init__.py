"""Reward models for evaluation, one module each, behind the `Scorer` interface and a name registry.

Importing this package registers ``pickscore``, ``hpsv2``, ``hpsv2.1``, ``imagereward``, ``aesthetic``, ``clip``
(torchmetrics convention), ``clip-cosine`` (SDPO's) and ``colour`` (the CPU demo's toy reward); `register_scorer`
adds your own.
"""

from .aesthetic import AestheticMLP, AestheticScorer
from .base import Scorer, available_scorers, build_scorer, register_scorer
from .clip_score import CLIPScoreScorer
from .hps import HPSv2Scorer, open_clip_to_transformers
from .image_reward import ImageRewardModel, ImageRewardScorer, blip_to_transformers
from .pickscore import PickScoreScorer


def _colour_scorer(**kwargs) -> Scorer:
    """The demo's colour reward, imported when asked for (the demo package is not needed otherwise)."""
    from ...demo.scorer import ColourRewardScorer

    return ColourRewardScorer(**kwargs)


register_scorer("colour", _colour_scorer)

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
