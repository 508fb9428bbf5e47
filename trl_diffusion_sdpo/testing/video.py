"""A tiny Wan text-to-video pipeline."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

from .components import flow_scheduler, t5_encoder, tokenizer_folder
from .tokenizers import write_t5_tokenizer


def build_tiny_wan_pipeline(
    seed: int = 0,
    tokenizer_dir: str | None = None,
    max_length: int = 16,
    attention_head_dim: int = 8,
    ffn_dim: int = 32,
) -> WanPipeline:
    """A tiny Wan 2.1-style text-to-video pipeline: a ``WanTransformer3DModel`` (1x2x2 patches, two layers), a UMT5
    encoder, a causal 3D ``AutoencoderKLWan`` (8x spatial, 4x temporal compression, 16 latent channels with Wan's
    per-channel ``latents_mean``/``latents_std``) and a flow-matching scheduler with Wan's static shift.

    Clips have ``4k + 1`` frames (the VAE keeps the first frame and compresses the rest 4x): 5 frames at 16x16
    pixels are latents ``[16, 2, 2, 2]``.

    ``attention_head_dim`` (two heads) and ``ffn_dim`` set the transformer's width: 96 and 768 make its feed-forward
    weights (``192 x 768``) larger than DeepSpeed ZeRO-3's default persistence threshold (1e5 elements)."""
    torch.manual_seed(seed)
    tokenizer = write_t5_tokenizer(tokenizer_folder(tokenizer_dir), max_length)
    text_dim = 32
    text_encoder = t5_encoder(len(tokenizer), text_dim, umt5=True)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=attention_head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=ffn_dim,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=flow_scheduler(shift=3.0),
        transformer=transformer,
    )
