"""A tiny Qwen-Image 2.1 pipeline (``QwenImage21Pipeline``), and the text-only Qwen3-VL processor it is built with.

The released pipeline's ``processor`` is a ``Qwen3VLProcessor``, which transformers builds only with its video
processor, and that needs torchvision (not installable beside this project's CPU torch). Text-to-image calls nothing
of the processor's image and video sides, so the tiny pipeline takes :class:`TextOnlyQwen3VLProcessor`: a
``Qwen3VLProcessor`` with the tokenizer and chat template alone, whose text path is the real class's own.
"""

from __future__ import annotations

import os
from typing import Any

from diffusers import QwenImage21Pipeline
from transformers import Qwen3VLProcessor

# diffusers' pipeline loader finds a component's load method by looking its base classes up in the component's own
# module: ProcessorMixin is named here so that QwenImage21Pipeline.from_pretrained loads the processor below.
from transformers.processing_utils import ProcessorMixin

from .components import (
    BuildArguments,
    decoder_text_config,
    qwen_image_scheduler,
    qwen_image_vae,
    qwen_vl_vision_config,
    two_rope_heads,
)
from .tokenizers import write_qwen3_vl_tokenizer

__all__ = ["TextOnlyQwen3VLProcessor", "build_tiny_qwen_image21_pipeline"]


class TextOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """A ``Qwen3VLProcessor`` without its image and video processors: the tokenizer, the chat template and the real
    class's text path (``__call__`` on text gives ``input_ids``, ``attention_mask`` and ``mm_token_type_ids``;
    ``apply_chat_template`` renders and tokenises conversations). Images are refused, as there is nothing to
    process them with. Saved and loaded with ``save_pretrained`` / ``from_pretrained`` like any processor."""

    def __init__(self, tokenizer=None, chat_template=None, **kwargs) -> None:
        # Qwen3VLProcessor.__init__ reads these ids from the tokenizer, then demands the image and video processors.
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        for name in ("image_token", "video_token", "vision_start_token", "vision_end_token"):
            setattr(self, f"{name}_id", tokenizer.convert_tokens_to_ids(getattr(self, name)))
        ProcessorMixin.__init__(self, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if images is not None or videos is not None:
            raise ValueError("TextOnlyQwen3VLProcessor has no image or video processor: it encodes text only")
        return super().__call__(text=text, **kwargs)


def build_tiny_qwen_image21_pipeline(
    attention_head_dim: int = 16, axes_dims_rope: tuple[int, int, int] = (4, 6, 6), **arguments: Any
) -> QwenImage21Pipeline:
    """A tiny Qwen-Image 2.1-style pipeline: the single-stream block-causal ``QwenImage21Transformer2DModel`` (two
    heads, 3-axis RoPE, latents unpatched), a ``Qwen3VLForConditionalGeneration`` text encoder (tiny vision tower,
    unused by text-to-image) with :class:`TextOnlyQwen3VLProcessor`, the 2.1 VAE (causal 3D convolutions, RGBA in
    and out, 16x spatial downsampling as the pipeline's fixed ``vae_scale_factor`` says, per-channel
    ``latents_mean``/``latents_std``) and a flow-matching scheduler with Qwen-Image's dynamic-shift settings.

    ``attention_head_dim`` (two heads; ``axes_dims_rope`` must sum to it) sets the transformer's width: 96 makes its
    SwiGLU weights (``192 x 3 * 192``) larger than DeepSpeed ZeRO-3's default persistence threshold. ``arguments``:
    the :class:`~.components.BuildArguments`."""
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    build = BuildArguments.start(arguments)
    tokenizer = write_qwen3_vl_tokenizer(os.path.join(build.tokenizer_dir, "tokenizer"), build.max_length)
    processor = TextOnlyQwen3VLProcessor(tokenizer=tokenizer, chat_template=tokenizer.chat_template)
    hidden, latent_channels = 16, 8
    text_config = decoder_text_config(
        len(tokenizer),
        hidden,
        tokenizer.pad_token_id,
        head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},  # halves of 8
    )
    token_ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{token}|>")
        for name, token in (("image", "image_pad"), ("video", "video_pad"), ("vision_start", "vision_start"))
    }
    config = Qwen3VLConfig(
        text_config=text_config,
        vision_config=qwen_vl_vision_config(
            hidden, patch_size=4, num_position_embeddings=16, deepstack_visual_indexes=[]
        ),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        **token_ids,
    )
    text_encoder = Qwen3VLForConditionalGeneration(config).eval()
    transformer = QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        context_in_dim=hidden,
        **two_rope_heads(attention_head_dim, axes_dims_rope),
    )
    vae = qwen_image_vae(
        AutoencoderKLQwenImage21,
        latent_channels,
        build.seed,
        decoder_base_dim=8,
        dim_mult=[1, 1, 1, 1, 1],  # four downsamplings: 16x
        temperal_downsample=[False, True, True, True],
    )
    return QwenImage21Pipeline(
        scheduler=qwen_image_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        processor=processor,
        transformer=transformer,
    )
