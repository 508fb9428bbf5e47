"""Real-size models the package ships no weights for, built from their published configs with random weights, for the
GPU matrix (``speed/gpu_matrix.py``): FLUX.2 [klein] 4B (transformer, Qwen3-4B text encoder, VAE), and the weight-only
int8 quantization of a denoiser that diffusers' ``TorchAoConfig`` / ``QuantoConfig`` apply while loading. The SD1.5
and SDXL configs are the harness's (``benchmarks/harness.py``, ``build_pipeline``)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

# black-forest-labs/FLUX.2-klein-4B, transformer/config.json (model-defining keys).
FLUX2_KLEIN_4B_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [32, 32, 32, 32],
    "guidance_embeds": False,
    "in_channels": 128,
    "joint_attention_dim": 7680,
    "mlp_ratio": 3.0,
    "num_attention_heads": 24,
    "num_layers": 5,
    "num_single_layers": 20,
    "out_channels": None,
    "patch_size": 1,
    "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}
# black-forest-labs/FLUX.2-klein-4B, text_encoder/config.json (Qwen3-4B; model-defining keys). The pipeline stacks its
# hidden states 9, 18 and 27: 3 x 2560 = the transformer's joint_attention_dim.
QWEN3_4B: dict[str, Any] = {
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}
# The FLUX.2 VAE (black-forest-labs/FLUX.2-dev vae/config.json, which the [klein] repositories share) is
# AutoencoderKLFlux2's default layout: 8x downsampling to 32 channels, folded into 2x2 patches (128 channels).


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built in ``dtype`` (frozen weights the trainer would cast anyway: no float32 copy of 4B weights)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_flux2_klein(device: str, workdir: str):
    """FLUX.2 [klein] 4B at real size with random weights: the transformer and Qwen3-4B in bf16, the VAE in float32
    (the trainer casts it), the tiny pipelines' byte-level Qwen tokenizer and FLUX.2's scheduler settings."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trl_diffusion_sdpo.testing import write_qwen_tokenizer
    from trl_diffusion_sdpo.testing.components import flux_scheduler

    torch.manual_seed(0)
    tokenizer = write_qwen_tokenizer(os.path.join(workdir, "tokenizer"), 512)
    with torch.device(device):
        with default_dtype(torch.bfloat16):
            config = Qwen3Config(**QWEN3_4B, pad_token_id=tokenizer.pad_token_id)
            text_encoder = Qwen3ForCausalLM(config).eval()
            transformer = Flux2Transformer2DModel.from_config(FLUX2_KLEIN_4B_TRANSFORMER)
        vae = AutoencoderKLFlux2().eval()
    return Flux2KleinPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )


# --base: the weight-only quantization diffusers' TorchAoConfig / QuantoConfig apply while loading, applied here to
# the denoiser built from its config (random weights are never written to disk to be loaded back).
QUANTIZED_BASES = ("none", "torchao-int8", "quanto-int8")


def quantize_denoiser(pipeline, base: str) -> None:
    """The pipeline's denoiser (its ``unet`` or ``transformer``) quantized in place with ``base``'s backend."""
    denoiser = getattr(pipeline, "unet", None) or pipeline.transformer
    if base == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(denoiser, Int8WeightOnlyConfig())
    elif base == "quanto-int8":
        from optimum.quanto import freeze, qint8, quantize

        # nn.Linear only, as diffusers' QuantoConfig converts (a quantized Conv2d cannot follow autocast's cast)
        linears = [name for name, module in denoiser.named_modules() if isinstance(module, torch.nn.Linear)]
        quantize(denoiser, weights=qint8, include=linears)
        freeze(denoiser)
    else:
        raise ValueError(f"unknown --base {base!r}")
