"""Tiny FLUX.2 pipelines: FLUX.2 [dev] (``Flux2Pipeline``: Mistral-3 text encoder, guidance embedding) and FLUX.2
[klein] (``Flux2KleinPipeline``: Qwen3 text encoder, no guidance embedding), on the FLUX.2 VAE with its batch-norm
latent statistics."""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

from .components import BuildArguments, decoder_text_config, flux_scheduler, two_rope_heads
from .tokenizers import write_mistral_tokenizer, write_qwen_tokenizer

__all__ = ["build_tiny_flux2_klein_pipeline", "build_tiny_flux2_pipeline"]

_HIDDEN = 16  # the text encoders' width: the transformer's joint_attention_dim is 3 * 16 (three stacked layers)
_LATENT_CHANNELS = 4  # 16 channels once the VAE's 2x2 patches are folded in, as FLUX.2's 32 become 128


def _transformer(
    guidance_embeds: bool, attention_head_dim: int, axes_dims_rope: tuple[int, int, int, int]
) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * _LATENT_CHANNELS,  # the pipeline's patchified latents: 2x2 patches folded into channels
        num_layers=1,
        num_single_layers=1,
        joint_attention_dim=3 * _HIDDEN,  # three hidden-state layers stacked, as encode_prompt builds them
        timestep_guidance_channels=32,
        guidance_embeds=guidance_embeds,
        **two_rope_heads(attention_head_dim, axes_dims_rope),  # the 4-axis (t, h, w, l) RoPE
    )


def _vae(seed: int) -> AutoencoderKLFlux2:
    """The FLUX.2 VAE narrowed (4x spatial downsampling), with non-trivial batch-norm running statistics so that the
    per-channel normalisation the pipeline applies is visible in every test."""
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=32,
    )
    generator = torch.Generator().manual_seed(seed)
    channels = vae.bn.running_mean.shape[0]
    vae.bn.running_mean.copy_(torch.randn(channels, generator=generator) * 0.3)
    vae.bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    return vae.eval()


def _denoising_components(
    seed: int, guidance_embeds: bool, attention_head_dim: int, axes_dims_rope: tuple[int, int, int, int]
) -> dict[str, object]:
    """What FLUX.2 [dev] and [klein] share beside their text encoders: the dynamic-shift scheduler, the VAE of
    :func:`_vae` and the transformer, built in that order (after the text encoder, as the weights were recorded)."""
    vae = _vae(seed)
    transformer = _transformer(guidance_embeds, attention_head_dim, axes_dims_rope)
    return {"scheduler": flux_scheduler(), "vae": vae, "transformer": transformer}


def build_tiny_flux2_pipeline(
    guidance_embeds: bool = True,
    attention_head_dim: int = 8,
    axes_dims_rope: tuple[int, int, int, int] = (2, 2, 2, 2),
    **arguments: Any,
) -> Flux2Pipeline:
    """A tiny FLUX.2 [dev]-style pipeline: ``Flux2Transformer2DModel`` with the guidance embedding, a
    ``Mistral3ForConditionalGeneration`` text encoder (30 text layers, so the pipeline's hidden-state layers 10, 20
    and 30 exist; a one-layer Pixtral vision tower, unused by text-to-image), a byte-level tokenizer with a
    Mistral-style chat template, the FLUX.2 VAE and a dynamic-shift flow-matching scheduler.

    The released pipeline's ``tokenizer`` is a ``PixtralProcessor``, which transformers builds only with torchvision;
    the pipeline calls nothing of it but ``apply_chat_template``, which the tokenizer has with the same arguments.

    ``attention_head_dim`` (two heads; ``axes_dims_rope`` must sum to it) sets the transformer's width: from 96 its
    SwiGLU input projection (``192 x 2 * 3 * 192``) exceeds DeepSpeed ZeRO-3's default persistence threshold.
    ``arguments``: the :class:`~.components.BuildArguments`."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    build = BuildArguments.start(arguments)
    tokenizer = write_mistral_tokenizer(os.path.join(build.tokenizer_dir, "tokenizer"), build.max_length)
    text_config = decoder_text_config(
        len(tokenizer),
        _HIDDEN,
        tokenizer.pad_token_id,
        model_type="mistral",
        num_hidden_layers=30,
        head_dim=8,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision_config = dict(
        model_type="pixtral",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        image_size=32,
        patch_size=8,
    )
    config = Mistral3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
    )
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    return Flux2Pipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        **_denoising_components(build.seed, guidance_embeds, attention_head_dim, axes_dims_rope),
    )


def build_tiny_flux2_klein_pipeline(
    is_distilled: bool = False,
    attention_head_dim: int = 8,
    axes_dims_rope: tuple[int, int, int, int] = (2, 2, 2, 2),
    **arguments: Any,
) -> Flux2KleinPipeline:
    """A tiny FLUX.2 [klein]-style pipeline: ``Flux2Transformer2DModel`` without the guidance embedding, a
    ``Qwen3ForCausalLM`` text encoder (27 layers, so the pipeline's hidden-state layers 9, 18 and 27 exist) with a
    Qwen3 chat-template tokenizer, the FLUX.2 VAE and a dynamic-shift flow-matching scheduler; ``attention_head_dim``,
    ``axes_dims_rope`` and ``arguments`` as in :func:`build_tiny_flux2_pipeline`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    build = BuildArguments.start(arguments)
    tokenizer = write_qwen_tokenizer(os.path.join(build.tokenizer_dir, "tokenizer"), build.max_length)
    config = decoder_text_config(len(tokenizer), _HIDDEN, tokenizer.pad_token_id, num_hidden_layers=27, head_dim=8)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(**config)).eval()
    return Flux2KleinPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        is_distilled=is_distilled,
        **_denoising_components(build.seed, False, attention_head_dim, axes_dims_rope),
    )
