"""SD 1.x / 2.x: one CLIP text encoder, ``encoder_hidden_states = last_hidden_state``."""

from __future__ import annotations

import torch

from .base import ModelFamily, PromptEmbeddings, PromptTokenizer

__all__ = ["StableDiffusionFamily"]


class StableDiffusionFamily(ModelFamily):
    """SD 1.x / 2.x: one CLIP text encoder, last hidden state as cross-attention context."""

    name = "stable-diffusion"

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.pipeline.vae, "text_encoder": self.pipeline.text_encoder}

    def prompt_tokenizer(self) -> PromptTokenizer:
        return PromptTokenizer({"input_ids": self.pipeline.tokenizer})

    @torch.no_grad()
    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        encoder = self.pipeline.text_encoder
        hidden = encoder(tokens["input_ids"].to(encoder.device), return_dict=True).last_hidden_state
        return PromptEmbeddings(hidden)
