"""A quantized base lowers a LoRA step's peak by the weights it saves, and ``estimate-memory`` predicts that peak.

Measured on the CPU by ``benchmarks/speed/quantized_base_memory.py``'s step (torch's profiler memory events for the
step, the model's storages counted tensor by tensor) on a UNet whose weights are most of the step's memory: SD1.5's
block layout at a small width with wide cross-attention, one pair at a 8 x 8 latent. Without the frozen-layer
backward (``families.quantization._FrozenQuantizedLinear``), torchao's layers keep each dequantized weight for the
backward and the int8 base's peak is above the bf16 base's.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

from trl_diffusion_sdpo.engines.memory import ModelSizes, RunShape, estimate_memory

pytest.importorskip("optimum.quanto")
pytest.importorskip("torchao")

UNET = {
    "block_out_channels": (128, 256),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 512,
    "attention_head_dim": 8,
    "transformer_layers_per_block": 2,
    "sample_size": 8,
}
LATENT = 8
ROOT = Path(__file__).resolve().parents[2]
RESULT = ROOT / "benchmarks" / "results" / "cpu-quantized-base-memory.json"


@functools.cache
def benchmark_script():
    """``benchmarks/speed/quantized_base_memory.py``: its LoRA step measurement and its docs table."""
    spec = importlib.util.spec_from_file_location(
        "quantized_base_memory", ROOT / "benchmarks/speed/quantized_base_memory.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
def bf16() -> dict[str, int]:
    return benchmark_script().lora_step_memory(build_unet, "none", latent=LATENT)


@pytest.mark.parametrize("backend", ["torchao-int8", "quanto-int8"])
def test_an_int8_base_lowers_the_lora_steps_peak_by_at_least_half_the_weights_saving(bf16, backend) -> None:
    int8 = benchmark_script().lora_step_memory(build_unet, backend, latent=LATENT)
    saved = bf16["resident"] - int8["resident"]
    assert saved > 0.25 * bf16["resident"]  # the linear weights are most of this UNet
    assert int8["peak"] <= bf16["peak"] - saved / 2, (int8, bf16)


@pytest.mark.parametrize("backend", ["none", "torchao-int8", "quanto-int8"])
def test_the_estimate_is_within_a_tenth_of_the_measured_lora_step_peak(bf16, backend) -> None:
    measured = bf16 if backend == "none" else benchmark_script().lora_step_memory(build_unet, backend, latent=LATENT)
    assert estimate(backend) == pytest.approx(measured["peak"], rel=0.10), measured


def test_the_recorded_cpu_run_saves_memory_and_its_estimate_is_within_a_tenth() -> None:
    import json

    report = json.loads(RESULT.read_text())
    bf16 = report["runs"]["none"]["measured_bytes"]
    for base in ("quanto-int8", "torchao-int8"):
        run = report["runs"][base]
        saved = bf16["resident"] - run["measured_bytes"]["resident"]
        assert run["measured_bytes"]["peak"] <= bf16["peak"] - saved / 2, base
    for run in report["runs"].values():
        assert abs(run["estimate_error"]) <= 0.10
        assert run["estimate_error"] == pytest.approx(
            run["estimate_mib"] / (run["measured_bytes"]["peak"] / 2**20) - 1, abs=1e-3
        )


def test_docs_quantization_table_is_the_result_files() -> None:
    import json

    script = benchmark_script()
    text = (ROOT / "docs" / "quantization.md").read_text()
    block = text.split(script.BEGIN, 1)[1].split(script.END, 1)[0].strip()
    assert block == script.table_markdown(json.loads(RESULT.read_text())), (
        "docs/quantization.md is stale: python benchmarks/speed/quantized_base_memory.py --table "
        "benchmarks/results/cpu-quantized-base-memory.json --write docs/quantization.md"
    )
