"""The update space's ``lambda`` search on the device: a fixed number of passes, no host read between them.

The update space (:func:`~.update_space.update_space_lambda`) evaluates ``D`` in passes over every trainable weight
and its optimizer state, several ``lambda`` per pass. On an accelerator a step at a typical size is bound by the
host's work, and a search that reads ``D`` back to decide its next points makes the host wait for the device at every
pass. This search decides nothing on the host: every pass's points are computed on the device from the previous
pass's values (``torch.where``, ``argmax``), and the number of passes and of points per pass is fixed, so the whole
search is queued at once and runs while the host goes on. This module sees ``D`` through one callable only,
``evaluate(lambdas) -> values`` on device tensors.

The points lie on a lattice of ``top / STEPS`` (``STEPS = 2048``: the resolution, ``max_lambda / 2048``):

1. the :data:`GRID_POINTS` grid ``0, top/8, ..., top`` in one pass; ``target = mu * max(D(0), 0)``;
2. the bracket ``[lo, lo + top/8]`` from the largest grid point ``lo`` meeting the target (the next one misses it);
3. :data:`REFINE_PASSES` passes of :data:`REFINE_POINTS` equally spaced inner points each, the bracket becoming
   ``[p, p + its spacing]`` for the largest evaluated ``p`` that meets the target (its right neighbour misses it), so
   ``(REFINE_POINTS + 1) ** REFINE_PASSES = 256`` brings ``top/8`` down to ``top/2048``.

Then ``lambda = top`` where ``D(top)`` meets the target (nothing to restrict); else, where a grid point meets it, the
bracket's lower end: ``D(lambda) >= target > D(lambda + top/2048)``, ``lambda`` within the resolution below a crossing
(the rightmost one among the evaluated points); else the grid point of the largest ``D``, counted infeasible. Every
point is a float32 number, the ``lambda`` the trainer will use, so the guarantee holds for the value returned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["GRID_POINTS", "REFINE_PASSES", "REFINE_POINTS", "STEPS", "lattice_crossing"]

STEPS = 2048  # the lattice: lambda in multiples of top / STEPS (the resolution)
GRID_POINTS = 9  # the first pass: 0, top/8, ..., top
# Each refining pass evaluates REFINE_POINTS inner points of the bracket (which it divides by REFINE_POINTS + 1): one
# point per pass (bisection) evaluates the fewest lambdas in all (17: the elementwise work of a pass grows with its
# lambdas), more points per pass take fewer passes (the host's work grows with the passes). Measured on the CPU
# measure (benchmarks/speed/host_time_lockstep.py): one point per pass costs the least there.
REFINE_POINTS = 1
REFINE_PASSES = 8  # (REFINE_POINTS + 1) ** REFINE_PASSES * (GRID_POINTS - 1) == STEPS


def _lattice(index: torch.Tensor, top: float) -> torch.Tensor:
    """The float32 ``lambda`` of lattice ``index`` (``index * top / STEPS``, rounded once from float64)."""
    return (index.to(torch.float64) * (top / STEPS)).to(torch.float32)


def lattice_crossing(
    evaluate: Callable[[torch.Tensor], torch.Tensor], top: float, mu: float | torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(lambda, infeasible, passes)`` as in the module docstring: ``lambda`` (float32, 0-dim) and ``infeasible``
    (float32 1.0 where no grid point meets the target) on ``device``, computed there; ``evaluate`` takes a float32
    vector of ``lambda`` and returns ``D`` at each (one pass over the weights); ``mu`` a number or a 0-dim tensor. No
    value is read on the host."""
    if (GRID_POINTS - 1) * (REFINE_POINTS + 1) ** REFINE_PASSES != STEPS:
        raise ValueError("the grid and the refining passes must divide the lattice exactly")
    span = STEPS // (GRID_POINTS - 1)
    grid = torch.arange(GRID_POINTS, device=device) * span  # lattice indices
    values = evaluate(_lattice(grid, top))
    mu = mu.to(device=device, dtype=values.dtype) if torch.is_tensor(mu) else mu  # a tensor (auto mu) stays one
    target = mu * values[0].clamp(min=0)
    meets = values >= target
    positions = torch.arange(GRID_POINTS, device=device)
    best = torch.where(meets, positions, -1).max()  # the largest grid point meeting the target (-1: none)
    feasible = best >= 0
    unrestricted = meets[-1]
    # lattice indices by arithmetic, not by indexing with a device tensor (which reads the index on the host)
    lo = best.clamp(min=0, max=GRID_POINTS - 2) * span  # a bracket to refine even where it is not used
    inner = torch.arange(1, REFINE_POINTS + 1, device=device)
    for _ in range(REFINE_PASSES):
        span //= REFINE_POINTS + 1
        points = lo + inner * span
        meets = evaluate(_lattice(points, top)) >= target
        # the largest inner point meeting the target (0: none, the bracket's lower end stays)
        steps = torch.where(meets, inner, 0).max()
        lo = lo + steps * span
    top_tensor = torch.full((), top, dtype=torch.float32, device=device)
    fallback = _lattice(values.argmax() * (STEPS // (GRID_POINTS - 1)), top)  # no grid point meets it: the best
    lam = torch.where(unrestricted, top_tensor, torch.where(feasible, _lattice(lo, top), fallback))
    return lam, (~feasible).to(torch.float32), 1 + REFINE_PASSES
