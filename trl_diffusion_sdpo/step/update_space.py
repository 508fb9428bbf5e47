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

``lambda`` is the largest value in ``[0, max_lambda]`` satisfying it, found by a scalar search over the real update
(AdamW's second moment depends on ``lambda``, so there is no closed form): ``D`` on a grid of
:data:`GRID_POINTS` values, then :data:`BISECTIONS` bisection steps between the largest satisfying grid point and
the next. Each evaluation of ``D`` is one elementwise pass over the trainable weights' gradients and optimizer state
(no forward or backward pass). ``D(0)`` and ``D(max_lambda)`` come first and the host reads whether
``max_lambda`` meets the condition (one sync per step): if so there is nothing to restrict and no search (two
evaluations); else 17. When no grid point satisfies the condition, ``lambda`` is the grid point with the largest
``D`` and the step is counted as infeasible.

Supported optimizers: ``torch.optim.AdamW``, ``torch.optim.Adam`` (its weight decay is an L2 term added to the
gradient) and ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay); foreach and fused implementations
compute the same update. ``amsgrad`` and ``maximize`` are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate.optimizer import AcceleratedOptimizer

__all__ = [
    "BISECTIONS",
    "GRID_POINTS",
    "SUPPORTED_OPTIMIZERS",
    "OptimizerUpdate",
    "unwrap_optimizer",
    "update_space_lambda",
]

GRID_POINTS = 9  # lambda = 0, max/8, ..., max
BISECTIONS = 8  # resolution max_lambda / 8 / 2^8 ~ 5e-4 * max_lambda
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


@dataclass
class _Tensor:
    """What the update of one weight tensor needs, in float32 (state tensors are read, never written)."""

    winner: torch.Tensor  # g_w
    loser: torch.Tensor  # h_l
    param: torch.Tensor
    first: torch.Tensor | None  # Adam's exp_avg, SGD's momentum buffer (None: the first step)
    second: torch.Tensor | None  # Adam's exp_avg_sq
    step: torch.Tensor | float  # Adam's step count before this step


