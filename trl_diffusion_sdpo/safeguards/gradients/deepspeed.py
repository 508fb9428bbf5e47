"""The exact safeguard's collectives under DeepSpeed ZeRO-1/2 (:class:`DeepSpeedCollectives`), whose engine owns the
reduced, accumulated gradients; ZeRO-3's build on them (:mod:`.zero3`). Imported when a DeepSpeed run chooses the
exact safeguard (:data:`~.collectives.COLLECTIVES`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ...engines.collectives import all_reduce_sum
from ...engines.deepspeed import engine_loss_scale
from .collectives import BranchCollectives, SumReduction, Tensors, UpdateInputs, register_collectives
from .one_pass import OnePassBranchGradients
from .per_branch import EngineBranchGradients
from .zero_partitions import zero_partition_inputs

__all__ = ["DeepSpeedCollectives"]


@register_collectives("deepspeed")
class DeepSpeedCollectives(BranchCollectives):
    """DeepSpeed ZeRO-1/2 keep the weights whole and own the accumulated, reduced gradients (their partitions).

    The one pass splits the branches on this process's whole weights as under DDP; the combined gradient is then
    handed to the engine as the gradient of a surrogate linear in the weights (:meth:`add_combined`), so the engine
    reduces, accumulates, clips and steps it as it would a plain backward's: one gradient-sized reduction, as for
    Diffusion-DPO (two in the global scope, whose winner gradient is averaged first; three in the update space,
    whose two branches are). The per-branch passes use the engine as their second gradient store
    (:class:`~.per_branch.EngineBranchGradients`). The update space reads the optimizer's state on this process's
    partitions (:func:`~.zero_partitions.zero_partition_inputs`), its sums added up over processes.
    """

    #: the per-branch passes keep the winner's gradient in the engine: the update space needs the one pass
    two_pass_update_space = False
    owns_gradients = True

    @property
    def _engine(self):
        return self.engine.accelerator.deepspeed_engine_wrapped.engine

    def runs_compiled(self, policy: torch.nn.Module) -> bool:
        """DeepSpeed compiles its module in place (``engine.compile``), which leaves no wrapper to see: the engine
        says."""
        return self._engine.is_compiled

    #: inside transformers' step, the scalars of the micro-batch's last engine backward, which Trainer's own
    #: ``accelerator.backward`` runs (the loss compute_loss returns carries them; ``None``: run here)
    deferred: list[torch.Tensor] | None = None

    def _engine_backward(self, scalar: torch.Tensor, boundary: bool | None) -> None:
        """The engine's backward of ``scalar`` (its loss scale applied, no accumulation average): ``boundary=False``
        inside a micro-batch (no step), ``None`` the micro-batch's last pass (accelerate sets the boundary and steps
        the engine at the end of the window; inside transformers' step, Trainer's backward, :attr:`deferred`)."""
        if boundary is None:
            if self.deferred is not None:
                self.deferred.append(scalar)
                return
            self.engine.accelerator.backward(scalar, scale_wrt_gas=False)
        else:
            self._engine.set_gradient_accumulation_boundary(boundary)
            self._engine.backward(scalar, scale_wrt_gas=False)

    @contextlib.contextmanager
    def tapped_pass(self, parameters: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        # ZeRO-1/2's hooks run after each weight's gradient accumulation, also where the taps handed it none. Their
        # flag for transient gradients makes them leave the weight alone; the combination reaches the engine
        # afterwards (add_combined). The flag is DeepSpeed's protocol on a parameter, with no public setter: read as
        # getattr(param, "ds_grad_is_ready", True) by DeepSpeedZeroOptimizer.reduce_independent_p_g_buckets_and_
        # remove_grads (deepspeed/runtime/zero/stage_1_and_2.py; stage3.py's DeepSpeedZeroOptimizer_Stage3 likewise),
        # whose comment names this use (transient gradients of a computation split into a loop), and set False then
        # True around such a loop by DeepSpeed's own TiledMLP.backward and SequenceTiledCompute.backward
        # (deepspeed/runtime/sequence_parallel/ulysses_sp.py), as here.
        for p in parameters:
            p.ds_grad_is_ready = False
        try:
            yield
        finally:
            for p in parameters:
                p.ds_grad_is_ready = True

    def per_branch_store(self, parameters: Sequence[torch.nn.Parameter]) -> EngineBranchGradients:
        return EngineBranchGradients(parameters, self._engine_backward, lambda: engine_loss_scale(self._engine))

    def update_inputs(
        self, optimizer, parameters: Sequence[torch.nn.Parameter], winner: Tensors, loser: Tensors
    ) -> UpdateInputs:
        """This process's partitions: the optimizer state exists only there."""
        return zero_partition_inputs(self._engine.optimizer, parameters, winner, loser)

    def update_sum_reduction(self) -> SumReduction:
        return all_reduce_sum  # the sums over this process's partition: added up, the global sums on every process

    def add_combined(
        self, store: OnePassBranchGradients, combined: list[torch.Tensor], sync_gradients: bool, *, reduced: bool
    ) -> None:
        """The engine's backward of ``sum_i <w_i, c_i>`` over the weights the pass reached (``c``: ``combined``,
        detached): its gradient is ``c``, which the engine's hooks reduce into its partitions as a plain backward's.
        ``c`` already carries the accumulation average; the engine applies its own loss scale, as to a loss."""
        terms = [
            torch.dot(p.reshape(-1), c.detach().reshape(-1).to(p.dtype))
            for p, c, reached in zip(store.parameters, combined, store.reached)
            if reached
        ]
        surrogate = torch.stack(terms).sum() if terms else store.parameters[0].reshape(-1)[:1].sum() * 0.0
        self._engine_backward(surrogate, None)

    def reduce_combined_gradients(self, parameters: Sequence[torch.nn.Parameter], sync_gradients: bool) -> None:
        """Nothing: the engine reduced every pass it saw into its own partitions."""
