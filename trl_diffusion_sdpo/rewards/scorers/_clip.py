"""Shared CLIP plumbing for the CLIP-based scorers (PickScore, CLIP score, and the ports of
``trl_diffusion_sdpo_rewards`` that embed with CLIP): loading a `CLIPModel` with its processor, and the L2-normalised
image and text embeddings ``normalize(proj(pooled))`` of transformers' CLIP towers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel

__all__: list[str] = []  # nothing here is imported by users; the package imports its names directly


class CLIPEmbedder:
    """A transformers `CLIPModel` plus processor that returns L2-normalised embeddings in float32."""

    def __init__(
        self,
        model: CLIPModel,
        processor,
        device: torch.device,
        batch_size: int = 16,
    ) -> None:
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor = processor
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        processor: str | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> CLIPEmbedder:
        """Load ``CLIPModel.from_pretrained(model)`` and ``AutoProcessor.from_pretrained(processor or model)``; both
        accept a Hub id or a local folder."""
        clip = CLIPModel.from_pretrained(model, dtype=dtype)
        return cls(clip, AutoProcessor.from_pretrained(processor or model), device or torch.device("cpu"), batch_size)

    @property
    def max_text_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rgb = [image.convert("RGB") for image in images]
        pixels = self.processor.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.model.dtype)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pooled = self.model.vision_model(pixel_values=self.pixel_values(images[start : start + self.batch_size]))
            chunks.append(self.model.visual_projection(pooled.pooler_output).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.processor.tokenizer(
                list(prompts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            ).to(self.device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            chunks.append(self.model.text_projection(pooled.pooler_output).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    def cosine(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each image with its own prompt."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
