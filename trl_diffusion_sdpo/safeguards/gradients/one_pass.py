"""The exact safeguard's gradients from one forward and one backward pass over the whole pair batch.

:class:`~trl_diffusion_sdpo.safeguards.gradients.layer_taps.LayerTaps` hands every trainable weight's gradient split
by groups of rows; this store keeps the groups apart until ``lambda`` is known, then writes ``.grad``:

* by branch (two groups: winner rows, loser rows): ``g_w`` and ``h_l`` in flat rows, ``<g_w, g_w>`` and
  ``<g_w, h_l>`` read off it, and ``.grad = A + g_w + lambda * h_l`` (``A``: the accumulation window's earlier
  sum, left in ``.grad`` untouched by the pass, which hands autograd no weight gradient);
* by pair (``2B`` groups: one per image; the per-pair scope): one gradient per image and weight, the per-pair sums
  ``<g_w,i, g_w,i>`` and ``<g_w,i, h_l,i>``, and ``.grad = A + sum_i (g_w,i + lambda_i * h_l,i)``.

Memory: the rows hold each weight's per-group products in the dtype the taps made them in (learned in the store's
first pass, whose rows are in the default dtype, :func:`buffer_dtype`): under bf16 (or fp16) autocast a linear or
convolution layer's weight gradient is a bf16 matmul's output, so its rows are bf16, half a float32 gradient for both
branches; a norm's affine gradient, formed in float32, keeps float32 rows, as does every weight without autocast. The
inner products are still accumulated in float32 and float64 (:func:`blocked_dot`). The rows are held in pieces of
consecutive weights of one dtype (``engines/memory/pieces.py`` decides their size and number); a piece's memory is
taken when the backward first reaches one of its weights, as Diffusion-DPO's ``.grad`` come back as its backward
frees activations, so where activations set the peak (at the start of the backward) the pass adds about two pieces'
rows to it, not two gradients. The combination reads each piece once, writes it into new per-weight tensors in the
wider of the weights' and the rows' dtypes (float32 from bf16 rows) and gives the piece's memory back at once: at
most the rows and one piece of the combination are held together, and when ``.grad`` is set nothing of the rows is,
so the optimizer's step and the next batch's encoding see what Diffusion-DPO's see. The pieces, and each weight's
views of them, are kept across steps: giving a piece's memory back and taking it again resizes its storage and makes
no new tensor; the combination's per-weight tensors are new each step (as autograd makes Diffusion-DPO's ``.grad``),
made by the foreach operations that compute them.
By pair: ``2B`` gradients of the trainable weights (LoRA, or full tuning up to a cap; see
:func:`~trl_diffusion_sdpo.safeguards.parameter.check_pair_scope_memory`).

Every step's work after the backward is a fixed number of operations whatever the number of weights (a few per
piece): the inner products and the reductions run on the pieces' rows, the combination is one foreach operation
per piece over the rows' per-weight views, and those views are made once (when a piece is first allocated), not per
micro-batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from ...engines.memory.pieces import piece_bounds
from .layer_taps import LayerTaps

__all__ = ["OnePassBranchGradients", "blocked_dot", "buffer_dtype"]

Reduction = Callable[[list[torch.Tensor]], None]

# Rows longer than this take blocked_dot's per-row route (the largest 32-bit signed leading dimension).
LONG_ROWS = 2**31 - 1
# blocked_dot reads lower-precision rows (bfloat16) in pieces of this many elements, each converted to float32 (a
# multiple of its block). Each piece costs about a dozen operations of host work, so the count of pieces, not their
# size, sets the host time: 2^20 made SD1.5's 860M bf16 rows about 820 pieces (some 10,000 operations a step, most
# of a GPU step's host time); 2^25 makes them about 40, at 128 MiB of float32 per widened row (transient, after the
# backward)
WIDENED_PIECE = 1 << 25


def buffer_dtype(parameter: torch.Tensor) -> torch.dtype:
    """The default dtype of the one pass's rows for weights like ``parameter`` (a weight's rows take its products'
    dtype once the store's first pass has shown it): bfloat16 for bfloat16 weights (their ``.grad`` is bfloat16
    anyway), else float32 or wider (float64 checks)."""
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
    collectives). The groups live in flat rows ``[groups, elements]`` held in pieces of consecutive weights of one
    rows' dtype (each weight a view of its piece's columns; see the module docstring), so the inner products, the
    combination and a reduction over processes are a few calls per piece, whatever the number of weights. The
    combination reads each piece once and gives its memory back at once.
    """

    def __init__(self, module: torch.nn.Module, parameters: Sequence[torch.nn.Parameter]) -> None:
        self.parameters = list(parameters)
        self.taps = LayerTaps(module, self.parameters)
        # per weight, the dtype of the per-group products the taps made for it in the first pass (None: not known)
        self._dtypes: list[torch.dtype | None] = [None] * len(self.parameters)
        self._learned = False  # whether a pass has taught _dtypes
        self._written: list[bool] = []  # per weight, whether the learning pass's sink wrote its rows
        self._set_layout([tuple(p.shape) for p in self.parameters])
        self._seen: list[bool] = []

    def _set_layout(
        self, shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype | None] | None = None
    ) -> None:
        """The rows' columns: each weight's ``shapes`` (in order), the weights grouped by their rows' dtype
        (``dtypes``, per weight; ``None``: the store's default, :meth:`_buffer_spec`'s), each group cut into pieces of
        consecutive weights (:func:`piece_bounds`); no piece allocated yet."""
        self._shapes = [tuple(shape) for shape in shapes]
        self._sizes = [math.prod(shape) for shape in self._shapes]
        self._layout_dtypes = list(dtypes) if dtypes is not None else [None] * len(self._sizes)
        classes: dict[torch.dtype | None, list[int]] = {}
        for i, dtype in enumerate(self._layout_dtypes):
            classes.setdefault(dtype, []).append(i)
        self._members: list[list[int]] = []  # per piece: its weights' indices, in order
        self._piece_dtypes: list[torch.dtype | None] = []  # per piece: its rows' dtype (None: the default)
        for dtype, members in (classes or {None: []}).items():
            bounds = piece_bounds([self._sizes[i] for i in members])
            for start, end in zip(bounds, bounds[1:]):
                self._members.append(members[start:end])
                self._piece_dtypes.append(dtype)
        self._piece_sizes = [[self._sizes[i] for i in members] for members in self._members]
        # per piece: the dtype of its combination, the widest of its weights' (``.grad`` is in the weight's dtype)
        self._grad_dtypes = [
            functools.reduce(torch.promote_types, [self.parameters[i].dtype for i in members]) if members else None
            for members in self._members
        ]
        self._piece_of = [0] * len(self._sizes)
        for piece, members in enumerate(self._members):
            for i in members:
                self._piece_of[i] = piece
        self._spec: tuple | None = None  # (groups, default dtype, device) of the pieces
        self._forget()

    def _forget(self) -> None:
        """Drop the pieces and every view of them."""
        count = len(self._members)
        self._pieces: list[torch.Tensor | None] = [None] * count  # per piece: [groups, its weights' total]
        self._live = [False] * count  # per piece: whether its storage holds memory
        self._views: list[torch.Tensor | None] = [None] * len(self._sizes)  # per weight: [groups, *shape]
        self._rows: dict[int, list[torch.Tensor]] = {}  # row -> per weight: [*shape] views of that row (made once)
        self._piece_views: dict[tuple[int, int], list[torch.Tensor]] = {}  # (piece, row) -> its weights' views

    @property
    def pieces(self) -> list[torch.Tensor]:
        """The rows' pieces, ``[groups, elements]`` each, one dtype each (after :meth:`split`)."""
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
        """Run the micro-batch's forward and backward inside: ``groups`` 2 (by branch) or ``2B`` (by image). The
        store's first pass hands the taps a sink that notes each weight's products' dtype (:meth:`_learn`); later
        passes hand them views in that dtype, which they write into directly."""
        self._prepare(groups)
        learning = not self._learned
        self._written = [False] * len(self.parameters)
        if learning:
            tapping = self.taps.tapping(groups, sink=self._learn)
        else:
            tapping = self.taps.tapping(groups, destination=self._destination)
        with tapping:
            yield
        if learning:  # a weight whose products came in the default dtype stays in the default's pieces
            self._learned = True
            self._dtypes = [None if dtype == self._spec[1] else dtype for dtype in self._dtypes]
            seen = list(self._written)
        else:
            written = set(self.taps.written())
            seen = [i in written for i in range(len(self.parameters))]
        self._complete(seen)

    def _learn(self, index: int, per_group: torch.Tensor) -> None:
        """The learning pass's sink: weight ``index``'s products' dtype noted (the widest, where several reach it),
        the products copied into its rows (added, after the first)."""
        known = self._dtypes[index]
        self._dtypes[index] = per_group.dtype if known is None else torch.promote_types(known, per_group.dtype)
        view = self._destination(index)
        if self._written[index]:
            view.add_(per_group)
        else:
            view.copy_(per_group)
            self._written[index] = True

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
        """``(rows, default dtype, device)`` of the pieces for a pass of ``groups``: the default dtype is that of a
        weight whose products' dtype is not known (:func:`buffer_dtype`)."""
        first = self.parameters[0]
        return groups, buffer_dtype(first), first.device

    def _prepare(self, groups: int) -> None:
        """Before the forward: the rows laid out in the dtypes the first pass taught (once), and the pieces' memory
        given back (their tensors and views kept), or fresh pieces, made as the backward reaches them, where the
        layout changed."""
        if self._dtypes != self._layout_dtypes:
            self._set_layout(self._shapes, self._dtypes)
        spec = self._buffer_spec(groups)
        if spec != self._spec:
            self._spec = spec
            self._forget()
        else:
            self.release()

    def release(self) -> None:
        """Give every piece's memory back (its tensor and views kept, their storage resized to nothing): done by the
        combination as it reads each piece, and by :meth:`assign`. Nothing may read the rows' values until the next
        pass has written them."""
        for piece in range(len(self._pieces)):
            self._free(piece)

    def _free(self, piece: int) -> None:
        """Give ``piece``'s memory back (its tensor and views kept)."""
        if self._live[piece]:
            self._pieces[piece].untyped_storage().resize_(0)
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
            groups, default, device = self._spec
            dtype = self._piece_dtypes[piece]
            sizes = self._piece_sizes[piece]
            tensor = self._pieces[piece] = torch.empty(
                (groups, sum(sizes)), dtype=default if dtype is None else dtype, device=device
            )
            for i, chunk in zip(self._members[piece], tensor.split(sizes, dim=1)):
                self._views[i] = chunk.view(groups, *self._shapes[i])
            self._rows, self._piece_views = {}, {}
        else:
            tensor.untyped_storage().resize_(tensor.numel() * tensor.element_size())
        self._live[piece] = True

    def row_views(self, row: int) -> list[torch.Tensor]:
        """Per weight, its ``[*shape]`` view of the rows' ``row``: made once per piece, then the same tensors."""
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
        """``(g_w, h_l)`` per weight: views of the rows (the update space reduces them in place)."""
        return self.row_views(0), self.row_views(1)

    def combination(self, lam: torch.Tensor) -> list[torch.Tensor]:
        """``g_w + lambda * h_l`` per weight, with ``g_w`` as buffered (averaged over processes in the global scope:
        the engine's final average then gives the same mean): per piece, new tensors (one foreach operation makes
        them all, in the wider of the weights' and the rows' dtypes: float32 from bf16 rows), the piece's memory
        given back at once, so that the rows are gone when the combination is formed. :meth:`assign` hands it to
        ``.grad``; an engine that owns the gradients takes it itself."""
        combined: list[torch.Tensor | None] = [None] * len(self._sizes)
        factors = _Factors(lam)  # lambda stays on the device
        for piece, rows in enumerate(self._pieces):
            lam_list = factors.list(0, rows.dtype, self._grad_dtypes[piece], len(self._members[piece]))
            # new tensors g_w + h_l * lambda, one addcmul per weight as the flat rows' one over the piece would be
            grads = torch._foreach_addcmul(self._piece_rows(piece, 0), self._piece_rows(piece, 1), lam_list)
            self._free(piece)
            for i, grad in zip(self._members[piece], grads):
                combined[i] = grad
        return combined

    def combine(self, lam: torch.Tensor) -> None:
        """``.grad = A + g_w + lambda * h_l`` (:meth:`combination`, then :meth:`assign`)."""
        self.assign(self.combination(lam))

    @property
    def reached(self) -> list[bool]:
        """Per weight, whether the last pass's gradient reached it."""
        return list(self._seen)

    def assign(self, combined: list[torch.Tensor]) -> None:
        """``.grad += combined`` (``.grad = combined`` where it is empty), in the weights' dtype; whatever the rows
        still hold is given back. A weight no gradient reached keeps an empty ``.grad``, as after a plain backward (an
        optimizer then skips it)."""
        accumulated = [(p.grad, c) for p, c in zip(self.parameters, combined) if p.grad is not None]
        for p, c, seen in zip(self.parameters, combined, self._seen):
            if p.grad is None and seen:
                p.grad = c if c.dtype == p.dtype else c.to(p.dtype)
        if accumulated:  # one foreach call, whatever the number of weights
            grads = [g for g, _ in accumulated]
            torch._foreach_add_(grads, [c if c.dtype == g.dtype else c.to(g.dtype) for g, c in accumulated])
        self.release()

    def _piece_rows(self, piece: int, row: int) -> list[torch.Tensor]:
        """The ``[*shape]`` views of ``row`` of ``piece``'s weights (made once, as :meth:`row_views`)."""
        key = (piece, row)
        views = self._piece_views.get(key)
        if views is None:
            views = self._piece_views[key] = [self._views[i][row] for i in self._members[piece]]
        return views

    # ------------------------------------------------------------------ by pair

    #: what the per-pair combination is divided by (the number of processes where their images' rows are summed)
    _pair_divisor = 1

    def pair_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(<g_w,i, g_w,i>, <g_w,i, h_l,i>)`` per pair ``i`` (float32 vectors of length ``B``): per pair, one blocked
        read of its winner's and loser's rows (``flat[i::B]``, a view), no temporary the size of the buffer."""
        pairs = self._pieces[0].shape[0] // 2
        sums = torch.stack(
            [_total([blocked_dot(piece[i], piece[i::pairs]) for piece in self._pieces]) for i in range(pairs)]
        )
        return sums[:, 0].float(), sums[:, 1].float()

    def pair_combination(self, lam: torch.Tensor) -> list[torch.Tensor]:
        """``sum_i (g_w,i + lambda_i * h_l,i)`` per weight (``lam``: one ``lambda`` per pair): per piece, new tensors
        (in the wider of the weights' and the rows' dtypes) summed image by image by foreach operations, and the
        piece's memory given back at once, for :meth:`assign`."""
        combined: list[torch.Tensor | None] = [None] * len(self._sizes)
        # the images' weights: 1 for the winners, lambda_i for the losers
        factors = _Factors(torch.cat([lam.detach().new_ones(lam.shape[0]), lam.detach()]))
        for piece, rows in enumerate(self._pieces):
            count, dtype = len(self._members[piece]), self._grad_dtypes[piece]
            products = factors.list(1, rows.dtype, dtype, count)
            grads = torch._foreach_addcmul(self._piece_rows(piece, 0), self._piece_rows(piece, 1), products)
            for image in range(2, rows.shape[0]):
                products = factors.list(image, rows.dtype, dtype, count)
                torch._foreach_addcmul_(grads, self._piece_rows(piece, image), products)
            if self._pair_divisor != 1:
                torch._foreach_div_(grads, self._pair_divisor)
            self._free(piece)
            for i, grad in zip(self._members[piece], grads):
                combined[i] = grad
        return combined


class _Factors:
    """A combination's factors (``lam``: a device scalar, or one per image) as the one-element tensors a foreach
    multiplication broadcasts: in the wider of the rows' and the weights' dtypes, so that bf16 rows are combined in
    float32. Made once per dtype, with no host read."""

    def __init__(self, lam: torch.Tensor) -> None:
        self.lam = lam.reshape(-1)
        self._cast: dict[torch.dtype, torch.Tensor] = {}

    def list(self, k: int, rows: torch.dtype, weights: torch.dtype | None, count: int) -> list[torch.Tensor]:
        dtype = rows if weights is None else torch.promote_types(rows, weights)
        cast = self._cast.get(dtype)
        if cast is None:
            cast = self._cast[dtype] = self.lam.to(dtype)
        return [cast[k : k + 1]] * count


def _total(sums: list[torch.Tensor]) -> torch.Tensor:
    """The pieces' sums added up (one piece: its own, no operation)."""
    return sums[0] if len(sums) == 1 else torch.stack(sums).sum(0)
