"""Intervals for the demo's comparison: Student t over training seeds, a two-level bootstrap of reward changes, and
the paired comparison against a reference method with its power (:func:`paired_difference`,
:func:`minimum_detectable_effect`).

Pure functions over arrays; no demo state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["minimum_detectable_effect", "paired_difference", "summarise"]

# Two-sided 95% Student t quantiles for 1 to 30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip

# The 0.80 quantile, for the power of a test: 1 to 30 degrees of freedom.
_T80 = (
    1.3764, 1.0607, 0.9785, 0.9410, 0.9195, 0.9057, 0.8960, 0.8889, 0.8834, 0.8791,
    0.8755, 0.8726, 0.8702, 0.8681, 0.8662, 0.8647, 0.8633, 0.8620, 0.8610, 0.8600,
    0.8591, 0.8583, 0.8575, 0.8569, 0.8562, 0.8557, 0.8551, 0.8546, 0.8542, 0.8538,
)  # fmt: skip


def _cornish_fisher(z: float, df: int) -> float:
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_quantile_80(df: int) -> float:
    """The 0.80 quantile of Student's t with ``df`` degrees of freedom (a table to 30, then Cornish-Fisher)."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    return _T80[df - 1] if df <= len(_T80) else _cornish_fisher(0.841621, df)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (a table to 30, then the Cornish-Fisher
    expansion ``z + (z^3 + z) / 4df + (5z^5 + 16z^3 + 3z) / 96df^2``, within 1e-4 there)."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    return _cornish_fisher(1.959964, df)


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


def minimum_detectable_effect(sd: float, n: int) -> float:
    """The smallest true mean difference a two-sided paired t test at alpha 0.05 detects with 80% power, from the
    paired differences' standard deviation ``sd`` over ``n`` pairs: ``(t_0.975(n-1) + t_0.80(n-1)) * sd / sqrt(n)``
    (the usual approximation to the noncentral-t power: 0.79 at n = 5, 0.80 at n = 10)."""
    if n < 2:
        raise ValueError(f"need at least 2 pairs, got {n}")
    return (t_quantile_975(n - 1) + t_quantile_80(n - 1)) * sd / math.sqrt(n)


def paired_difference(
    values: Sequence[float], reference: Sequence[float], resamples: int = 10_000, seed: int = 0
) -> dict[str, object]:
    """``values - reference`` pair by pair (pair ``i`` shares its training seed: same batches, timesteps, noise).

    Returns the mean difference, the differences' standard deviation ``sd`` (``ddof=1``), ``n``, the 95% paired t
    interval ``mean +- t_0.975(n-1) * sd / sqrt(n)`` (``ci95``), a 95% percentile bootstrap interval resampling the
    pairs (``ci95_bootstrap``), the two-sided p-value's side (``excludes_zero``) and the minimum detectable effect at
    80% power (``mde80``). The t interval is the one to read: with 10 pairs the percentile bootstrap is known to be
    too narrow; it is there as a check on the t interval's normality assumption.
    """
    values = np.asarray(values, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if values.shape != reference.shape or values.ndim != 1:
        raise ValueError(f"paired values need the same 1-d shape, got {values.shape} and {reference.shape}")
    n = len(values)
    if n < 2:
        raise ValueError(f"need at least 2 pairs, got {n}")
    differences = values - reference
    mean, sd = float(differences.mean()), float(differences.std(ddof=1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "mean": mean,
        "sd": sd,
        "n": n,
        "ci95": [mean - half, mean + half],
        "ci95_bootstrap": [float(low), float(high)],
        "excludes_zero": bool(mean - half > 0 or mean + half < 0),
        "mde80": minimum_detectable_effect(sd, n),
        "differences": [float(d) for d in differences],
    }
