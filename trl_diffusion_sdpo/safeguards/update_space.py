"""The update-space safeguard: ``lambda`` chosen on the optimizer's actual update, not on the gradient.

The parameter-space rule guarantees, for a plain gradient step, that the loss's winner term ``W`` does not rise to
first order. The optimizer people use does not step along the gradient: AdamW preconditions by its second moment,
carries momentum and shrinks the weights; SGD with momentum adds its buffer. The update space takes the update the
optimizer will actually apply,

    Delta(lambda) = U(state, c(lambda) * (g_w + lambda * h_l)),

with ``U`` the optimizer's update from its current state (moments, step count, learning rate, weight decay) and
``c(lambda) = min(1, max_grad_norm / (||g_w + lambda * h_l|| + 1e-6))`` the clip coefficient the trainer will apply
to the combined gradient (1 with ``max_grad_norm <= 0``), and asks that the winner term's first-order change
``<g_w, Delta(lambda)>`` be a decrease at least ``mu`` times that of the winner's own update:

    D(lambda) = -<g_w, Delta(lambda)> >= mu * max(D(0), 0).

For a plain gradient step (``Delta = -lr * g``, no clipping) ``D(lambda) = lr * (|g_w|^2 + lambda <g_w, h_l>)`` and
``D(0) = lr |g_w|^2``: this is the parameter-space rule exactly, so ``mu`` means the same thing in both spaces. The
``max(., 0)``: when momentum or weight decay already make the winner's own update raise ``W`` (``D(0) < 0``) the
condition asks for no rise at all (``D(lambda) >= 0``); it may then be infeasible (see :func:`update_space_lambda`).

``lambda`` is found by a scalar search over the real update (AdamW's second moment depends on ``lambda``, so there
is no closed form), on a schedule fixed before it starts (:func:`~.crossing.last_crossing`), so that nothing is read
back to the host between its passes: each pass's ``lambda`` follow from the values before it by tensor operations on
the device, and the host queues the four passes without waiting for the device.

* The grid pass evaluates ``D`` at the :data:`GRID_POINTS` points ``0, max_lambda / 8, ..., max_lambda`` together;
  the target ``mu * max(D(0), 0)`` follows from the first. Where ``D(max_lambda)`` meets it there is nothing to
  restrict: ``lambda = max_lambda``. Where no grid point meets it (momentum or weight decay already raise the winner's
  term, ``D(0) < 0``, and no ``lambda`` makes up for it), ``lambda`` is the grid point with the largest ``D`` and the
  step is counted as infeasible (``safeguard/update_infeasible``, a device tensor). Else the bracket is the largest
  grid point that meets the target and the next one, which misses it.
* Three refinement passes of seven ``lambda`` each cut the bracket into eighths and keep the largest part whose lower
  end meets the target, so that ``lambda``, that lower end after the last, lies within ``resolution = max_lambda *``
  :data:`RESOLUTION` (``max_lambda / 4096``) below a crossing: ``D(lambda) >= target > D(hi)`` for some ``hi`` in
  ``(lambda, lambda + resolution]``. The passes run where the grid answered too, and leave its answer.

Where ``D`` crosses the target more than once in ``[0, max_lambda]``, the search returns the last crossing the grid
shows (a feasible region narrower than the grid's spacing may be missed). Every ``lambda`` evaluated is a float32
number, the ``lambda`` the trainer will use, so ``D(lambda) >= target`` holds for the returned value itself. Four
passes of 30 ``lambda`` in all cost more arithmetic than the search that read ``D`` on the host between passes (one
pass of two ``lambda`` where nothing is restricted, two to four where the margin binds); they cost no wait.

A pass reads the gradients, the optimizer's moments and (for an L2 weight decay) the weights once, in runs of
consecutive weights (up to :data:`CPU_CHUNK` elements on a CPU, :data:`DEVICE_CHUNK` on an accelerator) for all of
its ``lambda`` together: per run (or piece of a run, :data:`CPU_WORK`) a handful of batched elementwise operations
into a workspace kept across steps, the run's moments copied into it by one foreach call each (once per step where a
segment is one run), the gradients read where they lie (the one pass's buffer rows; read in the backward's units,
with ``unscale`` folded into the scalars). Adam's bias corrections come from each weight's step count where it lies
(on the device for the fused optimizer), as per-weight scales of ``D``, never read on the host. A step's operations
grow with the number of runs, not with the number of weights. Where :data:`KERNELS` names a compiler for the device
(CUDA: inductor), Adam's share of a run is instead one compiled kernel for all of the pass's ``lambda``
(:func:`adam_run_share`, :class:`CompiledShare`): its elementwise work never reaches memory, and the same graphs serve
every step, eager or compiled; where it cannot compile, the pieces run in its place. SGD's update is affine in the
gradient: its ``D`` follows from four sums formed once, and a pass costs a few operations on scalars.

On sharded weights (FSDP2) each process holds a shard of every tensor, and every sum above is a sum over
elements: :class:`OptimizerUpdate` works on the local shards and adds up, through ``reduce_sum``, the clip
coefficient's three sums, AdamW's weight-decay term and SGD's four sums (one collective when it is built) and
``D(lambda)`` (one collective per evaluation pass). Every process then holds the same values and takes the same
steps of the search on its device: the same ``lambda``, that of the global micro-batch.

Supported optimizers: ``torch.optim.AdamW``, ``torch.optim.Adam`` (its weight decay is an L2 term added to the
gradient) and ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay); foreach and fused implementations
compute the same update. ``amsgrad`` and ``maximize`` are refused, and so are the 8-bit optimizers (their moments
are block-quantized) when the config is made (:mod:`~trl_diffusion_sdpo.config.rules`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate.optimizer import AcceleratedOptimizer

from .crossing import GRID_POINTS, RESOLUTION, float32, last_crossing
from .gradients.one_pass import blocked_dot
from .parameter import ParameterSpace
from .update_runs import (
    Run,
    UpdateWorkspace,
    branch_rows,
    host_tensor,
    local,
    one_view,
    runs,
    stacked_rows,
    storage_groups,
    to_device,
)

__all__ = [
    "GRID_POINTS",
    "KERNELS",
    "RESOLUTION",
    "SUPPORTED_OPTIMIZERS",
    "CompiledShare",
    "OptimizerUpdate",
    "UpdateSpace",
    "UpdateSpaceRule",
    "adam_run_share",
    "unwrap_optimizer",
    "update_space_lambda",
]

logger = logging.getLogger(__name__)

SUPPORTED_OPTIMIZERS = "torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD"


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrappers."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _refuse(optimizer: object, why: str) -> ValueError:
    return ValueError(
        f"safeguard_space='update' needs the optimizer's update rule; {why}. Supported: {SUPPORTED_OPTIMIZERS} "
        f"(got {type(optimizer).__module__}.{type(optimizer).__name__}). Use one of them (optim='adamw_torch', "
        "'adamw_torch_fused' or 'sgd'), or safeguard_space='parameter'."
    )


def check_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside ``optimizer`` if the update space supports it, else a ValueError naming those
    it supports."""
    inner = unwrap_optimizer(optimizer)
    if type(inner) not in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
        raise _refuse(inner, "this optimizer's is not implemented")
    for group in inner.param_groups:
        if group.get("maximize", False):
            raise _refuse(inner, "maximize=True is not supported")
        if group.get("amsgrad", False):
            raise _refuse(inner, "amsgrad=True is not supported")
    return inner


