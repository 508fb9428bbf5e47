"""Wan 2.1 / 2.2 text-to-video: a 3D transformer (``WanTransformer3DModel``) conditioned on UMT5, over the latents of a
causal 3D VAE (``AutoencoderKLWan``), trained by rectified flow. No pooled projection, no guidance embedding.

Followed: diffusers' ``WanPipeline`` (``pipelines/wan/pipeline_wan.py``, diffusers 0.42) for everything the model
sees, and SimpleTuner's Wan quickstart and the public diffusers+peft Wan 2.1 LoRA scripts for the training draw
(logit-normal levels on the statically shifted sigma table, the flow-matching velocity target). Read, not copied.

* Text, as ``WanPipeline._get_t5_prompt_embeds``: prompts cleaned (``prompt_clean``: HTML unescape, ftfy when
  installed, whitespace collapsed), tokenised to ``max_sequence_length`` tokens (512, the pipeline's ``__call__``
  default) with padding, UMT5's ``last_hidden_state`` computed with the attention mask, and every position past the
  prompt's length set to zero (the pipeline cuts each sequence at its length and zero-pads it back). The mask is
  ``input_ids != pad_token_id``: the tokenizer pads to the right with its pad id, which no text token has.
* Latents ``[N, 16, F', h, w]`` with ``F' = (F - 1) / 4 + 1`` for ``F = 4k + 1`` frames and ``h, w`` the pixel size
  over 8, normalised per channel with the VAE config's ``latents_mean``/``latents_std``:
  ``x0 = (z - mean_c) / std_c`` (the inverse of the pipeline's decode, as ``WanVideoToVideoPipeline`` encodes); see
  :func:`~.base.scale_latents`.
* Noise levels: the sigma table of a ``FlowMatchEulerDiscreteScheduler`` with the pipeline scheduler's static shift
  (``flow_shift`` of the ``UniPCMultistepScheduler`` the Wan checkpoints ship, 3.0 for the 480p T2V models, 5.0 at
  720p; or ``shift`` of a flow-match Euler scheduler). The transformer takes ``t = 1000 s``; with the pipeline's
  ``expand_timesteps`` (Wan 2.2 TI2V-5B) one timestep per latent token, all equal, as the pipeline passes them.
* Wan 2.2 A14B has two experts (``transformer`` above ``boundary_ratio``, ``transformer_2`` below); training one
  expert on its noise range is not implemented, so such pipelines are refused with what to do instead.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import PromptEmbeddings, PromptTokenizer
from .registry import register_family
from .video import VideoFlowMatchingFamily

__all__ = ["WanFamily", "WanPromptTokenizer"]


class WanPromptTokenizer(PromptTokenizer):
    """The UMT5 tokenizer as ``WanPipeline`` runs it: prompts cleaned with the pipeline's ``prompt_clean`` first."""

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # the pipeline module is slow to import

        return super().__call__([prompt_clean(prompt) for prompt in prompts])


@register_family("wan", pipelines=("WanPipeline",))
class WanFamily(VideoFlowMatchingFamily):
    """Wan 2.1 / 2.2 text-to-video (``WanPipeline`` with a ``WanTransformer3DModel``)."""

    transformer_class = "WanTransformer3DModel"
    required_components = ("text_encoder", "vae")  # the VAE's class tells text-to-video apart (see matches)
    suggested_num_frames = "81 as Wan samples, 17 or 33 to save memory"
    # The self- and cross-attention projections of every block (attn1, attn2), as diffusers' Wan LoRAs adapt them.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    default_learning_rate = 1e-4
    learning_rate_source = "SimpleTuner's Wan LoRA quickstart"
    # The VAE keeps the first frame and compresses the rest in time by this factor (``scale_factor_temporal``).
    temporal_compression_default: ClassVar[int] = 4

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        """A Wan transformer and a Wan VAE (``AutoencoderKLWan``), so the image-to-video pipelines with an image
        encoder, which this family does not condition, are not taken for text-to-video."""
        if not super().matches(pipeline) or getattr(pipeline, "image_encoder", None) is not None:
            return False
        import diffusers

        return isinstance(pipeline.vae, diffusers.AutoencoderKLWan)

    @classmethod
    def check_pipeline(cls, pipeline: Any) -> None:
        if getattr(pipeline, "transformer_2", None) is not None:
            raise ValueError(
                "This WanPipeline has two experts (Wan 2.2 A14B: `transformer` for high noise, `transformer_2` for "
                "low noise); training one expert on its noise range is not supported. Load the pipeline with "
                "transformer_2=None (and boundary_ratio=None) to tune `transformer` alone, or use a "
                "single-transformer Wan (2.1 T2V, 2.2 TI2V-5B)."
            )
        if pipeline.text_encoder is None:
            raise ValueError("The WanPipeline has no text_encoder (UMT5): it is needed to encode the prompts")

    @property
    def spatial_compression(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    @property
    def temporal_compression(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_temporal", self.temporal_compression_default))

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    def training_scheduler_config(self) -> dict[str, Any]:
        """A flow-match Euler config with the pipeline scheduler's static shift (``flow_shift`` of UniPC, ``shift``
        of flow-match Euler) and no dynamic shifting: the table Wan is trained and sampled on."""
        config = self.pipeline.scheduler.config
        shift = config.get("flow_shift", None) or config.get("shift", 1.0)
        return {"num_train_timesteps": int(config.get("num_train_timesteps", 1000)), "shift": float(shift)}

    def prompt_tokenizer(self) -> PromptTokenizer:
        return WanPromptTokenizer({"input_ids": self.pipeline.tokenizer}, {"input_ids": self.max_sequence_length})

    @torch.no_grad()
    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        encoder = self.pipeline.text_encoder
        ids = tokens["input_ids"].to(encoder.device)
        mask = ids.ne(self.pipeline.tokenizer.pad_token_id).long()
        hidden = encoder(ids, mask).last_hidden_state
        # Zero past each prompt's length, as the pipeline's cut-and-pad does.
        return PromptEmbeddings(hidden * mask.unsqueeze(-1).to(hidden.dtype))

    def call_denoiser(
        self, model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, object]
    ) -> torch.Tensor:
        """``model`` on ``sample [N, C, F', h, w]`` at ``timestep [N]`` (0-1000); ``[N, C, F', h, w]`` back."""
        if self.pipeline.config.get("expand_timesteps", False):
            # Wan 2.2 TI2V: one timestep per latent token (1x2x2 patches), all equal for text-to-video.
            _, _, frames, height, width = sample.shape
            patch = self.denoiser.config.patch_size
            tokens = (frames // patch[0]) * (height // patch[1]) * (width // patch[2])
            timestep = timestep[:, None].expand(-1, tokens)
        return model(hidden_states=sample, timestep=timestep, **conditioning, return_dict=False)[0]
