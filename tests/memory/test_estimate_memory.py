"""``trl-diffusion-sdpo estimate-memory`` and :mod:`trl_diffusion_sdpo.engines.memory`: an answer for every shipped
config,
terms that sum to ``total_gib``, engines that divide what they shard, and counts checked against what diffusers,
peft and optimum-quanto build (the tiny shipped pipeline loaded with its weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model

from trl_diffusion_sdpo.cli.memory import run_estimate_memory
from trl_diffusion_sdpo.engines.memory import (
    MEASURED_ERRORS,
    RunShape,
    estimate_memory,
    model_sizes,
    unet_activation_bytes,
)
from trl_diffusion_sdpo.families.loading import resolve_model_name

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
TINY = "trl-diffusion-sdpo:tiny"
GIB = 2**30


def estimate_json(capsys, *argv: str) -> dict:
    assert run_estimate_memory([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(resolve_model_name(TINY), subfolder="unet")


def test_tiny_config_estimate_sums_its_terms(capsys) -> None:
    result = estimate_json(capsys, "--config", str(ROOT / "examples/configs/tiny_cpu.yaml"))
    parts = result["components_bytes"]
    assert set(parts) >= {"weights", "gradients", "optimizer", "activations", "reference", "safeguard"}
    assert result["total_gib"] == pytest.approx(sum(parts.values()) / GIB, abs=1e-3)
    assert result["parameters"]["denoiser"] == sum(p.numel() for p in tiny_unet().parameters())
    assert parts["reference"] == 0  # LoRA: the base with the adapters off


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_gets_an_estimate(capsys, config: Path) -> None:
    result = estimate_json(capsys, "--config", str(config))
    assert result["total_gib"] > 0
    assert result["total_gib"] == pytest.approx(sum(result["components_bytes"].values()) / GIB, abs=1e-3)


def test_shipped_configs_name_models_the_estimate_knows(capsys) -> None:
    """Every shipped config's model is counted without a download (the slow test runs each config whole); a model
    several configs name is counted once."""
    import yaml

    configs_of: dict[str, list[str]] = {}
    for config in CONFIGS:
        configs_of.setdefault(yaml.safe_load(config.read_text())["model_name_or_path"], []).append(config.name)
    for model, names in configs_of.items():
        sizes = model_sizes(model)
        assert sum(p.numel() for p in sizes.denoiser.parameters()) > 0, names
        assert all(p.is_meta for p in sizes.denoiser.parameters()), names


def _full_shape(**overrides) -> RunShape:
    return RunShape(**{"pairs": 1, "resolution": 32, "dtype_bytes": 2, "lora_rank": None, **overrides})


def test_full_tuning_terms_follow_the_zero_accounting() -> None:
    """bf16 full tuning with AdamW, P counted on the loaded UNet: DDP keeps 4P weights, 4P gradients, 8P moments, a
    2P reference and a 2P autocast copy; ZeRO-3 keeps (2 + 4)P/N, 2P/N, 8P/N and 2P/N; doubling N halves them."""
    p = sum(t.numel() for t in tiny_unet().parameters())
    sizes = model_sizes(TINY)
    memo: dict = {}  # the activation counts, shared as the advice's estimates share them
    ddp = estimate_memory(sizes, _full_shape(), memo).components
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer"], ddp["reference"], ddp["mixed_precision_cast"]) == (
        4 * p,
        4 * p,
        8 * p,
        2 * p,
        2 * p,
    )
    zero3 = {}
    for n in (2, 4):
        zero3[n] = estimate_memory(sizes, _full_shape(engine="zero3", num_processes=n), memo).components
        assert zero3[n]["weights"] == pytest.approx(6 * p / n, abs=2)
        assert zero3[n]["gradients"] == pytest.approx(2 * p / n, abs=1)
        assert zero3[n]["optimizer"] == pytest.approx(8 * p / n, abs=1)
        assert zero3[n]["reference"] == pytest.approx(2 * p / n, abs=1)
    two = zero3[2]
    four = estimate_memory(sizes, _full_shape(engine="zero3", num_processes=4)).components  # its own count
    assert four == zero3[4]
    for term in ("weights", "gradients", "optimizer", "reference"):
        assert four[term] == pytest.approx(two[term] / 2, abs=2), term
    assert four["activations"] == two["activations"]  # per process: never sharded
    zero2 = estimate_memory(sizes, _full_shape(engine="zero2", num_processes=4), memo).components
    assert zero2["reference"] == 2 * p and zero2["gradients"] == pytest.approx(2 * p / 4, abs=1)


def test_safeguard_one_pass_adds_both_rows_to_diffusion_dpos_activation_peak() -> None:
    """A model of one piece: DDP in bf16, both rows in bf16 (the products' dtype under autocast; taken whole when the
    backward starts, where Diffusion-DPO's peak holds no gradient: tests/safeguard/test_one_pass_memory.py measures
    it), and in float32 both float32 rows; ZeRO-2 in bf16: both rows in bf16, sharded as its gradients; FSDP2: both
    float32 rows of the shards. Each, or after the backward the rows and the combination's piece beyond the
    gradients, less the activations, where that is larger."""
    p = sum(t.numel() for t in tiny_unet().parameters())
    sizes = model_sizes(TINY)
    memo: dict = {}  # the activation counts, shared as the advice's estimates share them
    bf16 = estimate_memory(sizes, _full_shape(safeguard="one_pass"), memo).components
    assert bf16["safeguard"] == max(2 * 2 * p, 2 * 2 * p + 4 * p - 4 * p - bf16["activations"]) == 4 * p
    fp32 = estimate_memory(sizes, _full_shape(safeguard="one_pass", dtype_bytes=4), memo).components
    assert fp32["safeguard"] == max(8 * p, 8 * p + 4 * p - 4 * p - fp32["activations"]) == 8 * p
    zero2 = estimate_memory(sizes, _full_shape(safeguard="one_pass", engine="zero2", num_processes=2), memo).components
    row = 2 * p // 2
    assert zero2["safeguard"] == max(2 * row, 3 * row - zero2["activations"])
    fsdp2 = estimate_memory(sizes, _full_shape(safeguard="one_pass", engine="fsdp2", num_processes=2), memo).components
    row = 4 * p // 2
    assert fsdp2["safeguard"] == max(2 * row, 3 * row - fsdp2["activations"])
    assert estimate_memory(sizes, _full_shape(safeguard="output"), memo).components["safeguard"] == 0


def test_safeguard_one_pass_in_pieces_adds_two_pieces_or_the_rows_and_a_piece_of_the_combination(monkeypatch) -> None:
    """A model of four pieces (a large model's layout): two pieces' rows at the activations' peak, or after the
    backward both rows and one piece of the combination beyond the gradients term less the activations, whichever is
    larger. In bf16 that is a quarter of a float32 gradient either way (the bf16 rows are the size of the float32
    gradients they stand for; nothing of them is held at the optimizer step); in float32 the second row and a piece.
    ZeRO-2 keeps its gradient buffers beside its bf16 rows; FSDP2 and ZeRO-3 float32 rows of their shards."""
    from trl_diffusion_sdpo.engines.memory import pieces as memory_model

    p = sum(t.numel() for t in tiny_unet().parameters())
    sizes = model_sizes(TINY)
    memo: dict = {}  # the activation counts, shared as the advice's estimates share them
    monkeypatch.setattr(memory_model, "PIECE_ELEMENTS", -(-p // 4))
    bf16 = estimate_memory(sizes, _full_shape(safeguard="one_pass"), memo).components
    assert bf16["safeguard"] == max(2 * -(-2 * p // 4), -(-4 * p // 4) - bf16["activations"])
    assert bf16["safeguard"] <= p + 1  # a quarter of a float32 gradient, where the rows of before held two
    fp32 = estimate_memory(sizes, _full_shape(safeguard="one_pass", dtype_bytes=4), memo).components
    assert fp32["safeguard"] == max(2 * -(-4 * p // 4), 4 * p + -(-4 * p // 4) - fp32["activations"])
    zero2 = estimate_memory(sizes, _full_shape(safeguard="one_pass", engine="zero2", num_processes=2), memo).components
    row = 2 * p // 2
    assert zero2["safeguard"] == max(2 * -(-row // 4), 2 * row + -(-row // 4) - zero2["activations"])
    for engine in ("fsdp2", "zero3"):
        shape = _full_shape(safeguard="one_pass", engine=engine, num_processes=2)
        sharded = estimate_memory(sizes, shape, memo).components
        row = 4 * p // 2
        assert sharded["safeguard"] == max(2 * -(-row // 4), 2 * row + -(-row // 4) - sharded["activations"])


def test_lora_trained_parameters_equal_peft_count() -> None:
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    peft_model = get_peft_model(tiny_unet(), LoraConfig(r=4, lora_alpha=4, target_modules=list(targets)))
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    estimate = estimate_memory(model_sizes(TINY), _full_shape(lora_rank=4, lora_targets=targets))
    assert estimate.parameters["trained"] == trained
    assert estimate.components["reference"] == 0


def test_quantized_base_bytes_match_optimum_quanto() -> None:
    """The int8 base's weight bytes against the storage of the UNet optimum-quanto quantizes (its linear layers, as
    ``--base_quantization quanto-int8`` does), within 2 %."""
    from optimum.quanto import freeze, qint8, quantize

    unet = tiny_unet()
    linears = [name for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)]
    quantize(unet, weights=qint8, include=linears)
    freeze(unet)
    stored = 0
    for tensor in unet.state_dict().values():
        stored += tensor.numel() * tensor.element_size()
    shape = _full_shape(lora_rank=4, base_quantization="quanto-int8", dtype_bytes=4)
    with_lora = estimate_memory(model_sizes(TINY), shape)
    adapters = 4 * with_lora.parameters["trained"]
    assert with_lora.components["weights"] - adapters == pytest.approx(stored, rel=0.02)


def test_unet_activations_on_meta_equal_a_real_forwards_saved_tensors() -> None:
    """The meta-device count against the tensors a real CPU forward of the loaded UNet saves (real attention kernel,
    each storage counted once by its address)."""
    unet = tiny_unet()
    parameters = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    rows, latent, tokens = 4, 8, 77
    sample = torch.randn(rows, unet.config.in_channels, latent, latent)
    text = torch.randn(rows, tokens, unet.config.cross_attention_dim)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(sample, torch.full((rows,), 500), text)
    measured = sum(seen.values())
    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(unet.config)
    counted = unet_activation_bytes(meta, rows, latent, tokens, torch.float32, checkpointing=False)
    assert counted == pytest.approx(measured, rel=0.05)
    checkpointed = unet_activation_bytes(meta, rows, latent, tokens, torch.float32, checkpointing=True)
    assert checkpointed < counted


def test_unknown_hub_model_is_refused_naming_the_flag(capsys) -> None:
    with pytest.raises(SystemExit):
        run_estimate_memory(["--model_name_or_path", "someone/unknown-model", "--json"])
    err = capsys.readouterr().err
    assert "--model_name_or_path someone/unknown-model" in err and "hf download" in err


# the card verdict: an independent computation of the usable memory (90 % of the card's GB) and its margin
def usable_gib(gb: float) -> float:
    return 0.9 * gb * 1e9 / GIB


QWEN_4BIT = ("--config", str(ROOT / "examples/configs/qwen_image_lora.yaml"), "--base_quantization", "quanto-int4")


# Qwen-Image has no GPU measurement: its verdict plans with the largest error measured on another family (a bf16 or
# 8-bit base; tests/memory/test_measured_error.py recomputes it from the result file)
QWEN_RATIO = max(row.ratio for row in MEASURED_ERRORS if not row.bitsandbytes)


@pytest.mark.parametrize("gpu", [24, 8])
def test_gpu_flag_says_whether_the_run_fits_with_the_margin(capsys, gpu: int) -> None:
    result = estimate_json(capsys, *QWEN_4BIT, "--cache_latents", "true", "--gpu", str(gpu))
    planned = QWEN_RATIO * sum(result["components_bytes"].values()) / GIB
    assert result["gpu_gb"] == gpu
    assert result["margin_gib"] == pytest.approx(usable_gib(gpu) - planned, abs=1e-3)
    # 14.3 GiB planned at 18.4: fits 24 GB, not 8
    assert result["fits"] is (usable_gib(gpu) >= planned) and result["fits"] is (gpu == 24)


def test_without_gpu_the_smallest_card_that_fits_is_named(capsys) -> None:
    for extra in (("--cache_latents", "true"), ("--cache_latents", "false")):
        result = estimate_json(capsys, *QWEN_4BIT, *extra)
        planned = QWEN_RATIO * sum(result["components_bytes"].values()) / GIB
        smallest = next(gb for gb in (24, 48, 80, 141) if planned <= usable_gib(gb))
        assert (result["gpu_gb"], result["fits"]) == (smallest, True)
        assert result["margin_gib"] == pytest.approx(usable_gib(smallest) - planned, abs=1e-3)
    too_big = estimate_json(capsys, "--config", str(ROOT / "examples/configs/flux2_lora.yaml"), "--use_peft", "false")
    assert too_big["fits"] is False and too_big["margin_gib"] < 0 and too_big["gpu_gb"] == 141


def test_human_output_states_the_verdict_in_one_line(capsys) -> None:
    assert run_estimate_memory([*QWEN_4BIT, "--cache_latents", "true", "--gpu", "24"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    verdicts = [line for line in lines if "GB GPU" in line]
    assert verdicts == [lines[-1]] and lines[-1].startswith("Fits a 24 GB GPU: ")
    assert run_estimate_memory([*QWEN_4BIT, "--cache_latents", "false", "--gpu", "24"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("Does not fit a 24 GB GPU: ")
    assert run_estimate_memory([*QWEN_4BIT, "--cache_latents", "false"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("Fits a 48 GB GPU (the smallest of ")


def test_the_help_prints():
    """``estimate-memory --help`` formats every option's help (a bare ``%`` in a help string breaks argparse)."""
    import contextlib
    import io

    from trl_diffusion_sdpo.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["estimate-memory", "--help"])
    assert "--gpu" in out.getvalue() and "% free" in out.getvalue()


@pytest.mark.parametrize(
    "sizes,elements,most,expected",
    [
        ([5, 5, 5, 5], 5, 16, [0, 1, 2, 3, 4]),  # a piece per weight
        ([5, 5, 5, 5], 10, 16, [0, 2, 4]),
        ([5, 5, 5, 5], 1, 2, [0, 2, 4]),  # at most `most`
        ([10, 1, 1, 1], 1, 2, [0, 1, 4]),  # a weight is never cut
        ([3], 1, 16, [0, 1]),
        ([2**20] * 8, 2**26, 16, [0, 8]),  # under PIECE_ELEMENTS: one piece
    ],
)
def test_the_one_pass_pieces_cut_consecutive_weights_into_similar_sizes(monkeypatch, sizes, elements, most, expected):
    from trl_diffusion_sdpo.engines.memory import pieces

    monkeypatch.setattr(pieces, "PIECE_ELEMENTS", elements)
    monkeypatch.setattr(pieces, "MAX_PIECES", most)
    assert pieces.piece_bounds(sizes) == expected
    assert len(expected) - 1 <= pieces.piece_count(sum(sizes))
