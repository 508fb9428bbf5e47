"""What the exact safeguard's per-branch gradients need from each engine: which store holds them, what is set aside
of an accumulation window, and the reductions over processes.

One object per engine, picked by :func:`collectives_for` from the engine's class (register another with
:func:`register_collectives`); the engine itself keeps placement, saving, loading and resume. The defaults are one
process's and DDP's: whole weights and gradients on every process, the branches run outside DDP's hooks and the
combined gradient is averaged once at the end of the accumulation window.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch

from ...engines import DeepSpeedEngine, Engine, FSDP1Engine, FSDP2Engine, PlainEngine
from ...engines.collectives import all_reduce_mean_, all_reduce_sum
from ...engines.deepspeed import engine_loss_scale
from .base import PerBranchStore
from .one_pass import OnePassBranchGradients
from .one_pass_sharded import ShardedOnePassBranchGradients
from .per_branch import BranchGradientSplitter, EngineBranchGradients
from .zero_partitions import zero_partition_inputs

__all__ = [
    "BranchCollectives",
    "DeepSpeedCollectives",
    "FSDP1Collectives",
    "FSDP2Collectives",
    "ShardSums",
    "collectives_for",
    "register_collectives",
]

Reduction = Callable[[list[torch.Tensor]], None]
Tensors = list[torch.Tensor]
SumReduction = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes and returns it
# what OptimizerUpdate reads: (optimizer, parameters, winner, loser)
UpdateInputs = tuple[object, Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor]]

_REGISTRY: dict[type[Engine], type[BranchCollectives]] = {}
# engine class -> [(when, collectives)]: collectives for those of its engines that ``when`` accepts (a ZeRO stage)
_VARIANTS: dict[type[Engine], list[tuple[Callable[[Engine], bool], type[BranchCollectives]]]] = {}


def register_collectives(engine_class: type[Engine], when: Callable[[Engine], bool] | None = None):
    """Class decorator: the collectives of ``engine_class`` (and of its subclasses without their own); with
    ``when``, only of the engines for which ``when(engine)`` holds (they take precedence over the class's own)."""

    def register(cls: type[BranchCollectives]) -> type[BranchCollectives]:
        if when is None:
            _REGISTRY[engine_class] = cls
        else:
            _VARIANTS.setdefault(engine_class, []).append((when, cls))
        return cls

    return register


def collectives_for(engine: Engine) -> BranchCollectives:
    """The collectives of ``engine``'s class, or of its nearest registered base class (a variant whose ``when``
    accepts ``engine`` first)."""
    for cls in type(engine).__mro__:
        for when, variant in _VARIANTS.get(cls, ()):
            if when(engine):
                return variant(engine)
        if cls in _REGISTRY:
            return _REGISTRY[cls](engine)
    raise ValueError(
        f"the exact safeguard has no collectives for {type(engine).__name__}: register them with "
        "trl_diffusion_sdpo.safeguards.gradients.register_collectives, or use safeguard_space='output'"
    )


@register_collectives(PlainEngine)
class BranchCollectives:
    """One process, or DDP: the parameter space in every scope, the update space, the one-pass split."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @functools.cached_property
    def num_processes(self) -> int:
        """The engine's process count, fixed for a run: read once, not at every reduction."""
        return self.engine.num_processes

    # ------------------------------------------------------------------ what can run

    def check_parameter_space(self, scope: str) -> None:
        """Raise a ValueError naming what to use instead when the parameter space cannot run here in ``scope``
        (``safeguard_scope``: ``"local"``, ``"global"`` or ``"pair"``)."""

    def check_update_space(self) -> None:
        """Raise a ValueError naming what to use instead when the update space cannot run here."""

    #: why the branches' gradients cannot be split inside one pass here (``None``: they can)
    one_pass_refusal: str | None = None
    #: whether the update space can run on the per-branch passes' store (else it needs the one pass)
    two_pass_update_space = True
    #: whether the engine takes every gradient autograd hands a weight (its hooks reduce it away at once)
    owns_gradients = False

    def one_pass_reason(self) -> str | None:
        """Why the branches' gradients cannot be split inside one pass here (``None``: they can; the per-branch
        passes run otherwise)."""
        return self.one_pass_refusal

    #: the one pass's store (whole weights here; each process's shards where the engine shards them)
    one_pass_store_class: type[OnePassBranchGradients] = OnePassBranchGradients

    def one_pass_store(
        self, module: torch.nn.Module, parameters: Sequence[torch.nn.Parameter]
    ) -> OnePassBranchGradients:
        """The one pass's store over the trainable ``parameters`` of ``module``."""
        return self.one_pass_store_class(module, parameters)

    @contextlib.contextmanager
    def tapped_pass(self, parameters: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        """Around the one pass's forward and backward: the taps hand autograd no weight gradient, and whatever the
        engine hooks on the weights' gradients must let that pass."""
        yield

    def reduce_pair_sums(self, winner_sq: torch.Tensor, cross: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-pair scope's ``(<g_w,i, g_w,i>, <g_w,i, h_l,i>)``: whole here (each process's pairs are its own)."""
        return winner_sq, cross

    def tapped_backward(self, outputs: tuple[torch.Tensor, ...], cotangents: tuple[torch.Tensor, ...]) -> None:
        """The one pass's backward of the branches' ``outputs`` with their ``cotangents``."""
        torch.autograd.backward(outputs, cotangents)

    # ------------------------------------------------------------------ the per-branch passes

    def per_branch_store(self, parameters: Sequence[torch.nn.Parameter]) -> PerBranchStore:
        """The store of the per-branch passes over the trainable ``parameters``."""
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

    # ------------------------------------------------------------------ reductions

    def winner_reduction(self, global_scope: bool) -> Reduction | None:
        """What averages the winner's buffered gradient over processes before ``<g_w, g_w>`` (global scope)."""
        return all_reduce_mean_ if global_scope and self.num_processes > 1 else None

    def reduce_branch_sums(
        self, winner_sq: torch.Tensor, cross: torch.Tensor, global_scope: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(<g_w, g_w>, <g_w, h_l>)`` over the scope: with the global scope the cross term of the averaged winner
        gradient with each process's loser gradient is averaged too (the winner's was averaged by
        :meth:`winner_reduction`)."""
        if global_scope and self.num_processes > 1:
            cross = all_reduce_sum(cross) / self.num_processes
        return winner_sq, cross

    def reduce_branch_gradients(self, winner: list[torch.Tensor], loser: list[torch.Tensor]) -> None:
        """The update space: average ``g_w`` and ``h_l`` over processes in place (the optimizer sees their mean);
        two gradient-sized all-reduces where a plain step has one."""
        if self.num_processes > 1:
            all_reduce_mean_(winner)
            all_reduce_mean_(loser)

    def update_sum_reduction(self) -> SumReduction | None:
        """The update space: what adds up :class:`~trl_diffusion_sdpo.safeguards.update_space.OptimizerUpdate`'s sums
        over processes where each holds a shard of the weights (``None``: every process holds them whole, nothing to
        add up)."""
        return None

    def update_inputs(
        self, optimizer, parameters: Sequence[torch.nn.Parameter], winner: Tensors, loser: Tensors
    ) -> UpdateInputs:
        """The update space: what :class:`~trl_diffusion_sdpo.safeguards.update_space.OptimizerUpdate` reads,
        ``(optimizer, parameters, winner, loser)``, after :meth:`reduce_branch_gradients`: here the training
        optimizer and the whole weights (or FSDP2's shards: each tensor's local part)."""
        return optimizer, parameters, winner, loser

    def reduce_combined_gradients(self, parameters: Sequence[torch.nn.Parameter], sync_gradients: bool) -> None:
        """After the branches are combined: at the end of the accumulation window (``sync_gradients``), average the
        gradients over processes once, as DDP's hooks would have (the branches ran outside them)."""
        if self.num_processes > 1 and sync_gradients:
            all_reduce_mean_([p.grad if p.grad is not None else p.new_zeros(p.shape) for p in parameters])

    def add_combined(
        self, store: OnePassBranchGradients, combined: list[torch.Tensor], sync_gradients: bool, *, reduced: bool
    ) -> None:
        """The one pass: the micro-batch's ``combined`` gradient (``g_w + lambda h_l`` per weight, or the pair scope's
        sum) joins the gradients the optimizer will see: added to ``.grad``, then averaged over processes by
        :meth:`reduce_combined_gradients` unless its branches were already (``reduced``: the update space)."""
        store.assign(combined)
        if not reduced:
            self.reduce_combined_gradients(store.parameters, sync_gradients)


@register_collectives(DeepSpeedEngine)
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

    def _engine_backward(self, scalar: torch.Tensor, boundary: bool | None) -> None:
        """The engine's backward of ``scalar`` (its loss scale applied, no accumulation average): ``boundary=False``
        inside a micro-batch (no step), ``None`` the micro-batch's last pass (accelerate sets the boundary and steps
        the engine at the end of the window)."""
        if boundary is None:
            self.engine.accelerator.backward(scalar, scale_wrt_gas=False)
        else:
            self._engine.set_gradient_accumulation_boundary(boundary)
            self._engine.backward(scalar, scale_wrt_gas=False)

    @contextlib.contextmanager
    def tapped_pass(self, parameters: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        # ZeRO-1/2's hooks run after each weight's gradient accumulation, also where the taps handed it none; their
        # flag for transient gradients (``ds_grad_is_ready``, which DeepSpeed's own tiled computations set) makes
        # them leave the weight alone. The combination reaches the engine afterwards (add_combined).
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


class ShardSums:
    """For collectives whose engine averages each branch's gradient over processes as it shards it (FSDP2 and
    ZeRO-3 reduce-scatter): every process holds its shard of the global micro-batch's ``g_w`` and ``h_l`` (or, by
    pair, its rows of every process's images), so the inner products over its shard, added up over processes in one
    all-reduce, are the global values; the global scope is implied."""

    def winner_reduction(self, global_scope: bool) -> None:
        return None  # already averaged by the engine's reduce-scatter

    def reduce_branch_sums(
        self, winner_sq: torch.Tensor, cross: torch.Tensor, global_scope: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sums = all_reduce_sum(torch.stack([winner_sq, cross]))
        return sums[0], sums[1]

    def reduce_pair_sums(self, winner_sq: torch.Tensor, cross: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.reduce_branch_sums(winner_sq, cross, True)

    def reduce_branch_gradients(self, winner: list[torch.Tensor], loser: list[torch.Tensor]) -> None:
        """Nothing: each branch's shards are already averaged (the engine's reduce-scatter)."""


@register_collectives(FSDP2Engine)
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


@register_collectives(FSDP1Engine)
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
