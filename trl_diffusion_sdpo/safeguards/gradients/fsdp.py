"""The exact safeguard's collectives under FSDP: FSDP2's on each process's gradient shards
(:class:`FSDP2Collectives`), and FSDP1's refusals (:class:`FSDP1Collectives`). Imported when an FSDP run chooses the
exact safeguard (:data:`~.collectives.COLLECTIVES`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...engines.collectives import all_reduce_sum
from .collectives import BranchCollectives, ShardSums, SumReduction, register_collectives
from .one_pass_sharded import ShardedOnePassBranchGradients
from .per_branch import BranchGradientSplitter

__all__ = ["FSDP1Collectives", "FSDP2Collectives"]


@register_collectives("fsdp2")
class FSDP2Collectives(ShardSums, BranchCollectives):
    """FSDP2: each branch's backward reduce-scatters its gradient inside autograd, so the parameter space works on
    each process's gradient shards (hook-free) and its inner products are summed over processes: the global scope
    is implied. The update space works on the same shards and the optimizer state's: every sum it forms, ``D(lambda)``
    at each evaluation of its search included, is summed over processes, so every process finds the ``lambda`` of
    the global micro-batch. The accumulation window's earlier sum is set aside while the branches run."""

    one_pass_store_class = ShardedOnePassBranchGradients

    def check_parameter_space(self, scope: str) -> None:
        if scope == "local":
            raise ValueError(
                "safeguard_space='parameter' under FSDP2 needs safeguard_scope='global' (or 'pair'): FSDP2 averages "
                "each branch's gradient over processes, so lambda is that of the global micro-batch. Set "
                "safeguard_scope='global', or use DDP for one lambda per process."
            )

    def per_branch_store(self, parameters: Sequence[torch.nn.Parameter]) -> BranchGradientSplitter:
        return BranchGradientSplitter(parameters, local=True)

    def set_aside_accumulated(
        self, policy: torch.nn.Module, parameters: Sequence[torch.nn.Parameter]
    ) -> list[torch.Tensor | None]:
        # Each branch must reach its gradient shards now, not at the end of the accumulation window; the window's
        # earlier sum is set aside (a 1/N-sized shard) so the branches start from empty gradients.
        policy.set_requires_gradient_sync(True)
        accumulated = [p.grad for p in parameters]
        for p in parameters:
            p.grad = None
        return accumulated

    def update_sum_reduction(self) -> SumReduction:
        return all_reduce_sum  # the sums over this process's shards: added up, the global sums on every process

    def reduce_combined_gradients(self, parameters: Sequence[torch.nn.Parameter], sync_gradients: bool) -> None:
        """Nothing: every branch was reduce-scattered inside its backward."""


@register_collectives("fsdp1")
class FSDP1Collectives(BranchCollectives):
    """FSDP1's flattened, sharded gradients cannot be separated per branch, and its flat optimizer state cannot be
    read per weight: the parameter and update spaces are refused, each naming FSDP2."""

    def check_parameter_space(self, scope: str) -> None:
        raise ValueError(
            "safeguard_space='parameter' is not supported under FSDP1; use FSDP2 "
            "(examples/accelerate_configs/fsdp2.yaml), DDP or DeepSpeed ZeRO-1/2, or keep FSDP1 with "
            "safeguard_space='output'."
        )

    def check_update_space(self) -> None:
        raise ValueError(
            "safeguard_space='update' is not supported under FSDP1: its flattened, sharded optimizer state cannot "
            "be read per weight. Use FSDP2 (examples/accelerate_configs/fsdp2.yaml), DDP or DeepSpeed ZeRO "
            "(deepspeed_zero2.yaml) with safeguard_space='update', or keep FSDP1 with safeguard_space='output'."
        )
