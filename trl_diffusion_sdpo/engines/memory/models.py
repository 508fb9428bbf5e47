"""The Hub pipelines ``estimate-memory`` counts without their files (:data:`KNOWN_MODELS`): the shipped configs'
pipelines, each with its family, its denoiser's published config and its frozen parts' published parameter counts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = ["KNOWN_MODELS", "KnownModel"]


@dataclass(frozen=True)
class KnownModel:
    """A Hub pipeline counted without its files: the family, the denoiser's class and its published config (the
    keys that differ from the class's defaults), and the frozen components' published parameter counts."""

    family: str
    denoiser_class: str
    denoiser_config: dict[str, Any]
    frozen: dict[str, int]
    joint_attention: bool = True  # prompt tokens share the denoiser's attention with the latent tokens
    vae_fp32: bool = False  # the family keeps this VAE in float32 (force_upcast)
    patch: int = 16  # pixels per latent token along each side
    frames_per_token: int = 4  # video: frames per latent frame (the VAE's temporal compression)


_SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
_SDXL_UNET = {
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
_SD3_MEDIUM = {
    "num_layers": 24,
    "num_attention_heads": 24,
    "caption_projection_dim": 1536,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
_FLUX2_KLEIN_4B = {
    "joint_attention_dim": 7680,
    "num_attention_heads": 24,
    "num_layers": 5,
    "num_single_layers": 20,
    "guidance_embeds": False,
}
# Published parameter counts of the frozen components (the models' safetensors headers).
_CLIP_L = 123_060_480
_CLIP_L_PROJ = 123_650_304
_CLIP_G_PROJ = 694_659_840
_T5_XXL_ENCODER = 4_762_310_656
_UMT5_XXL_ENCODER = 5_680_910_336
_QWEN25_VL_7B = 8_292_166_656
_QWEN3_4B = 4_022_468_096
_MISTRAL_SMALL_31 = 24_011_361_280
_SD_VAE = 83_653_863
_FLUX_VAE = 83_819_683
_FLUX2_VAE = 84_046_115
_WAN_VAE = 126_892_531
_HUNYUAN15_VAE = 253_956_003
_BYT5_SMALL_ENCODER = 218_640_000

_FLUX1 = KnownModel(
    "flux",
    "FluxTransformer2DModel",
    {"guidance_embeds": True},
    {"vae": _FLUX_VAE, "text_encoder": _CLIP_L, "text_encoder_2": _T5_XXL_ENCODER},
)
_QWEN_IMAGE = KnownModel(
    "qwen-image", "QwenImageTransformer2DModel", {}, {"vae": _WAN_VAE, "text_encoder": _QWEN25_VL_7B}
)
_FLUX2_KLEIN = KnownModel(
    "flux2-klein", "Flux2Transformer2DModel", _FLUX2_KLEIN_4B, {"vae": _FLUX2_VAE, "text_encoder": _QWEN3_4B}
)
_SD3 = KnownModel(
    "stable-diffusion-3",
    "SD3Transformer2DModel",
    _SD3_MEDIUM,
    {
        "vae": _FLUX_VAE,
        "text_encoder": _CLIP_L_PROJ,
        "text_encoder_2": _CLIP_G_PROJ,
        "text_encoder_3": _T5_XXL_ENCODER,
    },
)
_SDXL = KnownModel(
    "stable-diffusion-xl",
    "UNet2DConditionModel",
    _SDXL_UNET,
    {"vae": _SD_VAE, "text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G_PROJ},
    joint_attention=False,
    vae_fp32=True,
)
_SD15 = KnownModel(
    "stable-diffusion",
    "UNet2DConditionModel",
    _SD15_UNET,
    {"vae": _SD_VAE, "text_encoder": _CLIP_L},
    joint_attention=False,
)
# The pipelines the shipped configs (examples/configs) name. Denoisers: the class defaults of diffusers 0.42 are
# FLUX.1 [dev], FLUX.2 [dev], Qwen-Image, Z-Image, Wan 14B and HunyuanVideo 1.5's published configs; the others list
# what differs. Qwen-Image 2.1 and the Qwen-Image-Edit models share Qwen-Image's transformer.
KNOWN_MODELS: dict[str, KnownModel] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _SD15,
    "stabilityai/stable-diffusion-xl-base-1.0": _SDXL,
    "stabilityai/stable-diffusion-3.5-medium": _SD3,
    "black-forest-labs/FLUX.1-dev": _FLUX1,
    "black-forest-labs/FLUX.1-Kontext-dev": replace(_FLUX1, family="flux-kontext"),
    "black-forest-labs/FLUX.2-dev": KnownModel(
        "flux2", "Flux2Transformer2DModel", {}, {"vae": _FLUX2_VAE, "text_encoder": _MISTRAL_SMALL_31}
    ),
    "black-forest-labs/FLUX.2-klein-base-4B": _FLUX2_KLEIN,
    "black-forest-labs/FLUX.2-klein-4B": _FLUX2_KLEIN,
    "Qwen/Qwen-Image": _QWEN_IMAGE,
    "Qwen/Qwen-Image-2.1": replace(_QWEN_IMAGE, family="qwen-image-2.1"),
    "Qwen/Qwen-Image-Edit": replace(_QWEN_IMAGE, family="qwen-image-edit"),
    "Qwen/Qwen-Image-Edit-2509": replace(_QWEN_IMAGE, family="qwen-image-edit-plus"),
    "Tongyi-MAI/Z-Image-Turbo": KnownModel(
        "z-image", "ZImageTransformer2DModel", {}, {"vae": _FLUX_VAE, "text_encoder": _QWEN3_4B}
    ),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": KnownModel(
        "wan", "WanTransformer3DModel", {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
        {"vae": _WAN_VAE, "text_encoder": _UMT5_XXL_ENCODER}, joint_attention=False,
    ),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": KnownModel(
        "wan", "WanTransformer3DModel", {}, {"vae": _WAN_VAE, "text_encoder": _UMT5_XXL_ENCODER},
        joint_attention=False,
    ),
    "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v": KnownModel(
        "hunyuan-video-1.5", "HunyuanVideo15Transformer3DModel", {"task_type": "t2v"},
        {"vae": _HUNYUAN15_VAE, "text_encoder": _QWEN25_VL_7B, "text_encoder_2": _BYT5_SMALL_ENCODER},
    ),
}  # fmt: skip
