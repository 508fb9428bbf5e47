"""A scalar function's crossing of zero from above, bracketed to a resolution in few evaluations.

The update space's ``lambda`` search (:func:`~.update_space.update_space_lambda`) evaluates ``D`` in passes over every
trainable weight and its optimizer state, several ``lambda`` per pass; a pass costs about as much as a few optimizer
steps, so the search is built to need few of them. This module is that search on its own, over Python floats: an
``evaluate(points) -> values`` callable is all it sees of ``D``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["ESTIMATED_PASSES", "SPARE_PASSES", "bracketed_crossing", "float32"]

SPARE_PASSES = 2  # search passes allowed beyond bisection's count (ITP's n0)
ESTIMATED_PASSES = 4  # search passes that evaluate around an interpolated crossing; bisection after them


def float32(x: float) -> float:
    """``x`` rounded to the nearest float32: the search evaluates ``D`` at the ``lambda`` the trainer will use."""
    return float(np.float32(x))


def _float32_at_most(x: float) -> float:
    """The largest float32 not above ``x``."""
    y = np.float32(x)
    return float(y if y <= x else np.nextafter(y, np.float32(-np.inf)))


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """``matrix^-1 rhs`` (at most 4 x 4); None where singular or not finite."""
    try:
        out = np.linalg.solve(np.asarray(matrix, dtype=np.float64), np.asarray(rhs, dtype=np.float64))
    except np.linalg.LinAlgError:
        return None
    return out.tolist() if np.isfinite(out).all() else None


def _interpolated_crossing(
    known: list[tuple[float, float]], lo: float, hi: float, clip: Callable[[float], float]
) -> float:
    """Where the interpolant of the evaluated points nearest the bracket ``[lo, hi]`` (up to four, ``lo`` and ``hi``
    first) crosses zero inside it; NaN where it does not (or the points do not determine it).

    The interpolant suits ``D``: where the second moment dominates the update, ``D(lambda) ~ a + c(lambda) (b +
    d lambda)`` with ``c`` the clip coefficient (known exactly), so the basis is ``c, c lambda, 1, c lambda^2`` (as
    many as points; the first two alone are the secant when ``c`` is 1); where ``c`` is the same at every point (no
    clipping) the polynomial ``1, lambda, lambda^2, lambda^3``. The crossing is found on the host by bisection of the
    interpolant."""
    nearest = sorted(known, key=lambda p: max(lo - p[0], p[0] - hi, 0.0))[:4]
    scales = [clip(x) for x, _ in nearest]
    polynomial = max(scales) - min(scales) <= 1e-12 * max(scales)

    def basis(x: float, c: float) -> list[float]:
        terms = [1.0, x, x * x, x**3] if polynomial else [c, c * x, 1.0, c * x * x]
        return terms[: len(nearest)]

    coefficients = _solve([basis(x, c) for (x, _), c in zip(nearest, scales)], [f for _, f in nearest])
    if coefficients is None:
        return math.nan

    def model(x: float) -> float:
        return sum(a * b for a, b in zip(coefficients, basis(x, clip(x))))

    a, b = lo, hi
    if not (model(a) >= 0 > model(b)):
        return math.nan
    for _ in range(60):
        middle = (a + b) / 2
        a, b = (middle, b) if model(middle) >= 0 else (a, middle)
    return (a + b) / 2


def bracketed_crossing(
    evaluate: Callable[[list[float]], list[float]],
    lo: float,
    hi: float,
    f_lo: float,
    f_hi: float,
    resolution: float,
    clip: Callable[[float], float] | None = None,
) -> tuple[float, float]:
    """A crossing of ``f`` from above, bracketed to ``resolution``: ``(lo, hi)`` with ``f(lo) >= 0 > f(hi)`` and
    ``lo < hi <= lo + resolution``, from a bracket ``lo < hi`` with ``f_lo = f(lo) >= 0 > f_hi = f(hi)``.

    ``evaluate`` takes a list of float32 points and returns ``f`` at each (for ``D``: one pass over the weights for
    all of them); ``clip`` is the clip coefficient ``c(lambda)`` the interpolant uses (None: 1). A pass evaluates the
    pair ``x - resolution/2``, ``x + resolution/2`` around the interpolated crossing ``x``
    (:func:`_interpolated_crossing`), which certifies the bracket at once where ``x`` is within ``resolution/2`` of
    a crossing; the bracket becomes the rightmost sign change among its ends and the new points (the largest
    evaluated point with ``f >= 0`` and the next one). The worst case is bounded as in ITP (Oliveira and Takahashi,
    2020): with ``n = ceil(log2((hi - lo) / resolution)) +`` :data:`SPARE_PASSES`, pass ``k`` leaves at most
    ``resolution * 2^(n - k)``; where the pair alone could leave more (``x`` far from the bracket's middle) the
    midpoint joins it, and after :data:`ESTIMATED_PASSES` passes (or without a finite ``x``) the midpoint is
    evaluated alone. So at most ``n`` passes (13 for ``[0, max_lambda]``; one more where float32 rounding of the
    points leaves the last bracket a few ulps too wide), three points each in the first four and one after. With
    ``f`` smooth the first or second pair usually certifies."""
    clip = clip or (lambda lam: 1.0)
    half = resolution / 2
    budget = math.ceil(math.log2((hi - lo) / resolution)) + SPARE_PASSES if hi - lo > resolution else 0
    known = [(lo, f_lo), (hi, f_hi)]
    passes = 0
    while hi - lo > resolution:
        passes += 1
        width = hi - lo
        mid = float32(lo + width / 2)
        x = _interpolated_crossing(known, lo, hi, clip) if passes <= ESTIMATED_PASSES else math.nan
        if width <= 2 * resolution or not math.isfinite(x):
            points = [mid]
        else:
            x = min(max(x, lo + resolution), hi - resolution)
            first = float32(x - half)
            points = [first, _float32_at_most(first + resolution)]
            if abs(x - mid) > resolution * 2.0 ** (budget - passes) - width / 2 and mid not in points:
                points = sorted([*points, mid])  # the pair alone may leave more than this pass's bound
        values = evaluate(points)
        known += zip(points, values)
        xs, fs = [lo, *points, hi], [f_lo, *values, f_hi]
        j = max(i for i in range(len(xs) - 1) if fs[i] >= 0)  # lo's f is >= 0, hi's is not
        lo, hi, f_lo, f_hi = xs[j], xs[j + 1], fs[j], fs[j + 1]
    return lo, hi
