"""The paired comparison's statistics (``trl_diffusion_sdpo.demo.stats``) against independent computations: scipy's
paired t test and noncentral t where scipy is installed, and hand-computed cases that need nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from trl_diffusion_sdpo.config import DiffusionSDPOConfig
from trl_diffusion_sdpo.demo.methods import Method, method_unavailable
from trl_diffusion_sdpo.demo.stats import (
    minimum_detectable_effect,
    paired_difference,
    t_quantile_80,
    t_quantile_975,
)
from trl_diffusion_sdpo.evaluation.compare import bootstrap_mean_ci

# Ten seeds whose methods move together (a large seed effect) while the difference varies little: a paired interval
# is narrow, an unpaired one (two-sample SD) is many times wider.
REFERENCE = np.array([-0.20, -0.07, -0.15, -0.02, -0.11, -0.30, -0.05, -0.09, -0.18, -0.12])
SHIFT = np.array([0.05, 0.09, 0.04, 0.07, 0.03, 0.08, 0.06, 0.02, 0.10, 0.05])


def test_paired_difference_by_hand():
    # differences 1..5: mean 3, sd sqrt(2.5), t_0.975(4) = 2.7764 (table), half width 2.7764 * sqrt(2.5) / sqrt(5)
    result = paired_difference([2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764 * math.sqrt(2.5) / math.sqrt(5)
    assert result["n"] == 5 and result["mean"] == pytest.approx(3.0)
    assert result["sd"] == pytest.approx(math.sqrt(2.5))
    assert result["ci95"] == pytest.approx([3.0 - half, 3.0 + half], rel=1e-4)
    assert result["excludes_zero"] is True
    assert result["mde80"] == pytest.approx((2.7764 + 0.9410) * math.sqrt(2.5) / math.sqrt(5), rel=1e-4)
    assert result["differences"] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])


def test_paired_difference_matches_scipy_paired_t():
    stats = pytest.importorskip("scipy.stats")
    values = REFERENCE + SHIFT
    result = paired_difference(values, REFERENCE)
    expected = stats.ttest_rel(values, REFERENCE).confidence_interval(0.95)
    assert result["ci95"] == pytest.approx([expected.low, expected.high], rel=1e-4)
    # an unpaired (Welch) interval on the same numbers is several times wider: the pairing is what the test reads
    welch = stats.ttest_ind(values, REFERENCE, equal_var=False).confidence_interval(0.95)
    assert (welch.high - welch.low) > 3 * (result["ci95"][1] - result["ci95"][0])
    # the bootstrap over pairs lands near the t interval on these near-normal differences
    low, high = result["ci95_bootstrap"]
    assert result["ci95"][0] - 0.01 < low < result["mean"] < high < result["ci95"][1] + 0.01


def test_paired_difference_zero_inside_and_bad_input():
    result = paired_difference([0.1, -0.1, 0.2, -0.2], [0.0, 0.0, 0.0, 0.0])
    assert result["excludes_zero"] is False and result["ci95"][0] < 0 < result["ci95"][1]
    with pytest.raises(ValueError, match="same 1-d shape"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_difference([1.0], [0.0])


def test_t_quantiles_against_the_printed_table():
    for df, q975, q80 in [(1, 12.706, 1.3764), (4, 2.776, 0.9410), (9, 2.262, 0.8834), (30, 2.042, 0.8538)]:
        assert t_quantile_975(df) == pytest.approx(q975, abs=5e-4) and t_quantile_80(df) == pytest.approx(
            q80, abs=5e-5
        )
    with pytest.raises(ValueError, match="df must be at least 1"):
        t_quantile_975(0)


def test_minimum_detectable_effect_has_80_percent_power():
    """At the MDE, the exact power of the two-sided paired t test (noncentral t with noncentrality mde * sqrt(n) /
    sd and n - 1 degrees of freedom) is 80%."""
    stats = pytest.importorskip("scipy.stats")
    sd = 0.03
    for n in (5, 10, 12, 20, 40):
        mde = minimum_detectable_effect(sd, n)
        df, noncentrality = n - 1, mde * math.sqrt(n) / sd
        critical = stats.t.ppf(0.975, df)
        power = stats.nct.sf(critical, df, noncentrality) + stats.nct.cdf(-critical, df, noncentrality)
        assert power == pytest.approx(0.80, abs=0.012), (n, power)
    # by hand at n = 10: (2.262 + 0.8834) * sd / sqrt(10)
    assert minimum_detectable_effect(1.0, 10) == pytest.approx((2.2622 + 0.8834) / math.sqrt(10), rel=1e-4)


def test_method_extra_config_fields():
    """A variant is one Method line: its extra fields reach the config, and a field the installed config lacks makes
    it unavailable (the demo and the comparison skip it and say why)."""
    pair = Method("x", "x", True, 0.5, "parameter", (("safeguard_scope", "global"),))
    assert pair.config_kwargs() == {"safeguard_mu": 0.5, "safeguard_space": "parameter", "safeguard_scope": "global"}
    assert method_unavailable(pair, DiffusionSDPOConfig) is None
    future = Method("y", "y", False, config=(("not_a_field_yet", 1),))
    assert "not_a_field_yet" in method_unavailable(future, DiffusionSDPOConfig)


def test_bootstrap_interval_is_scipys_percentile_bootstrap():
    values = np.random.default_rng(2).exponential(1.0, size=50)  # skewed: percentile and BCa intervals differ
    expected = scipy.stats.bootstrap(
        (values,), np.mean, n_resamples=3000, method="percentile", confidence_level=0.9, rng=np.random.default_rng(7)
    ).confidence_interval
    assert bootstrap_mean_ci(values, n_resamples=3000, confidence=0.9, seed=7) == pytest.approx(
        (values.mean(), expected.low, expected.high), rel=1e-12
    )
