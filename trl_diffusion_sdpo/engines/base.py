"""The interface every training engine implements: what differs between one process or DDP, DeepSpeed ZeRO, FSDP.

The trainer picks an engine once (:func:`~trl_diffusion_sdpo.engines.engine_for`) after accelerate has set up its
``Accelerator``, and from then on asks it instead of checking which engine runs. An engine answers:

* whether the parameter-space safeguard can run, and in which scope (:meth:`Engine.check_parameter_space`), and
  whether the update space can (:meth:`Engine.check_update_space`, :meth:`Engine.reduce_branch_gradients`);
* where the per-branch gradients live (:meth:`Engine.branch_gradients`), what happens to gradients accumulated
  before a micro-batch's branches (:meth:`Engine.set_aside_accumulated`) and how the branches' inner products and
  the combined gradient are reduced over processes (:meth:`Engine.reduce_branch_sums`,
  :meth:`Engine.reduce_combined_gradients`);
* where a frozen reference copy lives, and in which precision (:meth:`Engine.place_reference`);
* how the weights are gathered for a save (:meth:`Engine.gather_state_dict`), loaded back
  (:meth:`Engine.loading`) and what accelerate writes that a checkpoint does not need
  (:meth:`Engine.clean_checkpoint`);
* who owns gradient clipping and overflow skipping (:attr:`Engine.manages_gradients`,
  :attr:`Engine.skips_nonfinite_steps`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import torch
from accelerate.utils import DistributedType

from ..distributed import all_reduce_mean_, all_reduce_sum
from ..tuning import reference_like_policy
from .branches import BranchGradientSplitter, EngineBranchGradients

__all__ = ["BranchGradients", "Engine"]

BranchGradients = BranchGradientSplitter | EngineBranchGradients

# Where gradients are sharded or clipped by the engine itself, accelerate's own clipping must be used.
_ENGINE_MANAGED = {DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.XLA, DistributedType.MEGATRON_LM}


class Engine(ABC):
    """One training engine behind accelerate. Subclasses override what differs; the defaults are one process's."""

    name: str = "base"
    #: DeepSpeed steps (and skips an overflowing step) inside its backward: the non-finite guard only counts.
    skips_nonfinite_steps: bool = False
    #: FSDP wraps the model inside ``Trainer.train()``, replacing the parameters: none can be listed before it.
    replaces_parameters_in_train: bool = False
    #: Validation sampling needs the whole denoiser on the main process.
    samples_whole_denoiser: bool = True

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def manages_gradients(self) -> bool:
        """Whether the engine owns the gradients (sharded or clipped by it): clipping is then accelerate's and no
        fused optimizer step can be told to skip."""
        return self.accelerator.distributed_type in _ENGINE_MANAGED

    def __repr__(self) -> str:
        return f"{type(self).__name__}(processes={self.num_processes})"

    # ------------------------------------------------------------------ the parameter-space safeguard

    @abstractmethod
    def check_parameter_space(self, scope: str) -> None:
        """Raise a ValueError naming what to use instead when the per-branch passes cannot run here (``scope``:
        ``safeguard_scope``, ``"local"`` or ``"global"``)."""

    def one_pass_reason(self) -> str | None:
        """Why the exact safeguard cannot split the branches' gradients inside one pass here (``None``: it can; the
        per-branch passes run otherwise). One process, or DDP: it can."""
        return None

    def branch_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> BranchGradients:
        """The per-branch gradient store over the trainable ``parameters`` (see :mod:`.branches`)."""
        return BranchGradientSplitter(parameters)

    def set_aside_accumulated(
        self, policy: torch.nn.Module, parameters: Sequence[torch.nn.Parameter]
    ) -> list[torch.Tensor | None] | None:
        """Called before a micro-batch's branches: what must be set aside of the gradients accumulated so far
        (``None``: nothing, the branches add to them in place)."""
        return None

    def restore_accumulated(
        self, parameters: Sequence[torch.nn.Parameter], accumulated: list[torch.Tensor | None] | None
    ) -> None:
        """Add back what :meth:`set_aside_accumulated` took."""
        if accumulated is None:
            return
        for p, earlier in zip(parameters, accumulated):
            if earlier is not None:
                p.grad = earlier if p.grad is None else p.grad.add_(earlier)

    def winner_reduction(self, global_scope: bool) -> Callable[[list[torch.Tensor]], None] | None:
        """What averages the winner's buffered gradient over processes before ``<g_w, g_w>`` (global scope)."""
        if global_scope and self.num_processes > 1:
            return all_reduce_mean_
        return None

    def reduce_branch_sums(
        self, winner_sq: torch.Tensor, cross: torch.Tensor, global_scope: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(<g_w, g_w>, <g_w, h_l>)`` over the scope: with the global scope the cross term of the averaged winner
        gradient with each process's loser gradient is averaged too (the winner's was averaged by
        :meth:`winner_reduction`)."""
        if global_scope and self.num_processes > 1:
            cross = all_reduce_sum(cross) / self.num_processes
        return winner_sq, cross

    def check_update_space(self) -> None:
        """Raise a ValueError when the update space cannot run here. By default it cannot: it reads the whole
        optimizer state of every trainable weight and the whole per-branch gradients on each process, and an engine
        that shards them (DeepSpeed ZeRO, FSDP) would have to reduce ``D(lambda)`` over processes at every
        evaluation of the search (a method to add here)."""
        raise ValueError(
            f"safeguard_space='update' is not supported under {self.name}: the optimizer state and gradients are "
            "sharded across processes, and the update space reads them whole. Use one process or DDP "
            "(multi_gpu.yaml) with safeguard_space='update', or keep this engine with safeguard_space='parameter' "
            "or 'output'."
        )

    def reduce_branch_gradients(self, winner: list[torch.Tensor], loser: list[torch.Tensor]) -> None:
        """The update space: average ``g_w`` and ``h_l`` over processes in place (the optimizer sees their mean);
        two gradient-sized all-reduces where a plain step has one."""
        if self.num_processes > 1:
            all_reduce_mean_(winner)
            all_reduce_mean_(loser)

    @abstractmethod
    def reduce_combined_gradients(self, parameters: Sequence[torch.nn.Parameter], sync_gradients: bool) -> None:
        """After the branches are combined: whatever reduction over processes the engine's own backward would have
        done (``sync_gradients``: this micro-batch closes the accumulation window)."""

    # ------------------------------------------------------------------ placement, saving, loading

    def check_validation_sampling(self) -> None:
        """Raise when the main process cannot sample validation images alone."""
        return None

    def place_reference(
        self, module: torch.nn.Module, policy: torch.nn.Module, device: torch.device, dtype: torch.dtype
    ) -> torch.nn.Module:
        """A frozen reference copy, ready for inference: whole on every process, each weight in the dtype of the
        ``policy``'s (float32 for full tuning's trainable weights, ``dtype`` for LoRA's frozen base), so that under the
        policy's autocast it computes what the policy computes at step 0 (see
        :func:`~trl_diffusion_sdpo.tuning.reference_like_policy`)."""
        return reference_like_policy(module, policy, device, dtype)

    def gather_state_dict(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """The full weights to save, gathered from shards on the main process (every process calls it); ``None``
        where the weights are whole and ``Trainer.save_model`` can save them as usual."""
        return None

    def gathers_for_save(self) -> bool:
        """Whether :meth:`gather_state_dict` must run (on every process) before a save."""
        return False

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Within the block, full diffusers-format weights load into the trained model."""
        yield

    @contextlib.contextmanager
    def loading_optimizer(self) -> Iterator[None]:
        """Within the block, the trainer restores a checkpoint's optimizer state."""
        yield

    def clean_checkpoint(self, output_dir: str, should_save: bool) -> None:
        """Remove what accelerate wrote into a checkpoint that resuming does not read."""
        return None

    def resume_on_other_count(self, checkpoint: str, saved_processes: int, work_dir: str) -> str:
        """The folder to resume from when ``checkpoint`` was written by ``saved_processes`` processes and this run has
        another number (every process calls it; ``work_dir`` is free for what the engine must write, removed after
        training). By default refused: the engine's state is sharded for the old count."""
        from ..io.resume_check import ResumeConfigError

        raise ResumeConfigError(
            f"Cannot resume under {self.name} on {self.num_processes} process(es) from {checkpoint}, written by "
            f"{saved_processes}: its sharded optimizer state is not resharded to another number of processes here. "
            f"Resume on {saved_processes} process(es); another count works under DDP (multi_gpu.yaml) and DeepSpeed "
            "ZeRO-1/2 (docs/reliability.md)."
        )
