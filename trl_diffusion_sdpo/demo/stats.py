"""Intervals for the demo's comparison: Student t over training seeds, and a two-level bootstrap of reward changes.

Pure functions over arrays; no demo state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_paired_change", "summarise", "t_interval", "t_quantile_975"]

# Two-sided 95% Student t quantiles for 1 to 30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (a table to 30, then the Cornish-Fisher
    expansion ``z + (z^3 + z) / 4df + (5z^5 + 16z^3 + 3z) / 96df^2``, within 1e-4 there)."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: Sequence[float]) -> list[float] | None:
    """95% interval of the mean, ``mean +- t(n-1) * sd / sqrt(n)``; ``None`` for fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return None
    mean, half = values.mean(), t_quantile_975(len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return [float(mean - half), float(mean + half)]


def summarise(values: Sequence[float], bounds: tuple[float, float] | None = None) -> dict[str, object]:
    """``{"mean", "ci95" (t over the values, or None), "n", "values"}``; with ``bounds`` (the metric's range, e.g.
    ``(0, 1)`` for an accuracy) the interval is clipped to it, since a t interval over few values can overshoot."""
    values = [float(v) for v in values]
    interval = t_interval(values)
    if interval is not None and bounds is not None:
        interval = [max(interval[0], bounds[0]), min(interval[1], bounds[1])]
    return {"mean": float(np.mean(values)), "ci95": interval, "n": len(values), "values": values}


def bootstrap_paired_change(
    runs: np.ndarray, base: np.ndarray, resamples: int = 2000, seed: int = 0
) -> dict[str, object]:
    """Mean reward change ``run - base`` with a 95% percentile bootstrap interval over two levels of noise.

    ``runs`` is ``[seeds, samples]`` (one row per training seed), ``base`` is ``[samples]``; sample ``j`` of every
    row and of ``base`` shares its prompt and initial noise, so differences are taken per sample. Each resample
    draws training seeds with replacement, then samples with replacement (the same indices for a run and the
    base). With one seed only the sample level varies.
    """
    runs = np.atleast_2d(np.asarray(runs, dtype=np.float64))
    base = np.asarray(base, dtype=np.float64).ravel()
    if runs.shape[1] != len(base):
        raise ValueError(f"runs have {runs.shape[1]} samples each, base has {len(base)}")
    differences = runs - base[None, :]
    rng = np.random.default_rng(seed)
    num_seeds, num_samples = differences.shape
    seed_draws = rng.integers(0, num_seeds, size=(resamples, num_seeds))
    sample_draws = rng.integers(0, num_samples, size=(resamples, num_seeds, num_samples))
    picked = differences[seed_draws[..., None], sample_draws]  # [resamples, seeds, samples]
    means = picked.mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(differences.mean()), "ci95": [float(low), float(high)], "resamples": resamples}
