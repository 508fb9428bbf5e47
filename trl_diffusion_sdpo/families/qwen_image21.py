"""Qwen-Image 2.1: a single-stream block-causal transformer conditioned on Qwen3-VL, on the 2.1 VAE (RGBA, 16x),
trained by rectified flow. What is the same as Qwen-Image (the template's prefix dropped from the last hidden state,
zero-padded prompts whose zero rows are the padding, the VAE's frame axis, per-channel latent statistics) comes from
:class:`~.qwen_image.QwenImageFamily`; this module states what differs.

Followed: diffusers' ``QwenImage21Pipeline`` (``pipelines/qwenimage21/pipeline_qwenimage21.py``) and its transformer
``QwenImage21Transformer2DModel`` (``models/transformers/transformer_qwenimage21.py``), diffusers 0.42. diffusers ships
no training script for it.

* Text, as ``QwenImage21Pipeline._get_qwen_prompt_embeds`` for text-to-image: each prompt (an empty one read as one
  space: Qwen has no BOS token) is put into the pipeline's ``prompt_template_t2i`` (a system turn, "Comprehend and
  analyze the provided prompt.", then the prompt as the user turn), tokenised with the processor's tokenizer with
  LEFT padding (the side the pipeline pads on), and run through Qwen3-VL with its attention mask; the last decoder
  layer's output is kept BEFORE the text model's final norm (the pipeline neutralises the norm with a forward hook for
  the call, and so does this family), without the system turn's ``_drop_idx`` tokens. At most
  ``max_sequence_length`` tokens remain (the pipeline cuts none; a longer prompt is cut here), zero-padded.
* Latents: the VAE reads RGBA: the training images, RGB, get an opaque alpha channel (1 in [-1, 1]), as the pipeline
  converts its condition images to RGBA before ``image_processor.preprocess``. The VAE is 3D (frame axis added at
  encoding and dropped again) and compresses 16x; latents are normalised per channel, ``(z - latents_mean) /
  latents_std``, as ``_encode_vae_image`` and the inverse before decoding.
* The call: latents unpatched, one token per latent position (``QwenImage21Pipeline._pack_latents``: ``[N, h w,
  C]``), ``img_shapes = [(1, h, w)]`` per sample, the vision-slot mask ``img_mask`` of the pipeline's text-to-image
  call (no slot over the prompt, then one per 2x2 group of target latents), the timestep as ``s = t / 1000``, and the
  prediction's last ``h w`` tokens (the transformer returns the whole text-and-image sequence) unpacked again. No
  guidance embedding: 2.1 guides with ``true_cfg_scale`` only.
* The prompt's length matters to the transformer: the image's RoPE frame index is the length of the text before it,
  padding included, and the samples of a call share one layout. The pipeline pads a batch of prompts to its longest;
  so does the call (the padding columns no prompt of the call uses are dropped), one transformer call as for every
  family, so a call reproduces the pipeline's call on the same prompts. A pair's images share their prompt: with one
  pair per device (the shipped config) every call is the pipeline's single-prompt call. With several pairs of prompts
  of different token lengths (or prompt dropout's empty prompt) a shorter prompt's image sees the longest one's
  frame index, so its prediction depends on the other pairs of its micro-batch (of its process, under DDP), as in the
  pipeline's batched sampling. One call per length would avoid that but make the number of forward passes depend on
  the data, which the sharded engines' collectives forbid (a hang).
* Noise levels: logit-normal with the shift the pipeline samples with: ``calculate_shift`` of the ``h w`` latent
  positions (not ``(h/2)(w/2)`` patches as Qwen-Image) over the scheduler config when it enables dynamic shifting,
  else the scheduler's static table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .base import PromptEmbeddings
from .qwen_image import QwenImageFamily, QwenImagePromptTokenizer, prompt_mask
from .registry import register_family

__all__ = ["QwenImage21Family", "QwenImage21PromptTokenizer"]


class QwenImage21PromptTokenizer(QwenImagePromptTokenizer):
    """Qwen-Image's template tokenisation with 2.1's differences: left padding, and an empty prompt read as a space."""

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = self.tokenizers["input_ids"]
        inputs = tokenizer(
            [self.template.format(prompt or " ") for prompt in prompts],
            padding="max_length",
            padding_side="left",
            max_length=self.max_lengths["input_ids"],
            truncation=True,
            return_tensors="pt",
        )
        return {"input_ids": inputs.input_ids}


@contextlib.contextmanager
def final_norm_skipped(text_encoder: torch.nn.Module) -> Iterator[None]:
    """Within the block, the text model's final norm returns its input, as ``QwenImage21Pipeline`` hooks it: the
    last hidden state is then the last decoder layer's output, which the transformer was trained on (transformers 5
    ties ``hidden_states[-1]`` to the normalised ``last_hidden_state``)."""
    model = text_encoder.model
    text_model = getattr(model, "language_model", model)
    handle = text_model.norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        yield
    finally:
        handle.remove()


@register_family("qwen-image-2.1", pipelines=("QwenImage21Pipeline",))
class QwenImage21Family(QwenImageFamily):
    """Qwen-Image 2.1 text-to-image (``QwenImage21Pipeline`` with a ``QwenImage21Transformer2DModel``)."""

    transformer_class = "QwenImage21Transformer2DModel"
    required_components = ("text_encoder", "processor")
    # The single-stream blocks' attention: one set of projections for text and image tokens.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    # One vision slot of the pipeline stands for 2x2 latent positions (its sizes are multiples of 32 px), but the
    # transformer's tokens are single latent positions, which calculate_shift counts.
    latent_patch_size = 2
    token_patch_size = 1
    default_flow_shift = "scheduler"
    shift_follows_scheduler = True
    default_guidance_scale = None  # no guidance embedding
    # The transformer's RoPE table has 8192 text positions and the image's frame index is the prompt's length.
    max_prompt_tokens = 8191
    default_learning_rate = 1e-4
    learning_rate_source = (
        "SimpleTuner's Qwen-Image 2.1 LoRA (huggingface.co/SimpleTuner/Qwen-Image-2.1-training-assistant-v2: 1e-4); "
        "diffusers ships no 2.1 training script"
    )

    @classmethod
    def check_pipeline(cls, pipeline: Any) -> None:
        if pipeline.text_encoder is None or pipeline.processor is None:
            raise ValueError("QwenImage21Pipeline needs its Qwen3-VL `text_encoder` and `processor` for training")

    # -------------------------------------------------------------------------------------------------- the text

    @property
    def _template_start(self) -> int:
        return int(self.pipeline._drop_idx)  # the system turn's length, read by the pipeline from its processor

    @property
    def pad_token_id(self) -> int:
        return self.pipeline.processor.tokenizer.pad_token_id

    def prompt_tokenizer(self) -> QwenImage21PromptTokenizer:
        return QwenImage21PromptTokenizer(
            self.pipeline.processor.tokenizer,
            self.pipeline.prompt_template_t2i,
            self._template_start,
            self.max_sequence_length,
        )

    def _last_hidden_state(
        self, ids: torch.Tensor, attention_mask: torch.Tensor, vision: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        with final_norm_skipped(self.pipeline.text_encoder):
            return super()._last_hidden_state(ids, attention_mask, vision)

    # ------------------------------------------------------------------------------------------------ the images

    def _posterior(self, pixel_values: torch.Tensor):
        """The posterior of RGB images made opaque RGBA when the VAE reads four channels (the released one does)."""
        if self.vae.config.in_channels == 4 and pixel_values.shape[1] == 3:
            pixel_values = torch.cat([pixel_values, torch.ones_like(pixel_values[:, :1])], dim=1)
        return super()._posterior(pixel_values)

    # -------------------------------------------------------------------------------------------- the prediction

    def denoiser_conditioning(
        self, prompt_embeds: PromptEmbeddings, time_ids: torch.Tensor | None
    ) -> dict[str, object]:
        """The sequence cut to the call's longest prompt (the pipeline pads a batch to it) and its mask (``None`` when
        no prompt is padded, as the pipeline passes it)."""
        hidden = prompt_embeds.encoder_hidden_states
        mask = prompt_mask(hidden)
        length = int(mask.sum(dim=1).max())  # the rows are prompt tokens first, then zeros
        hidden, mask = hidden[:, :length], mask[:, :length]
        return {"encoder_hidden_states": hidden, "encoder_hidden_states_mask": None if bool(mask.all()) else mask}

    def call_denoiser(
        self, model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, object]
    ) -> torch.Tensor:
        from diffusers import QwenImage21Pipeline  # the pipeline module is slow to import: only when the model runs

        n, channels, height, width = sample.shape
        if height % 2 or width % 2:
            raise ValueError(
                f"{self.name} takes latents of even height and width (a vision slot covers 2x2), got {height}x{width}"
            )
        tokens, text = height * width, conditioning["encoder_hidden_states"].shape[1]
        # No slot over the prompt (text-to-image), then one per 2x2 group of target latents.
        img_mask = torch.ones(n, text + tokens // 4, dtype=torch.bool, device=sample.device)
        img_mask[:, :text] = False
        out = model(
            hidden_states=QwenImage21Pipeline._pack_latents(sample, n, channels, height, width),
            timestep=timestep / 1000,
            img_shapes=[[(1, height, width)]] * n,
            img_mask=img_mask,
            **conditioning,
            return_dict=False,
        )[0]
        # the target's tokens, [N, h w, C], back to [N, C, h, w] (QwenImage21Pipeline._unpack_latents, no frame axis)
        return out[:, -tokens:].transpose(1, 2).reshape(n, channels, height, width)
