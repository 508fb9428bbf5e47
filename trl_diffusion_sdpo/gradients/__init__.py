"""Per-branch gradients for the exact safeguard: the stores that keep the winner's and the loser's gradients apart
within a micro-batch (:mod:`.base` has their protocol), the per-layer taps that split them inside one pass
(:mod:`.layer_taps`, :mod:`.one_pass`), the per-branch passes (:mod:`.per_branch`), and each engine's reductions over
processes (:mod:`.collectives`).
"""

from __future__ import annotations

from .base import BranchGradients, PerBranchStore
from .collectives import BranchCollectives, collectives_for, register_collectives
from .one_pass import OnePassBranchGradients, blocked_dot
from .per_branch import BranchGradientSplitter, EngineBranchGradients, branch_cotangents

__all__ = [
    "BranchCollectives",
    "BranchGradientSplitter",
    "BranchGradients",
    "EngineBranchGradients",
    "OnePassBranchGradients",
    "PerBranchStore",
    "blocked_dot",
    "branch_cotangents",
    "collectives_for",
    "register_collectives",
]
