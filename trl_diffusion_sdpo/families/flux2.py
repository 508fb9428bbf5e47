"""FLUX.2: a double/single-stream transformer with 4-axis RoPE on the FLUX.2 VAE, trained by rectified flow; [dev]
conditioned on Mistral-Small-3 with a guidance embedding, [klein] on Qwen3 without one.

Followed: diffusers' ``Flux2Pipeline`` (``pipelines/flux2/pipeline_flux2.py``) and ``Flux2KleinPipeline``
(``pipelines/flux2/pipeline_flux2_klein.py``), diffusers 0.42, and diffusers' LoRA script
``examples/dreambooth/train_dreambooth_lora_flux2_klein.py`` (its training loop is that of
``train_dreambooth_lora_flux2.py``).

* Text, as the pipelines' ``encode_prompt``: [dev] puts each prompt after the pipeline's ``system_message`` in a
  system and a user turn (``format_input``) and tokenises the batch with ``apply_chat_template`` (no generation
  prompt); [klein] puts each prompt into one user turn with the generation prompt and ``enable_thinking=False``.
  Both pad to ``max_sequence_length`` tokens (512 in the pipelines), run the encoder with the attention mask and
  keep THREE intermediate hidden states (``text_encoder_out_layers``: 10, 20, 30 for [dev], 9, 18, 27 for [klein],
  read from the pipeline's ``encode_prompt``), stacked feature-wise into ``[B, L, 3D]``. Padding rows are kept, as
  the pipelines pass them to the transformer without a mask; text positions are ``(0, 0, 0, l)``
  (``_prepare_text_ids``).
* Latents: the VAE's 32-channel latents are folded into 2x2 patches (``_patchify_latents``: ``[N, 4C, h/2, w/2]``)
  and normalised per channel by the VAE's batch-norm running statistics, ``(z - running_mean) / sqrt(running_var +
  batch_norm_eps)`` (the pipeline's ``_encode_vae_image`` and its inverse before decoding; the script likewise).
  The step sees this patchified layout; the posterior's moments are patchified, so a posterior sample is the
  patchified sample.
* The call: one token per patchified position (``_pack_latents``), 4-axis positions ``(0, h, w, 0)``
  (``_prepare_latent_ids``), the timestep as ``s = t / 1000``, and for [dev] the guidance value (the transformer's
  ``guidance_embeds``; ``Flux2KleinPipeline`` passes none whatever the transformer has); the prediction is unpacked
  again (``_unpack_latents_with_ids``).
* Reference images (multi-reference editing), switched on by the data: a dataset with a ``source_image`` or
  ``source_images`` column trains editing, one without it text-to-image, on the same pipeline (``Flux2Pipeline``
  takes ``image=`` for both). Each reference is encoded as the pipeline's ``_encode_vae_image`` encodes its ``image``
  (the posterior's mode, patchified, batch-norm normalised: :meth:`~.base.ModelFamily.encode_sources` with this
  family's posterior and latents config), once per pair. The call appends, as ``prepare_image_latents`` and the
  denoising loop do, every reference's packed tokens in order after the target's, with positions
  ``(10 + 10 i, h, w, 0)`` for reference ``i`` (``_prepare_image_ids``, ``scale=10``), and keeps the target's tokens
  of the prediction (``noise_pred[:, : latents.size(1)]``). The data resizes and center-crops each reference to the
  training resolution (diffusers' ``train_dreambooth_lora_flux2_klein_img2img.py`` likewise trains its condition
  image at the target's size); the pipeline samples with each reference's own size, its area capped at 1024x1024.
* Noise levels: logit-normal on the scheduler's sigma table, as the script draws them (FLUX.2's scheduler enables
  dynamic shifting, so the table is unshifted; the script's default weighting is uniform, ``flow_weighting_scheme:
  none``). The pipeline shifts its sampling steps by ``compute_empirical_mu(image_seq_len, num_steps)``, which
  depends on the number of inference steps and has no training counterpart, so ``flow_shift="resolution"`` (FLUX.1's
  ``calculate_shift``) is refused.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

from .base import PromptEmbeddings, PromptTokenizer
from .editing import SourceConditioning
from .flow import FlowMatchingFamily, FlowNoiser
from .registry import register_family
from .z_image import ZImagePromptTokenizer

__all__ = [
    "Flux2Family",
    "Flux2KleinFamily",
    "Flux2KleinPromptTokenizer",
    "Flux2PromptTokenizer",
    "reference_tokens",
]


def _inner_tokenizer(tokenizer: Any) -> Any:
    """The text tokenizer of a processor (``PixtralProcessor.tokenizer``), or the tokenizer itself."""
    return getattr(tokenizer, "tokenizer", tokenizer)


class Flux2PromptTokenizer(PromptTokenizer):
    """FLUX.2 [dev]: the system message and the prompt as chat turns (``format_input``), tokenised by the pipeline's
    tokenizer or processor ``apply_chat_template`` to ``max_sequence_length`` tokens, padded."""

    def __init__(self, tokenizer: Any, system_message: str, max_sequence_length: int) -> None:
        super().__init__({"input_ids": _inner_tokenizer(tokenizer)}, {"input_ids": max_sequence_length})
        self.chat = tokenizer  # the processor (released pipelines) or a tokenizer with the same chat template
        self.system_message = system_message

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        inputs = self.chat.apply_chat_template(
            format_input(prompts=list(prompts), system_message=self.system_message),
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.max_lengths["input_ids"],
        )
        return {"input_ids": inputs["input_ids"]}


class Flux2KleinPromptTokenizer(ZImagePromptTokenizer):
    """FLUX.2 [klein]: Z-Image's chat-template tokenisation (one user turn with the generation prompt, padded to
    ``max_sequence_length``) with ``enable_thinking=False``, as ``Flux2KleinPipeline`` calls it."""

    enable_thinking = False


def reference_tokens(references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference images' tokens ``[N, S h w, C]`` and 4-axis positions ``[N, S h w, 4]`` of their latents
    ``[N, S, C, h, w]``, as ``Flux2Pipeline.prepare_image_latents`` builds them: each reference packed
    (``_pack_latents``) and concatenated in order, positions ``(10 + 10 i, y, x, 0)`` for reference ``i``
    (``_prepare_image_ids``). Every pair's references have the same shapes, so the positions are one pair's."""
    from diffusers import Flux2Pipeline

    n, count, channels = references.shape[:3]
    tokens = Flux2Pipeline._pack_latents(references.flatten(0, 1))  # [N S, h w, C], reference after reference
    positions = Flux2Pipeline._prepare_image_ids(list(references[0]))  # [1, S h w, 4]
    return tokens.reshape(n, -1, channels), positions.to(references.device).expand(n, -1, -1)


