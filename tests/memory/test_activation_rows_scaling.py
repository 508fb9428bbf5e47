"""Activations counted for one pair and scaled by the pairs equal a fresh count at the run's rows (a UNet's meta
forward at 2, 4 and 8 rows, a transformer's formula), a shared memo runs one meta forward per resolution and
checkpointing setting, and the advice reached with scaled counts equals the advice from fresh counts."""

from __future__ import annotations

import pytest
import torch

from trl_diffusion_sdpo.engines.memory import RunShape, model_sizes
from trl_diffusion_sdpo.engines.memory import estimate as estimate_module
from trl_diffusion_sdpo.engines.memory.advice import fit_advice
from trl_diffusion_sdpo.engines.memory.estimate import activation_bytes, estimate_memory, unet_activation_bytes

TINY = "trl-diffusion-sdpo:tiny"


@pytest.fixture(scope="module")
def tiny():
    return model_sizes(TINY)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_scaled_unet_activations_equal_a_fresh_meta_forward_at_2_4_8_rows(tiny, checkpointing: bool) -> None:
    memo: dict = {}
    for rows in (2, 4, 8):
        shape = RunShape(pairs=rows // 2, resolution=64, dtype_bytes=4, activation_checkpointing=checkpointing)
        scaled, _ = activation_bytes(tiny, shape, memo)
        fresh = unet_activation_bytes(
            tiny.denoiser, rows, 64 // tiny.patch, shape.prompt_tokens, torch.float32, checkpointing
        )
        assert scaled == fresh, rows
    assert len(memo) == 1  # one pair's count, scaled for every row count


def test_scaled_transformer_activations_equal_the_formula_at_the_run_rows() -> None:
    sizes = model_sizes("black-forest-labs/FLUX.1-dev")
    for pairs in (1, 2, 4):
        shape = RunShape(pairs=pairs, resolution=512, prompt_tokens=512, dtype_bytes=2)
        assert activation_bytes(sizes, shape, {}) == estimate_module._activation_bytes(sizes, shape)


def test_the_advice_runs_one_meta_forward_per_resolution_and_checkpointing(tiny, monkeypatch) -> None:
    counted: list[tuple] = []
    fresh = estimate_module._activation_bytes

    def recording(sizes, shape):  # noqa: ANN001, ANN202
        counted.append((shape.pairs, shape.resolution, shape.activation_checkpointing))
        return fresh(sizes, shape)

    monkeypatch.setattr(estimate_module, "_activation_bytes", recording)
    shape = RunShape(pairs=8, resolution=64, dtype_bytes=4, lora_rank=None, lora_r=8, accumulation=1)
    memo: dict = {}
    run = estimate_memory(tiny, shape, memo)
    # a card just below the run's own peak: the advice estimates several batch sizes and checkpointing settings
    fit_advice(tiny, shape, run.total_bytes * 0.97 / 1e9, activations_memo=memo)
    assert all(pairs == 1 for pairs, _, _ in counted)
    assert len(counted) == len(set(counted)) == len(memo)


# By default: test_scaled_unet_activations_equal_a_fresh_meta_forward_at_2_4_8_rows (the scaled counts equal fresh
# ones, with and without checkpointing) and test_the_advice_runs_one_meta_forward_per_resolution_and_checkpointing
# (the advice reads its counts through the memo, one pair's each)
@pytest.mark.slow
def test_the_advice_from_scaled_counts_equals_the_advice_from_fresh_counts(tiny, monkeypatch) -> None:
    shape = RunShape(pairs=8, resolution=64, dtype_bytes=4, lora_rank=None, lora_r=8, accumulation=1)
    gpu = estimate_memory(tiny, shape, {}).total_bytes * 0.8 / 1e9
    scaled = fit_advice(tiny, shape, gpu, activations_memo={})
    fresh: dict = {}

    def unscaled(sizes, shape, memo=None):  # noqa: ANN001, ANN202
        # a count at the run's own rows, kept by the whole shape, pairs included
        if shape not in fresh:
            fresh[shape] = estimate_module._activation_bytes(sizes, shape)
        return fresh[shape]

    monkeypatch.setattr(estimate_module, "activation_bytes", unscaled)
    slow = fit_advice(tiny, shape, gpu, activations_memo={})
    assert (scaled.flags, scaled.estimate, scaled.verdict) == (slow.flags, slow.estimate, slow.verdict)


def test_a_memo_shared_across_resolutions_keeps_each_resolutions_count(tiny) -> None:
    memo: dict = {}
    fresh: dict[int, int] = {}  # a fresh meta forward's count by resolution
    for resolution in (64, 32, 64):
        shape = RunShape(pairs=2, resolution=resolution, dtype_bytes=4)
        latent = resolution // tiny.patch
        if resolution not in fresh:
            fresh[resolution] = unet_activation_bytes(
                tiny.denoiser, 4, latent, shape.prompt_tokens, torch.float32, False
            )
        assert activation_bytes(tiny, shape, memo)[0] == fresh[resolution], resolution
