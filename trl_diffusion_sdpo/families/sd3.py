"""SD3 / SD3.5: an MMDiT transformer conditioned on two CLIP encoders and T5, trained by rectified flow.

Conditioning, as ``StableDiffusion3Pipeline.encode_prompt`` builds it: the penultimate hidden states of CLIP-L and
CLIP-G concatenated on features (768 + 1280), zero-padded to T5's width (4096), then concatenated on the sequence
axis with T5's last hidden state (77 + ``max_sequence_length`` tokens); the pooled projection is both CLIP
encoders' projected text embeddings concatenated (768 + 1280). Without T5 (``text_encoder_3=None``) its tokens are
zeros, as in the pipeline. The transformer takes the timestep on the 0-1000 scale.
"""

from __future__ import annotations

import torch

from .base import PromptEmbeddings, PromptTokenizer
from .flow import FlowMatchingFamily
from .registry import register_family

__all__ = ["StableDiffusion3Family"]


@register_family("stable-diffusion-3", pipelines=("StableDiffusion3Pipeline",))
class StableDiffusion3Family(FlowMatchingFamily):
    """SD3 / SD3.5 (``StableDiffusion3Pipeline`` with an ``SD3Transformer2DModel``), noised as the flow base's
    defaults: logit-normal levels on the scheduler's (statically shifted, 3.0) sigma table."""

    sampled_latents_are_denoiser_latents = True

    transformer_class = "SD3Transformer2DModel"
    required_components = ("text_encoder_3",)
    frozen_components = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")  # text_encoder_3 may be None
    default_max_sequence_length = 77  # diffusers' SD3 LoRA script (the pipeline samples with 256)
    default_learning_rate = 3e-4
    # The one family with a Flow-DPO recipe of its own, which the other flow families' beta borrows.
    beta_source = (
        "flow_grpo's SD3.5 Flow-DPO (scripts/train_sd3_dpo.py, config/dpo.py) on per-sample mean velocity errors"
    )
    learning_rate_source = "the same recipe's LoRA learning rate"

    def prompt_tokenizer(self) -> PromptTokenizer:
        tokenizers = {"input_ids": self.pipeline.tokenizer, "input_ids_2": self.pipeline.tokenizer_2}
        if self.pipeline.text_encoder_3 is not None:
            tokenizers["input_ids_3"] = self.pipeline.tokenizer_3
        return PromptTokenizer(tokenizers, {"input_ids_3": self.max_sequence_length})

    @torch.no_grad()
    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        pipe = self.pipeline
        hidden, pooled = [], []
        for key, encoder in (("input_ids", pipe.text_encoder), ("input_ids_2", pipe.text_encoder_2)):
            out = encoder(tokens[key].to(encoder.device), output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip_hidden = torch.cat(hidden, dim=-1)
        batch = clip_hidden.shape[0]
        if pipe.text_encoder_3 is not None:
            encoder = pipe.text_encoder_3
            t5_hidden = encoder(tokens["input_ids_3"].to(encoder.device), return_dict=True).last_hidden_state
        else:
            width = pipe.transformer.config.joint_attention_dim
            t5_hidden = clip_hidden.new_zeros(batch, self.max_sequence_length, width)
        clip_hidden = torch.nn.functional.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
        sequence = torch.cat([clip_hidden, t5_hidden.to(clip_hidden)], dim=-2)
        return PromptEmbeddings(sequence, torch.cat(pooled, dim=-1))
