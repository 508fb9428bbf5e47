"""Qwen-Image: a double-stream MMDiT transformer conditioned on Qwen2.5-VL, on the Qwen-Image VAE, trained by
rectified flow.

Followed: diffusers' ``QwenImagePipeline`` (``pipelines/qwenimage/pipeline_qwenimage.py``, diffusers 0.42) and
diffusers' LoRA script ``examples/dreambooth/train_dreambooth_lora_qwen_image.py``.

* Text, as ``QwenImagePipeline._get_qwen_prompt_embeds``: each prompt is put into the pipeline's own template
  (``prompt_template_encode``, a system turn asking to describe the image, then the prompt as the user turn), run
  through Qwen2.5-VL with its attention mask, and the LAST hidden state is kept without the template's first
  ``prompt_template_encode_start_idx`` (34) tokens; at most ``max_sequence_length`` tokens remain, zero-padded, with
  a mask that marks the prompt's tokens (``encoder_hidden_states_mask``). The zero rows ARE the padding: the mask is
  recovered from them at the call (a real hidden state is never exactly zero), so the cache, prompt dropout and
  the step carry one tensor as for the other families.
* Latents: the VAE is 3D (causal convolutions) and takes ``[N, 3, 1, H, W]``; the frame axis is added at encoding
  and dropped again, so the step sees ``[N, C, h, w]``. Normalisation is per channel, ``(z - latents_mean) /
  latents_std`` from the VAE config (:func:`~.base.scale_latents`), as the script and the pipeline's inverse.
* The call: ``(h/2)(w/2)`` packed 2x2 patches (``QwenImagePipeline._pack_latents``), ``img_shapes = [(1, h/2,
  w/2)]`` per sample for the 3-axis RoPE, the timestep as ``s = t / 1000``, the guidance value for a guidance-
  distilled transformer (``guidance_embeds``; the released Qwen-Image has none), and the prediction unpacked again.
* Noise levels: logit-normal with the resolution-dependent shift the pipeline samples with (``calculate_shift`` of
  the ``(h/2)(w/2)`` image tokens between the scheduler config's ``base``/``max_image_seq_len`` and
  ``base``/``max_shift``; 0.5 to 0.9 over 256 to 8192 tokens for Qwen-Image), as for FLUX. The pipeline's terminal
  stretch (``shift_terminal=0.02``) shapes its sampling steps and is not applied to training levels, as in diffusers'
  script (which draws from the unshifted table: ``flow_shift="scheduler"`` reproduces it).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import PromptEmbeddings, PromptTokenizer
from .flow import FlowMatchingFamily
from .registry import pipeline_is, register_family

__all__ = ["QwenImageFamily", "QwenImagePromptTokenizer"]

# QwenImagePipeline's prompt template and the number of its leading tokens dropped from the hidden states: read from
# the pipeline when it has them (a subclass may change them), these otherwise.
_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
_TEMPLATE_START = 34
# The instruction-editing pipelines: Qwen-Image's components plus a Qwen2-VL processor; the class tells them apart.
EDIT_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline")


class QwenImagePromptTokenizer(PromptTokenizer):
    """Formats each prompt into the pipeline's template, then tokenises to ``template_start + max_sequence_length``
    tokens (the template's dropped prefix plus the kept tokens), padded to that length."""

    def __init__(self, tokenizer: Any, template: str, template_start: int, max_sequence_length: int) -> None:
        super().__init__({"input_ids": tokenizer}, {"input_ids": template_start + max_sequence_length})
        self.template = template

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return super().__call__([self.template.format(prompt) for prompt in prompts])


def prompt_mask(hidden: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` True where a row of ``hidden [B, L, D]`` is a prompt token: padding rows are exactly zero."""
    return hidden.ne(0).any(dim=-1)


@register_family("qwen-image", pipelines=("QwenImagePipeline",))
class QwenImageFamily(FlowMatchingFamily):
    """Qwen-Image (``QwenImagePipeline`` with a ``QwenImageTransformer2DModel``); prompts of up to 1024 tokens."""

    transformer_class = "QwenImageTransformer2DModel"
    default_flow_shift = "resolution"
    default_guidance_scale = 1.0  # used only by a guidance-distilled transformer (guidance_embeds=True)
    default_learning_rate = 2e-4
    learning_rate_source = "diffusers' Qwen-Image LoRA example (examples/dreambooth/README_qwen.md, 2e-4)"
    max_prompt_tokens: ClassVar[int] = 1024  # the pipeline's own limit

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        """A ``QwenImageTransformer2DModel`` with a VAE that carries per-channel ``latents_mean`` (the text-to-image
        pipeline; the edit pipelines, whose components are the same, are :mod:`.qwen_image_edit`'s, and the layered
        variant takes image conditioning no family builds)."""
        if not super().matches(pipeline) or pipeline_is(pipeline, *EDIT_PIPELINES):
            return False
        vae = getattr(pipeline, "vae", None)
        return vae is not None and getattr(vae.config, "latents_mean", None) is not None

    @classmethod
    def check_pipeline(cls, pipeline: Any) -> None:
        if pipeline.text_encoder is None or pipeline.tokenizer is None:
            raise ValueError("QwenImagePipeline needs its Qwen2.5-VL `text_encoder` and `tokenizer` for training")
        if getattr(pipeline, "processor", None) is not None:  # the edit pipelines' image processor
            raise ValueError(
                f"{type(pipeline).__name__} conditions on an input image; this family trains text-to-image "
                "Qwen-Image (load the checkpoint as a QwenImagePipeline)"
            )

    # -------------------------------------------------------------------------------------------------- the text

    @property
    def _template_start(self) -> int:
        return int(getattr(self.pipeline, "prompt_template_encode_start_idx", _TEMPLATE_START))

    def prompt_tokenizer(self) -> QwenImagePromptTokenizer:
        template = getattr(self.pipeline, "prompt_template_encode", _TEMPLATE)
        return QwenImagePromptTokenizer(
            self.pipeline.tokenizer, template, self._template_start, self.max_sequence_length
        )

    def _last_hidden_state(
        self, ids: torch.Tensor, attention_mask: torch.Tensor, vision: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The text encoder's last hidden state ``[B, T, D]`` of the tokens ``ids`` (with ``vision``, the edit
        families' image inputs)."""
        encoder = self.pipeline.text_encoder
        return encoder(
            input_ids=ids, attention_mask=attention_mask, output_hidden_states=True, **(vision or {})
        ).hidden_states[-1]

    @torch.no_grad()
    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        """The text encoder's last hidden state of the prompt's tokens after the template's prefix, zero-padded to
        ``max_sequence_length`` (``[B, L, D]``; no pooled projection)."""
        ids = tokens["input_ids"].to(self.pipeline.text_encoder.device)
        attention_mask = ids.ne(self.pad_token_id).long()
        hidden = self._last_hidden_state(ids, attention_mask, self._vision_inputs(tokens))
        start, length = self._template_start, self.prompt_length
        sequence = hidden.new_zeros(hidden.shape[0], length, hidden.shape[-1])
        for row in range(hidden.shape[0]):
            kept = hidden[row][attention_mask[row].bool()][start : start + length]
            sequence[row, : kept.shape[0]] = kept
        return PromptEmbeddings(sequence)

    @property
    def pad_token_id(self) -> int:
        """The id that pads the tokens (the attention mask leaves it out)."""
        return self.pipeline.tokenizer.pad_token_id

    @property
    def prompt_length(self) -> int:
        """The encoded prompt's length: the tokens kept after the template's prefix, zero-padded."""
        return self.max_sequence_length

    def _vision_inputs(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the text encoder reads besides the tokens: nothing for text-to-image (the edit families' images)."""
        return {}

    # ------------------------------------------------------------------------------------------------ the images

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = self.pipeline.vae_scale_factor
        return self.vae.config.z_dim, resolution // factor, resolution // factor

    def _posterior(self, pixel_values: torch.Tensor):
        """The posterior of one-frame videos ``[N, 3, 1, H, W]``, with the frame axis dropped from its moments."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = super()._posterior(pixel_values.unsqueeze(2))
        return DiagonalGaussianDistribution(posterior.parameters.squeeze(2))

    # -------------------------------------------------------------------------------------------- the prediction

    def denoiser_conditioning(
        self, prompt_embeds: PromptEmbeddings, time_ids: torch.Tensor | None
    ) -> dict[str, object]:
        """The sequence and its mask (``None`` when every row is a prompt token, as the pipeline passes it)."""
        hidden = prompt_embeds.encoder_hidden_states
        mask = prompt_mask(hidden)
        return {"encoder_hidden_states": hidden, "encoder_hidden_states_mask": None if bool(mask.all()) else mask}

    def call_denoiser(
        self, model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, object]
    ) -> torch.Tensor:
        from diffusers import QwenImagePipeline  # the pipeline module is slow to import: only when the model runs

        conditioning = dict(conditioning)
        sources = conditioning.pop("source_latents", None)  # an edit family's [N, S, C, h', w']
        n, channels, height, width = sample.shape
        pack = QwenImagePipeline._pack_latents
        tokens, shapes = [pack(sample, n, channels, height, width)], [(1, height // 2, width // 2)]
        # Editing: each source's packed latents after the target's, each listed in img_shapes for the RoPE, as the
        # edit pipelines concatenate them (torch.cat([latents, image_latents], dim=1)).
        for source in [] if sources is None else sources.to(sample.dtype).unbind(1):
            tokens.append(pack(source, n, channels, *source.shape[-2:]))
            shapes.append((1, source.shape[-2] // 2, source.shape[-1] // 2))
        out = model(
            hidden_states=torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0],
            timestep=timestep / 1000,
            guidance=self.guidance(n, sample.device),
            img_shapes=[shapes] * n,
            **conditioning,
            return_dict=False,
        )[0][:, : tokens[0].shape[1]]  # the target's tokens (noise_pred[:, : latents.size(1)])
        # [N, (h/2)(w/2), 4C] back to [N, C, h, w] (QwenImagePipeline._unpack_latents without its frame axis)
        out = out.view(n, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(n, channels, height, width)
