"""Constants the package copies from published code, checked against the published values written out here.

A test that imports a constant from the code under test and computes its expectation with it agrees with any value
the code holds. Each value below is copied from its source, which the comment names, so a typo or an edit in the
package fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from trl_diffusion_sdpo import DiffusionSDPOConfig
from trl_diffusion_sdpo.families.noising import SUPPORTED_PREDICTION_TYPES
from trl_diffusion_sdpo.objectives.smpo import PICKSCORE_MAX, PICKSCORE_MIN, smoothed_preference_weights

# JaydenLyh/SmPO (SmPO-Diffusion, Lu et al., ICML 2025, arXiv 2506.02698), train.py, preprocess_train (commit
# 61105a19):
#     max_val = 0.28201571106910706
#     min_val = 0.11543526500463486
#     norm_score = (score - min_val) / (max_val - min_val)
# the raw PickScore cosine range over Pick-a-Pic v2 that normalises the scores before the smoothed preference.
PUBLISHED_SMPO_PICKSCORE_MIN = 0.11543526500463486
PUBLISHED_SMPO_PICKSCORE_MAX = 0.28201571106910706


def test_smpo_pickscore_range_is_the_published_one_in_the_objective_and_the_config_defaults():
    assert (PICKSCORE_MIN, PICKSCORE_MAX) == (PUBLISHED_SMPO_PICKSCORE_MIN, PUBLISHED_SMPO_PICKSCORE_MAX)
    config = DiffusionSDPOConfig(output_dir="unused")
    assert (config.smpo_score_min, config.smpo_score_max) == (
        PUBLISHED_SMPO_PICKSCORE_MIN,
        PUBLISHED_SMPO_PICKSCORE_MAX,
    )


def test_smpo_default_weights_normalise_with_the_published_range():
    """With the defaults, a pair at the range's two ends has normalised scores 1 and 0: p = sigmoid(1) and the
    weight gamma (2p - 1) with gamma = 10; a pair half a range apart has p = sigmoid(1/2)."""
    low, high = PUBLISHED_SMPO_PICKSCORE_MIN, PUBLISHED_SMPO_PICKSCORE_MAX
    middle = (low + high) / 2
    weights = smoothed_preference_weights(
        torch.tensor([high, middle], dtype=torch.float64), torch.tensor([low, low], dtype=torch.float64)
    )
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    assert weights.tolist() == pytest.approx([10 * (2 * sigmoid(1.0) - 1), 10 * (2 * sigmoid(0.5) - 1)], rel=1e-12)


def test_supported_prediction_types_are_the_three_diffusers_schedulers_train_with():
    # diffusers DDPMScheduler(prediction_type=...): "epsilon", "sample" or "v_prediction" (scheduling_ddpm.py).
    assert set(SUPPORTED_PREDICTION_TYPES) == {"epsilon", "v_prediction", "sample"}
