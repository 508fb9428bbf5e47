"""Rewards: the reward functions online training calls (:mod:`.functions`: in-process scorers and remote rewards
over HTTP), the reward server that serves a scorer (:mod:`.server`), the scorers themselves (:mod:`.scorers`: CLIP
score, PickScore and the reward-model ports).

The names below resolve on first use, so a run that scores nothing (no ``reward_funcs``) loads none of them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config._lazy import lazy_attributes

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from .functions import (
        RemoteReward,
        RewardError,
        RewardFunction,
        RewardFunctions,
        dataset_scoring_function,
        is_reward_url,
    )

_EXPORTS = {
    "RemoteReward": ".functions",
    "RewardError": ".functions",
    "RewardFunction": ".functions",
    "RewardFunctions": ".functions",
    "dataset_scoring_function": ".functions",
    "is_reward_url": ".functions",
}

__all__ = [
    "RemoteReward",
    "RewardError",
    "RewardFunction",
    "RewardFunctions",
    "dataset_scoring_function",
    "is_reward_url",
]

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
