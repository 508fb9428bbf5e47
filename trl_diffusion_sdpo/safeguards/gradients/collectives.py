"""What the exact safeguard's per-branch gradients need from each engine: which store holds them, what is set aside
of an accumulation window, and the reductions over processes.

One object per engine, picked by :func:`collectives_for` from the engine's
:attr:`~trl_diffusion_sdpo.engines.Engine.variant` (its name, or ``"deepspeed-zero3"``) in :data:`COLLECTIVES`, whose
built-in entries name their class as ``"module:class"``: a run imports the collectives of the engine it trains with
and no other (register another with :func:`register_collectives`). The engine itself keeps placement, saving, loading
and resume. The defaults here are one process's and DDP's: whole weights and gradients on every process, the branches
run outside DDP's hooks and the combined gradient is averaged once at the end of the accumulation window.
DeepSpeed ZeRO-1/2's are in :mod:`.deepspeed`, ZeRO-3's in :mod:`.zero3`, FSDP's in :mod:`.fsdp`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from accelerate.utils import is_compiled_module

from ...config._lazy import import_target
from ...engines import Engine
from ...engines.collectives import all_reduce_mean_, all_reduce_sum
from .base import PerBranchStore
from .one_pass import OnePassBranchGradients

__all__ = [
    "COLLECTIVES",
    "BranchCollectives",
    "ShardSums",
    "collectives_for",
    "register_collectives",
]

Reduction = Callable[[list[torch.Tensor]], None]
Tensors = list[torch.Tensor]
SumReduction = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes and returns it
# what OptimizerUpdate reads: (optimizer, parameters, winner, loser)
UpdateInputs = tuple[object, Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor]]
CollectivesType = TypeVar("CollectivesType", bound="type[BranchCollectives]")

_HERE = __name__.rpartition(".")[0]
#: Engine variant -> its collectives: ``"module:class"`` for a built-in one, its module imported when an engine of that
#: variant runs the exact safeguard (it registers the class under the same variant, checked when it does), or the
#: class, for one registered by user code.
COLLECTIVES: dict[str, str | type[BranchCollectives]] = {
    "ddp": f"{__name__}:BranchCollectives",
    "deepspeed": f"{_HERE}.deepspeed:DeepSpeedCollectives",
    "deepspeed-zero3": f"{_HERE}.zero3:DeepSpeedZeRO3Collectives",
    "fsdp2": f"{_HERE}.fsdp:FSDP2Collectives",
    "fsdp1": f"{_HERE}.fsdp:FSDP1Collectives",
}

#: The per-branch passes' store (whole weights), imported when they run: the one pass, the default, has no use for it.
PER_BRANCH_STORE = f"{_HERE}.per_branch:BranchGradientSplitter"


def register_collectives(variant: str) -> Callable[[CollectivesType], CollectivesType]:
    """Class decorator: the collectives of the engines whose :attr:`~trl_diffusion_sdpo.engines.Engine.variant` is
    ``variant`` (an engine's ``name`` unless it refines it). A built-in variant takes only its own class."""

    def register(cls: CollectivesType) -> CollectivesType:
        built_in = COLLECTIVES.get(variant)
        if isinstance(built_in, str):
            if built_in != f"{cls.__module__}:{cls.__qualname__}":
                raise ValueError(f"the {variant!r} engine's collectives are built in ({built_in}): name yours anew")
        else:
            COLLECTIVES[variant] = cls
        return cls

    return register


def collectives_for(engine: Engine) -> BranchCollectives:
    """The collectives registered for ``engine``'s variant, their module imported now."""
    entry: Any = COLLECTIVES.get(engine.variant)
    if entry is None:
        raise ValueError(
            f"the exact safeguard has no collectives for the {engine.variant!r} engine ({type(engine).__name__}): "
            "register them with trl_diffusion_sdpo.safeguards.gradients.register_collectives, or use "
            "safeguard_space='output'"
        )
    return (import_target(entry) if isinstance(entry, str) else entry)(engine)


@register_collectives("ddp")
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

    def runs_compiled(self, policy: torch.nn.Module) -> bool:
        """Whether the engine runs ``policy`` compiled (``torch_compile``): here accelerate's compiled wrapper."""
        return is_compiled_module(policy)

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
        return import_target(PER_BRANCH_STORE)(parameters)

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
