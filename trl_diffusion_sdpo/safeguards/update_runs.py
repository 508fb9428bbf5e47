"""The update space's reading of the weights: runs of consecutive weights, their gradients where they lie, and a
workspace kept across steps into which a pass copies a run's optimizer state with one foreach call.

:class:`~trl_diffusion_sdpo.safeguards.update_space.OptimizerUpdate` reads the trainable weights in runs
(:func:`runs`) so that a step costs a fixed number of operations per run, not per weight: a run's gradients are one
``[2, n]`` view of the one pass's buffer rows where they lie there (:func:`branch_rows`, a copy otherwise), and its
optimizer state and weights, per-weight tensors of the optimizer, are copied into the flat buffers of an
:class:`UpdateWorkspace` by one ``torch._foreach_copy_`` each, through per-weight views made once and kept. Where a
run's weights may differ in Adam's step count, their per-weight scales of ``D`` are repeated over their elements on the
device once per step (:meth:`UpdateWorkspace.expanded`). Nothing here reads a tensor's value on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy
import torch

__all__ = [
    "Run",
    "UpdateWorkspace",
    "branch_rows",
    "host_tensor",
    "local",
    "one_view",
    "runs",
    "stacked_rows",
    "to_device",
    "storage_groups",
]


@dataclass
class Run:
    """Consecutive weights of one segment: the winner's and the loser's flat gradients (backward units; views where
    they lie back to back, as in the one pass's buffer), and per weight the optimizer's first and second state
    (``None``: the first step) and the weights (where a weight decay needs them), copied into a flat workspace by one
    foreach call each when a pass reads them."""

    winner: torch.Tensor
    loser: torch.Tensor
    first: list[torch.Tensor] | None
    second: list[torch.Tensor] | None
    param: list[torch.Tensor] | None
    shapes: tuple[tuple[int, ...], ...]
    rows: torch.Tensor  # [g_w; h_l] as [2, n] (winner and loser are its rows)
    #: Adam's per-weight scales of ``D`` (``eps / kappa``, its factor): two numbers or 0-dim tensors where they are
    #: the same for the run's weights, else ``[2, weights]`` on the device
    scales: tuple | torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.winner.numel()


class UpdateWorkspace:
    """Flat buffers a pass copies a run's optimizer state (and weights) into, with each run's per-weight views of
    them made once and kept: hold one across steps (the update space's stage does) and the per-weight work of a step
    is one foreach copy per run and input."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, list[torch.Tensor]] = {}
        self._holds: dict[str, tuple[int, int]] = {}  # buffer -> (generation, id of the run) it holds
        self._work: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}  # (run's elements, lambdas) -> its views
        self._sizes: dict[tuple, torch.Tensor] = {}  # a run's shapes -> its weights' sizes on the device
        self._expanded: tuple | None = None  # (generation, id of the run, (eps, g_w * factor))
        self.generation = 0

    def flat(self, name: str, shapes: tuple, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, list]:
        """``(flat, views)``: buffer ``name``'s first ``sum(shapes)`` elements and their per-weight views."""
        n = sum(math.prod(s) for s in shapes)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < n or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(max(n, 1), dtype=dtype, device=device)
            self._views = {k: v for k, v in self._views.items() if k[0] != name}
            self._holds.pop(name, None)
        key = (name, shapes)
        views = self._views.get(key)
        if views is None:
            self._views[(name, n)] = buffer[:n]
            starts = [0]
            for shape in shapes:
                starts.append(starts[-1] + math.prod(shape))
            views = self._views[key] = [buffer[a:b].view(s) for a, b, s in zip(starts, starts[1:], shapes)]
        return self._views[(name, n)], views

    def work_views(self, n: int, count: int, work: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The ``[count, n]`` views of the three rows of ``work`` (a pass's temporaries: gradient, numerator,
        denominator) for a run of ``n`` elements, made once and kept while ``work`` is the same buffer."""
        held = next(iter(self._work.values()), None)
        if held is not None and held[0].untyped_storage().data_ptr() != work.untyped_storage().data_ptr():
            self._work.clear()  # a new buffer: views of the old one would keep it alive beside it
        views = self._work.get((n, count))
        if views is None:
            views = self._work[(n, count)] = tuple(work[k, : count * n].view(count, n) for k in range(3))
        return views

    def expanded(self, run: Run, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eps, g_w * factor)`` per element of ``run`` from its per-weight ``scales`` (``[2, weights]``), formed
        once per step and run (kept while the run is the last one asked for): each weight's scales repeated over its
        elements, on the device (the weights' sizes, a device tensor, made once per layout and kept)."""
        held = self._expanded
        if held is not None and held[:2] == (self.generation, id(run)):
            return held[2]
        sizes = self._sizes.get(run.shapes)
        if sizes is None or sizes.device != scales.device:
            sizes = torch.tensor([math.prod(shape) for shape in run.shapes])
            sizes = self._sizes[run.shapes] = to_device(sizes, scales.device)
        eps, weights = torch.repeat_interleave(scales, sizes, dim=1, output_size=run.numel).unbind()  # no host read
        weights.mul_(run.winner)
        self._expanded = (self.generation, id(run), (eps, weights))
        return eps, weights

    def read(self, name: str, run: Run, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """``tensors`` (one per weight of ``run``) copied into buffer ``name`` by one foreach call, unless it holds
        them already in this generation: its flat view."""
        flat, views = self.flat(name, run.shapes, dtype, run.winner.device)
        if self._holds.get(name) != (self.generation, id(run)):
            torch._foreach_copy_(views, tensors)
            self._holds[name] = (self.generation, id(run))
        return flat


_NUMPY = {torch.float32: numpy.float32, torch.float64: numpy.float64}


def host_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of host numbers on ``device``: built in numpy and wrapped, one conversion (no tensor of Python
    objects)."""
    numbers = numpy.asarray(values, dtype=numpy.float64)
    if dtype in _NUMPY:  # rounded in numpy as torch would (to nearest): no conversion on the device
        numbers = numbers.astype(_NUMPY[dtype])
    return torch.from_numpy(numbers).to(device=device, dtype=dtype)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, without making the host wait: a CPU tensor bound for a CUDA device is copied from
    pinned memory, asynchronously (a copy from pageable memory synchronizes the stream)."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2's weights, gradients and state), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def one_view(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One flat view of ``parts`` (contiguous tensors) where they lie back to back in one storage, else None; the
    check reads addresses only (no tensor operation per part)."""
    first = parts[0]
    size = first.element_size()
    if not all(p.is_contiguous() and p.dtype == first.dtype for p in parts):
        return None
    storage = first.untyped_storage().data_ptr()
    for q, p in zip(parts, parts[1:]):
        if p.untyped_storage().data_ptr() != storage or p.data_ptr() != q.data_ptr() + q.numel() * size:
            return None
    return first.as_strided((sum(p.numel() for p in parts),), (1,), first.storage_offset())


def _joined(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat tensor of ``parts``: a view where they lie back to back in one storage, else a copy."""
    view = one_view(parts)
    return view if view is not None else torch.cat([p.reshape(-1) for p in parts])


def branch_rows(winner: Sequence[torch.Tensor], loser: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``[g_w; h_l]`` of a run as ``[2, n]`` in ``dtype``: a view of the one pass's buffer rows where they are, else
    a copy."""
    w, h = _joined(winner), _joined(loser)
    rows = stacked_rows(w, h)
    rows = rows if rows is not None else torch.stack([w, h])
    return rows if rows.dtype == dtype else rows.to(dtype)


def stacked_rows(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor | None:
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


def storage_groups(tensors: Sequence[torch.Tensor]) -> Callable[[list[int]], list[list[int]]]:
    """A function that splits indices into ``tensors`` by the shared buffer each tensor is a view of (its storage
    holds more than the view: the one pass's pieces, one per dtype where its rows differ in dtype), in order of first
    appearance, order kept within each; tensors of their own (a storage each) form one group, in order. Reads
    addresses only (no tensor operation)."""
    keys = []
    for t in tensors:
        storage = t.untyped_storage()
        keys.append(storage.data_ptr() if storage.nbytes() > t.numel() * t.element_size() else None)

    def split(indices: list[int]) -> list[list[int]]:
        groups: dict[int | None, list[int]] = {}
        for i in indices:
            groups.setdefault(keys[i], []).append(i)
        return list(groups.values())

    return split


def runs(indices: list[int], sizes: list[int], chunk: int) -> list[list[int]]:
    """``indices`` (one buffer's weights: :func:`storage_groups`) cut into runs of consecutive weights of at most
    ``chunk`` elements (a larger one alone)."""
    runs: list[list[int]] = []
    total = 0
    for i in indices:
        if runs and total + sizes[i] <= chunk:
            runs[-1].append(i)
            total += sizes[i]
        else:
            runs.append([i])
            total = sizes[i]
    return runs