#: Elements per run of the evaluation: a segment's weights are read in runs of consecutive tensors of at most this
#: many elements (a larger tensor is a run of its own), so that a pass costs a fixed number of operations per run,
#: whatever the number of weights, and its workspace (``3 x lambdas x run`` elements, plus the run's optimizer state
#: copied once per pass) stays bounded.
CPU_CHUNK, DEVICE_CHUNK = 1 << 20, 1 << 23
#: A pass's temporaries take ``3 x lambdas x piece`` elements: a run is read in pieces of at most ``work / lambdas``
#: elements, so that the workspace stays within ``3 x work`` elements (CPU: 9 lambdas over a whole run; accelerator:
#: 3), whatever the number of ``lambda`` per pass and the size of the largest weight. A CPU's pieces stay whole runs:
#: pieces of 32K elements, whose temporaries stay in the core's cache, took 326 ms for the rule against 495 ms on
#: SD1.5's structure at small widths (``benchmarks/results/update-space/cpu-update-search-pieces-sd15-structure.json``)
#: but add about 8 operations a piece, which a step's operation count (``tests/safeguard/test_operation_counts.py``)
#: holds fixed.
CPU_WORK, DEVICE_WORK = 9 * CPU_CHUNK, 3 * DEVICE_CHUNK
#: Where Adam's share of ``D`` is one compiled kernel per run (:class:`CompiledShare`), by device type: the
#: ``torch.compile`` backend that fuses it (a pass's elementwise work then never leaves the kernel: on an H200 about
#: 3 ms a ``lambda`` at SD1.5's 860M weights against 25 ms eager, ``benchmarks/speed/update_search_fused.py``);
#: elsewhere the eager pieces, ``"pieces"`` (on a CPU, compiling takes about 20 s a process and its kernel ran no
#: faster than the pieces). ``OptimizerUpdate(kernel=...)`` chooses otherwise.
KERNELS: dict[str, str] = {"cuda": "inductor"}

_SGD_SUMS = ("ww", "wh", "wp", "wb")  # SGD's closed form: <g_w, g_w>, <g_w, h_l>, <g_w, theta>, <g_w, b>


@dataclass
class _Segment:
    """The weights whose update has the same lambda-dependent hyperparameters (one optimizer group's, and one step
    count for Adam), cut into runs. SGD's update is affine in the gradient: its ``D`` follows from the sums
    ``<g_w, g_w>``, ``<g_w, h_l>``, ``<g_w, theta>`` and ``<g_w, b>`` (``sums``), read once."""

    hyper: dict
    runs: list[Run]
    sums: dict[str, torch.Tensor]
    #: the compiled kernel's numbers as a device tensor (:func:`adam_run_share`), made at its first pass
    constants: torch.Tensor | None = None


