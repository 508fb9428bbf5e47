"""Rectified-flow (flow-matching) families: the base class :class:`FlowMatchingFamily` that the flow transformer
families share (with their common defaults), and their noiser :class:`FlowNoiser`.

For a clean latent ``x0``, a noise ``eps ~ N(0, I)`` and a noise level ``s`` in ``(0, 1]``:

    x_s    = (1 - s) * x0 + s * eps          (the network input, at timestep ``t = 1000 * s``)
    target = eps - x0                        (the velocity the transformer predicts)

As for the UNet families, one ``s`` and one ``eps`` are drawn per PAIR and used by both the winner and the loser,
so the two errors of a pair differ only through the images.

How ``s`` is drawn follows the way each family is trained, through diffusers' helpers
(:func:`diffusers.training_utils.compute_density_for_timestep_sampling` and
:func:`~diffusers.training_utils.compute_loss_weighting_for_sd3`):

1. ``u`` in ``(0, 1)``: ``"logit_normal"`` ``sigmoid(N(logit_mean, logit_std))`` (SD3 paper's default),
   ``"mode"`` (mode sampling with ``mode_scale``), or uniform (``"none"``, ``"sigma_sqrt"``, ``"cosmap"``);
2. ``s`` from the 1000-entry sigma table of the training scheduler at index ``floor(1000 u)``, as diffusers'
   training scripts do (``shift="scheduler"``: the table carries the scheduler's static shift, 3.0 for SD3; FLUX's
   scheduler uses dynamic shifting, so its table is unshifted); or from the unshifted table followed by the
   resolution-dependent shift (``shift="resolution"``, FLUX): ``mu = calculate_shift(seq_len)`` with
   ``seq_len = (h/2)(w/2)`` image tokens of 2x2 latent patches (``h w`` for a transformer that takes latents
   unpatched, Qwen-Image 2.1) and ``s' = e^mu s / (1 + (e^mu - 1) s)``;
3. a per-sample loss weight ``w(s)`` (``"sigma_sqrt"``: ``s^-2``; ``"cosmap"``: ``2 / (pi (1 - 2s + 2s^2))``;
   otherwise 1). A weighted scheme multiplies each branch's squared error by ``w``; it is applied by scaling the
   predictions and the target by ``sqrt(w)`` (see :func:`trl_diffusion_sdpo.step.stages.predict_pairs`), so the
   errors, the objectives and the safeguard all see the weighted problem. With weight 1 (the default schemes)
   nothing is scaled.

Diffusers' schedulers and training helpers are imported when a noiser is built or draws, not when this module is.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..config.checks import Choice, Range
from ..config.rules import FLOW_SHIFTS, FLOW_WEIGHTING_SCHEMES
from ..objectives import objective_class, registered_objectives
from .base import ModelFamily, PromptEmbeddings
from .inversion import FlowInversionNoiser, inversion_settings
from .noising import Device, NoisedPair, Noiser, pair_latents

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "FLOW_SHIFTS",
    "FLOW_WEIGHTING_SCHEMES",
    "UNET_SCALE_BETA",
    "FlowMatchingFamily",
    "FlowNoiser",
    "FlowTimestepSampling",
    "check_flow_config",
    "flow_noised_pair",
    "resolution_shift",
]

logger = logging.getLogger(__name__)


def check_flow_config(config: Any) -> None:
    """The config's flow fields name options of these tables (``None``: the family's default): the config's own
    rules (:data:`~trl_diffusion_sdpo.config.rules.FIELD_RULES`) hold them."""
    Choice(FLOW_WEIGHTING_SCHEMES, optional=True).check("flow_weighting_scheme", config.flow_weighting_scheme)
    Choice(FLOW_SHIFTS, optional=True).check("flow_shift", config.flow_shift)


# A beta from this value up is on the scale of the UNet recipes (Diffusion-DPO: 2000-5000 for SD1.5/SDXL; DMPO:
# 2000-6000), at least 10 times the flow anchors (100 on per-sample mean velocity errors). The objectives say whether
# the warning applies to them (``unet_scale_beta_warning``).
UNET_SCALE_BETA = 1000.0


@dataclass(frozen=True)
class FlowTimestepSampling:
    """How the noise level ``s`` is drawn and weighted (see the module docstring)."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: str = "scheduler"

    def __post_init__(self) -> None:
        # Named as the config fields they come from.
        Choice(FLOW_WEIGHTING_SCHEMES).check("flow_weighting_scheme", self.weighting_scheme)
        Choice(FLOW_SHIFTS).check("flow_shift", self.shift)
        Range(0, low_open=True).check("flow_logit_std", self.logit_std)


