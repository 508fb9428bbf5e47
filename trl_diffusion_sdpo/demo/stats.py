"""Intervals for the demo's comparison: Student t over training seeds, a two-level bootstrap of reward changes, and
the paired comparison against a reference method with its power (:func:`paired_difference`,
:func:`minimum_detectable_effect`).

Pure functions over arrays; no demo state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.stats

from ..evaluation.compare import bootstrap_mean_ci

__all__ = ["minimum_detectable_effect", "paired_difference", "summarise"]


def t_quantile_80(df: int) -> float:
    """The 0.80 quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t.ppf``)."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    return float(scipy.stats.t.ppf(0.80, df))


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t.ppf``)."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    return float(scipy.stats.t.ppf(0.975, df))


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

    Not ``scipy.stats.bootstrap``: it resamples the observations of one level, and this resamples two, seeds and
    then samples within them.

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
    _, low, high = bootstrap_mean_ci(differences, n_resamples=resamples, seed=seed)
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