def _run_scales(scales, start: int, weights: int):
    """A run's part of its segment's Adam scales (:meth:`OptimizerUpdate._adam_scales`): numbers as they are, a
    weight's own two 0-dim tensors, or ``[2, weights]`` for several weights."""
    if not torch.is_tensor(scales):
        return scales
    if weights == 1:
        return tuple(scales[:, start].unbind())
    return scales[:, start : start + weights]


def _sum_dtype(device: torch.device) -> torch.dtype:
    """What ``D`` and the sums are accumulated in: float64, where the device has it (MPS has not: float32)."""
    return torch.float32 if device.type == "mps" else torch.float64


def adam_run_share(
    st: torch.Tensor,
    rows: torch.Tensor,
    first: torch.Tensor | None,
    second: torch.Tensor | None,
    param: torch.Tensor | None,
    eps: torch.Tensor,
    weights: torch.Tensor,
    constants: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A run's Adam share of ``D`` for every row ``[s, t]`` of ``st`` (``[lambdas, 2]``), as one expression a compiler
    fuses into one reduction over the run (:meth:`OptimizerUpdate._adam` states it; its eager pieces compute the same):
    ``sum_i weights_i (G_i + c1 m_i) / (sqrt(v_i + G_i^2 / c2) + eps_i)`` with ``G = s g_w + t h_l + l2 theta``
    (``rows = [g_w; h_l]``; no state, ``first is None``: ``G / (|G| + eps)``), summed in ``dtype``: ``[lambdas]``.
    ``constants`` is ``[c1, 1 / c2, l2]`` and ``eps`` a tensor, on the device: a number would enter a graph compiled
    for every size as an input read back on the host."""
    grad = st[:, 0:1] * rows[0] + st[:, 1:2] * rows[1]
    if param is not None:
        grad = grad + constants[2] * param
    if first is None:
        ratio = grad / (grad.abs() + eps)
    else:
        ratio = (grad + constants[0] * first) / (torch.sqrt(second + grad * grad * constants[1]) + eps)
    return (ratio * weights).sum(-1, dtype=dtype)


class CompiledShare:
    """:func:`adam_run_share` compiled by ``torch.compile`` with ``backend``, one graph for runs of every size
    (``dynamic=True``; a graph per kind of run: with or without state, weight decay, per-element ``eps``). Where
    compiling or running the kernel raises, it says why once and answers ``None`` from then on: the caller runs the
    eager pieces instead. One per backend (:meth:`of`), so that its graphs serve every step."""

    _by_backend: dict[str | Callable, CompiledShare] = {}

    def __init__(self, backend: str | Callable) -> None:
        self.backend = backend
        self.function = torch.compile(adam_run_share, backend=backend, dynamic=True, fullgraph=True)
        #: why the kernel is not used (``None`` while it is)
        self.failure: str | None = None

    @classmethod
    def of(cls, backend: str | Callable) -> CompiledShare:
        if backend not in cls._by_backend:
            cls._by_backend[backend] = cls(backend)
        return cls._by_backend[backend]

    def __call__(self, *args) -> torch.Tensor | None:
        if self.failure is not None:
            return None
        try:
            return self.function(*args)
        except Exception as error:  # noqa: BLE001 - any failure to compile: the eager pieces compute the same
            # the compiler's own error, not dynamo's wrapper of it (BackendCompilerFailed keeps it apart)
            while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
                error = inner
            self.failure = f"{type(error).__name__}: {error}".splitlines()[0]
            logger.warning(
                "The update space's search runs its eager passes: compiling its kernel (backend %s) failed: %s",
                getattr(self.backend, "__name__", self.backend),
                self.failure,
            )
            return None


class OptimizerUpdate:
    """``D(lambda) = -<g_w, Delta(lambda)>`` for the update ``optimizer`` would take next from the gradient
    ``c(lambda) * (g_w + lambda * h_l)`` (see the module docstring), for many ``lambda`` at once.

    The trainable weights are grouped into segments of equal lambda-dependent hyperparameters and cut into runs of
    consecutive weights (their gradients views where the inputs allow, e.g. the one-pass buffer's rows); an evaluation
    is a few batched elementwise operations per run for all requested ``lambda`` together, summed in float64. SGD's
    ``D`` is affine in the gradient and follows from four sums read once (no pass per ``lambda``).

    Args:
        optimizer: the training optimizer (accelerate's wrapper is unwrapped); its state is read, not changed.
        parameters: the trainable weights, in the order of ``winner`` and ``loser``.
        winner: ``g_w`` per weight, in the backward's units (times ``unscale``: the optimizer's).
        loser: ``h_l`` per weight, same units.
        max_grad_norm: the trainer's clipping threshold (``<= 0``: no clipping).
        unscale: what turns ``winner`` and ``loser`` into the units the optimizer sees (``1 / scale`` of a scaled
            backward), a number or a 0-dim tensor; no copy of the gradients is made.
        reduce_sum: where the weights are sharded over processes, what sums a tensor over them (returning the sum;
            e.g. an all-reduce): the inputs are then each process's shards, and every sum formed from them is added
            up (see the module docstring). ``None``: the weights are whole here, nothing is reduced.
        workspace: the buffers a pass works in, kept across steps by the caller (a fresh one where not given).
        kernel: how Adam's share of ``D`` is evaluated: ``"pieces"`` (eager, a few batched operations per piece of a
            run), or a ``torch.compile`` backend (one compiled kernel per run, :class:`CompiledShare`, falling back to
            the pieces where it cannot compile); ``None``: :data:`KERNELS`'s for the gradients' device.
    """

    def __init__(
        self,
        optimizer,
        parameters: Sequence[torch.nn.Parameter],
        winner: Sequence[torch.Tensor],
        loser: Sequence[torch.Tensor],
        max_grad_norm: float,
        unscale: torch.Tensor | float = 1.0,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
        workspace: UpdateWorkspace | None = None,
        kernel: str | Callable | None = None,
    ) -> None:
        self.optimizer = check_optimizer(optimizer)
        self.reduce_sum = reduce_sum
        self.workspace = workspace if workspace is not None else UpdateWorkspace()
        self.workspace.generation += 1  # a new step: what the workspace holds is stale
        self.adam = not isinstance(self.optimizer, torch.optim.SGD)
        self.decoupled = isinstance(self.optimizer, torch.optim.AdamW)
        self.max_grad_norm = max_grad_norm
        parameters = list(parameters)
        winner, loser = [local(w) for w in winner], [local(h) for h in loser]  # no operation per weight
        device = winner[0].device if winner else torch.device("cpu")
        self.dtype = torch.promote_types(winner[0].dtype, torch.float32) if winner else torch.float32
        self.sum_dtype = _sum_dtype(device)
        kernel = KERNELS.get(device.type, "pieces") if kernel is None else kernel
        self.kernel = None if kernel == "pieces" or not self.adam else CompiledShare.of(kernel)
        group_of = {id(p): group for group in self.optimizer.param_groups for p in group["params"]}
        states = [self.optimizer.state.get(p, {}) for p in parameters]
        keys, by_key = [], {}
        for i, p in enumerate(parameters):
            group = group_of.get(id(p))
            if group is None:
                raise ValueError("a trainable weight is not in the optimizer's parameter groups")
            key = self._key(group, states[i])
            if key not in by_key:
                by_key[key] = []
                keys.append(key)
            by_key[key].append(i)
        self.segments: list[_Segment] = []
        sizes = [w.numel() for w in winner]
        chunk = CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK
        norms: list[torch.Tensor] = []  # per run <w, w>, <w, h>, <h, h> (the clip coefficient's sums)
        clipping = max_grad_norm > 0
        # one blocked read where they are one buffer; the rows of the one pass's buffer, where they are, serve a run
        # of all the weights as they are
        sums, flat_rows = self._flat_norms(winner, loser) if clipping else (None, None)
        # runs stay inside the buffers the gradients are views of (the one pass's pieces, one per dtype of the rows
        # where the layers' products differ): each buffer's weights are cut into runs apart, in their order
        groups = storage_groups(winner) if flat_rows is None else None
        decays: list[torch.Tensor] = []  # AdamW: sum_groups lr wd <g_w, theta>, per run of a group's weights
        first_name, second_name = ("exp_avg", "exp_avg_sq") if self.adam else ("momentum_buffer", None)
        with torch.no_grad():
            for key in keys:
                hyper = dict(key)
                segment = _Segment(hyper, [], {})
                sgd: dict[str, list[torch.Tensor]] = {name: [] for name in _SGD_SUMS}
                members_of_key = by_key[key]
                grouped = [members_of_key] if groups is None else groups(members_of_key)
                segment_runs = [run for group in grouped for run in runs(group, sizes, chunk)]
                scales = self._adam_scales(hyper, [states[i] for run in segment_runs for i in run], device)
                start = 0
                for members in segment_runs:
                    stated = hyper["has_state"]
                    if flat_rows is not None and flat_rows.dtype == self.dtype and len(members) == len(winner):
                        rows = flat_rows
                    else:
                        rows = branch_rows([winner[i] for i in members], [loser[i] for i in members], self.dtype)
                    run = Run(
                        rows[0],
                        rows[1],
                        [local(states[i][first_name]) for i in members] if stated else None,
                        [local(states[i][second_name]) for i in members] if stated and second_name else None,
                        [local(parameters[i]) for i in members] if hyper["l2"] else None,
                        tuple(tuple(winner[i].shape) for i in members),
                        rows,
                        _run_scales(scales, start, len(members)),
                    )
                    start += len(members)
                    w, h = run.winner, run.loser
                    # every sum over a run as the one buffer's (blocked_dot: float32 blocks added in float64), so
                    # that partitions and one buffer give the same sums: a float32 dot per run rounds otherwise, by
                    # 3e-4 where <g_w, h_l> nearly cancels, which moves the crossing
                    if clipping and sums is None:  # [<w, w>, <w, h>] reading w once, then <h, h>
                        norms += [blocked_dot(w, rows, dtype=self.sum_dtype), blocked_dot(h, h, dtype=self.sum_dtype)]
                    if self.adam:
                        segment.runs.append(run)
                        continue
                    products = blocked_dot(w, rows, dtype=self.sum_dtype)
                    sgd["ww"].append(products[0])  # SGD: the four sums of its closed form
                    sgd["wh"].append(products[1])
                    if run.param is not None:
                        sgd["wp"].append(blocked_dot(w, self._read("param", run), dtype=self.sum_dtype))
                    if run.first is not None:
                        sgd["wb"].append(blocked_dot(w, self._read("first", run), dtype=self.sum_dtype))
                segment.sums = {name: torch.stack(values).sum() for name, values in sgd.items() if values}
                self.segments.append(segment)
            for group in self.optimizer.param_groups if self.decoupled else ():
                if group["weight_decay"] != 0:
                    members = [i for i, p in enumerate(parameters) if group_of.get(id(p)) is group]
                    for run in runs(members, sizes, chunk):  # <g_w, theta>: theta copied, times g_w, summed
                        shapes = tuple(tuple(winner[i].shape) for i in run)
                        flat, views = self.workspace.flat("decay", shapes, self.dtype, device)
                        torch._foreach_copy_(views, [local(parameters[i]) for i in run])
                        torch._foreach_mul_(views, [winner[i] for i in run])
                        decays.append(flat.sum(dtype=self.sum_dtype) * (group["lr"] * group["weight_decay"]))
        if sums is None:
            zeros = torch.zeros(3, dtype=self.sum_dtype, device=device)
            sums = torch.cat([n.reshape(-1) for n in norms]).view(-1, 3).sum(0) if norms else zeros
            sums = sums.to(device)
        self._largest = max((run.numel for segment in self.segments for run in segment.runs), default=0)
        self._work = CPU_WORK if device.type == "cpu" else DEVICE_WORK
        if not decays:
            decay = torch.zeros((), dtype=self.sum_dtype, device=device)
        else:  # one group with a decay (the usual case): no stack
            decay = decays[0] if len(decays) == 1 else torch.stack(decays).sum()
        if reduce_sum is not None:
            sums, decay = self._reduce_sums(reduce_sum, sums, decay)
        self.device = device
        # on the device, never read back: ||g_w + lambda h_l||^2 = ww + 2 lambda wl + lambda^2 ll (optimizer units:
        # times 1 / scale^2), the clip coefficient of any lambda; the decoupled weight decay's share of D, the same
        # for every lambda; 1 / scale (a tensor, or a number as it is)
        u = unscale.to(device=device, dtype=self.sum_dtype) if torch.is_tensor(unscale) else float(unscale)
        self._unscale = u
        self._norms = sums.to(self.sum_dtype) * (u * u)
        self._decay = decay.to(self.sum_dtype) * u
        ww, wl, ll = self._norms.unbind()
        self._quadratic = (ww, 2 * wl, ll)

    ww = property(lambda self: self._norms[0], doc="``<g_w, g_w>`` in the optimizer's units (a device tensor)")
    wl = property(lambda self: self._norms[1], doc="``<g_w, h_l>`` in the optimizer's units (a device tensor)")
    ll = property(lambda self: self._norms[2], doc="``<h_l, h_l>`` in the optimizer's units (a device tensor)")

    def _read(self, name: str, run: Run) -> torch.Tensor:
        """``run``'s ``name`` input (``param``, ``first``, ``second``) flat in the workspace: one foreach copy, or none
        where the workspace still holds it from this step (a segment of one run: every pass reads the same)."""
        return self.workspace.read(name, run, getattr(run, name), self.dtype)

    def _reduce_sums(
        self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], sums: torch.Tensor, decay: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The clip coefficient's three sums, AdamW's decay term and each SGD segment's four sums (zeros where a sum
        does not apply) over this process's shards, added up over processes in one collective: ``(sums, decay)``,
        and the segments' sums replaced by their totals. The layout is the same on every process (the same weights
        in the same segments)."""
        zero = decay.new_zeros(())
        sgd = [] if self.adam else self.segments
        packed = reduce_sum(
            torch.cat([sums, decay.reshape(1), *(torch.stack([s.sums.get(n, zero) for n in _SGD_SUMS]) for s in sgd)])
        )
        for k, segment in enumerate(sgd):
            segment.sums = dict(zip(_SGD_SUMS, packed[4 + 4 * k : 8 + 4 * k]))
        return packed[:3], packed[3]

    def _flat_norms(
        self, winner: list[torch.Tensor], loser: list[torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``([<w, w>, <w, h>, <h, h>], rows)`` (backward units) in two blocked reads where ``winner`` and ``loser``
        (flat) are each one flat buffer, with ``rows`` their ``[2, total]`` view where they are the rows of one (the
        one pass's buffer); ``(None, None)`` otherwise (then summed per run)."""
        flat_winner = one_view(winner) if winner else None
        flat_loser = one_view(loser) if loser else None
        if flat_winner is None or flat_loser is None or flat_winner.dtype != flat_loser.dtype:
            return None, None
        rows = stacked_rows(flat_winner, flat_loser)
        if rows is not None:  # <w, w> and <w, h> reading w once
            winner_sums = blocked_dot(flat_winner, rows, dtype=self.sum_dtype)
        else:
            winner_sums = torch.stack(
                [blocked_dot(flat_winner, b, dtype=self.sum_dtype) for b in (flat_winner, flat_loser)]
            )
        loser_sum = blocked_dot(flat_loser, flat_loser.unsqueeze(0), dtype=self.sum_dtype)  # [<h, h>]
        return torch.cat([winner_sums, loser_sum]), rows

    def _key(self, group: dict, state: dict) -> tuple:
        """The hyperparameters a weight's ``D(lambda)`` depends on beyond its own tensors and step count (hashable;
        Adam's step count, a tensor that may lie on the device, enters through :meth:`_adam_scales`)."""
        lr = float(group["lr"])
        l2 = 0.0 if self.decoupled else float(group["weight_decay"])
        if self.adam:
            beta1, beta2 = (float(b) for b in group["betas"])
            first = "exp_avg" in state
            return (
                ("lr", lr),
                ("beta1", beta1),
                ("beta2", beta2),
                ("eps", float(group["eps"])),
                ("l2", l2),
                ("has_state", first),
            )
        return (
            ("lr", lr),
            ("l2", l2),
            ("momentum", float(group["momentum"])),
            ("dampening", float(group["dampening"])),
            ("nesterov", bool(group["nesterov"])),
            ("has_state", state.get("momentum_buffer") is not None),
        )

    def clip_coefficient(self, lam: torch.Tensor) -> torch.Tensor:
        """``min(1, max_grad_norm / (||g_w + lambda h_l|| + 1e-6))``, as ``clip_grad_norm_`` multiplies."""
        lam = lam if lam.dtype == self.sum_dtype else lam.to(self.sum_dtype)
        if self.max_grad_norm <= 0:
            return torch.ones_like(lam)
        ww, wl2, ll = self._quadratic
        norm = torch.addcmul(ww, lam, torch.addcmul(wl2, lam, ll)).clamp_(min=0).sqrt_()
        return norm.add_(1e-6).reciprocal_().mul_(self.max_grad_norm).clamp_(max=1.0)

    def winner_decreases(self, lams: torch.Tensor) -> torch.Tensor:
        """:meth:`decreases` at each of ``lams`` (a vector)."""
        return self.decreases(lams)

    @torch.no_grad()
    def decreases(self, points: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """``D`` at each ``lambda`` of ``points`` (float32 numbers: a device tensor, or host numbers), in one pass over
        the weights, as a device tensor (float64 where the device has it); on shards (``reduce_sum``), every process's
        share added up in one collective, the same ``D`` on every process. Nothing is read back to the host: the
        gradient's coefficients ``s = c(lambda) / scale`` and ``t = s lambda`` are formed on the device from the clip
        coefficient's sums."""
        if not torch.is_tensor(points):
            points = host_tensor(list(points), torch.float32, self.device)
        lams = points.to(device=self.device, dtype=self.sum_dtype)
        s = self.clip_coefficient(lams) * self._unscale  # G = s g_w + t h_l
        t = s * lams
        if not self.adam:
            total = torch.stack([self._sgd(segment, s, t) for segment in self.segments]).sum(0)
            return total * self._unscale + self._decay
        st = torch.stack([s, t], 1).to(self.dtype)  # [lambdas, 2]
        count = st.shape[0]
        piece = min(self._largest, max(self._work // count, 1))  # a run's elements per operation
        shares = [share for segment in self.segments for share in self._adam(segment, st, piece)]
        total = shares[0] if len(shares) == 1 else torch.stack(shares).sum(0)
        if self.reduce_sum is not None:  # this process's share of the elementwise sums, added up over processes
            total = self.reduce_sum(total)
        return total * self._unscale + self._decay

    def _adam_scales(
        self, hyper: dict, states: list[dict], device: torch.device
    ) -> tuple[float, float] | torch.Tensor:
        """Adam's per-weight ``(eps / kappa, lr (1 - beta1) / (bc1 kappa))`` (see :meth:`_adam`) for the weights of
        ``states`` in order: two numbers where every weight has the same step count (none has state yet, the first
        step), else a ``[2, weights]`` device tensor from their step counts, read where they lie (no host read)."""
        if not self.adam:
            return None
        beta1, beta2, eps, lr = hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["lr"]
        if not hyper["has_state"]:  # step 1 for every weight: bc1 = 1 - beta1, bc2 = 1 - beta2, c2 = 1, kappa = 1
            return eps, lr
        c2 = beta2 / (1 - beta2)
        steps = [state["step"] for state in states]
        if not all(torch.is_tensor(step) for step in steps):
            steps = [torch.as_tensor(float(step)) for step in steps]  # a number: the step counts of older torch
        step = to_device(torch.stack([local(x) for x in steps]), device).to(self.sum_dtype) + 1
        # kappa = sqrt((1 - beta2) c2 / bc2) = sqrt(beta2 / bc2)
        inverse_kappa = torch.rsqrt((1 - beta2) * c2 / (1 - torch.pow(beta2, step)))
        scales = torch.stack([inverse_kappa * eps, inverse_kappa * (lr * (1 - beta1)) / (1 - torch.pow(beta1, step))])
        return scales.to(self.dtype)

    def _adam(self, segment: _Segment, st: torch.Tensor, piece: int) -> list[torch.Tensor]:
        """Adam's share of ``D`` per run, ``D = unscale * sum(shares) + decay``: torch's
        ``-lr / bc1 * m' / (sqrt(v') / sqrt(bc2) + eps)`` rearranged so that each run costs a few operations over
        ``[lambdas, run]``: with ``G = s g_w + t h_l`` (+ ``wd theta``; ``[s, t]`` the rows of ``st``, times
        ``[g_w; h_l]`` in one product),
        ``m' = (1 - beta1)(G + c1 m)``, ``v' = (1 - beta2) c2 (v + G^2 / c2)`` (``c1 = beta1 / (1 - beta1)``,
        ``c2 = beta2 / (1 - beta2)``; no state: ``m = v = 0`` and ``c2 = 1``),
        ``kappa = sqrt((1 - beta2) c2 / bc2)``:
        ``D = lr (1 - beta1) / (bc1 kappa) <g_w, (G + c1 m) / (sqrt(v + G^2 / c2) + eps / kappa)>``, the per-weight
        ``eps / kappa`` and ``lr (1 - beta1) / (bc1 kappa)`` from each weight's step count (:meth:`_adam_scales`).
        A run is read in pieces of ``piece`` elements (the workspace holds ``3 x lambdas x piece``), or whole by the
        compiled kernel (:func:`adam_run_share`; no workspace)."""
        hyper = segment.hyper
        beta1, beta2 = hyper["beta1"], hyper["beta2"]
        c1, c2 = beta1 / (1 - beta1), (beta2 / (1 - beta2) if hyper["has_state"] else 1.0)
        count = st.shape[0]
        shares = []
        for run in segment.runs:
            eps, factor, weights = self._run_scales(run)
            first = self._read("first", run) if run.first is not None else None
            second = self._read("second", run) if run.first is not None else None
            param = self._read("param", run) if hyper["l2"] != 0 else None
            if self.kernel is not None:  # the whole run in one kernel: no piece, no temporaries in memory
                if segment.constants is None:  # [c1, 1 / c2, l2, eps] on the device, once per segment and step
                    numbers = [c1, 1 / c2, hyper["l2"], hyper["eps"]]
                    segment.constants = to_device(torch.tensor(numbers, dtype=self.dtype), self.device)
                eps = eps if torch.is_tensor(eps) else segment.constants[3]  # the first step's eps: a number
                share = self.kernel(
                    st, run.rows, first, second, param, eps, weights, segment.constants, self.sum_dtype
                )
                if share is not None:
                    shares.append(share if factor is None else share * factor)
                    continue
            work = self.workspace.flat("work", ((3, count * piece),), self.dtype, self.device)[1][0]
            for a in range(0, run.numel, piece):
                b = min(a + piece, run.numel)
                whole = a == 0 and b == run.numel  # one piece: the run's tensors as they are (no slicing)

                def part(x, a=a, b=b, whole=whole):
                    return x if whole or not torch.is_tensor(x) or x.dim() == 0 else x[..., a:b]

                grad, numerator, denominator = self.workspace.work_views(b - a, count, work)
                torch.mm(st, part(run.rows), out=grad)
                if param is not None:
                    grad.add_(part(param), alpha=hyper["l2"])
                if first is not None:
                    torch.add(grad, part(first), alpha=c1, out=numerator)
                    torch.addcmul(part(second), grad, grad, value=1 / c2, out=denominator).sqrt_()
                else:
                    numerator = grad
                    torch.abs(grad, out=denominator)
                share = torch.mv(numerator.div_(denominator.add_(part(eps))), part(weights))
                shares.append(share.to(self.sum_dtype) if factor is None else share.to(self.sum_dtype) * factor)
        return shares

    def _run_scales(self, run: Run) -> tuple:
        """``(eps, factor, weights)`` of a run: ``D``'s share is ``factor * <weights, ratio>`` with the ratio's
        denominator offset by ``eps`` (a number, a 0-dim tensor, or one per element); where the weights' scales differ
        (several step counts may), ``factor`` is ``None`` and ``weights`` is ``g_w`` times each element's factor,
        expanded once per step into the workspace."""
        scales = run.scales
        if not torch.is_tensor(scales):  # the same for every weight: numbers, or 0-dim tensors (one weight)
            return scales[0], scales[1], run.winner
        eps, weights = self.workspace.expanded(run, scales)
        return eps, None, weights

    def _sgd(self, segment: _Segment, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """SGD's share of ``D`` (``g_w`` in the backward's units: times ``unscale``, ``D``):
        ``lr <g_w, alpha G' + beta b>`` with
        ``G' = s g_w + t h_l + wd theta``, ``b`` the momentum buffer, and ``(alpha, beta)`` from momentum, dampening
        and Nesterov: affine, from the four sums."""
        hyper, sums = segment.hyper, segment.sums
        momentum, dampening = hyper["momentum"], hyper["dampening"]
        if momentum == 0:
            alpha, beta = 1.0, 0.0
        elif not hyper["has_state"]:  # the first step: b' = G'
            alpha, beta = (1 + momentum if hyper["nesterov"] else 1.0), 0.0
        elif hyper["nesterov"]:  # G' + momentum (momentum b + (1 - dampening) G')
            alpha, beta = 1 + momentum * (1 - dampening), momentum * momentum
        else:
            alpha, beta = 1 - dampening, momentum
        zero = torch.zeros((), dtype=self.sum_dtype, device=s.device)
        gradient = s * sums.get("ww", zero) + t * sums.get("wh", zero) + hyper["l2"] * sums.get("wp", zero)
        return hyper["lr"] * (alpha * gradient + beta * sums.get("wb", zero))


def update_space_lambda(
    update: OptimizerUpdate, mu: float | torch.Tensor, max_lambda: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda, infeasible)``: ``max_lambda`` where ``D(max_lambda) >= target = mu * max(D(0), 0)``, else ``lambda``
    within ``resolution = max_lambda *`` :data:`RESOLUTION` below a crossing: ``D(lambda) >= target > D(hi)`` for some
    ``hi`` in ``(lambda, lambda + resolution]``; where no point of the :data:`GRID_POINTS`-point grid meets the
    target, the grid point with the largest ``D`` and ``infeasible = 1``. Both are detached float32 0-dim device
    tensors, and nothing is read back to the host: the passes follow the fixed schedule of
    :func:`~.crossing.last_crossing` (see the module docstring). ``mu`` may be a device tensor."""
    return last_crossing(update.decreases, float32(max_lambda), lambda first: mu * first.clamp(min=0.0), update.device)


class UpdateSpaceRule:
    """The update space's ``lambda`` on a micro-batch's separated branches: ``g_w`` and ``h_l`` averaged over
    processes in place (what the optimizer will see; on shards, the engine's reduce-scatter did it), then
    :func:`update_space_lambda` on the optimizer's update from its state, its sums added up over processes where each
    holds a shard (``collectives``). ``max_grad_norm`` is the trainer's clipping threshold (``<= 0``: no clipping)."""

    def __init__(self, collectives, margin, max_lambda: float, max_grad_norm: float) -> None:
        self.collectives, self.margin = collectives, margin
        self.max_lambda, self.max_grad_norm = max_lambda, max_grad_norm
        #: 1.0 where the last micro-batch's lambda could not meet the margin (a device tensor, for the metrics);
        #: ``None`` before the first micro-batch
        self.infeasible: torch.Tensor | None = None
        self.workspace = UpdateWorkspace()  # the search's buffers and views, kept across steps

    def __call__(self, branches, optimizer) -> torch.Tensor:
        if optimizer is None:
            raise ValueError("safeguard_space='update' needs the optimizer: pass optimizer= to the backward stage")
        winner, loser = branches.gradients()
        scale = branches.scale
        update = OptimizerUpdate(
            *self.collectives.update_inputs(optimizer, branches.parameters, winner, loser),
            self.max_grad_norm,
            unscale=scale.reciprocal() if torch.is_tensor(scale) else 1.0 / scale,  # the optimizer's units
            reduce_sum=self.collectives.update_sum_reduction(),
            workspace=self.workspace,
        )
        lam, self.infeasible = update_space_lambda(update, self.margin.value, self.max_lambda)
        return lam


class UpdateSpace(ParameterSpace):
    """``safeguard_space="update"``: the parameter space's separated branches, ``lambda`` chosen by its hook on the
    optimizer's update of ``g_w + lambda h_l`` (:class:`UpdateSpaceRule`)."""

    name = "update"
    metric_names = (*ParameterSpace.metric_names, "safeguard/update_infeasible")
    update_space = True

    def __init__(self, args, engine, *, lora: bool = True, trainable_elements: int = 0) -> None:
        super().__init__(args, engine, lora=lora, trainable_elements=trainable_elements)
        self.rule = UpdateSpaceRule(
            self.backward_stage.collectives, self.margin, args.safeguard_max_lambda, args.max_grad_norm
        )

    def lambda_of(self, branches, optimizer) -> torch.Tensor:
        return self.rule(branches, optimizer)

    def _lambdas(self, lam: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {**super()._lambdas(lam), "safeguard/update_infeasible": self.rule.infeasible}
