"""Tiny reward-model folders for the evaluation tests, built from configs and saved the way the real ones are."""

from __future__ import annotations

import os

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from trl_diffusion_sdpo.testing import write_char_tokenizer

try:
    from transformers import CLIPImageProcessorPil as ImageProcessor
except ImportError:  # transformers 4.x
    from transformers import CLIPImageProcessor as ImageProcessor

TEXT_LENGTH = 16


def clip_config(
    vocab_size: int,
    eos: int,
    projection_dim: int = 24,
    image_size: int = 32,
    hidden: int = 32,
    patch: int = 8,
    max_positions: int = TEXT_LENGTH,
) -> CLIPConfig:
    return CLIPConfig(
        projection_dim=projection_dim,
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=max_positions,
            hidden_act="gelu",
            eos_token_id=eos,
            bos_token_id=eos - 1,
            pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            hidden_act="gelu",
        ),
    )


def save_clip_processor(directory: str, image_size: int = 32) -> CLIPProcessor:
    tokenizer = write_char_tokenizer(os.path.join(directory, "tok"), max_length=TEXT_LENGTH)
    image_processor = ImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(directory)
    return processor


def save_tiny_clip(directory: str, projection_dim: int = 24, seed: int = 0) -> str:
    """A random CLIPModel plus processor in ``directory`` (safetensors, config, tokenizer, image processor)."""
    processor = save_clip_processor(directory)
    torch.manual_seed(seed)
    tokenizer = processor.tokenizer
    model = CLIPModel(clip_config(len(tokenizer), tokenizer.eos_token_id, projection_dim)).eval()
    model.save_pretrained(directory)
    return directory


def coloured_images(n: int, size: int = 40) -> list[Image.Image]:
    """Distinct images: a colour per image with a lighter square in one corner."""
    images = []
    for i in range(n):
        colour = ((60 * i) % 256, (110 + 40 * i) % 256, (200 - 30 * i) % 256)
        image = Image.new("RGB", (size, size + 8 * (i % 2)), colour)
        image.paste((250, 250, 250), (0, 0, size // 3, size // 3))
        images.append(image)
    return images
