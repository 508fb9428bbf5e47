"""FSDP: FSDP2 (``fully_shard``), the supported one, and FSDP1, which accelerate still offers."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch

from ..distributed import (
    all_reduce_sum,
    drop_fsdp_model_copy,
    gather_fsdp2_state_dict,
    loading_into_shards,
    shard_reference_fsdp2,
)
from ..tuning import reference_like_policy
from .base import Engine
from .branches import BranchGradientSplitter

__all__ = ["FSDP1Engine", "FSDP2Engine"]


class FSDP2Engine(Engine):
    """FSDP2: parameters and gradients are DTensor shards.

    Each branch's backward reduce-scatters its gradient inside autograd, so the parameter-space safeguard works on
    each process's gradient shards (hook-free) and its inner products are summed over processes: the global scope
    is implied. The accumulation window's earlier sum is set aside while the branches run.
    """

    name = "fsdp2"
    replaces_parameters_in_train = True
    samples_whole_denoiser = False

    def check_parameter_space(self, scope: str) -> None:
        if scope != "global":
            raise ValueError(
                "safeguard_space='parameter' under FSDP2 needs safeguard_scope='global': FSDP2 averages each branch's "
                "gradient over processes inside its backward, so lambda is that of the global micro-batch. Set "
                "safeguard_scope='global', or use DDP for one lambda per process."
            )

    def one_pass_reason(self) -> str:
        return (
            "FSDP2 gathers each weight for its layer and reduce-scatters its gradient inside autograd; the one-pass "
            "split would hold whole per-branch gradients of gathered weights (not implemented under FSDP2)"
        )

    def branch_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> BranchGradientSplitter:
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

    def winner_reduction(self, global_scope: bool) -> None:
        return None  # already averaged by FSDP2's reduce-scatter

    def reduce_branch_sums(
        self, winner_sq: torch.Tensor, cross: torch.Tensor, global_scope: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Sums over this process's shards of the already averaged gradients: add them up.
        winner_sq, cross = all_reduce_sum(torch.stack([winner_sq, cross]))
        return winner_sq, cross

    def reduce_combined_gradients(self, parameters: Sequence[torch.nn.Parameter], sync_gradients: bool) -> None:
        """Nothing: every branch was reduce-scattered inside its backward."""

    def check_validation_sampling(self) -> None:
        raise ValueError(
            "validation_prompts cannot sample under DeepSpeed ZeRO-3 or FSDP2 (every process holds only a "
            "shard of the denoiser, and the main process samples alone); validate from a saved checkpoint with "
            "`trl-diffusion-sdpo evaluate`, or use ZeRO-2 or DDP."
        )

    def place_reference(
        self, module: torch.nn.Module, policy: torch.nn.Module, device: torch.device, dtype: torch.dtype
    ) -> torch.nn.Module:
        # In the policy's dtypes before sharding, as the policy is: the mixed-precision policy then casts both alike
        # when it gathers a block, and the models' float32 modules stay float32 in the reference.
        reference_like_policy(module, policy, device, dtype)
        return shard_reference_fsdp2(module, self.accelerator)

    def gathers_for_save(self) -> bool:
        return True

    def gather_state_dict(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        return gather_fsdp2_state_dict(model, trainable_only=trainable_only)

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        # Each process copies its own shards out of the full tensors on disk.
        with loading_into_shards():
            yield

    @contextlib.contextmanager
    def loading_optimizer(self) -> Iterator[None]:
        """accelerate restores FSDP2 optimizer state with torch's ``set_optimizer_state_dict``, which by default
        refuses a trainable parameter without saved state. A parameter that never received a gradient has none
        (AdamW creates it at the first gradient): Qwen-Image's last block discards its text stream, so its
        ``to_add_out`` adapters never train. Within the block the load is not strict, as ``Optimizer.load_state_dict``
        (DDP) and DeepSpeed are: such a parameter resumes without state, as it trained without."""
        from torch.distributed.checkpoint import state_dict as torch_state_dict

        set_optimizer_state_dict = torch_state_dict.set_optimizer_state_dict

        def not_strict(model, optimizers, optim_state_dict, *, options=None):
            options = dataclasses.replace(options or torch_state_dict.StateDictOptions(), strict=False)
            return set_optimizer_state_dict(model, optimizers, optim_state_dict, options=options)

        torch_state_dict.set_optimizer_state_dict = not_strict  # accelerate imports it at each call
        try:
            yield
        finally:
            torch_state_dict.set_optimizer_state_dict = set_optimizer_state_dict

    def clean_checkpoint(self, output_dir: str, should_save: bool) -> None:
        # accelerate's pickled copy of the weights duplicates the diffusers files
        self.accelerator.wait_for_everyone()
        if should_save:
            drop_fsdp_model_copy(output_dir)


class FSDP1Engine(Engine):
    """FSDP1 (``FullyShardedDataParallel``): trained as accelerate does it; the parameter-space safeguard cannot
    separate its flattened, sharded gradients per branch."""

    name = "fsdp1"
    replaces_parameters_in_train = True

    def check_parameter_space(self, scope: str) -> None:
        raise ValueError(
            "safeguard_space='parameter' is not supported under FSDP1; use FSDP2 "
            "(examples/accelerate_configs/fsdp2.yaml), DDP or DeepSpeed ZeRO-1/2, or keep FSDP1 with "
            "safeguard_space='output'."
        )

    def reduce_combined_gradients(self, parameters: Sequence[torch.nn.Parameter], sync_gradients: bool) -> None:
        """Never called: :meth:`check_parameter_space` refuses the per-branch passes."""
