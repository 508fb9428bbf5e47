"""Testing utilities: small diffusion pipelines built from configs, for tests, the CPU demo and CPU benchmarks.

They are real diffusers pipelines (UNet or transformer, VAE, CLIP, T5, UMT5, Qwen2.5-VL, Qwen3-VL, Qwen3 or Mistral-3
text encoders, tokenizers, scheduler), only narrow; their tokenizers are written from small vocabularies
(``tokenizers``), so nothing is downloaded. One module per kind of denoiser; ``components`` holds the parts they share.
:data:`TINY_PIPELINES` names each registered family's builder by the family's registered name.
"""

from collections.abc import Callable

from .flow import (
    build_tiny_flux_kontext_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_qwen_image_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_z_image_pipeline,
)
from .flux2 import build_tiny_flux2_klein_pipeline, build_tiny_flux2_pipeline
from .hunyuan_video15 import build_tiny_hunyuan_video15_pipeline
from .qwen_image21 import TextOnlyQwen3VLProcessor, build_tiny_qwen_image21_pipeline
from .qwen_image_edit import build_tiny_qwen_image_edit_pipeline, build_tiny_qwen_image_edit_plus_pipeline
from .tokenizers import (
    write_char_tokenizer,
    write_mistral_tokenizer,
    write_qwen3_vl_tokenizer,
    write_qwen_tokenizer,
    write_qwen_vl_tokenizer,
    write_t5_tokenizer,
)
from .unet import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline
from .video import build_tiny_wan_pipeline

#: Each registered family's tiny pipeline builder, by the family's registered name
#: (:func:`trl_diffusion_sdpo.families.registry.registered_families`). Every builder takes ``seed`` and
#: ``tokenizer_dir`` (where its tokenizers are written) and ``max_length`` (their token budget) as keywords.
TINY_PIPELINES: dict[str, Callable] = {
    "stable-diffusion": build_tiny_sd_pipeline,
    "stable-diffusion-xl": build_tiny_sdxl_pipeline,
    "stable-diffusion-3": build_tiny_sd3_pipeline,
    "flux": build_tiny_flux_pipeline,
    "flux-kontext": build_tiny_flux_kontext_pipeline,
    "qwen-image": build_tiny_qwen_image_pipeline,
    "qwen-image-edit": build_tiny_qwen_image_edit_pipeline,
    "qwen-image-edit-plus": build_tiny_qwen_image_edit_plus_pipeline,
    "qwen-image-2.1": build_tiny_qwen_image21_pipeline,
    "z-image": build_tiny_z_image_pipeline,
    "wan": build_tiny_wan_pipeline,
    "flux2": build_tiny_flux2_pipeline,
    "flux2-klein": build_tiny_flux2_klein_pipeline,
    "hunyuan-video-1.5": build_tiny_hunyuan_video15_pipeline,
}

__all__ = [
    "TINY_PIPELINES",
    "TextOnlyQwen3VLProcessor",
    "build_tiny_flux2_klein_pipeline",
    "build_tiny_flux2_pipeline",
    "build_tiny_flux_kontext_pipeline",
    "build_tiny_flux_pipeline",
    "build_tiny_hunyuan_video15_pipeline",
    "build_tiny_qwen_image_edit_pipeline",
    "build_tiny_qwen_image_edit_plus_pipeline",
    "build_tiny_qwen_image21_pipeline",
    "build_tiny_qwen_image_pipeline",
    "build_tiny_sd3_pipeline",
    "build_tiny_sd_pipeline",
    "build_tiny_sdxl_pipeline",
    "build_tiny_wan_pipeline",
    "build_tiny_z_image_pipeline",
    "write_char_tokenizer",
    "write_mistral_tokenizer",
    "write_qwen3_vl_tokenizer",
    "write_qwen_tokenizer",
    "write_qwen_vl_tokenizer",
    "write_t5_tokenizer",
]
