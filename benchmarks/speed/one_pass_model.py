"""The model and batch the one-pass benchmarks run on (``one_pass_routes.py``, ``one_pass_layers.py``): a UNet preset
with random weights, one batch of ``2 * pairs`` rows (winners, then losers) and a preference-loss-like cotangent."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402

from benchmarks.harness import SD15_UNET, SMALL_UNET  # noqa: E402

TINY_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}


PRESETS: dict[str, dict[str, Any]] = {"small": SMALL_UNET, "tiny": TINY_UNET, "sd15": SD15_UNET}


def build(preset: str, lora: bool, pairs: int, seed: int = 0, sample_size: int | None = None):
    """The preset's UNet (random weights; ``sample_size`` overrides the latent side), one batch of ``2 * pairs`` rows
    and a target. SD1.5 gets CLIP's 77 prompt tokens, the others 8."""
    config = {**PRESETS[preset], **({"sample_size": sample_size} if sample_size else {})}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config)
    if lora:
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
            )
        )
    unet.train()
    side = config["sample_size"]
    gen = torch.Generator().manual_seed(seed + 1)
    rows = 2 * pairs
    sample = torch.randn(rows, config["in_channels"], side, side, generator=gen)
    timesteps = torch.randint(0, 1000, (pairs,), generator=gen).repeat(2)
    tokens = 77 if preset == "sd15" else 8
    context = torch.randn(pairs, tokens, config["cross_attention_dim"], generator=gen).repeat(2, 1, 1)
    target = torch.randn(rows, config["out_channels"], side, side, generator=gen)
    return unet, (sample, timesteps, context), target


def cotangents(prediction: torch.Tensor, target: torch.Tensor, sign: float | None = None) -> torch.Tensor:
    """A preference-loss-like cotangent per row: a squared-error gradient, of opposite sign on the losers (what the
    DPO loss hands its predictions); ``sign`` for one branch's rows alone (``None``: winners then losers)."""
    rows = prediction.shape[0]
    if sign is None:
        sign = torch.cat([torch.ones(rows // 2), -torch.ones(rows // 2)]).view(-1, 1, 1, 1)
    return (2 * sign * (prediction.detach() - target) / prediction[0].numel()).to(prediction)
