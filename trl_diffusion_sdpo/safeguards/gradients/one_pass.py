"""The exact safeguard's gradients from one forward and one backward pass over the whole pair batch.

:class:`~trl_diffusion_sdpo.safeguards.gradients.layer_taps.LayerTaps` hands every trainable weight's gradient split
by groups of
rows; this store keeps the groups apart until ``lambda`` is known, then writes ``.grad``:

* by branch (two groups: winner rows, loser rows): ``g_w`` and ``h_l`` in one flat buffer, ``<g_w, g_w>`` and
  ``<g_w, h_l>`` read off it, and ``.grad = A + g_w + lambda * h_l`` (``A``: the accumulation window's earlier
  sum, left in ``.grad`` untouched by the pass, which hands autograd no weight gradient);
* by pair (``2B`` groups: one per image; the per-pair scope): one gradient per image and weight, the per-pair sums
  ``<g_w,i, g_w,i>`` and ``<g_w,i, h_l,i>``, and ``.grad = A + sum_i (g_w,i + lambda_i * h_l,i)``.

Memory: one gradient-sized buffer beyond ``.grad``. The buffer's winner row becomes ``.grad`` (each weight's
``.grad`` a view of it, handed over where ``.grad`` is empty), so what the pass adds to a Diffusion-DPO step is the
loser's row. The rows are in the weights' dtype where the weights are bfloat16 (the inner products are still
accumulated in float32 and float64), else float32 (or wider). The buffer is held in pieces of consecutive weights
(``engines/memory/pieces.py`` decides their size and number); a piece's memory is given back
before each forward and taken again when the backward first reaches one of its weights, as Diffusion-DPO's
``.grad`` come back as its backward frees activations. So where activations set the peak (at the start of the
backward) the pass adds about two pieces' rows to it, not two gradients. The pieces, and each weight's views of
them, are kept across steps: giving a piece's memory back and taking it again resizes its storage and makes no new
tensor. With gradient accumulation ``A`` holds the first micro-batch's pieces (their winner rows) and later
micro-batches fill new ones.
By pair: ``2B`` gradients of the trainable weights (LoRA, or full tuning up to a cap; see
:func:`~trl_diffusion_sdpo.safeguards.parameter.check_pair_scope_memory`).

Every step's work after the backward is a fixed number of operations whatever the number of weights (a few per
piece): the inner products, the combination and the reductions run on the pieces' rows, and the per-weight views of
those rows are made once (when a piece is first allocated), not per micro-batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from ...engines.memory.pieces import piece_bounds
from .layer_taps import LayerTaps

__all__ = ["OnePassBranchGradients", "blocked_dot", "buffer_dtype"]

Reduction = Callable[[list[torch.Tensor]], None]

# Rows longer than this take blocked_dot's per-row route (the largest 32-bit signed leading dimension).
LONG_ROWS = 2**31 - 1
# blocked_dot reads lower-precision rows (bfloat16) in pieces of this many elements, each converted to float32
WIDENED_PIECE = 1 << 20


def buffer_dtype(parameter: torch.Tensor) -> torch.dtype:
    """The dtype of the one pass's rows for weights like ``parameter``: bfloat16 for bfloat16 weights (their ``.grad``
    is bfloat16 anyway), else float32 or wider (float64 checks)."""
    if parameter.dtype == torch.bfloat16:
        return parameter.dtype
    return torch.promote_types(parameter.dtype, torch.float32)


def blocked_dot(
    a: torch.Tensor, b: torch.Tensor, block: int = 1 << 16, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``<a, b>`` of a long flat vector ``a`` with ``b`` (the same length, or rows ``[m, len(a)]``: then one product
    per row, reading ``a`` once), summed per block of ``block`` elements by one batched matmul and the blocks' sums
    added in ``dtype`` (float64; MPS has none): one dot over millions of float32 elements accumulates a relative
    error that ``lambda``'s ratio amplifies where ``<g_w, h_l>`` nearly cancels. Rows in a lower precision
    (bfloat16) are read in pieces of :data:`WIDENED_PIECE` elements converted to float32: the products are float32's,
    not the storage dtype's."""
    if a.dtype not in (torch.float32, torch.float64) and a.numel() > 0:
        pieces = [
            blocked_dot(a[i : i + WIDENED_PIECE].float(), b[..., i : i + WIDENED_PIECE].float(), block, dtype)
            for i in range(0, a.numel(), WIDENED_PIECE)
        ]
        return pieces[0] if len(pieces) == 1 else torch.stack(pieces).sum(0)
    n = a.numel()
    if n > LONG_ROWS:
        # cuBLAS takes the rows' stride as a 32-bit leading dimension, which the [k, block, m] view of rows longer
        # than 2^31 elements (full tuning of a multi-billion-parameter model) exceeds: one contiguous product per row
        rows = [b] if b.dim() == 1 else list(b)
        total = torch.stack([_contiguous_blocked_dot(a, row, block, dtype) for row in rows])
        return total if b.dim() > 1 else total[0]
    rows = b.view(1, -1) if b.dim() == 1 else b
    m = rows.shape[0]
    k = n // block
    if not k:  # shorter than a block: one product, widened (what the general path adds to zeros)
        total = (rows @ a).to(dtype)
        return total if b.dim() > 1 else total[0]
    left = a[: k * block].view(k, 1, block)
    right = rows[:, : k * block].reshape(m, k, block).permute(1, 2, 0)  # [k, block, m]: a view, no copy
    total = torch.bmm(left, right).to(dtype).sum((0, 1))
    if n > k * block:
        total = total + (rows[:, k * block :] @ a[k * block :]).to(dtype)
    return total if b.dim() > 1 else total[0]


