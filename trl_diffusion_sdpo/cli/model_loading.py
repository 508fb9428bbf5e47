"""The pipeline that ``train``, ``online`` and ``cache`` load as their parsed arguments name it
(``--model_name_or_path``, ``--dtype``, ``--vae_name_or_path``, the frozen base's quantization), and TRL's LoRA config
with the family's targets. ``estimate-memory`` reads the same quantization from the same arguments
(:func:`base_quantization_for`).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from trl import (
    ModelConfig,
    get_peft_config,
)  # get_peft_config's module loads pandas, datasets and rich: not for --help

from ..data.model_names import check_model_exists as model_exists
from ..engines.collectives import load_pipeline, zero3_init_disabled
from ..families import family_for_pipeline
from ..families.loading import dtype_keyword, resolve_model_name
from ..families.quantization import BaseQuantization, load_quantized_pipeline
from .train_options import DiffusionScriptArguments

__all__ = ["base_quantization_for", "build_pipeline", "check_model_exists", "peft_config_for"]


def _torch_dtype(name: str | None) -> torch.dtype | None:
    """``ModelConfig.dtype`` as a torch dtype; ``None`` or ``"auto"`` loads the checkpoint as diffusers does."""
    if name in (None, "auto"):
        return None
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def base_quantization_for(model_args: ModelConfig, diffusion_args: DiffusionScriptArguments):
    """The frozen base's quantization from ``--base_quantization`` and TRL's bitsandbytes switches."""
    return BaseQuantization.from_arguments(
        diffusion_args.base_quantization,
        load_in_4bit=model_args.load_in_4bit,
        load_in_8bit=model_args.load_in_8bit,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        use_bnb_nested_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
        compute_dtype=_torch_dtype(model_args.dtype),
    )


def build_pipeline(model_args: ModelConfig, diffusion_args: DiffusionScriptArguments):
    """Load the pipeline whole on every process (even under a ZeRO-3 config with ``zero3_init_flag``), its frozen base
    quantized as the arguments say (the text encoders too, unless training reads a latent cache)."""
    check_model_exists(model_args.model_name_or_path)
    quantization = base_quantization_for(model_args, diffusion_args)
    try:  # one line before anything loads (bitsandbytes without a CUDA GPU, a backend not installed)
        quantization.check_usable()
    except ValueError as err:
        raise SystemExit(f"trl-diffusion-sdpo: error: {err}") from None
    dtype = _torch_dtype(model_args.dtype)
    kwargs: dict = {"revision": model_args.model_revision, **dtype_keyword(dtype)}
    if diffusion_args.vae_name_or_path:
        subfolder = diffusion_args.vae_subfolder
        config = f"{subfolder}/config.json" if subfolder else "config.json"
        model_exists(diffusion_args.vae_name_or_path, "--vae_name_or_path", "a VAE folder or Hub id", files=[config])
        with zero3_init_disabled():
            kwargs["vae"] = AutoencoderKL.from_pretrained(
                diffusion_args.vae_name_or_path, subfolder=diffusion_args.vae_subfolder, **dtype_keyword(dtype)
            )
    return load_quantized_pipeline(
        lambda **loading: load_pipeline(model_args.model_name_or_path, **loading),
        resolve_model_name(model_args.model_name_or_path),
        quantization,
        quantize_text_encoders=not diffusion_args.latent_cache,
        **kwargs,
    )


def check_model_exists(name: str) -> None:
    """A ``FileNotFoundError`` in one line where ``--model_name_or_path`` leads to no pipeline: neither a local folder,
    nor in the Hugging Face cache, nor on a Hub that answers (:func:`~..data.model_names.check_model_exists`, which
    every command taking a model asks), before any loading."""
    model_exists(name, "--model_name_or_path")


def peft_config_for(model_args: ModelConfig, pipeline):
    """TRL's ``get_peft_config``, with the family's ``lora_target_modules`` as default targets."""
    peft_config = get_peft_config(model_args)
    if peft_config is None:
        return None
    family = family_for_pipeline(pipeline)  # fails early, naming what the pipeline lacks
    if not model_args.lora_target_modules:
        peft_config.target_modules = set(family.lora_target_modules)
    peft_config.task_type = None  # TRL's default (CAUSAL_LM) names a language-model head
    return peft_config
