"""Real-size models the package ships no weights for, built from their published configs with random weights, for the
GPU matrix (``speed/gpu_matrix.py``): FLUX.2 [klein] 4B (transformer, Qwen3-4B text encoder, VAE), and a denoiser's
quantization through the package's own route (:func:`quantize_denoiser`: torchao, quanto, bitsandbytes). The SD1.5
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


# --base: the frozen denoiser quantized as the package quantizes a base (families/quantization.py): torchao and quanto
# once built (``quantize_linear_layers``, linear layers only), bitsandbytes while loading (its layers quantize as they
# land on the GPU), from the random weights saved once as safetensors and loaded back through diffusers' config.
QUANTIZED_BASES = ("none", "torchao-int8", "quanto-int8", "bnb-nf4", "bnb-int8")


def quantize_denoiser(pipeline, base: str, workdir: str | None = None) -> None:
    """The pipeline's denoiser (its ``unet`` or ``transformer``) quantized with ``base``'s backend: in place, or (for
    bitsandbytes, on a CUDA GPU) saved to ``workdir`` in bf16 and loaded back quantized into the pipeline."""
    from trl_diffusion_sdpo.families.quantization import BaseQuantization, quantize_linear_layers

    if base not in QUANTIZED_BASES or base == "none":
        raise ValueError(f"unknown --base {base!r}")
    name = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"
    denoiser = getattr(pipeline, name)
    quantization = BaseQuantization(base, compute_dtype=torch.bfloat16)
    if quantization.backend != "bnb":
        quantize_linear_layers(denoiser, quantization)
        return
    quantization.check_usable()  # a CUDA GPU and the bitsandbytes package, else a ValueError saying so
    folder = os.path.join(workdir or ".", f"{name}-bf16")
    denoiser.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    del denoiser  # the pipeline's reference goes when the loaded one replaces it
    loaded = _denoiser_class(folder).from_pretrained(
        folder, quantization_config=quantization.config("diffusers"), torch_dtype=torch.bfloat16, device_map="cuda"
    )
    pipeline.register_modules(**{name: loaded})
    torch.cuda.empty_cache()


def _denoiser_class(folder: str):
    """The diffusers class a saved denoiser's config names."""
    import json

    import diffusers

    with open(os.path.join(folder, "config.json")) as config:
        return getattr(diffusers, json.load(config)["_class_name"])
