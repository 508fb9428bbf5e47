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
is no closed form). ``D(0)`` and ``D(max_lambda)`` come first, from one pass, read on the host: when ``D(max_lambda)``
meets the target ``mu * max(D(0), 0)`` there is nothing to restrict, ``lambda = max_lambda``, and no search. Else:

* ``D(0)`` meets the target (always, unless ``D(0) < 0``): ``[0, max_lambda]`` brackets a crossing, and
  :func:`~.crossing.bracketed_crossing` narrows it to ``resolution = max_lambda *`` :data:`RESOLUTION`
  (``max_lambda / 2048``, the resolution of the grid and bisections before): ``lambda`` is the bracket's lower end, so
  ``D(lambda) >= target > D(hi)`` for some ``hi`` in ``(lambda, lambda + resolution]``. A pass evaluates
  ``x - resolution / 2`` and ``x + resolution / 2`` around the crossing ``x`` of an interpolant of the points evaluated
  so far (its basis built on the clip coefficient, which is known exactly), which certifies the bracket at once when
  ``x`` is that close; ITP's bound keeps the worst case to 13 passes. Typically two or three passes of two ``lambda``
  each.
* ``D(0)`` misses it (momentum or weight decay already raise the winner's term; the target is 0): the inner points
  of the :data:`GRID_POINTS`-point grid ``0, max_lambda / 8, ..., max_lambda`` take one pass; the crossing is searched
  between the largest grid point that meets the target and the next; where none does, ``lambda`` is the grid point
  with the largest ``D`` and the step is counted as infeasible.

Where ``D`` crosses the target once, ``lambda`` is within the resolution below the largest ``lambda`` meeting the
target, as before. Where ``D`` crosses the target more than once in ``[0, max_lambda]``, the search returns one of
the crossings (the rightmost sign change among the points it evaluated), not necessarily the largest: the grid
before took the largest grid point meeting the target, which could also miss a feasible region between grid points.
Every candidate is a float32 number, the ``lambda`` the trainer will use, so ``D(lambda) >= target`` holds for the
returned value itself.

A pass reads the gradients, the optimizer's moments and (for an L2 weight decay) the weights once, in slices (on a
CPU 128K elements, views of the tensors, or small tensors joined) for all of its ``lambda`` together: a handful of
batched elementwise operations per slice into one workspace allocated per pass, no Python loop over the weights,
and no copy of the gradients (they are read in the backward's units, with ``unscale`` folded into the scalars).
SGD's update is affine in the gradient: its ``D`` follows from four sums read once, and the search costs no pass.

On sharded weights (FSDP2) each process holds a shard of every tensor, and every sum above is a sum over
elements: :class:`OptimizerUpdate` works on the local shards and adds up, through ``reduce_sum``, the clip
coefficient's three sums, AdamW's weight-decay term and SGD's four sums (one collective when it is built) and
``D(lambda)`` (one collective per evaluation pass). Every process then reads the same numbers on the host and takes
the same decisions in the search: the same ``lambda``, that of the global micro-batch.

Supported optimizers: ``torch.optim.AdamW``, ``torch.optim.Adam`` (its weight decay is an L2 term added to the
gradient) and ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay); foreach and fused implementations
compute the same update. ``amsgrad`` and ``maximize`` are refused, and so are the 8-bit optimizers (their moments
are block-quantized) when the config is made (:mod:`~trl_diffusion_sdpo.config.rules`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate.optimizer import AcceleratedOptimizer

from .crossing import bracketed_crossing, float32
from .gradients.one_pass import blocked_dot

__all__ = [
    "GRID_POINTS",
    "RESOLUTION",
    "SUPPORTED_OPTIMIZERS",
    "OptimizerUpdate",
    "unwrap_optimizer",
    "update_space_lambda",
]

RESOLUTION = 1 / 2048  # of max_lambda: lambda lies within this below a crossing (as 9 grid points + 8 bisections)
GRID_POINTS = 9  # lambda = 0, max/8, ..., max: where D(0) misses the margin, the grid that looks for a feasible lambda
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


#: Elements per slice of the evaluation. On a CPU a slice is a view of a tensor of at least ``CPU_JOIN`` elements
#: (cut into ``CPU_SLICE`` pieces) or a run of smaller tensors joined (copied) up to ``CPU_SLICE``: large enough that
#: the per-operation dispatch is small against the arithmetic, small enough that a pass's workspace (``lambdas x
#: slice`` elements, three of them) stays in the last-level cache. On an accelerator slices bound the workspace while
#: keeping kernels large, and tensors below a slice are joined.
CPU_SLICE, CPU_JOIN, DEVICE_SLICE = 1 << 17, 1 << 15, 1 << 22

_SGD_SUMS = ("ww", "wh", "wp", "wb")  # SGD's closed form: <g_w, g_w>, <g_w, h_l>, <g_w, theta>, <g_w, b>


@dataclass
class _Slice:
    """One slice of a segment's elements: the winner's and the loser's gradient (backward units), the optimizer's
    first and second state (``None``: the first step) and the weights (where an L2 weight decay needs them). Views of
    the inputs where the slice lies in one tensor or in consecutive memory, else a copy of the small tensors in it."""

    winner: torch.Tensor
    loser: torch.Tensor
    first: torch.Tensor | None
    second: torch.Tensor | None
    param: torch.Tensor | None


@dataclass
class _Segment:
    """The weights whose update has the same lambda-dependent hyperparameters (one optimizer group's, and one step
    count for Adam), cut into slices. SGD's update is affine in the gradient: its ``D`` follows from the sums
    ``<g_w, g_w>``, ``<g_w, h_l>``, ``<g_w, theta>`` and ``<g_w, b>`` (``sums``), read once, and it keeps no slices."""

    hyper: dict
    slices: list[_Slice]
    sums: dict[str, torch.Tensor]

    @property
    def largest(self) -> int:
        """Elements of the segment's largest slice (0 without slices)."""
        return max((part.winner.numel() for part in self.slices), default=0)


def _sum_dtype(device: torch.device) -> torch.dtype:
    """What ``D`` and the sums are accumulated in: float64, where the device has it (MPS has not: float32)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _host_floats(values: Sequence) -> list[float]:
    """Python floats of numbers and 0-dim tensors (Adam's step counts): one host read for those on a device."""
    tensors = [i for i, v in enumerate(values) if torch.is_tensor(v)]
    out = [float(v) if not torch.is_tensor(v) else 0.0 for v in values]
    on_device = [i for i in tensors if values[i].device.type != "cpu"]
    if on_device:
        read = torch.stack([values[i].detach().float() for i in on_device]).tolist()
        for i, value in zip(on_device, read):
            out[i] = value
    for i in tensors:
        if values[i].device.type == "cpu":
            out[i] = float(values[i])
    return out


def _one_view(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """One flat view of ``parts`` (flat contiguous pieces) where they lie back to back in one storage, else None."""
    if len(parts) == 1:
        return parts[0] if parts[0].is_contiguous() else None
    first = parts[0]
    size = first.element_size()
    consecutive = all(p.is_contiguous() for p in parts) and all(
        p.dtype == first.dtype
        and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and p.data_ptr() == q.data_ptr() + q.numel() * size
        for q, p in zip(parts, parts[1:])
    )
    if consecutive:
        return first.as_strided((sum(p.numel() for p in parts),), (1,), first.storage_offset())
    return None


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """One flat tensor of ``parts`` (flat pieces): a view where they lie back to back in one storage, else a copy."""
    view = _one_view(parts)
    return view if view is not None else torch.cat(parts)


def _rows(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor | None:
    """``[first; second]`` as one ``[2, n]`` view where ``second`` lies a fixed stride after ``first`` in the same
    storage (the one pass's buffer ``[2, total]``), else None."""
    size = first.element_size()
    offset, rest = divmod(second.data_ptr() - first.data_ptr(), size)
    if (
        first.dtype != second.dtype
        or first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
        or rest
        or offset < first.numel()
    ):
        return None
    return first.as_strided((2, first.numel()), (offset, 1), first.storage_offset())


def _flat(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A flat view of ``tensor``; of this process's shard for a DTensor (FSDP2's weights, gradients and state)."""
    if tensor is None:
        return None
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.detach().reshape(-1)


class OptimizerUpdate:
    """``D(lambda) = -<g_w, Delta(lambda)>`` for the update ``optimizer`` would take next from the gradient
    ``c(lambda) * (g_w + lambda * h_l)`` (see the module docstring), for many ``lambda`` at once.

    The trainable weights are grouped into segments of equal lambda-dependent hyperparameters and cut into slices
    (views where the inputs allow, e.g. the one-pass buffer's rows); an evaluation is a few batched elementwise
    operations per slice for all requested ``lambda`` together, summed in float64. SGD's ``D`` is affine in the
    gradient and follows from four sums read once (no pass per ``lambda``).

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
    ) -> None:
        self.optimizer = check_optimizer(optimizer)
        self.reduce_sum = reduce_sum
        self.adam = not isinstance(self.optimizer, torch.optim.SGD)
        self.decoupled = isinstance(self.optimizer, torch.optim.AdamW)
        self.max_grad_norm = max_grad_norm
        parameters = list(parameters)
        winner, loser = [_flat(w) for w in winner], [_flat(h) for h in loser]  # flat views, made once
        decays = any(group["weight_decay"] != 0 for group in self.optimizer.param_groups)
        weights = [_flat(p) for p in parameters] if decays else [None] * len(parameters)
        device = winner[0].device if winner else torch.device("cpu")
        self.dtype = torch.promote_types(winner[0].dtype, torch.float32) if winner else torch.float32
        self.sum_dtype = _sum_dtype(device)
        self.unscale = torch.as_tensor(unscale, dtype=self.sum_dtype, device=device)
        group_of = {id(p): group for group in self.optimizer.param_groups for p in group["params"]}
        states = [self.optimizer.state.get(p, {}) for p in parameters]
        steps = _host_floats([state.get("step", 0.0) for state in states])
        keys, by_key = [], {}
        for i, p in enumerate(parameters):
            group = group_of.get(id(p))
            if group is None:
                raise ValueError("a trainable weight is not in the optimizer's parameter groups")
            key = self._key(group, states[i], steps[i])
            if key not in by_key:
                by_key[key] = []
                keys.append(key)
            by_key[key].append(i)
        self.segments: list[_Segment] = []
        slice_size, join = (CPU_SLICE, CPU_JOIN) if device.type == "cpu" else (DEVICE_SLICE, DEVICE_SLICE)
        norms: list[torch.Tensor] = []  # per slice <w, w>, <w, h>, <h, h> (the clip coefficient's sums)
        clipping = max_grad_norm > 0
        sums = self._flat_norms(winner, loser) if clipping else None  # one blocked read where they are one buffer
        for key in keys:
            indices = by_key[key]
            hyper = dict(key)
            state_names = ("exp_avg", "exp_avg_sq") if self.adam else ("momentum_buffer", None)
            segment = _Segment(hyper, [], {})
            parts = self._slices(
                indices, winner, loser, weights, states, state_names, hyper["l2"] != 0, slice_size, join, self.dtype
            )
            sgd: dict[str, list[torch.Tensor]] = {name: [] for name in _SGD_SUMS}
            for part in parts:
                w, h = part.winner, part.loser
                if clipping and sums is None:
                    norms += [torch.dot(w, w), torch.dot(w, h), torch.dot(h, h)]
                if self.adam:
                    segment.slices.append(part)
                    continue
                for name, other in (("ww", w), ("wh", h), ("wp", part.param), ("wb", part.first)):
                    if other is not None:  # SGD: the four sums of its closed form
                        sgd[name].append(torch.dot(w, other))
            segment.sums = {
                name: torch.stack(values).to(self.sum_dtype).sum() for name, values in sgd.items() if values
            }
            self.segments.append(segment)
        if sums is None:
            zeros = torch.zeros(3, dtype=self.sum_dtype)
            sums = torch.stack(norms).to(self.sum_dtype).view(-1, 3).sum(0) if norms else zeros
            sums = sums.to(device)
        self._largest = max((segment.largest for segment in self.segments), default=0)
        decay = torch.zeros((), dtype=self.sum_dtype, device=device)  # AdamW: sum_groups lr wd <g_w, theta>
        if self.decoupled:
            for group in self.optimizer.param_groups:
                if group["weight_decay"] != 0:
                    members = [i for i, p in enumerate(parameters) if group_of.get(id(p)) is group]
                    dots = [torch.dot(winner[i], weights[i].to(winner[i].dtype)) for i in members]
                    if dots:
                        decay = decay + group["lr"] * group["weight_decay"] * torch.stack(dots).to(decay).sum()
        if reduce_sum is not None:
            sums, decay = self._reduce_sums(reduce_sum, sums, decay)
        u = self.unscale
        # ||g_w + lambda h_l||^2 = ww + 2 lambda wl + lambda^2 ll (optimizer units): the clip coefficient of any lambda
        self.ww, self.wl, self.ll = sums[0] * u * u, sums[1] * u * u, sums[2] * u * u
        self._decay = decay * u  # the decoupled weight decay's share of D, the same for every lambda

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

    def _flat_norms(self, winner: list[torch.Tensor], loser: list[torch.Tensor]) -> torch.Tensor | None:
        """``[<w, w>, <w, h>, <h, h>]`` (backward units) in two blocked reads where ``winner`` and ``loser`` (flat) are
        each one flat buffer (the one pass hands the rows of ``[2, total]``), else None (then summed per slice)."""
        flat_winner = _one_view(winner) if winner else None
        flat_loser = _one_view(loser) if loser else None
        if flat_winner is None or flat_loser is None or flat_winner.dtype != flat_loser.dtype:
            return None
        rows = _rows(flat_winner, flat_loser)
        if rows is not None:  # <w, w> and <w, h> reading w once
            winner_sums = blocked_dot(flat_winner, rows, dtype=self.sum_dtype)
        else:
            winner_sums = torch.stack(
                [blocked_dot(flat_winner, b, dtype=self.sum_dtype) for b in (flat_winner, flat_loser)]
            )
        return torch.cat([winner_sums, blocked_dot(flat_loser, flat_loser, dtype=self.sum_dtype).reshape(1)])

    def _key(self, group: dict, state: dict, step: float) -> tuple:
        """The hyperparameters a weight's ``D(lambda)`` depends on beyond its own tensors (hashable)."""
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
                ("step", step),
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

    @staticmethod
    def _slices(indices, winner, loser, weights, states, state_names, wants_param, size, join, dtype):
        """The segment's elements in slices of at most ``size``: a tensor of at least ``join`` elements in views of
        ``size``, smaller ones joined in runs of up to ``size`` (copies, unless they lie back to back)."""
        first_name, second_name = state_names
        columns = [  # per tensor of the segment, each input flattened (None where it does not exist)
            [winner[i] for i in indices],
            [loser[i] for i in indices],
            [_flat(states[i].get(first_name)) for i in indices],
            [_flat(states[i].get(second_name)) if second_name else None for i in indices],
            [weights[i] if wants_param else None for i in indices],
        ]

        def make(run: list[tuple[int, int, int]]) -> _Slice:
            joined = []
            for column in columns:
                if column[run[0][0]] is None:
                    joined.append(None)
                    continue
                pieces = [column[k] if b - a == column[k].numel() else column[k][a:b] for k, a, b in run]
                joined.append(_joined([piece if piece.dtype == dtype else piece.to(dtype) for piece in pieces]))
            return _Slice(*joined)

        run: list[tuple[int, int, int]] = []  # (position in the segment, start, stop)
        total = 0
        for k, flat in enumerate(columns[0]):
            n = flat.numel()
            if n >= join:
                if run:
                    yield make(run)
                    run, total = [], 0
                for a in range(0, n, size):
                    yield make([(k, a, min(a + size, n))])
                continue
            if total + n > size and run:
                yield make(run)
                run, total = [], 0
            run.append((k, 0, n))
            total += n
        if run:
            yield make(run)

    def host_clip_coefficient(self) -> Callable[[float], float]:
        """:meth:`clip_coefficient` as a function of a Python float, from the three sums read once on the host."""
        if self.max_grad_norm <= 0:
            return lambda lam: 1.0
        ww, wl, ll = torch.stack([self.ww, self.wl, self.ll]).tolist()
        threshold = self.max_grad_norm

        def coefficient(lam: float) -> float:
            norm = math.sqrt(max(ww + 2 * lam * wl + lam * lam * ll, 0.0))
            return min(threshold / (norm + 1e-6), 1.0)

        return coefficient

    def clip_coefficient(self, lam: torch.Tensor) -> torch.Tensor:
        """``min(1, max_grad_norm / (||g_w + lambda h_l|| + 1e-6))``, as ``clip_grad_norm_`` multiplies."""
        lam = lam.to(self.sum_dtype)
        if self.max_grad_norm <= 0:
            return torch.ones_like(lam)
        norm = (self.ww + 2 * lam * self.wl + lam * lam * self.ll).clamp(min=0).sqrt()
        return (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)

    def winner_decreases(self, lams: torch.Tensor) -> torch.Tensor:
        """``D`` at each of ``lams`` (a vector), in one pass over the weights (float64 where the device has it); on
        shards (``reduce_sum``), every process's share added up in one collective, the same ``D`` on every process."""
        lams = lams.to(self.ww.device, self.sum_dtype)
        coefficient = self.clip_coefficient(lams) * self.unscale  # G = s g_w + t h_l in the optimizer's units
        s, t = coefficient, coefficient * lams
        # sharded Adam: this process's share of the elementwise sums, added up over processes in one collective (the
        # decay term and SGD's closed form are built from sums already added up)
        sharded = self.reduce_sum is not None and self.adam
        total = torch.zeros_like(lams) if sharded else self._decay + torch.zeros_like(lams)
        # the pass's temporaries, allocated once: [gradient, numerator, denominator] x lambdas x the largest slice
        work = (
            torch.empty(3, lams.numel() * self._largest, dtype=self.dtype, device=lams.device) if self.adam else None
        )
        for segment in self.segments:
            total = total + (self._adam(segment, s, t, work) if self.adam else self._sgd(segment, s, t))
        return self._decay + self.reduce_sum(total) if sharded else total

    def _adam(self, segment: _Segment, s: torch.Tensor, t: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        """Adam's share of ``D``: torch's ``-lr / bc1 * m' / (sqrt(v') / sqrt(bc2) + eps)`` rearranged so that each
        slice costs a few operations over ``[lambdas, slice]``: with ``G = s g_w + t h_l`` (+ ``wd theta``),
        ``m' = (1 - beta1)(G + c1 m)``, ``v' = (1 - beta2) c2 (v + G^2 / c2)`` (``c1 = beta1 / (1 - beta1)``,
        ``c2 = beta2 / (1 - beta2)``; no state: ``m = v = 0`` and ``c2 = 1``),
        ``kappa = sqrt((1 - beta2) c2 / bc2)``:
        ``D = lr (1 - beta1) / (bc1 kappa) <g_w, (G + c1 m) / (sqrt(v + G^2 / c2) + eps / kappa)>``."""
        hyper = segment.hyper
        beta1, beta2, step = hyper["beta1"], hyper["beta2"], hyper["step"] + 1
        bc1, bc2 = 1 - beta1**step, 1 - beta2**step
        c1, c2 = beta1 / (1 - beta1), (beta2 / (1 - beta2) if hyper["has_state"] else 1.0)
        kappa = ((1 - beta2) * c2 / bc2) ** 0.5
        eps = hyper["eps"] / kappa
        count = s.shape[0]
        s, t = s.to(self.dtype).unsqueeze(1), t.to(self.dtype).unsqueeze(1)
        shares = torch.empty(len(segment.slices), count, dtype=self.dtype, device=s.device)
        for part, share in zip(segment.slices, shares):
            n = part.winner.numel()
            grad, numerator, denominator = (buffer[: count * n].view(count, n) for buffer in work)
            torch.mul(part.winner, s, out=grad)
            grad.addcmul_(t, part.loser)
            if hyper["l2"] != 0:
                grad.add_(part.param, alpha=hyper["l2"])
            if part.first is not None:
                torch.add(grad, part.first, alpha=c1, out=numerator)
                torch.addcmul(part.second, grad, grad, value=1 / c2, out=denominator).sqrt_()
            else:
                numerator = grad
                torch.abs(grad, out=denominator)
            torch.mv(numerator.div_(denominator.add_(eps)), part.winner, out=share)
        return shares.to(self.sum_dtype).sum(0) * (self.unscale * hyper["lr"] * (1 - beta1) / (bc1 * kappa))

    def _sgd(self, segment: _Segment, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """SGD's share of ``D``: ``lr <g_w, alpha G' + beta b>`` with ``G' = s g_w + t h_l + wd theta``, ``b`` the
        momentum buffer, and ``(alpha, beta)`` from momentum, dampening and Nesterov: affine, from the four sums."""
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
        return self.unscale * hyper["lr"] * (alpha * gradient + beta * sums.get("wb", zero))


def update_space_lambda(
    update: OptimizerUpdate, mu: float, max_lambda: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda, infeasible)``: ``max_lambda`` where ``D(max_lambda) >= target = mu * max(D(0), 0)``, else ``lambda``
    within ``resolution = max_lambda *`` :data:`RESOLUTION` below a crossing: ``D(lambda) >= target > D(hi)`` for some
    ``hi`` in ``(lambda, lambda + resolution]`` (see the module docstring); both are detached float32 0-dim device
    tensors.

    ``D(0)`` and ``D(max_lambda)`` come from one pass, read on the host: when ``D(max_lambda)`` meets the target
    (nothing to restrict) the search ends there. When ``D(0)`` meets it, the crossing is searched in ``[0,
    max_lambda]`` by :func:`~.crossing.bracketed_crossing` (at most three ``lambda`` per pass, one host read each).
    When it does not (momentum or weight decay already raise the winner's term, so the target is 0), the inner grid
    points of :data:`GRID_POINTS` take one pass; the crossing is searched between the largest grid point that meets
    the target and the next, and where none does, ``lambda`` is the grid point with the largest ``D`` and
    ``infeasible = 1``. Every candidate is a float32 number, as the trainer will use it."""
    device = update.ww.device
    top = float32(max_lambda)

    def decreases(points: list[float]) -> list[float]:
        return update.winner_decreases(torch.tensor(points, dtype=update.sum_dtype, device=device)).tolist()

    first, last = decreases([0.0, top])
    target = mu * max(first, 0.0)
    infeasible = False
    if last >= target:  # the common case: nothing to restrict, no search
        lam = top
    elif first >= target:
        lam, _ = bracketed_crossing(
            lambda points: [d - target for d in decreases(points)],
            0.0,
            top,
            first - target,
            last - target,
            max_lambda * RESOLUTION,
            update.host_clip_coefficient(),
        )
    else:
        grid = [float32(max_lambda * k / (GRID_POINTS - 1)) for k in range(GRID_POINTS)]
        values = [first, *decreases(grid[1:-1]), last]
        feasible = [k for k, d in enumerate(values) if d >= target]
        if feasible:
            k = feasible[-1]  # < GRID_POINTS - 1: D(max_lambda) misses the target
            lam, _ = bracketed_crossing(
                lambda points: [d - target for d in decreases(points)],
                grid[k],
                grid[k + 1],
                values[k] - target,
                values[k + 1] - target,
                max_lambda * RESOLUTION,
                update.host_clip_coefficient(),
            )
        else:
            lam, infeasible = grid[max(range(GRID_POINTS), key=lambda k: values[k])], True
    as_float = {"dtype": torch.float32, "device": device}
    return torch.tensor(lam, **as_float), torch.tensor(float(infeasible), **as_float)