def resolution_shift(latent_height: int, latent_width: int, scheduler_config, token_patch_size: int = 2) -> float:
    """FLUX's resolution-dependent shift ``e^mu``, ``mu`` linear in the number of image tokens (``token_patch_size``
    x ``token_patch_size`` latent patches: 2x2 for FLUX.1 and Qwen-Image, 1 for Qwen-Image 2.1) between
    ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)`` of the scheduler config."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # the pipeline module is slow to import

    seq_len = (latent_height // token_patch_size) * (latent_width // token_patch_size)
    mu = calculate_shift(
        seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )
    return math.exp(mu)


def flow_noised_pair(
    mean: torch.Tensor,
    std: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    posterior_eps: torch.Tensor,
    vae_config,
    num_train_timesteps: int = 1000,
) -> NoisedPair:
    """A pair batch noised by rectified flow: ``x0 = scale(mean + std * posterior_eps)``, ``x_s = (1 - s) x0 + s eps``.

    ``mean``/``std`` ``[2B, C, h, w]`` (winners, then losers); ``sigmas`` ``[B]`` and ``noise`` ``[B, C, h, w]`` per
    pair, shared by both images; ``posterior_eps`` ``[B, 2, C, h, w]`` per image. ``timesteps`` are
    ``num_train_timesteps * s`` (float), the target ``eps - x0``; no loss weight (see :meth:`FlowNoiser.noise_pairs`).
    """
    latents = pair_latents(mean, std, posterior_eps, vae_config)
    s = sigmas.to(mean).repeat(2)
    noise = noise.to(mean).repeat(2, *([1] * (mean.dim() - 1)))
    s_b = s.view(-1, *([1] * (mean.dim() - 1)))
    noisy = (1 - s_b) * latents + s_b * noise
    return NoisedPair(latents, noise, noisy, s * num_train_timesteps, noise - latents)


class FlowNoiser(Noiser):
    """Draws ``s`` and ``eps`` per pair and noises pairs, for one training scheduler and one sampling setting;
    ``token_patch_size`` is the side of the latent patch one image token covers (the resolution shift counts them)."""

    def __init__(self, scheduler_config, sampling: FlowTimestepSampling, token_patch_size: int = 2) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.sampling = sampling
        self.scheduler_config = scheduler_config
        self.token_patch_size = token_patch_size
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        # FLUX's resolution shift s -> e^mu s / (1 + (e^mu - 1) s) is the scheduler's own time_shift(mu, 1, s)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        if sampling.shift == "scheduler":
            table = self.scheduler.sigmas
        else:  # the unshifted table (1 down to 1/T)
            table = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps).sigmas
        self.sigma_table = table[: self.num_train_timesteps].float().cpu()  # descending: index 0 is s = 1

    def level_grid(self, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """``num_steps`` levels at the unshifted times ``k / n`` (``k = 1..n``), mapped as the training levels are:
        the sigma table (index ``T (1 - k/n)``, rounded), then FLUX's resolution shift under
        ``flow_shift="resolution"``. Ascending, float64 (the inversion's grid, :mod:`.inversion`)."""
        table = self.sigma_table.double()
        count = len(table)
        index = torch.round(count * (1 - torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps)).long()
        grid = table[index.clamp(0, count - 1)]
        if self.sampling.shift == "resolution":
            grid = self._shifted(grid, latent_shape)
        return grid

    def sample_sigmas(
        self, n: int, latent_shape: tuple[int, ...], generator: torch.Generator | None, device: Device
    ) -> torch.Tensor:
        """``n`` noise levels ``s`` (float32, on the generator's device, then moved to ``device``)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        gen_device = generator.device if generator is not None else device
        s = self.sampling
        u = compute_density_for_timestep_sampling(
            s.weighting_scheme, n, s.logit_mean, s.logit_std, s.mode_scale, device=gen_device, generator=generator
        )
        index = (u * len(self.sigma_table)).long().clamp(0, len(self.sigma_table) - 1)
        sigmas = self.sigma_table.to(gen_device)[index]
        if s.shift == "resolution":
            sigmas = self._shifted(sigmas, latent_shape)
        return sigmas.to(device)

    def _shifted(self, sigmas: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """``sigmas`` under FLUX's resolution shift for ``latent_shape``: the scheduler's ``time_shift`` with
        ``mu = log`` :func:`resolution_shift` (``e^mu s / (1 + (e^mu - 1) s)`` for its exponential shift)."""
        shift = resolution_shift(latent_shape[-2], latent_shape[-1], self.scheduler_config, self.token_patch_size)
        return self.scheduler.time_shift(math.log(shift), 1.0, sigmas)

    def loss_weight(self, sigmas: torch.Tensor) -> torch.Tensor | None:
        """The per-sample weight ``w(s)``, or ``None`` where it is 1 for every sample."""
        if self.sampling.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.sampling.weighting_scheme, sigmas).float()

    def draw(
        self, num_pairs: int, latent_shape: tuple[int, ...], generator: torch.Generator | None, device: Device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The levels (:meth:`sample_sigmas`), then the noise, from ``generator`` on ``device``."""
        sigmas = self.sample_sigmas(num_pairs, latent_shape, generator, device)
        return sigmas, torch.randn((num_pairs, *latent_shape), generator=generator, device=device)

    def noise_pairs(
        self, mean: Tensor, std: Tensor, levels: Tensor, noise: Tensor, posterior_eps: Tensor, vae_config: Any
    ) -> NoisedPair:
        """See :func:`flow_noised_pair`; adds this setting's loss weight."""
        noised = flow_noised_pair(mean, std, levels, noise, posterior_eps, vae_config, self.num_train_timesteps)
        weight = self.loss_weight(levels)
        noised.loss_weight = None if weight is None else weight.to(mean.device).repeat(2)
        return noised


class FlowMatchingFamily(ModelFamily):
    """Base of the rectified-flow transformer families: the transformer is the denoiser, both attention streams are
    the LoRA targets, the noiser is :class:`FlowNoiser` with the family's default sampling, and T5-style prompts are
    cut at ``max_sequence_length`` tokens. A subclass sets ``transformer_class``, the defaults where its model differs
    from the ones below (at least ``default_learning_rate`` and its ``learning_rate_source``), and defines the text
    side (and :meth:`call_denoiser` when its transformer takes another input layout)."""

    denoiser_name = "transformer"
    flow_matching = True
    # Both attention streams (image and text tokens), as flow_grpo's SD3.5 Flow-DPO and diffusers' scripts adapt them.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    # The diffusers transformer class (a subclass matches too) and the pipeline attributes that must exist (they may
    # hold None, as SD3 without T5) for :meth:`matches`: by default the text encoder and its tokenizer, which every
    # text-conditioned pipeline has.
    transformer_class: ClassVar[str]
    required_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")
    # The side of the latent patches the transformer takes: the resolution must be a multiple of it in pixels.
    latent_patch_size: ClassVar[int] = 2
    # The side of the latent patch one image token covers: the resolution shift's image_seq_len counts them (the
    # transformer's patches, but Qwen-Image 2.1 takes latents unpatched and its pipeline counts latent positions).
    token_patch_size: ClassVar[int] = 2
    # How noise levels are drawn when the config leaves flow_weighting_scheme / flow_shift unset: logit-normal(0, 1)
    # levels on the scheduler's sigma table, no loss weighting, as diffusers' SD3 training script and flow_grpo's
    # SD3.5 Flow-DPO draw them.
    default_weighting_scheme: ClassVar[str] = "logit_normal"
    default_flow_shift: ClassVar[str] = "scheduler"
    # Whether the default follows the pipeline's scheduler instead: "resolution" when its config enables dynamic
    # (resolution-dependent) shifting at sampling, else ``default_flow_shift`` (its static table).
    shift_follows_scheduler: ClassVar[bool] = False
    # The prompt length in tokens the pipelines sample with (FLUX.1, FLUX.2, Qwen-Image, Z-Image, Wan) and diffusers'
    # LoRA scripts train with; SD3's script trains with 77.
    default_max_sequence_length: ClassVar[int] = 512
    # The most prompt tokens max_sequence_length may keep (the pipeline's own limit), or None where none is checked.
    max_prompt_tokens: ClassVar[int | None] = None
    # The guidance embedding's value, for transformers that have one (FLUX.1-dev); None for the others.
    default_guidance_scale: ClassVar[float | None] = None
    # The Euler inversion grid's length when noising="inversion" leaves inversion_steps unset: SmPO's SDXL value (no
    # published SmPO recipe for a flow model; a choice of this package, not the authors').
    default_inversion_steps: ClassVar[int] = 10
    # The recommended Diffusion-DPO ``beta`` and (LoRA) learning rate for this family, and where they come from (a
    # paper, a public recipe or a measurement): the one place a family states them. ``defaults_source`` reads
    # "beta: <beta_source>; lr: <learning_rate_source>" unless the family writes it whole (SD3: one recipe gives
    # both). docs/families.md tabulates them and the UNet-scale-beta warning of :meth:`noiser` quotes them.
    default_beta: ClassVar[float] = 100.0
    beta_source: ClassVar[str] = (
        "flow_grpo's SD3.5 Flow-DPO value in the same mean-error units (no published Flow-DPO recipe on mean errors "
        "for this family)"
    )
    default_learning_rate: ClassVar[float]
    learning_rate_source: ClassVar[str]
    defaults_source: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "defaults_source" not in vars(cls) and hasattr(cls, "learning_rate_source"):
            cls.defaults_source = f"beta: {cls.beta_source}; lr: {cls.learning_rate_source}"

    def __init__(
        self, pipeline: DiffusionPipeline, max_sequence_length: int | None = None, guidance_scale: float | None = None
    ) -> None:
        super().__init__(pipeline)
        self.max_sequence_length = max_sequence_length or self.resolve("max_sequence_length")
        unset = guidance_scale is None
        self.guidance_scale = self.resolve("flux_guidance_scale") if unset else float(guidance_scale)
        longest, wanted = self.max_prompt_tokens, self.max_sequence_length
        if longest is not None and wanted > longest:
            raise ValueError(f"max_sequence_length for {self.name} is at most {longest}, got {wanted}")

    @classmethod
    def from_pipeline(cls, pipeline: DiffusionPipeline, **options: Any) -> FlowMatchingFamily:
        """The family with ``max_sequence_length`` and ``guidance_scale`` (keywords; ``None`` keeps the default)."""
        return cls(pipeline, **options)

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        """A transformer of ``transformer_class`` (or a subclass), no UNet, and the ``required_components``."""
        transformer = getattr(pipeline, "transformer", None)
        if getattr(pipeline, "unet", None) is not None or transformer is None:
            return False
        import diffusers  # the class is looked up only when a pipeline has a transformer

        return isinstance(transformer, getattr(diffusers, cls.transformer_class)) and all(
            hasattr(pipeline, name) for name in cls.required_components
        )

    def noiser(self, args: Any) -> FlowNoiser | FlowInversionNoiser:
        """The flow noiser with the ``flow_*`` settings of ``args`` (a ``DiffusionSDPOConfig``), with Euler ReNoise
        inversion on top under ``noising`` (see :mod:`.inversion`); refuses settings and objectives that have no
        flow-matching meaning, naming the field to change, and warns about a UNet-scale ``beta``."""
        objective = objective_class(args.loss_type)
        if objective.not_for_flow_matching:
            usable = [n for n in registered_objectives() if not objective_class(n).not_for_flow_matching]
            raise ValueError(
                f"loss_type={args.loss_type!r} is not supported for {self.name}: {objective.not_for_flow_matching}. "
                f"Use one of {usable}."
            )
        if args.min_timestep != 0 or args.max_timestep is not None:
            raise ValueError(
                f"min_timestep/max_timestep apply to the UNet families; {self.name} draws noise levels with "
                "flow_weighting_scheme, flow_logit_mean/std, flow_mode_scale and flow_shift"
            )
        multiple = self.latent_patch_size * self.spatial_compression
        if args.resolution % multiple != 0:
            raise ValueError(
                f"resolution must be a multiple of {multiple} for {self.name} (the transformer takes "
                f"{self.latent_patch_size}x{self.latent_patch_size} latent patches), got {args.resolution}"
            )
        self.configure_sources(args)
        sampling = FlowTimestepSampling(
            weighting_scheme=args.flow_weighting_scheme or self.resolve("flow_weighting_scheme"),
            logit_mean=args.flow_logit_mean,
            logit_std=args.flow_logit_std,
            mode_scale=args.flow_mode_scale,
            shift=args.flow_shift or self.default_shift(),
        )
        noiser = FlowNoiser(self.training_scheduler_config(), sampling, self.token_patch_size)
        settings = inversion_settings(args, self.resolve("inversion_steps"))
        if settings is not None:
            noiser = FlowInversionNoiser(noiser, settings)
        if objective.unet_scale_beta_warning and args.beta >= UNET_SCALE_BETA:
            logger.warning(
                f"beta={args.beta:g} is Diffusion-DPO's value for SD UNets in scale (2000-5000); {self.name} is a "
                f"flow model trained on mean velocity errors, where beta is {args.beta / self.default_beta:.3g} times "
                f"smaller: its default is beta={self.default_beta:g} with learning_rate="
                f"{self.default_learning_rate:g} ({self.defaults_source}). Leave beta unset for the family's value, "
                "or see docs/families.md before keeping it."
            )
        return noiser

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent along each spatial axis (the VAE's downsampling factor)."""
        return self.pipeline.vae_scale_factor

    def source_multiple(self) -> int:
        """A source's side is a whole number of the transformer's latent patches."""
        return self.latent_patch_size * self.spatial_compression

    def training_scheduler_config(self):
        """The ``FlowMatchEulerDiscreteScheduler`` config whose sigma table the noiser draws from: the pipeline's."""
        return self.pipeline.scheduler.config

    def default_shift(self) -> str:
        """The ``flow_shift`` used when the config leaves it unset: the defaults table's (the class's
        ``default_flow_shift``), or ``"resolution"`` under ``shift_follows_scheduler`` when the scheduler shifts by
        resolution at sampling (a mechanic of the pipeline, not a default)."""
        if self.shift_follows_scheduler and self.pipeline.scheduler.config.get("use_dynamic_shifting", False):
            return "resolution"
        return self.resolve("flow_shift")

    def denoiser_conditioning(
        self, prompt_embeds: PromptEmbeddings, time_ids: torch.Tensor | None
    ) -> dict[str, object]:
        """The sequence and the pooled projection (in the sequence's dtype), as the MMDiT transformers take them; the
        sequence alone for a family without a pooled projection (Wan)."""
        hidden = prompt_embeds.encoder_hidden_states
        if prompt_embeds.pooled is None:
            return {"encoder_hidden_states": hidden}
        return {"encoder_hidden_states": hidden, "pooled_projections": prompt_embeds.pooled.to(hidden.dtype)}

    def guidance(self, num_samples: int, device: torch.device) -> torch.Tensor | None:
        """The guidance value per sample for a guidance-distilled transformer (``guidance_embeds``: FLUX.1-dev, a
        distilled Qwen-Image), else ``None``. Read from the pipeline's module: the called model may be a wrapper."""
        if not getattr(self.denoiser.config, "guidance_embeds", False):
            return None
        return torch.full((num_samples,), self.guidance_scale, device=device, dtype=torch.float32)

    def call_denoiser(
        self, model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, object]
    ) -> torch.Tensor:
        """``model(hidden_states=sample, timestep=t, ...)`` on the latent layout, ``t`` on the 0-1000 scale (SD3)."""
        return model(hidden_states=sample, timestep=timestep, **conditioning, return_dict=False)[0]
