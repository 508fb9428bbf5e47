"""Tiny flow-matching image pipelines: SD3, FLUX.1, Qwen-Image and Z-Image transformers."""

from __future__ import annotations

import os
from typing import Any

from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    ZImagePipeline,
)

from .components import (
    BuildArguments,
    clip_text_encoder,
    decoder_text_config,
    flow_scheduler,
    flux_scheduler,
    flux_vae,
    qwen_image_scheduler,
    qwen_image_vae,
    qwen_vl_vision_config,
    rope_axes,
    t5_encoder,
    tiny_vae,
    two_rope_heads,
)
from .tokenizers import write_char_tokenizer, write_qwen_tokenizer, write_t5_tokenizer


def text_components(*encoders: tuple[Any, Any]) -> dict[str, Any]:
    """Text encoders and their tokenizers, in order, under the names a diffusers pipeline takes them:
    ``text_encoder``/``tokenizer``, then ``text_encoder_2``/``tokenizer_2`` and so on."""
    components = {}
    for number, (encoder, tokenizer) in enumerate(encoders, start=1):
        suffix = "" if number == 1 else f"_{number}"
        components[f"text_encoder{suffix}"], components[f"tokenizer{suffix}"] = encoder, tokenizer
    return components


def build_tiny_sd3_pipeline(
    with_t5: bool = True, attention_head_dim: int = 8, **arguments: Any
) -> StableDiffusion3Pipeline:
    """A tiny SD3-style pipeline: MMDiT transformer, two CLIP encoders with projection, a T5 encoder, a 16-channel
    VAE with SD3's latent scale and shift, and a flow-matching scheduler with SD3's static shift 3.0.

    ``attention_head_dim`` (two heads) sets the transformer's width: 96 makes its feed-forward weights larger than
    DeepSpeed ZeRO-3's default persistence threshold, so they really are partitioned. ``arguments``: the
    :class:`~.components.BuildArguments` (``max_length`` 16)."""
    build = BuildArguments.start(arguments, max_length=16)
    base_dir, max_length = build.tokenizer_dir, build.max_length
    tokenizer = write_char_tokenizer(os.path.join(base_dir, "tokenizer"), max_length)
    tokenizer_2 = write_char_tokenizer(os.path.join(base_dir, "tokenizer_2"), max_length, pad_token="!")
    tokenizer_3 = write_t5_tokenizer(os.path.join(base_dir, "tokenizer_3"), max_length) if with_t5 else None
    clip_hidden, joint = 16, 32  # the two CLIP widths add up to the T5 width (SD3: 768 + 1280 padded to 4096)
    latent_channels = 16  # SD3's VAE
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=attention_head_dim,
        num_attention_heads=2,
        joint_attention_dim=joint,
        caption_projection_dim=2 * attention_head_dim,
        pooled_projection_dim=2 * clip_hidden,
        pos_embed_max_size=16,
    )
    vae = tiny_vae((8, 8, 8, 8), latent_channels=latent_channels, scaling_factor=1.5305, shift_factor=0.0609)
    text_encoder = clip_text_encoder(len(tokenizer), clip_hidden, 2, max_length, projection=clip_hidden)
    text_encoder_2 = clip_text_encoder(len(tokenizer_2), clip_hidden, 2, max_length, projection=clip_hidden)
    text_encoder_3 = t5_encoder(len(tokenizer_3), joint) if with_t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=flow_scheduler(shift=3.0),
        vae=vae,
        **text_components((text_encoder, tokenizer), (text_encoder_2, tokenizer_2), (text_encoder_3, tokenizer_3)),
    )


def build_tiny_flux_pipeline(
    guidance_embeds: bool = True,
    attention_head_dim: int = 8,
    axes_dims_rope: tuple[int, int, int] = (2, 2, 4),
    **arguments: Any,
) -> FluxPipeline:
    """A tiny FLUX.1-style pipeline: double- and single-stream transformer (with the guidance embedding of
    FLUX.1-dev, or without it as schnell), CLIP-L (pooled only) and T5 encoders, a VAE without quant convs and
    FLUX's latent scale and shift, and a flow-matching scheduler with dynamic (resolution-dependent) shifting.

    ``attention_head_dim`` (two heads; ``axes_dims_rope`` must sum to it) sets the transformer's width. ``arguments``:
    the :class:`~.components.BuildArguments` (``max_length`` 16)."""
    build = BuildArguments.start(arguments, max_length=16)
    base_dir, max_length = build.tokenizer_dir, build.max_length
    tokenizer = write_char_tokenizer(os.path.join(base_dir, "tokenizer"), max_length)
    tokenizer_2 = write_t5_tokenizer(os.path.join(base_dir, "tokenizer_2"), max_length)
    latent_channels, hidden = 4, 32
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # latents are packed into 2x2 patches
        num_layers=1,
        num_single_layers=1,
        joint_attention_dim=hidden,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        **two_rope_heads(attention_head_dim, axes_dims_rope),
    )
    vae = flux_vae(latent_channels)
    text_encoder = clip_text_encoder(len(tokenizer), 16, 2, max_length)
    text_encoder_2 = t5_encoder(len(tokenizer_2), hidden)
    return FluxPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        **text_components((text_encoder, tokenizer), (text_encoder_2, tokenizer_2)),
        transformer=transformer,
    )


