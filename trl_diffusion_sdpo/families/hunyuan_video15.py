"""HunyuanVideo 1.5 text-to-video: a double-stream 3D transformer (``HunyuanVideo15Transformer3DModel``) conditioned
on two text encoders, Qwen2.5-VL and a ByT5 glyph encoder, over the latents of a causal 3D VAE
(``AutoencoderKLHunyuanVideo15``), trained by rectified flow. No pooled projection, no guidance embedding.

Followed: diffusers' ``HunyuanVideo15Pipeline`` (``pipelines/hunyuan_video1_5/pipeline_hunyuan_video1_5.py``,
diffusers 0.42) for everything the model sees, and the transformer's forward
(``models/transformers/transformer_hunyuan_video15.py``) for what its masks do. Read, not copied.

* Text, as ``HunyuanVideo15Pipeline.encode_prompt`` builds it:

  - Qwen2.5-VL (``_get_mllm_prompt_embeds``): each prompt (``" "`` for an empty one) is the user turn after the
    pipeline's system message in the chat template with the generation prompt, padded and cut to
    ``prompt_template_encode_start_idx + max_sequence_length`` tokens (108 + 1000 in the pipeline); the third hidden
    state from the end is kept from position 108 on, with the attention mask from there.
  - ByT5 (``_get_byt5_prompt_embeds``): the quoted spans of the prompt (``extract_glyph_texts``: ``"..."`` or
    ``“...”``, as ``Text "...". ``) tokenised to ``tokenizer_2_max_length`` (256) bytes and encoded with their mask;
    a prompt that quotes nothing gives zeros and an all-zero mask.

  Both sequences travel as one tensor (the cache, prompt dropout and the step carry one): the Qwen rows first
  (``max_sequence_length``), then the ByT5 rows (256), zero-padded to the wider of the two widths, every row past a
  mask set to zero. The transformer never reads a masked row (it zeroes them and masks them out of attention, and its
  token refiner pools and attends over the mask only), so zeroing them changes nothing; the call recovers both masks
  from the zero rows, as Qwen-Image's does (a real hidden state is never exactly zero).
* Latents ``[N, C, F', h, w]`` (``C = 32``) with ``F' = (F - 1) / 4 + 1`` for ``F = 4k + 1`` frames and ``h, w`` the
  pixel size over 16, scaled as the pipeline decodes them: it divides by the VAE config's ``scaling_factor``, so
  ``x0 = z * scaling_factor`` (as its image-to-video sibling encodes the first frame). Clips are encoded one at a
  time (the VAE fails on batches in diffusers 0.42, huggingface/diffusers#13133).
* The call, as the text-to-video pipeline makes it: the latents concatenated with zero condition latents (``C``
  channels) and a zero mask (one channel), ``in_channels = 2C + 1``; ``image_embeds`` zeros of
  ``[N, vision_num_semantic_tokens (729), image_embed_dim]``, which the transformer takes for text-to-video and masks
  out, in the transformer's dtype; the timestep ``t = 1000 s`` in the latents' dtype; both text sequences with their
  masks in theirs.
* Noise levels: logit-normal on the sigma table of the pipeline's ``FlowMatchEulerDiscreteScheduler`` with its
  static shift (the table the pipeline samples on, through ``set_timesteps(sigmas=...)``).
* ``HunyuanVideo15ImageToVideoPipeline`` (a SigLIP image encoder and first-frame condition latents) is refused by
  name before any family is tried (:data:`~.registry.UNTRAINABLE_PIPELINES`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import PromptEmbeddings, PromptTokenizer
from .qwen_image import prompt_mask
from .registry import register_family
from .video import VideoFlowMatchingFamily

__all__ = ["HunyuanVideo15Family", "HunyuanVideo15PromptTokenizer"]

# The pipeline's lengths, read from it when it has them (they are attributes set in its __init__, not config).
_TEMPLATE_START = 108  # prompt_template_encode_start_idx
_MLLM_LENGTH = 1000  # tokenizer_max_length
_GLYPH_LENGTH = 256  # tokenizer_2_max_length
_VISION_TOKENS = 729  # vision_num_semantic_tokens
# _get_mllm_prompt_embeds' default, which encode_prompt keeps: the hidden state this many layers before the last.
_SKIPPED_LAYERS = 2


class HunyuanVideo15PromptTokenizer(PromptTokenizer):
    """Both tokenisations of ``HunyuanVideo15Pipeline.encode_prompt``: ``input_ids``, the prompts in the chat template
    for Qwen2.5-VL (``template_start + max_sequence_length`` tokens); ``input_ids_2``, their glyph texts for ByT5
    (``glyph_length`` bytes; all padding for a prompt that quotes nothing)."""

    def __init__(
        self,
        tokenizer: Any,
        tokenizer_2: Any,
        system_message: str,
        template_start: int,
        max_sequence_length: int,
        glyph_length: int,
    ) -> None:
        super().__init__(
            {"input_ids": tokenizer, "input_ids_2": tokenizer_2},
            {"input_ids": template_start + max_sequence_length, "input_ids_2": glyph_length},
        )
        self.system_message = system_message

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import (  # slow to import: when used
            extract_glyph_texts,
            format_text_input,
        )

        tokenizer, tokenizer_2 = self.tokenizers["input_ids"], self.tokenizers["input_ids_2"]
        length, glyph_length = self.max_lengths["input_ids"], self.max_lengths["input_ids_2"]
        chat = tokenizer.apply_chat_template(
            format_text_input(prompts, self.system_message),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            padding="max_length",
            max_length=length,
            truncation=True,
            return_tensors="pt",
        )
        glyphs = [extract_glyph_texts(prompt) for prompt in prompts]
        glyph_ids = torch.full((len(prompts), glyph_length), tokenizer_2.pad_token_id, dtype=torch.long)
        quoted = [row for row, glyph in enumerate(glyphs) if glyph is not None]
        if quoted:
            glyph_ids[quoted] = tokenizer_2(
                [glyphs[row] for row in quoted],
                padding="max_length",
                max_length=glyph_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids
        return {"input_ids": chat["input_ids"], "input_ids_2": glyph_ids}


@register_family("hunyuan-video-1.5", pipelines=("HunyuanVideo15Pipeline",))
class HunyuanVideo15Family(VideoFlowMatchingFamily):
    """HunyuanVideo 1.5 text-to-video (``HunyuanVideo15Pipeline`` with a ``HunyuanVideo15Transformer3DModel``)."""

    transformer_class = "HunyuanVideo15Transformer3DModel"
    required_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")
    frozen_components = ("vae", "text_encoder", "text_encoder_2")
    suggested_num_frames = "121 as HunyuanVideo 1.5 samples, 33 or 61 to save memory"
    # The Qwen2.5-VL tokens the pipeline encodes after the template (its tokenizer_max_length).
    default_max_sequence_length: ClassVar[int] = _MLLM_LENGTH
    # The pipeline decodes a call's clips as one batch, which the VAE fails on (huggingface/diffusers#13133).
    max_samples_per_call: ClassVar[int | None] = 1
    default_learning_rate = 1e-4
    learning_rate_source = (
        "musubi-tuner's HunyuanVideo 1.5 LoRA example (docs/hunyuan_video_1_5.md: --learning_rate 1e-4)"
    )

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        """A HunyuanVideo 1.5 transformer, both text encoders, and no image encoder (the image-to-video pipeline's
        SigLIP, whose conditioning this family does not build)."""
        return super().matches(pipeline) and getattr(pipeline, "image_encoder", None) is None

    @classmethod
    def check_pipeline(cls, pipeline: Any) -> None:
        for encoder, what in (("text_encoder", "Qwen2.5-VL"), ("text_encoder_2", "ByT5 glyph encoder")):
            if getattr(pipeline, encoder) is None:
                raise ValueError(f"The HunyuanVideo15Pipeline has no {encoder} ({what}): it is needed for the prompts")
        channels, latent = pipeline.transformer.config.in_channels, pipeline.vae.config.latent_channels
        if channels != 2 * latent + 1:
            raise ValueError(
                f"The transformer takes {channels} input channels; the text-to-video call gives it 2 x {latent} + 1 "
                "(the latents, zero condition latents and a zero mask, as HunyuanVideo15Pipeline does)"
            )

    @property
    def max_prompt_tokens(self) -> int:
        """The Qwen2.5-VL tokens the pipeline encodes (its ``tokenizer_max_length``)."""
        return int(getattr(self.pipeline, "tokenizer_max_length", _MLLM_LENGTH))

    # -------------------------------------------------------------------------------------------- the latents

    @property
    def spatial_compression(self) -> int:
        return int(self.vae.config.spatial_compression_ratio)

    @property
    def temporal_compression(self) -> int:
        return int(self.vae.config.temporal_compression_ratio)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def latent_patch_size(self) -> int:  # the transformer's spatial patch (1 in the released configs)
        return int(self.denoiser.config.patch_size)

    def _posterior(self, pixel_values: torch.Tensor):
        """The VAE posterior of each clip, encoded one at a time and joined: diffusers 0.42's
        ``AutoencoderKLHunyuanVideo15`` broadcasts its mid-block causal mask against batches of more than one clip and
        fails (huggingface/diffusers#13133); the clips are independent, so the moments are a batched encoding's."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        clips = [super(HunyuanVideo15Family, self)._posterior(clip) for clip in pixel_values.split(1)]
        return DiagonalGaussianDistribution(torch.cat([clip.parameters for clip in clips]))

    # ----------------------------------------------------------------------------------------------- the text

    @property
    def _template_start(self) -> int:
        return int(getattr(self.pipeline, "prompt_template_encode_start_idx", _TEMPLATE_START))

    @property
    def _glyph_length(self) -> int:
        return int(getattr(self.pipeline, "tokenizer_2_max_length", _GLYPH_LENGTH))

    def prompt_tokenizer(self) -> HunyuanVideo15PromptTokenizer:
        return HunyuanVideo15PromptTokenizer(
            self.pipeline.tokenizer,
            self.pipeline.tokenizer_2,
            self.pipeline.system_message,
            self._template_start,
            self.max_sequence_length,
            self._glyph_length,
        )

    @torch.no_grad()
    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        """Qwen2.5-VL's rows after the template, then ByT5's glyph rows, zero past their masks and zero-padded to one
        width: ``[B, max_sequence_length + 256, max(D_qwen, D_byt5)]`` (no pooled projection)."""
        pipe = self.pipeline
        ids = tokens["input_ids"].to(pipe.text_encoder.device)
        mask = ids.ne(pipe.tokenizer.pad_token_id).long()
        states = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        start = self._template_start
        text = states[-(_SKIPPED_LAYERS + 1)][:, start:]
        text = text * mask[:, start:, None].to(text.dtype)

        glyph_ids = tokens["input_ids_2"].to(pipe.text_encoder_2.device)
        glyph_mask = glyph_ids.ne(pipe.tokenizer_2.pad_token_id).long()
        width_2 = pipe.text_encoder_2.config.d_model
        glyph = text.new_zeros(glyph_ids.shape[0], glyph_ids.shape[1], width_2)
        quoted = glyph_mask.any(dim=1)  # a prompt that quotes nothing keeps zeros, as the pipeline gives it
        if quoted.any():
            encoded = pipe.text_encoder_2(input_ids=glyph_ids[quoted], attention_mask=glyph_mask[quoted].float())[0]
            glyph[quoted.to(glyph.device)] = (encoded * glyph_mask[quoted, :, None].to(encoded.dtype)).to(glyph)

        sequence = text.new_zeros(text.shape[0], text.shape[1] + glyph.shape[1], max(text.shape[-1], width_2))
        sequence[:, : text.shape[1], : text.shape[-1]] = text
        sequence[:, text.shape[1] :, :width_2] = glyph
        return PromptEmbeddings(sequence)

    # -------------------------------------------------------------------------------------------- the prediction

    def denoiser_conditioning(
        self, prompt_embeds: PromptEmbeddings, time_ids: torch.Tensor | None
    ) -> dict[str, object]:
        """The two text sequences of the packed tensor (see :meth:`encode_prompts`) and their masks, recovered from
        the zero rows, in the sequence's dtype (as the pipeline passes them)."""
        hidden = prompt_embeds.encoder_hidden_states
        config = self.denoiser.config
        split = hidden.shape[1] - self._glyph_length
        text = hidden[:, :split, : config.text_embed_dim]
        glyph = hidden[:, split:, : config.text_embed_2_dim]
        return {
            "encoder_hidden_states": text,
            "encoder_attention_mask": prompt_mask(text).to(hidden.dtype),
            "encoder_hidden_states_2": glyph,
            "encoder_attention_mask_2": prompt_mask(glyph).to(hidden.dtype),
        }

    def call_denoiser(
        self, model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, object]
    ) -> torch.Tensor:
        """``model`` on ``sample [N, C, F', h, w]`` at ``timestep [N]`` (0-1000) with the text-to-video pipeline's
        zero image conditioning; ``[N, C, F', h, w]`` back."""
        n, _, frames, height, width = sample.shape
        condition = sample.new_zeros(n, sample.shape[1] + 1, frames, height, width)  # latents, then the mask channel
        tokens = int(getattr(self.pipeline, "vision_num_semantic_tokens", _VISION_TOKENS))
        # in the transformer's dtype, as the pipeline makes them: its image projection's norm takes them as they come
        image_embeds = sample.new_zeros(n, tokens, self.denoiser.config.image_embed_dim, dtype=self.denoiser.dtype)
        return model(
            hidden_states=torch.cat([sample, condition], dim=1),
            image_embeds=image_embeds,
            timestep=timestep.to(sample.dtype),
            **conditioning,
            return_dict=False,
        )[0]
