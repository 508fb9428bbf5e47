"""Tiny Qwen-Image-Edit pipelines (``QwenImageEditPipeline`` and ``QwenImageEditPlusPipeline``): the tiny Qwen-Image
transformer, VAE and scheduler, a Qwen2.5-VL encoder whose tiny vision tower reads the source images, and a Qwen2-VL
processor (the byte-level Qwen tokenizer with the vision tokens, and Qwen2-VL's image processor from a config).

transformers' ``Qwen2VLProcessor`` cannot be built without torchvision (its constructor checks the video processor's
class, which needs torchvision): where it cannot, the pipelines get :class:`Qwen2VLImageOnlyProcessor`, the same
processor without the video processor. Its images and text go through the same code (``Qwen2VLProcessor.__call__``
with Qwen2-VL's PIL image processor), so prompts encode exactly as with the real one.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from .components import tokenizer_folder
from .flow import build_tiny_qwen_image_pipeline
from .tokenizers import write_qwen_vl_tokenizer

__all__ = [
    "Qwen2VLImageOnlyProcessor",
    "build_tiny_qwen_image_edit_pipeline",
    "build_tiny_qwen_image_edit_plus_pipeline",
    "tiny_qwen2_vl_processor",
]

# The tiny image processor's pixel budget: every condition image (1024^2 for the Edit pipeline, 384^2 for Plus) is
# resized by Qwen2-VL's smart_resize to 84 x 84, 6 x 6 patches of 14 px, 9 tokens after the 2 x 2 merge (the real
# processor allows up to 12.8 MP: 1369 tokens for a 1024^2 image).
_MIN_PIXELS, _MAX_PIXELS = 56 * 56, 84 * 84


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images only: the same image-token expansion and tokenisation, without the video
    processor, whose class check needs torchvision. A stand-in for the tiny pipelines where torchvision is missing."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def tiny_qwen2_vl_processor(tokenizer: Any) -> Qwen2VLProcessor:
    """A Qwen2-VL processor for ``tokenizer``: Qwen2-VL's PIL image processor (14 px patches, 2 x 2 merge, temporal
    patches of 2, at most :data:`_MAX_PIXELS` pixels), in a ``Qwen2VLProcessor`` where torchvision allows it, else in
    :class:`Qwen2VLImageOnlyProcessor`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=_MIN_PIXELS, max_pixels=_MAX_PIXELS)
    try:
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    except (TypeError, ValueError, AttributeError):  # the video processor's class check without torchvision
        return Qwen2VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _edit_components(seed: int, tokenizer_dir: str | None, max_length: int, **options: Any) -> dict[str, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    base_dir = tokenizer_folder(tokenizer_dir)
    base = build_tiny_qwen_image_pipeline(seed=seed, tokenizer_dir=base_dir, max_length=max_length, **options)
    tokenizer = write_qwen_vl_tokenizer(os.path.join(base_dir, "vl-tokenizer"), max_length)
    # Qwen-Image's tiny Qwen2.5-VL, over the larger vocabulary and told its vision tokens' ids (the image
    # placeholders it replaces by the vision tower's features, the vision start its 3D RoPE positions from).
    config = base.text_encoder.config.to_dict()
    config["text_config"]["vocab_size"] = config["vocab_size"] = len(tokenizer)
    for key, token in (
        ("image_token_id", "image_pad"),
        ("video_token_id", "video_pad"),
        ("vision_start_token_id", "vision_start"),
    ):
        config[key] = tokenizer.convert_tokens_to_ids(f"<|{token}|>")
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)).eval()
    return dict(
        scheduler=base.scheduler,
        vae=base.vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=tiny_qwen2_vl_processor(tokenizer),
        transformer=base.transformer,
    )


def build_tiny_qwen_image_edit_pipeline(
    seed: int = 0, tokenizer_dir: str | None = None, max_length: int = 64, **options: Any
):
    """A tiny ``QwenImageEditPipeline``: :func:`build_tiny_qwen_image_pipeline`'s transformer, VAE and scheduler
    (``options`` as there), a tiny Qwen2.5-VL with its vision tower over :func:`write_qwen_vl_tokenizer`'s vocabulary,
    and :func:`tiny_qwen2_vl_processor`."""
    from diffusers import QwenImageEditPipeline

    return QwenImageEditPipeline(**_edit_components(seed, tokenizer_dir, max_length, **options))


def build_tiny_qwen_image_edit_plus_pipeline(
    seed: int = 0, tokenizer_dir: str | None = None, max_length: int = 64, **options: Any
):
    """A tiny ``QwenImageEditPlusPipeline`` (multi-image editing): the components of
    :func:`build_tiny_qwen_image_edit_pipeline`."""
    from diffusers import QwenImageEditPlusPipeline

    return QwenImageEditPlusPipeline(**_edit_components(seed, tokenizer_dir, max_length, **options))