@register_family("flux2", pipelines=("Flux2Pipeline",))
class Flux2Family(SourceConditioning, FlowMatchingFamily):
    """FLUX.2 [dev] (``Flux2Pipeline`` with a ``Flux2Transformer2DModel`` and a Mistral-3 text encoder)."""

    transformer_class = "Flux2Transformer2DModel"
    # Base classes of the text encoder that tell [dev] from [klein] (the pipeline's class when it has none).
    text_encoder_bases: ClassVar[tuple[str, ...]] = ("Mistral3PreTrainedModel",)
    # diffusers' FLUX.2 LoRA scripts' default targets: the double-stream blocks' image attention and the
    # single-stream blocks' fused QKV+MLP input and their output projection (``single_transformer_blocks.<i>.attn
    # .to_out``, added per block in ``__init__``: a bare ``to_out`` would also name the double-stream ModuleList).
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj")
    # The pipeline's sampling default: the guidance embedding conditions each prediction on the value used at
    # sampling (diffusers' script trains with 3.5, its help text carried over from its FLUX.1 script).
    default_guidance_scale = 4.0
    default_learning_rate = 1e-4
    learning_rate_source = (
        "diffusers' FLUX.2 LoRA scripts (train_dreambooth_lora_flux2.py / _klein.py, --learning_rate 1e-4)"
    )
    # Reference images when the data has them (any number: the pipeline sets no limit; Black Forest Labs recommend
    # at most 6 for [dev] and 4 for [klein]), text-to-image when it has none.
    edits = True
    sources_optional = True
    max_sources = None

    def __init__(
        self, pipeline: Any, max_sequence_length: int | None = None, guidance_scale: float | None = None
    ) -> None:
        super().__init__(pipeline, max_sequence_length, guidance_scale)
        single_blocks = len(getattr(self.denoiser, "single_transformer_blocks", ()))
        self.lora_target_modules = type(self).lora_target_modules + tuple(
            f"single_transformer_blocks.{i}.attn.to_out" for i in range(single_blocks)
        )
        self._latents_config: SimpleNamespace | None = None

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        """A ``Flux2Transformer2DModel`` and a text encoder of this variant (the pipeline's class without one)."""
        if not super().matches(pipeline):
            return False
        encoder = getattr(pipeline, "text_encoder", None)
        bases = {base.__name__ for base in type(encoder if encoder is not None else pipeline).__mro__}
        return bool(bases & {*cls.text_encoder_bases, *cls.pipeline_classes})

    @classmethod
    def check_pipeline(cls, pipeline: Any) -> None:
        if pipeline.text_encoder is None or pipeline.tokenizer is None:
            raise ValueError(f"{cls.pipeline_classes[0]} needs its `text_encoder` and `tokenizer` for training")
        if getattr(pipeline.tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"{cls.pipeline_classes[0]}'s tokenizer has no chat template: FLUX.2 encodes prompts as chat turns"
            )

    def noiser(self, args: Any) -> FlowNoiser:
        if args.flow_shift == "resolution":
            raise ValueError(
                f"flow_shift='resolution' is FLUX.1's calculate_shift; {self.name} samples with "
                "compute_empirical_mu(image_seq_len, num_inference_steps), which has no training counterpart. Use "
                "flow_shift='scheduler' (diffusers' FLUX.2 scripts: the scheduler's unshifted table) or 'none'"
            )
        return super().noiser(args)

    # -------------------------------------------------------------------------------------------------- the text

    def pipeline_source_size(self, width: int, height: int) -> tuple[int, int]:
        """As ``Flux2Pipeline.__call__`` sizes a reference image: its own size, scaled down to 1024^2 pixels where it
        has more (``_resize_to_target_area``), rounded down to the latent patch."""
        if width * height > 1024 * 1024:
            scale = math.sqrt(1024 * 1024 / (width * height))
            width, height = int(width * scale), int(height * scale)
        multiple = self.pipeline.vae_scale_factor * 2
        return width // multiple * multiple, height // multiple * multiple

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.pipeline.vae, "text_encoder": self.pipeline.text_encoder}

    def prompt_tokenizer(self) -> PromptTokenizer:
        return Flux2PromptTokenizer(self.pipeline.tokenizer, self.pipeline.system_message, self.max_sequence_length)

    @property
    def text_encoder_out_layers(self) -> tuple[int, ...]:
        """The hidden-state layers the pipeline stacks: its ``encode_prompt``'s default ``text_encoder_out_layers``."""
        default = inspect.signature(type(self.pipeline).encode_prompt).parameters["text_encoder_out_layers"].default
        return tuple(default)

    @torch.no_grad()
    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        """The ``text_encoder_out_layers`` hidden states of every token (padding included), stacked feature-wise:
        ``[B, L, 3D]``, as ``_get_mistral_3_small_prompt_embeds`` / ``_get_qwen3_prompt_embeds`` build them."""
        encoder = self.pipeline.text_encoder
        ids = tokens["input_ids"].to(encoder.device)
        mask = ids.ne(_inner_tokenizer(self.pipeline.tokenizer).pad_token_id).long()
        output = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        stacked = torch.stack([output.hidden_states[k] for k in self.text_encoder_out_layers], dim=1)
        batch, layers, length, width = stacked.shape
        return PromptEmbeddings(stacked.permute(0, 2, 1, 3).reshape(batch, length, layers * width))

    # ------------------------------------------------------------------------------------------------ the images

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """``(4C, h/2, w/2)``: the VAE latents folded into 2x2 patches."""
        size = resolution // self.pipeline.vae_scale_factor // 2
        return 4 * self.vae.config.latent_channels, size, size

    def _posterior(self, pixel_values: torch.Tensor):
        """The VAE posterior with its mean and log-variance folded into 2x2 patches (``_patchify_latents``)."""
        from diffusers import Flux2Pipeline  # the pipeline module is slow to import: only when the model runs
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = super()._posterior(pixel_values)
        patchify = Flux2Pipeline._patchify_latents
        return DiagonalGaussianDistribution(torch.cat([patchify(posterior.mean), patchify(posterior.logvar)], dim=1))

    def latents_config(self) -> SimpleNamespace:
        """Per-channel ``latents_mean = running_mean`` and ``latents_std = sqrt(running_var + batch_norm_eps)`` of the
        VAE's batch norm (read once: the VAE is frozen)."""
        if self._latents_config is None:
            bn = self.vae.bn
            std = torch.sqrt(bn.running_var.float() + self.vae.config.batch_norm_eps)
            self._latents_config = SimpleNamespace(
                latents_mean=bn.running_mean.float().tolist(), latents_std=std.tolist(), scaling_factor=None
            )
        return self._latents_config

    # -------------------------------------------------------------------------------------------- the prediction

    def call_denoiser(
        self, model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, object]
    ) -> torch.Tensor:
        from diffusers import Flux2Pipeline

        n, channels, height, width = sample.shape
        hidden = conditioning["encoder_hidden_states"]
        tokens = Flux2Pipeline._pack_latents(sample)  # [N, h w, 4C]
        positions = Flux2Pipeline._prepare_latent_ids(sample).to(sample.device)
        references = conditioning.get("source_latents")
        if references is not None:  # the references' tokens after the target's, as the pipeline's loop
            extra_tokens, extra_positions = reference_tokens(references.to(sample.dtype))
            tokens = torch.cat([tokens, extra_tokens], dim=1)
            positions = torch.cat([positions, extra_positions], dim=1)
        out = model(
            hidden_states=tokens,
            timestep=timestep / 1000,
            guidance=self.guidance(n, sample.device),
            encoder_hidden_states=hidden,
            txt_ids=Flux2Pipeline._prepare_text_ids(hidden).to(sample.device),
            img_ids=positions,
            return_dict=False,
        )[0]
        # the target's tokens, [N, h w, 4C] back to [N, 4C, h, w] (_unpack_latents_with_ids for row-major positions)
        return out[:, : height * width].permute(0, 2, 1).reshape(n, channels, height, width)


@register_family("flux2-klein", pipelines=("Flux2KleinPipeline",))
class Flux2KleinFamily(Flux2Family):
    """FLUX.2 [klein] (``Flux2KleinPipeline`` with a ``Flux2Transformer2DModel`` and a Qwen3 text encoder)."""

    text_encoder_bases = ("Qwen3PreTrainedModel",)
    default_guidance_scale = None  # the pipeline passes no guidance value (classifier-free guidance instead)

    def prompt_tokenizer(self) -> PromptTokenizer:
        return Flux2KleinPromptTokenizer(self.pipeline.tokenizer, self.max_sequence_length)

    def guidance(self, num_samples: int, device: torch.device) -> None:
        """None: ``Flux2KleinPipeline`` calls the transformer with ``guidance=None``."""
        return None
