"""Tiny Stable Diffusion 1.x and SDXL pipelines (UNet denoisers)."""

from __future__ import annotations

import os

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from .components import clip_text_encoder, ddpm_scheduler, tiny_vae, tokenizer_folder
from .tokenizers import write_char_tokenizer


def build_tiny_sd_pipeline(
    seed: int = 0,
    unet_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    prediction_type: str = "epsilon",
    tokenizer_dir: str | None = None,
    max_length: int = 32,
) -> StableDiffusionPipeline:
    """A tiny SD-1.x-style pipeline (8x downsampling VAE, so ``resolution`` must be a multiple of 8)."""
    torch.manual_seed(seed)
    tokenizer = write_char_tokenizer(tokenizer_folder(tokenizer_dir), max_length)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(unet_channels) - 1),
        up_block_types=("UpBlock2D",) * (len(unet_channels) - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = tiny_vae((8, 8, 8, 8))
    text_encoder = clip_text_encoder(len(tokenizer), cross_attention_dim, 2, max_length)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddpm_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(
    seed: int = 0, prediction_type: str = "epsilon", tokenizer_dir: str | None = None, max_length: int = 32
) -> StableDiffusionXLPipeline:
    """A tiny SDXL-style pipeline: two text encoders, pooled text embeds and time-id micro-conditioning."""
    torch.manual_seed(seed)
    base_dir = tokenizer_folder(tokenizer_dir)
    tokenizer = write_char_tokenizer(os.path.join(base_dir, "tokenizer"), max_length)
    # SDXL's second tokenizer pads with "!" instead of the end token: the two id tensors differ, as in the real model.
    tokenizer_2 = write_char_tokenizer(os.path.join(base_dir, "tokenizer_2"), max_length, pad_token="!")
    hidden_1, hidden_2, projection = 16, 16, 16
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden_1 + hidden_2,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=projection + 6 * 8,
        norm_num_groups=8,
    )
    vae = tiny_vae((8, 8, 8, 8), force_upcast=True)
    text_encoder = clip_text_encoder(len(tokenizer), hidden_1, 2, max_length)
    text_encoder_2 = clip_text_encoder(len(tokenizer_2), hidden_2, 2, max_length, projection=projection)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=ddpm_scheduler(prediction_type),
    )
