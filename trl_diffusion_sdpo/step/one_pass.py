"""The exact safeguard's gradients from one forward and one backward pass over the whole pair batch.

:class:`~trl_diffusion_sdpo.step.layer_taps.LayerTaps` hands every trainable weight's gradient split by groups of
rows; this store keeps the groups apart until ``lambda`` is known, then writes ``.grad``:

* by branch (two groups: winner rows, loser rows): buffers ``g_w`` and ``h_l``, ``<g_w, g_w>`` and ``<g_w, h_l>``
  read off them, and ``.grad = A + g_w + lambda * h_l`` (``A``: the accumulation window's earlier sum, left in
  ``.grad`` untouched by the pass, which hands autograd no weight gradient);
* by pair (``2B`` groups: one per image; the per-pair scope): one gradient per image and weight, the per-pair sums
  ``<g_w,i, g_w,i>`` and ``<g_w,i, h_l,i>``, and ``.grad = A + sum_i (g_w,i + lambda_i * h_l,i)``.

Memory: two gradient-sized buffers by branch. Without accumulation ``.grad`` is the winner buffer itself (handed
over), so the peak is that of the per-branch passes (``.grad`` plus one buffer); with accumulation ``A`` is a third.
By pair: ``2B`` gradients of the trainable weights (LoRA only; see
:meth:`~trl_diffusion_sdpo.step.parameter_space.ParameterSpaceBackward.from_config`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from .layer_taps import LayerTaps

__all__ = ["OnePassBranchGradients"]

Reduction = Callable[[list[torch.Tensor]], None]


def _dots(a: list[torch.Tensor], b: list[torch.Tensor], dims: int) -> torch.Tensor:
    """``sum_i <a_i, b_i>`` over the weights (float32 buffers), keeping the first ``dims`` axes (0: a scalar)."""
    if not a:
        return torch.zeros(())
    if dims == 0:
        return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]).sum()
    return torch.stack([(x * y).flatten(dims).sum(-1) for x, y in zip(a, b)]).sum(0)


class OnePassBranchGradients:
    """Per-branch or per-image gradients of the trainable ``parameters`` of ``module`` from one tapped pass.

    Use once per micro-batch: :meth:`split` around the forward and the backward, then, by branch,
    :meth:`branch_sums` and :meth:`combine` (or :meth:`branch_gradients` and :meth:`set_combined`, the update space),
    by pair :meth:`pair_sums` and :meth:`combine_pairs`.
    """

    def __init__(self, module: torch.nn.Module, parameters: Sequence[torch.nn.Parameter]) -> None:
        self.parameters = list(parameters)
        self.taps = LayerTaps(module, self.parameters)
        self._winner: list[torch.Tensor] = []
        self._loser: list[torch.Tensor] = []
        self._per_image: list[torch.Tensor] = []
        self._seen: list[bool] = []

    @property
    def uncovered(self) -> list[str]:
        """The trainable parameters no layer tap covers (the one pass cannot split their gradients)."""
        return self.taps.uncovered

    @property
    def failures(self) -> list[str]:
        """Why layers of the last pass could not be tapped."""
        return self.taps.failures

    @contextlib.contextmanager
    def split(self, groups: int) -> Iterator[None]:
        """Run the micro-batch's forward and backward inside: ``groups`` 2 (by branch) or ``2B`` (by image)."""
        self._seen = [False] * len(self.parameters)
        if groups == 2:
            self._prepare_branch_buffers()
            sink = self._branch_sink
        else:
            self._per_image = [
                torch.empty((groups, *p.shape), dtype=torch.float32, device=p.device) for p in self.parameters
            ]
            sink = self._image_sink
        with self.taps.tapping(groups, sink):
            yield
        unseen = [i for i, seen in enumerate(self._seen) if not seen]
        if unseen:  # no gradient reached these weights in this pass
            buffers = (
                [self._winner[i] for i in unseen] + [self._loser[i] for i in unseen]
                if groups == 2
                else [self._per_image[i] for i in unseen]
            )
            torch._foreach_zero_(buffers)

    def untapped_gradients(self, before: list[tuple[torch.Tensor | None, int]]) -> list[int]:
        """Indices of the weights whose ``.grad`` autograd changed since ``before`` (:meth:`grad_states`): a gradient
        that reached the weight outside its layer's tap (the weight used directly by another module)."""
        return [
            i
            for i, (p, (grad, version)) in enumerate(zip(self.parameters, before))
            if p.grad is not grad or (grad is not None and grad._version != version)
        ]

    def grad_states(self) -> list[tuple[torch.Tensor | None, int]]:
        """Each weight's ``.grad`` and its version counter, for :meth:`untapped_gradients`."""
        return [(p.grad, p.grad._version if p.grad is not None else 0) for p in self.parameters]

    # ------------------------------------------------------------------ by branch

    def _prepare_branch_buffers(self) -> None:
        if not self._winner:
            self._winner = [torch.empty_like(p, dtype=torch.float32) for p in self.parameters]
            self._loser = [torch.empty_like(p, dtype=torch.float32) for p in self.parameters]
            return
        for i, p in enumerate(self.parameters):
            if p.grad is self._winner[i]:  # handed over as .grad last time and still held (accumulation): keep it
                self._winner[i] = torch.empty_like(self._winner[i])

    def _branch_sink(self, i: int, per_group: torch.Tensor) -> None:
        if self._seen[i]:
            self._winner[i].add_(per_group[0])
            self._loser[i].add_(per_group[1])
        else:
            self._winner[i].copy_(per_group[0])
            self._loser[i].copy_(per_group[1])
            self._seen[i] = True

    def branch_sums(self, reduce_winner: Reduction | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(<g_w, g_w>, <g_w, h_l>)`` in float32; ``reduce_winner`` (the global scope) first averages the buffered
        ``g_w`` over processes, in place."""
        if reduce_winner is not None:
            reduce_winner(self._winner)
        return _dots(self._winner, self._winner, 0), _dots(self._winner, self._loser, 0)

    def branch_gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(g_w, h_l)`` per weight (the buffers themselves: the update space reduces them in place)."""
        return self._winner, self._loser

    def combine(self, lam: torch.Tensor) -> None:
        """``.grad = A + g_w + lambda * h_l``, with ``g_w`` as buffered (averaged over processes in the global scope:
        the engine's final average of ``.grad`` then gives the same mean)."""
        self.set_combined(lam, self._winner, self._loser)

    def set_combined(self, lam: torch.Tensor, winner: list[torch.Tensor], loser: list[torch.Tensor]) -> None:
        """``.grad = A + winner + lambda * loser`` (``winner``, ``loser``: :meth:`branch_gradients`, possibly reduced
        since). ``loser`` is overwritten; where ``.grad`` was empty the winner buffer becomes ``.grad``."""
        torch._foreach_mul_(loser, lam.detach().to(device=loser[0].device, dtype=loser[0].dtype))
        torch._foreach_add_(winner, loser)
        self._assign(winner)

    def _assign(self, combined: list[torch.Tensor]) -> None:
        """``.grad += combined`` (``.grad = combined`` where it is empty), in the weights' dtype. A weight no
        gradient reached keeps an empty ``.grad``, as after a plain backward (an optimizer then skips it)."""
        accumulated = [(p.grad, c) for p, c in zip(self.parameters, combined) if p.grad is not None]
        for p, c, seen in zip(self.parameters, combined, self._seen):
            if p.grad is None and seen:
                p.grad = c if c.dtype == p.dtype else c.to(p.dtype)
        if accumulated:
            torch._foreach_add_([g for g, _ in accumulated], [c.to(g.dtype) for g, c in accumulated])

    # ------------------------------------------------------------------ by pair

    def _image_sink(self, i: int, per_group: torch.Tensor) -> None:
        if self._seen[i]:
            self._per_image[i].add_(per_group)
        else:
            self._per_image[i].copy_(per_group)
            self._seen[i] = True

    def pair_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(<g_w,i, g_w,i>, <g_w,i, h_l,i>)`` per pair ``i`` (float32 vectors of length ``B``)."""
        pairs = self._per_image[0].shape[0] // 2
        winners = [g[:pairs] for g in self._per_image]
        losers = [g[pairs:] for g in self._per_image]
        return _dots(winners, winners, 1), _dots(winners, losers, 1)

    def combine_pairs(self, lam: torch.Tensor) -> None:
        """``.grad = A + sum_i (g_w,i + lambda_i * h_l,i)`` (``lam``: one ``lambda`` per pair)."""
        weights = torch.cat([torch.ones_like(lam), lam]).float()
        self._assign([torch.tensordot(weights, g, dims=1) for g in self._per_image])
        self._per_image = []