def _contiguous_blocked_dot(a: torch.Tensor, row: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`blocked_dot` of two flat vectors through contiguous ``[k, block]`` views only (no stride over 2^31)."""
    n = a.numel()
    k = n // block
    total = torch.zeros((), dtype=dtype, device=a.device)
    if k:
        products = torch.bmm(a[: k * block].view(k, 1, block), row[: k * block].view(k, block, 1))
        total = total + products.to(dtype).sum()
    if n > k * block:
        total = total + torch.dot(row[k * block :], a[k * block :]).to(dtype)
    return total


class OnePassBranchGradients:
    """Per-branch or per-image gradients of the trainable ``parameters`` of ``module`` from one tapped pass.

    Use once per micro-batch: :meth:`split` around the forward and the backward, then, by branch,
    :meth:`branch_sums` and :meth:`combine` (the update space: :meth:`branch_gradients`, reduced in place, then
    :meth:`combine`), by pair :meth:`pair_sums`, :meth:`pair_combination` and :meth:`assign` (or the engine's
    collectives). The groups live in a flat buffer (float32 or wider) ``[groups, total]`` held in pieces of
    consecutive weights (each weight a view of its piece's columns; see the module docstring), so the inner products,
    the combination and a reduction over processes are a few calls per piece, whatever the number of weights.
    """

    def __init__(self, module: torch.nn.Module, parameters: Sequence[torch.nn.Parameter]) -> None:
        self.parameters = list(parameters)
        self.taps = LayerTaps(module, self.parameters)
        self._set_layout([tuple(p.shape) for p in self.parameters])
        self._seen: list[bool] = []
        # a weight whose .grad is a view of the buffer, and that view's address (see _prepare)
        self._handed: tuple[torch.nn.Parameter, int] | None = None

    def _set_layout(self, shapes: Sequence[tuple[int, ...]], bounds: list[int] | None = None) -> None:
        """The buffer's columns: each weight's ``shapes`` (in order), cut into pieces at ``bounds``
        (:func:`piece_bounds` by default); no piece allocated yet."""
        self._shapes = [tuple(shape) for shape in shapes]
        self._sizes = [math.prod(shape) for shape in self._shapes]
        self._bounds = piece_bounds(self._sizes) if bounds is None else bounds
        self._piece_of = [k for k in range(len(self._bounds) - 1) for _ in range(self._bounds[k], self._bounds[k + 1])]
        self._spec: tuple | None = None  # (groups, dtype, device) of the pieces
        self._forget()

    def _forget(self) -> None:
        """Drop the pieces (a ``.grad`` that is a view of one keeps it alive) and every view of them."""
        count = len(self._bounds) - 1
        self._pieces: list[torch.Tensor | None] = [None] * count  # per piece: [groups, its weights' total]
        self._live = [False] * count  # per piece: whether its storage holds memory
        self._views: list[torch.Tensor | None] = [None] * len(self._sizes)  # per weight: [groups, *shape]
        self._rows: dict[int, list[torch.Tensor]] = {}  # row -> per weight: [*shape] views of that row (made once)

    @property
    def pieces(self) -> list[torch.Tensor]:
        """The buffer's pieces, ``[groups, elements]`` each (after :meth:`split`)."""
        return self._pieces

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
        self._prepare(groups)
        with self.taps.tapping(groups, destination=self._destination):
            yield
        written = set(self.taps.written())
        self._complete([i in written for i in range(len(self.parameters))])

    def _complete(self, seen: list[bool]) -> None:
        """After the backward: ``seen`` (per weight, whether a gradient reached it) kept, and every piece given its
        memory, the weights no gradient reached zeroed."""
        self._seen = seen
        for piece in range(len(self._pieces)):
            self._take(piece)
        for view, reached in zip(self._views, seen):
            if not reached:
                view.zero_()

    def _buffer_spec(self, groups: int) -> tuple:
        """``(rows, dtype, device)`` of the pieces for a pass of ``groups``."""
        first = self.parameters[0]
        return groups, buffer_dtype(first), first.device

    def _prepare(self, groups: int) -> None:
        """Before the forward: the pieces' memory given back (their tensors and views kept), unless their layout
        changed or a view of them is still some weight's ``.grad`` (handed over by :meth:`assign` and kept by
        gradient accumulation): then fresh pieces, made as the backward reaches them."""
        spec = self._buffer_spec(groups)
        handed = self._handed
        handed_over = handed is not None and handed[0].grad is not None and handed[0].grad.data_ptr() == handed[1]
        if spec != self._spec or handed_over:
            self._spec = spec
            self._forget()
        else:
            self.release()

    def release(self) -> None:
        """Give every piece's memory back (its tensor and views kept, their storage resized to nothing): before each
        forward, or as soon as nothing reads the rows (an engine that copied the combination into its own
        gradients). Nothing may read the rows' values until the next pass has written them."""
        for piece, tensor in enumerate(self._pieces):
            if self._live[piece]:
                tensor.untyped_storage().resize_(0)
                self._live[piece] = False

    def _destination(self, index: int) -> torch.Tensor:
        """Weight ``index``'s ``[groups, *shape]`` view, its piece's memory taken first (the backward reached it)."""
        self._take(self._piece_of[index])
        return self._views[index]

    def _take(self, piece: int) -> None:
        """Give ``piece`` its memory: a new tensor and its weights' views the first time, else its storage resized
        back (the same tensor, the same views)."""
        if self._live[piece]:
            return
        tensor = self._pieces[piece]
        if tensor is None:
            groups, dtype, device = self._spec
            start, end = self._bounds[piece], self._bounds[piece + 1]
            tensor = self._pieces[piece] = torch.empty(
                (groups, sum(self._sizes[start:end])), dtype=dtype, device=device
            )
            chunks = tensor.split(self._sizes[start:end], dim=1)
            for i, chunk in zip(range(start, end), chunks):
                self._views[i] = chunk.view(groups, *self._shapes[i])
            self._rows = {}
        else:
            tensor.untyped_storage().resize_(tensor.numel() * tensor.element_size())
        self._live[piece] = True

    def row_views(self, row: int) -> list[torch.Tensor]:
        """Per weight, its ``[*shape]`` view of the buffer's ``row``: made once per piece, then the same tensors."""
        views = self._rows.get(row)
        if views is None:
            views = self._rows[row] = [v[row] for v in self._views]
        return views

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

    def branch_sums(self, reduce_winner: Reduction | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(<g_w, g_w>, <g_w, h_l>)`` in float32; ``reduce_winner`` (the global scope) first averages the buffered
        ``g_w`` over processes, in place."""
        if reduce_winner is not None:
            reduce_winner([piece[0] for piece in self._pieces])
        both = _total([blocked_dot(piece[0], piece) for piece in self._pieces])  # reading each row once
        return both[0], both[1]

    def branch_gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(g_w, h_l)`` per weight: views of the buffer (the update space reduces them in place)."""
        return self.row_views(0), self.row_views(1)

    def combination(self, lam: torch.Tensor) -> list[torch.Tensor]:
        """``g_w + lambda * h_l`` per weight, with ``g_w`` as buffered (averaged over processes in the global scope:
        the engine's final average then gives the same mean), formed in place in the buffer's winner half (views of
        it). :meth:`assign` adds it to ``.grad``; an engine that owns the gradients takes it itself."""
        lam = lam.detach().to(self._pieces[0])  # lambda stays on the device
        for piece in self._pieces:
            piece[0].addcmul_(piece[1], lam)  # one fused pass
        return self.row_views(0)

    def combine(self, lam: torch.Tensor) -> None:
        """``.grad = A + g_w + lambda * h_l`` (:meth:`combination`, then :meth:`assign`)."""
        self.assign(self.combination(lam))

    @property
    def reached(self) -> list[bool]:
        """Per weight, whether the last pass's gradient reached it."""
        return list(self._seen)

    def assign(self, combined: list[torch.Tensor]) -> None:
        """``.grad += combined`` (``.grad = combined`` where it is empty), in the weights' dtype. A weight no
        gradient reached keeps an empty ``.grad``, as after a plain backward (an optimizer then skips it)."""
        accumulated = [(p.grad, c) for p, c in zip(self.parameters, combined) if p.grad is not None]
        self._handed = None
        for p, c, seen in zip(self.parameters, combined, self._seen):
            if p.grad is None and seen:
                p.grad = c if c.dtype == p.dtype else c.to(p.dtype)
                if self._handed is None and p.grad.data_ptr() == c.data_ptr():
                    self._handed = (p, c.data_ptr())
        if accumulated:  # one foreach call, whatever the number of weights
            grads = [g for g, _ in accumulated]
            torch._foreach_add_(grads, [c if c.dtype == g.dtype else c.to(g.dtype) for g, c in accumulated])

    # ------------------------------------------------------------------ by pair

    def pair_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(<g_w,i, g_w,i>, <g_w,i, h_l,i>)`` per pair ``i`` (float32 vectors of length ``B``): per pair, one blocked
        read of its winner's and loser's rows (``flat[i::B]``, a view), no temporary the size of the buffer."""
        pairs = self._pieces[0].shape[0] // 2
        sums = torch.stack(
            [_total([blocked_dot(piece[i], piece[i::pairs]) for piece in self._pieces]) for i in range(pairs)]
        )
        return sums[:, 0].float(), sums[:, 1].float()

    def pair_combination(self, lam: torch.Tensor) -> list[torch.Tensor]:
        """``sum_i (g_w,i + lambda_i * h_l,i)`` per weight (``lam``: one ``lambda`` per pair), formed in place in the
        buffer's first row (views of it), for :meth:`assign`."""
        weights = lam.to(self._pieces[0])  # the other images' weights: the first pair's loser's and the rest
        weights = torch.cat([weights.new_ones(lam.shape[0] - 1), weights])
        for piece in self._pieces:
            piece[0].addmv_(piece[1:].t(), weights)  # in place: no fresh gradient-sized tensor
        return self.row_views(0)


def _total(sums: list[torch.Tensor]) -> torch.Tensor:
    """The pieces' sums added up (one piece: its own, no operation)."""
    return sums[0] if len(sums) == 1 else torch.stack(sums).sum(0)
