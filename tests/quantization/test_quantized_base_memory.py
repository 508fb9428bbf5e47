"""A quantized base lowers a LoRA step's peak by the weights it saves, and ``estimate-memory`` predicts that peak.

Measured on the CPU by :func:`trl_diffusion_sdpo.engines.memory.measure.lora_step_memory` (torch's profiler memory
events for the step, the model's storages counted tensor by tensor) on a UNet whose weights are most of the step's
memory: SD1.5's block layout at a small width with wide cross-attention, one pair at a 8 x 8 latent. Without the
frozen-layer backward (``families.quantization._FrozenQuantizedLinear``), torchao's layers keep each dequantized
weight for the backward and the int8 base's peak is above the bf16 base's.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from trl_diffusion_sdpo.engines.memory import ModelSizes, RunShape, estimate_memory
from trl_diffusion_sdpo.engines.memory.measure import lora_step_memory

pytest.importorskip("optimum.quanto")
pytest.importorskip("torchao")

UNET = {
    "block_out_channels": (96, 192),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 512,
    "attention_head_dim": 8,
    "transformer_layers_per_block": 2,
    "sample_size": 8,
}
LATENT = 8


def build_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET)


def estimate(base_quantization: str) -> int:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights(include_buffers=True):
        meta = UNet2DConditionModel(**UNET)
    sizes = ModelSizes("stable-diffusion", meta, {}, False, False, 8, 4, "the test's UNet")
    shape = RunShape(pairs=1, resolution=8 * LATENT, dtype_bytes=2, lora_rank=8, base_quantization=base_quantization,
                     optim="adamw_torch", latent_cache=True, safeguard="none")  # fmt: skip
    return estimate_memory(sizes, shape).total_bytes


@pytest.fixture(scope="module")
def measured() -> Callable[[str], dict[str, int]]:
    """``measured(base_quantization)``: the LoRA step's memory on that base, measured once per module (both tests
    below read each base's measurement)."""
    done: dict[str, dict[str, int]] = {}

    def measure(backend: str) -> dict[str, int]:
        if backend not in done:
            done[backend] = lora_step_memory(build_unet, backend, latent=LATENT)
        return done[backend]

    return measure


@pytest.fixture(scope="module")
def bf16(measured) -> dict[str, int]:
    return measured("none")


# torchao-int8 in the slow tier (its measurement is the module's longest): by default quanto-int8's case here, and
# test_frozen_quantized_layers.py's [torchao-int8] case checks that torchao's frozen layers keep no weight for the
# backward, which is what lowers its peak
@pytest.mark.parametrize("backend", [pytest.param("torchao-int8", marks=pytest.mark.slow), "quanto-int8"])
def test_an_int8_base_lowers_the_lora_steps_peak_by_at_least_half_the_weights_saving(bf16, measured, backend) -> None:
    int8 = measured(backend)
    saved = bf16["resident"] - int8["resident"]
    assert saved > 0.25 * bf16["resident"]  # the linear weights are most of this UNet
    assert int8["peak"] <= bf16["peak"] - saved / 2, (int8, bf16)


# torchao-int8 in the slow tier: the estimate counts an int8 base alike for both backends, and quanto-int8's case
# compares it with a measured int8 step by default
@pytest.mark.parametrize("backend", ["none", pytest.param("torchao-int8", marks=pytest.mark.slow), "quanto-int8"])
def test_the_estimate_is_within_a_tenth_of_the_measured_lora_step_peak(measured, backend) -> None:
    memory = measured(backend)
    assert estimate(backend) == pytest.approx(memory["peak"], rel=0.10), memory
