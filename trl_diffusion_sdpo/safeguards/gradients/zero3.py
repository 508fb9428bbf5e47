"""The exact safeguard under DeepSpeed ZeRO-3, on each process's gradient partitions.

In one pass (the default) the taps' per-branch gradients of each gathered weight are reduce-scattered into ZeRO-3's
partition layout (:class:`~.one_pass_sharded.ZeRO3OnePassBranchGradients`), and the combination is written into the
engine's partitions (:meth:`DeepSpeedZeRO3Collectives.add_combined`). With ``safeguard_passes="two"``:

ZeRO-3 partitions every weight; the engine's backward hooks reduce-scatter each weight's gradient into this process's
float32 gradient partition, averaged over processes. Each branch runs as one engine backward, and its gradient is
read off the partitions with DeepSpeed's own accessors, ``deepspeed.utils.safe_get_local_grad`` /
``safe_set_local_grad`` (every ZeRO-3 weight has a partition, those below the persistence threshold included). As
under FSDP2 (:class:`~.fsdp.FSDP2Collectives`), the two inner products over this process's partitions, summed
over processes, are the exact values for the global micro-batch: the global scope is implied.

Per micro-batch (:class:`~trl_diffusion_sdpo.safeguards.parameter.PerBranchPasses`):

1. the accumulation window's earlier sum ``A`` is copied aside (nothing at the window's first micro-batch);
2. winner pass: partitions cleared, engine backward, the partitions (``g_w``) copied into a buffer;
3. loser pass: partitions cleared, engine backward, the partitions hold ``h_l``;
4. ``<g_w, g_w>`` and ``<g_w, h_l>`` summed over processes (one all-reduce of two numbers), ``lambda``;
5. ``g_w + lambda h_l`` written to the partitions, ``A`` added back;
6. at the end of the window the engine steps, as accelerate's ``DeepSpeedEngineWrapper.backward`` would.

The window's sum is kept here, not left to the engine: ZeRO-3 adds a backward to its partitions only once its
``micro_step_id`` is past 0, which only its forward advances, and the safeguard predicts through the unwrapped
denoiser; each pass therefore overwrites the partitions of the weights it reaches. Clearing them first makes every
pass's reading its own gradient whichever of the two the engine does, and covers weights a pass does not reach.

Under an fp16 loss scale the partitions are in the engine's scaled units: ``lambda`` does not depend on the scale
and the combination is linear, so the engine's step unscales the result as it would a plain backward's. The
optimizer's CPU offload is refused: the partitions the accessors read are then only filled at the window's end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .collectives import ShardSums, register_collectives
from .deepspeed import DeepSpeedCollectives
from .one_pass_sharded import ZeRO3OnePassBranchGradients
from .per_branch import _squared_norm
from .zero_partitions import zero_partition_inputs

__all__ = ["DeepSpeedZeRO3Collectives", "ZeRO3BranchGradients", "local_gradients", "set_local_gradients"]

Tensor = torch.Tensor


def local_gradients(parameters: Sequence[torch.nn.Parameter]) -> list[Tensor]:
    """This process's gradient partition of each ZeRO-3 weight, flat, in float32 (``safe_get_local_grad``: a view of
    the engine's buffer where it accumulates in float32 on the device, else a copy; copy what must outlive the next
    backward)."""
    from deepspeed.utils import safe_get_local_grad

    return [safe_get_local_grad(p).reshape(-1) for p in parameters]


def set_local_gradients(parameters: Sequence[torch.nn.Parameter], values: Sequence[Tensor]) -> None:
    """Write ``values`` (flat, one per weight) into this process's gradient partitions (``safe_set_local_grad``)."""
    from deepspeed.utils import safe_set_local_grad

    for p, value in zip(parameters, values):
        safe_set_local_grad(p, value)


def _offloads_optimizer(engine) -> bool:
    """Whether the run's DeepSpeed config offloads the optimizer (its state and gradient partitions) to the CPU."""
    state = getattr(getattr(engine, "accelerator", None), "state", None)
    config = getattr(getattr(state, "deepspeed_plugin", None), "deepspeed_config", None) or {}
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() != "none"


