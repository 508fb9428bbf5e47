"""The interface every model family implements: frozen components, prompt encoding, the denoiser and its call, and
the noiser that makes its training inputs.

Tokenisation happens in the data collator (CPU, possibly in dataloader workers); encoding happens on the
accelerator in the trainer. Both go through a family object so the trainer never branches on the model type.
One module per family beside this one (:mod:`.sd`, :mod:`.sdxl`, :mod:`.sd3`, :mod:`.flux`, :mod:`.qwen_image`,
:mod:`.z_image`, :mod:`.wan`, :mod:`.flux2`), each registered with :func:`~.registry.register_family`;
:func:`~.registry.family_for_pipeline` picks one.

What a family defines (abstract members are marked *):

* ``name`` and ``pipeline_classes``: the family's name and the diffusers pipeline classes it handles (for errors
  and docs), given at registration (``@register_family("name", pipelines=("SomePipeline",))`` sets both on the
  class); :meth:`~.base.ModelFamily.matches`\\*: whether a pipeline is one of them, decided from its components so
  that subclasses work; :meth:`~.base.ModelFamily.check_pipeline`: a specific refusal for a pipeline it claims but
  cannot train.
* ``denoiser_name``: the pipeline attribute of the trained network (``"unet"`` or ``"transformer"``); it also names
  the LoRA key prefix and the full-weights subfolder the pipeline's loaders expect.
* ``lora_target_modules``: the LoRA targets when the user names none (the only place they are written).
* ``flow_matching`` and :meth:`~.base.ModelFamily.noiser`\\*: how training inputs are noised. DDPM-style UNets noise
  with the scheduler's ``add_noise`` and regress its ``prediction_type`` (:class:`~.noising.DDPMNoiser`);
  rectified-flow transformers noise ``x_s = (1 - s) x0 + s eps`` and regress ``eps - x0`` (:class:`~.flow.FlowNoiser`,
  through :class:`~.flow.FlowMatchingFamily`).
* ``frozen_components`` (the pipeline attributes that never train, read by
  :meth:`~.base.ModelFamily.frozen_modules`), :meth:`~.base.ModelFamily.prompt_tokenizer`\\*,
  :meth:`~.base.ModelFamily.encode_prompts`\\*: the text side.
* :meth:`~.base.ModelFamily.denoiser_conditioning` and :meth:`~.base.ModelFamily.call_denoiser`: how one prediction
  is made, in the latent layout ``[N, C, h, w]`` (``[N, C, F', h, w]`` for a ``video`` family such as Wan) whatever
  the network's own input layout (FLUX packs 2x2 patches inside the call).
* :meth:`~.base.ModelFamily.sampling_keywords`, :meth:`~.base.ModelFamily.sampled_media` and
  ``max_samples_per_call``: how online training samples with the family's own pipeline (the training's size, an
  edit's sources, a video's clip length) and reads its samples.

Diffusers' pipeline modules are imported where they are used, never here: importing a family costs nothing.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.distributed.tensor import DTensor

from ..config._lazy import import_target
from ..config.defaults import resolve_default
from .noising import scale_latents

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from .noising import Noiser

__all__ = [
    "ModelFamily",
    "PromptEmbeddings",
    "PromptTokenizer",
    "is_quantized",
    "is_quantized_tensor",
    "quantized_parameters",
    "scale_latents",
]


@dataclass
class PromptEmbeddings:
    """The conditioning of the denoiser for a batch of pairs: the prompt's embeddings and, for an editing family,
    the source images' latents. Both images of a pair share it."""

    encoder_hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL ``text_embeds``, the flow transformers' pooled projection
    # An editing family's source latents ``[B, S, C, h, w]`` (``S`` source images per pair), in the denoiser's latent
    # space (:meth:`~.base.ModelFamily.encode_sources`); ``None`` for text-to-image.
    source_latents: torch.Tensor | None = None

    def repeat(self, times: int) -> PromptEmbeddings:
        """Stack the batch ``times`` times along dim 0 (winner and loser share the prompt and the sources)."""

        def stacked(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.repeat(times, *([1] * (value.dim() - 1)))

        return PromptEmbeddings(
            stacked(self.encoder_hidden_states), stacked(self.pooled), stacked(self.source_latents)
        )


class PromptTokenizer:
    """Tokenise prompts with each of a pipeline's tokenizers; small and picklable for dataloader workers.

    Each tokenizer pads and truncates to its ``model_max_length`` unless ``max_lengths`` names another length for its
    key (T5's sequence length is a training choice: 77 to 512 tokens).
    """

    def __init__(self, tokenizers: dict[str, object], max_lengths: dict[str, int] | None = None) -> None:
        self.tokenizers = tokenizers  # output key -> tokenizer
        self.max_lengths = dict(max_lengths or {})

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {
            key: tokenizer(
                prompts,
                padding="max_length",
                max_length=self.max_lengths.get(key, tokenizer.model_max_length),
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for key, tokenizer in self.tokenizers.items()
        }


class ModelFamily(abc.ABC):
    """A pipeline's frozen components, its trained denoiser, how to condition and call it, and how to noise its
    training inputs. Subclass it (or :class:`~.flow.FlowMatchingFamily`) and register the subclass with
    :func:`~.registry.register_family`."""

    # The family's name and the diffusers pipeline classes it handles, by name (errors and docs list them; matching
    # uses :meth:`matches`, on components): set by ``register_family(name, pipelines=...)``.
    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    needs_time_ids: ClassVar[bool] = False
    denoiser_name: ClassVar[str] = "unet"
    flow_matching: ClassVar[bool] = False
    # Whether the family trains on videos (pixel pairs ``[B, 2, 3, F, H, W]``, latents ``[N, C, F', h, w]``).
    video: ClassVar[bool] = False
    # LoRA targets when the user names none: the attention projections of the denoiser's blocks.
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    # The pipeline attributes that never train (VAE and text encoders); one that holds None (SD3 without T5) is left
    # out of :meth:`frozen_modules`.
    frozen_components: ClassVar[tuple[str, ...]] = ("vae", "text_encoder")
    # Editing: whether the denoiser conditions on source images (the data then needs a source column; see
    # docs/editing.md), and how many sources a pair may have (None: any number, as multi-image editing takes).
    edits: ClassVar[bool] = False
    max_sources: ClassVar[int | None] = 1
    # Whether the sources are optional: the same pipeline also generates from the prompt alone, and the data decides
    # (FLUX.2's reference images: a dataset with a source column trains editing, one without it text-to-image).
    sources_optional: ClassVar[bool] = False
    # Editing: the side of the square at which :meth:`encode_sources` encodes the sources; None: as the data gives them
    # (resized and center-cropped at the training resolution). Set from the config by
    # :meth:`~.editing.SourceConditioning.configure_sources`.
    source_resolution: int | None = None
    # Whether the prompt's encoding reads the source images too (a vision-language encoder): the collator then hands
    # them to the tokenizer, and prompt dropout, whose empty prompt has no image, is refused.
    prompt_reads_sources: ClassVar[bool] = False
    # The guidance of validation grids when validation_guidance_scale is None; None: the pipeline's own default
    # (its __call__'s guidance_scale: 3.5 for FLUX.1-dev, whose training conditions on 3.5 too).
    validation_guidance_scale: ClassVar[float | None] = None
    # The Diffusion-SDPO authors' safeguard mu where they measured this family, per loss_type ("*": every objective),
    # and where it comes from; and the family's Diffusion-DPO beta with its source. Data that the table of defaults
    # reads (config.defaults, which decides what an unset beta or safeguard_mu resolves to).
    authors_safeguard_mu: ClassVar[dict[str, float]] = {}
    safeguard_mu_source: ClassVar[str] = "the Diffusion-SDPO authors' runs (Fu et al., arXiv 2511.03317)"
    default_beta: ClassVar[float] = 5000.0
    beta_source: ClassVar[str] = (
        "Diffusion-DPO's SD1.5 and SDXL launchers (Wallace et al., arXiv 2311.12908; the paper reports 2000 to 5000)"
    )
    # Whether the latents the pipeline's sampler ends with (``callback_on_step_end``'s ``latents``) are
    # ``[N, C, h, w]`` in the denoiser's latent space, so that online training trains on them as they are; False
    # (packed tokens, or not checked): the sampled images are encoded again from their decoded pixels.
    sampled_latents_are_denoiser_latents: ClassVar[bool] = False
    # The most samples one call of the family's pipeline draws (online training); None: as many as asked.
    max_samples_per_call: ClassVar[int | None] = None

    def __init__(self, pipeline: DiffusionPipeline) -> None:
        self.pipeline = pipeline

    @classmethod
    def resolve(cls, field: str) -> Any:
        """The value config ``field`` takes when left unset, for this family: the defaults table's
        (:func:`~trl_diffusion_sdpo.config.defaults.resolve_default`), where what the family declares as data (its
        ``default_*`` attributes) sits beside the package's entries."""
        return resolve_default(field, cls).value

    def check_validation_sampling(self) -> None:  # noqa: B027 (most families sample grids)
        """Raise where the validation callback cannot sample this family's grids (video families)."""

    def sampling_guidance_scale(self) -> float | None:
        """The guidance a validation grid samples with by default: :attr:`validation_guidance_scale`; else the
        guidance a guidance-distilled transformer is trained on (FLUX.1-dev's ``flux_guidance_scale``, 3.5); else the
        ``guidance_scale`` default of the pipeline's ``__call__`` (``None`` where it has none)."""
        if self.validation_guidance_scale is not None:
            return self.validation_guidance_scale
        trained = getattr(self, "guidance_scale", None)
        if trained is not None:
            return float(trained)
        import inspect

        parameter = inspect.signature(type(self.pipeline).__call__).parameters.get("guidance_scale")
        if parameter is None or parameter.default in (inspect.Parameter.empty, None):
            return None
        return float(parameter.default)

    # ------------------------------------------------------------------------------------------- which pipelines

    @classmethod
    @abc.abstractmethod
    def matches(cls, pipeline: Any) -> bool:
        """Whether ``pipeline`` is one this family handles, from its components (not its class name)."""

    @classmethod
    def check_pipeline(cls, pipeline: Any) -> None:
        """Raise a ValueError saying what is missing when a pipeline this family :meth:`matches` cannot be trained
        (the SDXL refiner, a pipeline without its text encoder); by default every matching pipeline is accepted."""
        return None

    @classmethod
    def from_pipeline(
        cls,
        pipeline: DiffusionPipeline,
        *,
        max_sequence_length: int | None = None,
        guidance_scale: float | None = None,
    ) -> ModelFamily:
        """The family of ``pipeline`` with the training options that apply to it; the base families take none
        (``max_sequence_length`` and ``guidance_scale`` are for the flow-matching transformers)."""
        return cls(pipeline)

    # ------------------------------------------------------------------------------------------------- the model

    @property
    def denoiser(self) -> torch.nn.Module:
        """The trained network: the pipeline's UNet or transformer."""
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """Modules that never train (the ``frozen_components`` the pipeline holds), by pipeline attribute name."""
        modules = {name: getattr(self.pipeline, name, None) for name in self.frozen_components}
        return {name: module for name, module in modules.items() if module is not None}

    @abc.abstractmethod
    def noiser(self, args: Any) -> Noiser:
        """The noiser of this family for the config ``args`` (a ``DiffusionSDPOConfig``), after checking the config's
        noising fields against it (a ValueError naming the field to change)."""

    # ------------------------------------------------------------------------------------------------- the text

    @abc.abstractmethod
    def prompt_tokenizer(self) -> PromptTokenizer:
        """The tokenizer(s) of the family's text encoders, as the collator runs them."""

    @abc.abstractmethod
    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        """The text conditioning of ``tokens`` (the output of :meth:`prompt_tokenizer`), as the pipeline's
        ``encode_prompt`` builds it."""

    # ------------------------------------------------------------------------------------------------ the images

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """``(C, h, w)`` of the latents of a ``resolution``-pixel square image, in the layout the rest of the step
        sees (the latent cache sizes its columns with it). A ``video`` family also takes ``num_frames`` and gives
        ``(C, F', h, w)``."""
        config = self.vae.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        return config.latent_channels, resolution // factor, resolution // factor

    def latents_config(self) -> Any:
        """What :func:`scale_latents` reads to put a posterior sample into the denoiser's latent space: the VAE's
        config (``scaling_factor``/``shift_factor``, or per-channel ``latents_mean``/``latents_std``). A family whose
        VAE keeps its statistics elsewhere (FLUX.2's batch-norm buffers) returns an object with those fields."""
        return self.vae.config

    def latent_mask(self, mask: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """A loss mask ``[N, 1, H, W]`` at the size of the latents ``latent_shape`` the step's errors are taken on
        (:func:`~.masks.latent_mask`: area interpolation, broadcast over channels and video frames). A family whose
        step sees another latent layout overrides it."""
        return import_target("trl_diffusion_sdpo.families.masks:latent_mask")(mask, latent_shape)  # masked data

    def vae_needs_fp32(self) -> bool:
        """Whether the VAE must encode in float32 (the SDXL VAE overflows in fp16; diffusers flags it)."""
        return bool(getattr(self.vae.config, "force_upcast", False))

    @torch.no_grad()
    def encode_moments(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and standard deviation for ``pixel_values``, unscaled, in float32.

        The VAE computes in its own dtype: an enclosing autocast is switched off, so a VAE kept in float32 (see
        :meth:`vae_needs_fp32`) really encodes in float32 while the denoiser runs in the mixed-precision dtype.
        """
        posterior = self._posterior(pixel_values)
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def encode_sources(self, source_pixels: torch.Tensor) -> torch.Tensor:
        """An editing family's source latents ``[B, S, C, h, w]`` of ``source_pixels [B, S, 3, H, W]`` in [-1, 1]:
        the VAE posterior's mode, scaled into the denoiser's latent space, as the editing pipelines encode their
        input image (``sample_mode="argmax"``): the conditioning is deterministic, only the targets are sampled.
        With :attr:`source_resolution` set the pixels are resized to that square first."""
        batch, sources = source_pixels.shape[:2]
        pixels = source_pixels.flatten(0, 1)
        size = self.source_resolution
        if size is not None and tuple(pixels.shape[-2:]) != (size, size):
            # From the training crop (the data resizes a pair's images alike): bicubic, antialiased when shrinking.
            pixels = torch.nn.functional.interpolate(
                pixels.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True
            ).clamp(-1, 1)
        posterior = self._posterior(pixels)
        latents = scale_latents(posterior.mode(), self.latents_config())
        return latents.reshape(batch, sources, *latents.shape[1:])

    def source_multiple(self) -> int:
        """What a source's side must be a multiple of: the VAE's downsampling (a flow family: times its patch)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def configure_sources(self, args: Any) -> None:
        """Refuse ``source_resolution`` of the config ``args``: this family has no source images to encode at it (the
        editing families take it: :meth:`~.editing.SourceConditioning.configure_sources`). Called from the family's
        :meth:`noiser`, with the config's other checks."""
        if getattr(args, "source_resolution", None) is not None:
            raise ValueError(f"source_resolution is for editing families; {self.name} has no source images")

    # ------------------------------------------------------------------------------------------------- sampling

    def sampling_keywords(self, resolution: int, sources: list[Any] | None = None) -> dict[str, Any]:
        """The keywords of the family's pipeline call that sample what training trains on (online training): a
        ``resolution``-pixel square and, for an editing family, the sources (:class:`~.editing.SourceConditioning`); a
        ``video`` family adds its clip length."""
        return {"height": resolution, "width": resolution}

    def sampled_media(self, output: Any) -> list[Any]:
        """The samples of a pipeline call's ``output`` (``output_type="pil"``): one PIL image each, or, for a ``video``
        family, one list of PIL frames each."""
        return list(output.frames if self.video else output.images)

    def _posterior(self, pixel_values: torch.Tensor):
        vae = self.vae
        with torch.autocast(device_type=vae.device.type, enabled=False):
            return vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist

    # -------------------------------------------------------------------------------------------- the prediction

    def denoiser_conditioning(
        self, prompt_embeds: PromptEmbeddings, time_ids: torch.Tensor | None
    ) -> dict[str, object]:
        """Keyword arguments for :meth:`call_denoiser` (``denoiser(sample, timestep, **kwargs)`` for a UNet)."""
        return {"encoder_hidden_states": prompt_embeds.encoder_hidden_states}

    def call_denoiser(
        self, model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, object]
    ) -> torch.Tensor:
        """One prediction of ``model`` (the policy, possibly DDP-wrapped, or the reference) on ``sample [N, C, h, w]``
        at ``timestep [N]``, with ``conditioning`` from :meth:`denoiser_conditioning`; returns ``[N, C, h, w]``."""
        return model(sample, timestep, **conditioning, return_dict=False)[0]


# ------------------------------------------------------------------ a quantized denoiser
# Here rather than in :mod:`.quantization`: every run asks whether its base is quantized, and only a quantized one
# needs that module's backends, loaders and refusals.


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """A quantized weight: a tensor subclass (quanto's, torchao's, bitsandbytes' ``Params4bit`` data) or integer
    data where a float weight was."""
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if isinstance(data, DTensor):  # FSDP2's shards of an unquantized weight
        return is_quantized_tensor(data.to_local())
    return type(data) not in (torch.Tensor, torch.nn.Parameter) or not data.is_floating_point()


def quantized_parameters(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s quantized parameters (empty: not quantized)."""
    return [name for name, p in module.named_parameters() if is_quantized_tensor(p)]


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether ``module`` was loaded with a quantization config (diffusers' and transformers' ``is_quantized``) or
    holds quantized weights (quantized by hand)."""
    return bool(getattr(module, "is_quantized", False)) or bool(quantized_parameters(module))
