"""Z-Image: a single-stream S3-DiT transformer conditioned on Qwen3, on a FLUX-style VAE, trained by rectified flow.

Followed: diffusers' ``ZImagePipeline`` (``pipelines/z_image/pipeline_z_image.py``, diffusers 0.42) and diffusers'
LoRA script ``examples/dreambooth/train_dreambooth_lora_z_image.py``.

* Text, as ``ZImagePipeline._encode_prompt``: each prompt becomes one user turn of the tokenizer's chat template
  with the generation prompt (``enable_thinking=True``, as the pipeline asks), is padded to ``max_sequence_length``
  tokens (512 in the pipeline), and Qwen3's SECOND-TO-LAST hidden state is kept at the prompt's tokens only. The
  transformer takes a list of variable-length caption features; here they travel zero-padded ``[B, L, D]`` (the
  zero rows are the padding, so the cache and prompt dropout carry one tensor) and are cut back into the list at
  the call.
* Latents: ``(z - shift_factor) * scaling_factor`` from the VAE config (:func:`~.base.scale_latents`), layout
  ``[N, C, h, w]``; the transformer takes a list of ``[C, 1, h, w]`` (a frame axis of one), patchified 2x2 inside.
* The call: the timestep as ``1 - s`` (``(1000 - t) / 1000``: Z-Image's time runs from noise at 0 to data at 1) and
  the prediction NEGATED (the transformer predicts ``x0 - eps``), so the step sees the velocity ``eps - x0`` of the
  other flow families, as the script's ``model_pred = -model_pred`` and ``target = noise - model_input``.
* Noise levels: logit-normal on the scheduler's sigma table, with the shift the pipeline samples with: the static
  ``shift`` of a scheduler without dynamic shifting (Z-Image-Turbo's config: 3.0; its ``mu`` is then ignored), the
  resolution-dependent one (``calculate_shift``) when the scheduler config enables dynamic shifting.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import PromptEmbeddings, PromptTokenizer
from .flow import FlowMatchingFamily
from .registry import register_family

__all__ = ["ZImageFamily", "ZImagePromptTokenizer"]


class ZImagePromptTokenizer(PromptTokenizer):
    """Puts each prompt into the tokenizer's chat template as the pipeline does, then tokenises to
    ``max_sequence_length`` tokens, padded."""

    # Z-Image's pipeline asks for the thinking block (Qwen3's chat template then leaves it open).
    enable_thinking: bool = True

    def __init__(self, tokenizer: Any, max_sequence_length: int) -> None:
        super().__init__({"input_ids": tokenizer}, {"input_ids": max_sequence_length})

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = self.tokenizers["input_ids"]
        chats = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=self.enable_thinking,
            )
            for prompt in prompts
        ]
        return super().__call__(chats)


@register_family("z-image", pipelines=("ZImagePipeline",))
class ZImageFamily(FlowMatchingFamily):
    """Z-Image and Z-Image-Turbo (``ZImagePipeline`` with a ``ZImageTransformer2DModel``)."""

    transformer_class = "ZImageTransformer2DModel"
    # The single-stream blocks' attention (diffusers' Z-Image LoRA script's default targets): no text-stream
    # projections exist to adapt.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    default_learning_rate = 1e-4
    learning_rate_source = "diffusers' Z-Image LoRA example (examples/dreambooth/README_z_image.md, 1e-4)"
    shift_follows_scheduler = True  # the static table of Z-Image-Turbo's scheduler (3.0), else the resolution shift

    @classmethod
    def check_pipeline(cls, pipeline: Any) -> None:
        if pipeline.text_encoder is None or pipeline.tokenizer is None:
            raise ValueError("ZImagePipeline needs its Qwen3 `text_encoder` and `tokenizer` for training")
        if getattr(pipeline.tokenizer, "chat_template", None) is None:
            raise ValueError("ZImagePipeline's tokenizer has no chat template: Z-Image encodes prompts as chat turns")

    # -------------------------------------------------------------------------------------------------- the text

    def prompt_tokenizer(self) -> ZImagePromptTokenizer:
        return ZImagePromptTokenizer(self.pipeline.tokenizer, self.max_sequence_length)

    @torch.no_grad()
    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        """Qwen3's second-to-last hidden state at the prompt's tokens, zeros elsewhere (``[B, L, D]``)."""
        encoder = self.pipeline.text_encoder
        ids = tokens["input_ids"].to(encoder.device)
        mask = ids.ne(self.pipeline.tokenizer.pad_token_id)
        hidden = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return PromptEmbeddings(hidden * mask.unsqueeze(-1).to(hidden.dtype))

    # -------------------------------------------------------------------------------------------- the prediction

    def denoiser_conditioning(
        self, prompt_embeds: PromptEmbeddings, time_ids: torch.Tensor | None
    ) -> dict[str, object]:
        """The caption features as the transformer's list: each row cut to its prompt tokens (non-zero rows)."""
        hidden = prompt_embeds.encoder_hidden_states
        mask = hidden.ne(0).any(dim=-1)
        return {"cap_feats": [row[keep] for row, keep in zip(hidden, mask, strict=True)]}

    def call_denoiser(
        self, model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, object]
    ) -> torch.Tensor:
        frames = list(sample.unsqueeze(2).unbind(dim=0))  # [C, 1, h, w] each
        out = model(frames, (1000 - timestep) / 1000, conditioning["cap_feats"], return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2)
