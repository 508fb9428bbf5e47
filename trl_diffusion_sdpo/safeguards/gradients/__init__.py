"""Per-branch gradients for the exact safeguard: the stores that keep the winner's and the loser's gradients apart
within a micro-batch (:mod:`.base` has their protocol), the per-layer taps that split them inside one pass
(:mod:`.layer_taps`, :mod:`.one_pass`; on sharded weights :mod:`.one_pass_sharded`), the per-branch passes
(:mod:`.per_branch`; on DeepSpeed ZeRO-3's gradient partitions: :mod:`.zero3`), and each engine's reductions over
processes (:mod:`.collectives`).
"""

from __future__ import annotations

from .base import BranchGradients, PerBranchStore
from .collectives import BranchCollectives, collectives_for, register_collectives
from .one_pass import OnePassBranchGradients, blocked_dot
from .one_pass_sharded import ShardedOnePassBranchGradients, ZeRO3OnePassBranchGradients
from .per_branch import BranchGradientSplitter, EngineBranchGradients
from .zero3 import DeepSpeedZeRO3Collectives, ZeRO3BranchGradients  # registers ZeRO-3's collectives

__all__ = [
    "BranchCollectives",
    "BranchGradientSplitter",
    "BranchGradients",
    "DeepSpeedZeRO3Collectives",
    "EngineBranchGradients",
    "OnePassBranchGradients",
    "PerBranchStore",
    "ShardedOnePassBranchGradients",
    "ZeRO3BranchGradients",
    "ZeRO3OnePassBranchGradients",
    "blocked_dot",
    "collectives_for",
    "register_collectives",
]