class OptimizerUpdate:
    """``D(lambda) = -<g_w, Delta(lambda)>`` for the update ``optimizer`` would take next from the gradient
    ``c(lambda) * (g_w + lambda * h_l)`` (see the module docstring).

    Args:
        optimizer: the training optimizer (accelerate's wrapper is unwrapped); its state is read, not changed.
        parameters: the trainable weights, in the order of ``winner`` and ``loser``.
        winner: ``g_w`` per weight, in the units the optimizer sees (unscaled).
        loser: ``h_l`` per weight, same units.
        max_grad_norm: the trainer's clipping threshold (``<= 0``: no clipping).
    """

    def __init__(
        self,
        optimizer,
        parameters: Sequence[torch.nn.Parameter],
        winner: Sequence[torch.Tensor],
        loser: Sequence[torch.Tensor],
        max_grad_norm: float,
    ) -> None:
        self.optimizer = check_optimizer(optimizer)
        self.adam = not isinstance(self.optimizer, torch.optim.SGD)
        self.decoupled = isinstance(self.optimizer, torch.optim.AdamW)
        group_of = {id(p): group for group in self.optimizer.param_groups for p in group["params"]}
        self.groups: list[tuple[dict, list[_Tensor]]] = []
        by_group: dict[int, list[_Tensor]] = {}
        for p, w, h in zip(parameters, winner, loser):
            group = group_of.get(id(p))
            if group is None:
                raise ValueError("a trainable weight is not in the optimizer's parameter groups")
            state = self.optimizer.state.get(p, {})
            entry = _Tensor(
                w.float(),
                h.float(),
                p.detach().float(),
                state.get("exp_avg" if self.adam else "momentum_buffer"),
                state.get("exp_avg_sq"),
                state.get("step", 0.0),
            )
            if id(group) not in by_group:
                by_group[id(group)] = []
                self.groups.append((group, by_group[id(group)]))
            by_group[id(group)].append(entry)
        entries = [e for _, es in self.groups for e in es]
        dots = [(e.winner * e.winner).sum() for e in entries], [(e.winner * e.loser).sum() for e in entries]
        zero = torch.zeros((), device=entries[0].winner.device) if entries else torch.zeros(())
        # ||g_w + lambda h_l||^2 = ww + 2 lambda wl + lambda^2 ll: the clip coefficient for any lambda from 3 sums
        self.ww = torch.stack(dots[0]).sum() if entries else zero
        self.wl = torch.stack(dots[1]).sum() if entries else zero
        self.ll = torch.stack([(e.loser * e.loser).sum() for e in entries]).sum() if entries else zero
        self.max_grad_norm = max_grad_norm

    def clip_coefficient(self, lam: torch.Tensor) -> torch.Tensor:
        """``min(1, max_grad_norm / (||g_w + lambda h_l|| + 1e-6))``, as ``clip_grad_norm_`` multiplies."""
        if self.max_grad_norm <= 0:
            return torch.ones_like(lam)
        norm = (self.ww + 2 * lam * self.wl + lam * lam * self.ll).clamp(min=0).sqrt()
        return (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)

    def winner_decrease(self, lam: torch.Tensor) -> torch.Tensor:
        """``D(lambda) = -<g_w, Delta(lambda)>`` in float32 (a 0-dim device tensor)."""
        coefficient = self.clip_coefficient(lam)
        total = torch.zeros((), device=lam.device)
        for group, entries in self.groups:
            lr, wd = group["lr"], group["weight_decay"]
            for e in entries:
                grad = coefficient * (e.winner + lam * e.loser)
                if wd != 0 and not self.decoupled:  # Adam's and SGD's L2 term
                    grad = grad + wd * e.param
                step = (-self._adam(group, e, grad)) if self.adam else (-self._sgd(group, e, grad))
                if wd != 0 and self.decoupled:  # AdamW: p <- p * (1 - lr * wd) before the Adam step
                    step = step + lr * wd * e.param
                total = total + (e.winner * step).sum()
        return total

    @staticmethod
    def _adam(group: dict, e: _Tensor, grad: torch.Tensor) -> torch.Tensor:
        """torch's Adam step (without weight decay): ``-lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``."""
        beta1, beta2 = group["betas"]
        t = e.step + 1
        m = grad * (1 - beta1) if e.first is None else e.first.float() * beta1 + grad * (1 - beta1)
        v = grad * grad * (1 - beta2) if e.second is None else e.second.float() * beta2 + grad * grad * (1 - beta2)
        bc1 = 1 - beta1**t
        bc2_sqrt = (1 - beta2**t) ** 0.5
        return -group["lr"] / bc1 * m / (v.sqrt() / bc2_sqrt + group["eps"])

    @staticmethod
    def _sgd(group: dict, e: _Tensor, grad: torch.Tensor) -> torch.Tensor:
        """torch's SGD step: ``-lr * buf`` (or ``-lr * (grad + momentum * buf)`` with Nesterov)."""
        momentum = group["momentum"]
        if momentum != 0:
            buf = grad if e.first is None else e.first.float() * momentum + grad * (1 - group["dampening"])
            grad = grad + momentum * buf if group["nesterov"] else buf
        return -group["lr"] * grad


def update_space_lambda(
    update: OptimizerUpdate, mu: float, max_lambda: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda, infeasible)``: the largest ``lambda`` in ``[0, max_lambda]`` with
    ``D(lambda) >= mu * max(D(0), 0)`` (see the module docstring), found by a grid of :data:`GRID_POINTS` values and
    :data:`BISECTIONS` bisection steps; where no grid point satisfies it, the grid point with the largest ``D`` and
    ``infeasible = 1``. Both are detached float32 0-dim device tensors. ``D(max_lambda)`` is read on the host once:
    when it meets the margin (nothing to restrict) the search is skipped, two evaluations instead of 17."""
    device = update.ww.device
    grid = torch.linspace(0.0, max_lambda, GRID_POINTS, device=device)
    first, last_point = update.winner_decrease(grid[0]), update.winner_decrease(grid[-1])
    target = mu * first.clamp(min=0)
    if bool(last_point >= target):  # one host read: the common case (nothing to restrict) needs no search
        return grid[-1].detach().float(), torch.zeros((), device=device)
    inner = [update.winner_decrease(lam) for lam in grid[1:-1]]
    decrease = torch.stack([first, *inner, last_point])
    feasible = decrease >= target
    index = torch.arange(GRID_POINTS, device=device)
    last = torch.where(feasible, index, -1).max()
    lo = grid[last.clamp(min=0)]
    hi = grid[(last + 1).clamp(max=GRID_POINTS - 1)]
    for _ in range(BISECTIONS):  # lo satisfies the condition throughout; hi does not (unless lo = max_lambda)
        mid = (lo + hi) / 2
        ok = update.winner_decrease(mid) >= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    infeasible = last < 0
    lam = torch.where(infeasible, grid[decrease.argmax()], lo)
    return lam.detach().float(), infeasible.float()
