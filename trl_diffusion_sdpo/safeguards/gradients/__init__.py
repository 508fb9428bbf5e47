"""Per-branch gradients for the exact safeguard: the stores that keep the winner's and the loser's gradients apart
within a micro-batch (:mod:`.base` has their protocol), the per-layer taps that split them inside one pass
(:mod:`.layer_taps`, :mod:`.one_pass`; on sharded weights :mod:`.one_pass_sharded`), the per-branch passes
(:mod:`.per_branch`; on DeepSpeed ZeRO-3's gradient partitions: :mod:`.zero3`), and each engine's reductions over
processes (:mod:`.collectives`, registered by engine in :data:`~.collectives.COLLECTIVES`; DeepSpeed's in
:mod:`.deepspeed` and :mod:`.zero3`, FSDP's in :mod:`.fsdp`).

The names below resolve on first use, so a run imports the store and the collectives of its own engine and pass,
and no other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...config._lazy import lazy_attributes

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from .base import BranchGradients, PerBranchStore
    from .collectives import COLLECTIVES, BranchCollectives, collectives_for, register_collectives
    from .one_pass import OnePassBranchGradients, blocked_dot
    from .one_pass_sharded import ShardedOnePassBranchGradients, ZeRO3OnePassBranchGradients
    from .per_branch import BranchGradientSplitter, EngineBranchGradients
    from .zero3 import DeepSpeedZeRO3Collectives, ZeRO3BranchGradients

_EXPORTS = {
    "BranchCollectives": ".collectives",
    "BranchGradientSplitter": ".per_branch",
    "BranchGradients": ".base",
    "COLLECTIVES": ".collectives",
    "DeepSpeedZeRO3Collectives": ".zero3",
    "EngineBranchGradients": ".per_branch",
    "OnePassBranchGradients": ".one_pass",
    "PerBranchStore": ".base",
    "ShardedOnePassBranchGradients": ".one_pass_sharded",
    "ZeRO3BranchGradients": ".zero3",
    "ZeRO3OnePassBranchGradients": ".one_pass_sharded",
    "blocked_dot": ".one_pass",
    "collectives_for": ".collectives",
    "register_collectives": ".collectives",
}

__all__ = [
    "BranchCollectives",
    "BranchGradientSplitter",
    "BranchGradients",
    "COLLECTIVES",
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

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