class ZeRO3BranchGradients:
    """One engine backward per branch over ``parameters`` (ZeRO-3 weights), read off this process's partitions.

    ``engine_backward(scalar)`` runs the engine's backward of ``scalar`` inside the accumulation window (no boundary,
    no step, the engine's loss scale applied, no accumulation average). Use once per micro-batch, in this order:
    :meth:`backward_winner`, :meth:`backward_loser`, :meth:`combine`. The returned inner products are sums over this
    process's partitions: the caller adds them up over processes (:class:`DeepSpeedZeRO3Collectives`).
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter], engine_backward: Callable[[Tensor], None]) -> None:
        self.parameters = list(parameters)
        unmanaged = [i for i, p in enumerate(self.parameters) if not hasattr(p, "ds_id")]
        if unmanaged:
            raise ValueError(f"{len(unmanaged)} trainable weight(s) are not managed by ZeRO-3 (no ds_id)")
        self._engine_backward = engine_backward
        self._winner: list[Tensor] | None = None  # g_w's partitions (float32), kept through the loser's pass
        self._loser: list[Tensor] = []
        self._zeros: list[Tensor] | None = None

    def _pass(self, outputs: Tensor, cotangents: Tensor) -> list[Tensor]:
        if self._zeros is None:  # stride-0 views: no partition-sized allocation for the zeros
            self._zeros = [t.new_zeros(()).expand(t.numel()) for t in local_gradients(self.parameters)]
        set_local_gradients(self.parameters, self._zeros)
        self._engine_backward((outputs * cotangents.detach()).sum())
        return local_gradients(self.parameters)

    def backward_winner(self, outputs: Tensor, cotangents: Tensor, reduce_winner=None) -> Tensor:
        """The winner's engine backward; ``<g_w, g_w>`` over this process's partitions (float32)."""
        if reduce_winner is not None:
            raise RuntimeError("ZeRO-3 averages each branch's gradient over processes itself: no winner reduction")
        partitions = self._pass(outputs, cotangents)
        if self._winner is None:
            self._winner = [torch.empty_like(t) for t in partitions]
        torch._foreach_copy_(self._winner, partitions)  # a partition may be a view the next pass overwrites
        return _squared_norm(self._winner)

    def backward_loser(self, outputs: Tensor, cotangents: Tensor) -> Tensor:
        """The loser's engine backward; ``<g_w, h_l>`` over this process's partitions (float32)."""
        if self._winner is None:
            raise RuntimeError("backward_winner must run first")
        self._loser = self._pass(outputs, cotangents)
        dots = [torch.dot(w, h) for w, h in zip(self._winner, self._loser)]
        return torch.stack(dots).sum() if dots else torch.zeros(())

    def combine(self, lam: Tensor) -> None:
        """The partitions become ``g_w + lambda h_l`` (the window's earlier sum is the collectives' to add back)."""
        if self._winner is None or not self._loser:
            raise RuntimeError("combine needs both branches' passes")
        weight = None
        for w, h in zip(self._winner, self._loser):
            if weight is None:  # a device scalar: no host sync
                weight = lam.detach().to(device=w.device, dtype=w.dtype)
            w.addcmul_(h, weight)
        set_local_gradients(self.parameters, self._winner)
        self._loser = []


@register_collectives("deepspeed-zero3")
class DeepSpeedZeRO3Collectives(ShardSums, DeepSpeedCollectives):
    """DeepSpeed ZeRO-3: the exact rule on each process's gradient partitions, the global or the per-pair scope. In
    one pass the taps' split gradients are reduce-scattered into them (:class:`
    ~.one_pass_sharded.ZeRO3OnePassBranchGradients`); in per-branch passes the engine's backward fills them
    (:class:`ZeRO3BranchGradients`). The update space reads the optimizer's state on the engine's partitions (the one
    pass only). The window's earlier sum is kept here, and the engine steps at the window's end."""

    one_pass_store_class = ZeRO3OnePassBranchGradients

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self._window_open = False  # whether the partitions hold earlier micro-batches of this accumulation window

    @property
    def _deepspeed_engine(self):
        return self.engine.accelerator.deepspeed_engine_wrapped.engine

    def check_parameter_space(self, scope: str) -> None:
        if scope == "local":
            raise ValueError(
                "safeguard_space='parameter' under DeepSpeed ZeRO-3 needs safeguard_scope='global': ZeRO-3 averages "
                "each branch's gradient over processes as it reduce-scatters it into its partitions, so lambda is "
                "that of the global micro-batch. Set safeguard_scope='global', or use DDP (multi_gpu.yaml) or "
                "ZeRO-2 (deepspeed_zero2.yaml) for one lambda per process."
            )
        if _offloads_optimizer(self.engine):
            raise ValueError(
                "safeguard_space='parameter' under DeepSpeed ZeRO-3 does not support offload_optimizer: the "
                "gradient partitions it reads are filled only at the end of the accumulation window. Set "
                "offload_optimizer_device: none, or use safeguard_space='output'."
            )

    def check_update_space(self) -> None:
        if _offloads_optimizer(self.engine):
            raise ValueError(
                "safeguard_space='update' under DeepSpeed ZeRO-3 does not support offload_optimizer: the optimizer "
                "state it reads lives on the CPU. Set offload_optimizer_device: none, or use "
                "safeguard_space='parameter'."
            )

    def tapped_backward(self, outputs: tuple[Tensor, ...], cotangents: tuple[Tensor, ...]) -> None:
        # Through the engine (boundary False, no step): its hooks gather each block's weights for the backward and
        # its epilogue runs; the trainable weights' reduction is skipped (tapped_pass), the taps reduce-scatter them.
        engine = self._deepspeed_engine
        engine.set_gradient_accumulation_boundary(False)
        engine.backward(sum((o * c.detach()).sum() for o, c in zip(outputs, cotangents)), scale_wrt_gas=False)

    def update_inputs(self, optimizer, parameters, winner, loser):
        """The optimizer's state where ZeRO-3 keeps it: each sub-group's flat float32 partition."""
        return zero_partition_inputs(self._deepspeed_engine.optimizer, parameters, winner, loser)

    def add_combined(self, store, combined: list[Tensor], sync_gradients: bool, *, reduced: bool) -> None:
        """The one pass: this process's partitions of the combination (averaged over processes) become the engine's
        gradient partitions, the window's earlier sum added (the store gave its rows' memory back as it formed the
        combination); the engine steps at the window's end."""
        values = combined
        if self._window_open:
            values = [c + a for c, a in zip(combined, local_gradients(store.parameters))]
        set_local_gradients(store.parameters, values)  # copied into the engine's partitions
        store.release()  # no row outlives the step (the combination gave them back already)
        self.reduce_combined_gradients(store.parameters, sync_gradients)

    def per_branch_store(self, parameters: Sequence[torch.nn.Parameter]) -> ZeRO3BranchGradients:
        engine = self._deepspeed_engine

        def engine_backward(scalar: Tensor) -> None:
            engine.set_gradient_accumulation_boundary(False)
            engine.backward(scalar, scale_wrt_gas=False)

        return ZeRO3BranchGradients(parameters, engine_backward)

    def set_aside_accumulated(
        self, policy: torch.nn.Module, parameters: Sequence[torch.nn.Parameter]
    ) -> list[Tensor] | None:
        if not self._window_open:  # the window's first micro-batch: the partitions hold the last window's sum
            return None
        return [t.clone() for t in local_gradients(parameters)]

    def restore_accumulated(self, parameters: Sequence[torch.nn.Parameter], accumulated: list[Tensor] | None) -> None:
        if accumulated is None:
            return
        torch._foreach_add_(accumulated, local_gradients(parameters))
        set_local_gradients(parameters, accumulated)

    def reduce_combined_gradients(self, parameters: Sequence[torch.nn.Parameter], sync_gradients: bool) -> None:
        """At the end of the accumulation window the engine steps (boundary set, then ``engine.step()``: clipping,
        overflow check, optimizer, zeroing), as accelerate's ``DeepSpeedEngineWrapper.backward`` does."""
        self._window_open = not sync_gradients
        if sync_gradients and self.deferred is None:  # inside transformers' step, Trainer's backward steps it
            engine = self._deepspeed_engine
            engine.set_gradient_accumulation_boundary(True)
            engine.step()