def build_tiny_qwen_image_pipeline(
    guidance_embeds: bool = False,
    attention_head_dim: int = 16,
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6),
    **arguments: Any,
) -> QwenImagePipeline:
    """A tiny Qwen-Image-style pipeline: the double-stream MMDiT transformer with 3-axis RoPE, a Qwen2.5-VL text
    encoder (tiny vision tower included, unused by text-to-image), the Qwen-Image VAE (causal 3D convolutions, a
    temporal axis of one frame, per-channel ``latents_mean``/``latents_std``; 4x spatial downsampling here), and a
    flow-matching scheduler with Qwen-Image's dynamic-shift settings.

    ``attention_head_dim`` (two heads; ``axes_dims_rope`` must sum to it) sets the transformer's width: 96 makes its
    feed-forward weights (``2 * 96 x 4 * 2 * 96``) larger than DeepSpeed ZeRO-3's default persistence threshold.
    ``arguments``: the :class:`~.components.BuildArguments`."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    build = BuildArguments.start(arguments)
    tokenizer = write_qwen_tokenizer(os.path.join(build.tokenizer_dir, "tokenizer"), build.max_length)
    hidden, latent_channels = 16, 4
    text_config = decoder_text_config(len(tokenizer), hidden, tokenizer.pad_token_id)
    text_config["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}  # halves of the 8-wide heads
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=qwen_vl_vision_config(hidden),
        vocab_size=len(tokenizer),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * latent_channels,  # latents are packed into 2x2 patches
        out_channels=latent_channels,
        num_layers=2,
        joint_attention_dim=hidden,
        guidance_embeds=guidance_embeds,
        **two_rope_heads(attention_head_dim, axes_dims_rope),
    )
    vae = qwen_image_vae(
        AutoencoderKLQwenImage, latent_channels, build.seed, dim_mult=[1, 2, 4], temperal_downsample=[False, True]
    )
    return QwenImagePipeline(
        scheduler=qwen_image_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_tiny_z_image_pipeline(
    dim: int = 32, axes_dims: tuple[int, int, int] = (4, 6, 6), **arguments: Any
) -> ZImagePipeline:
    """A tiny Z-Image-style pipeline: the single-stream S3-DiT transformer (noise and caption refiners, 3-axis
    RoPE), a Qwen3 text encoder with a chat-template tokenizer, a FLUX-style VAE with Z-Image's latent scale and
    shift, and a flow-matching scheduler with a static shift of 3.0 (Z-Image-Turbo's scheduler config).

    ``dim`` (two heads; ``axes_dims`` must sum to ``dim / 2``) sets the transformer's width; its feed-forward is
    ``dim x int(8 dim / 3)``, past DeepSpeed ZeRO-3's default persistence threshold (1e5 elements) from ``dim = 224``.
    ``arguments``: the :class:`~.components.BuildArguments`."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    build = BuildArguments.start(arguments)
    tokenizer = write_qwen_tokenizer(os.path.join(build.tokenizer_dir, "tokenizer"), build.max_length)
    hidden, latent_channels = 16, 4
    text_encoder = Qwen3Model(
        Qwen3Config(head_dim=8, **decoder_text_config(len(tokenizer), hidden, tokenizer.pad_token_id))
    ).eval()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=latent_channels,
        dim=dim,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=hidden,
        axes_dims=list(rope_axes(axes_dims, dim // 2, f"dim={dim}, axes_dims={tuple(axes_dims)}")),
        axes_lens=[256, 32, 32],
    )
    vae = flux_vae(latent_channels)
    return ZImagePipeline(
        scheduler=flow_scheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_tiny_flux_kontext_pipeline(seed: int = 0, tokenizer_dir: str | None = None, **options: Any):
    """A tiny FLUX.1 Kontext pipeline: :func:`build_tiny_flux_pipeline`'s components (Kontext's are FLUX.1's) in a
    ``FluxKontextPipeline``; ``options`` as there."""
    from diffusers import FluxKontextPipeline

    flux = build_tiny_flux_pipeline(seed=seed, tokenizer_dir=tokenizer_dir, **options)
    names = FluxKontextPipeline._get_signature_keys(FluxKontextPipeline)[0]
    return FluxKontextPipeline(**{name: value for name, value in flux.components.items() if name in names})
