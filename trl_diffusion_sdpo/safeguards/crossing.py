"""A scalar function's last crossing of a target from above, bracketed on the device in a fixed schedule of passes.

The update space's ``lambda`` search (:func:`~.update_space.update_space_lambda`) evaluates ``D`` in passes over every
trainable weight and its optimizer state, several ``lambda`` per pass. This module is that search on its own, over
device tensors: an ``evaluate(points) -> values`` callable (float32 points, one pass) is all it sees of ``D``, and no
value is read back to the host. Each pass's points follow from the values before it by tensor operations (masks,
maxima, gathers), so the schedule, how many passes of how many points, is fixed before the search starts: the host
queues every pass without waiting for the device.

The schedule, for ``[0, top]``:

* the grid pass: the :data:`GRID_POINTS` points ``0, top / 8, ..., top``; the target follows from ``f(0)``. Where
  ``f(top)`` meets the target the answer is ``top``; where no grid point meets it, the grid point with the largest
  ``f`` (the search is *infeasible*). Else the bracket is ``[g_k, g_k+1]``, ``g_k`` the largest grid point meeting
  the target (so ``g_k+1`` misses it);
* :data:`REFINEMENTS` passes, each of the :data:`SUBDIVISIONS` ``- 1`` inner points that cut the bracket into
  :data:`SUBDIVISIONS` equal parts: the bracket becomes ``[x_j, x_j+1]``, ``x_j`` the largest of its lower end and
  the inner points that meets the target (its upper end, evaluated before, misses it).

After the last pass ``x = lo`` meets the target and a point at most ``top *`` :data:`RESOLUTION` above it
(``top / 4096``) misses it. Passes after an answer found by the grid alone (``top``, or infeasible) still run, and
leave the answer as it is. Every point is a float32 number: the returned one is the value ``f`` was evaluated at.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["GRID_POINTS", "REFINEMENTS", "RESOLUTION", "SUBDIVISIONS", "float32", "last_crossing", "schedule"]

GRID_POINTS = 9  # the grid pass: 0, top / 8, ..., top
SUBDIVISIONS = 8  # each refinement cuts the bracket into 8 (7 points per pass)
REFINEMENTS = 3  # refinement passes after the grid pass
#: of ``top``: the answer lies within this below a crossing (8 x 8^3 = 4096 parts)
RESOLUTION = 1 / ((GRID_POINTS - 1) * SUBDIVISIONS**REFINEMENTS)


def float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (on the host: no tensor)."""
    return float(np.float32(x))


def schedule() -> list[int]:
    """The number of points of each pass: ``[9, 7, 7, 7]``."""
    return [GRID_POINTS] + [SUBDIVISIONS - 1] * REFINEMENTS


@functools.lru_cache(maxsize=8)
def _constants(top: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The grid (float32), its indices, the inner points' indices and each refinement's offsets from the bracket's
    lower end (float64), made on ``device`` once per ``top``."""
    grid = torch.linspace(0.0, top, GRID_POINTS, dtype=torch.float64, device=device).to(torch.float32)
    inner = torch.arange(1, SUBDIVISIONS, dtype=torch.float64, device=device)
    width = top / (GRID_POINTS - 1)
    offsets = []
    for _ in range(REFINEMENTS):
        width /= SUBDIVISIONS
        offsets.append(inner * width)
    index = torch.arange(GRID_POINTS, device=device)
    return grid, index, torch.arange(1, SUBDIVISIONS, device=device), offsets


def last_crossing(
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    top: float,
    target_of: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, infeasible)``, 0-dim device tensors (float32, and 1.0 / 0.0), by the module's schedule.

    Args:
        evaluate: ``f`` at a vector of float32 points (one pass), a vector of values.
        top: the upper end of the interval (a float32 number), ``x = top`` where ``f(top)`` meets the target.
        target_of: the target from ``f(0)`` (a 0-dim tensor): ``x`` meets ``f(x) >= target``.
        device: where the points are made.

    Where some grid point meets the target, ``f(x) >= target`` and ``f(y) < target`` for a ``y`` in
    ``(x, x + top * RESOLUTION]`` (or ``x = top``); where none does, ``x`` is the grid point with the largest ``f``
    and ``infeasible`` is 1.
    """
    with torch.no_grad():
        grid, index, inner, offsets = _constants(float(top), torch.device(device))
        values = evaluate(grid)
        target = target_of(values[0])
        meets = values >= target
        last = torch.where(meets, index, -1).amax()  # the largest grid point meeting the target; -1: none
        infeasible = last < 0
        k = torch.where(infeasible, values.argmax(), last)
        lo = grid.gather(0, k.reshape(1))
        # where the grid alone answers (top, or its best point), no later point may meet the target
        target = torch.where(infeasible | meets[-1], torch.inf, target)
        for offset in offsets:
            points = (lo + offset).float()  # float64 sums of a float32 end: rounded once
            found = evaluate(points) >= target
            j = (found * inner).amax(0, keepdim=True)  # the largest inner point meeting the target; 0: the lower end
            lo = torch.cat([lo, points]).gather(0, j)
    return lo.reshape(()), infeasible.to(torch.float32)
