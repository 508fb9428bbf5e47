"""Latents and their forward noising: a VAE posterior sample scaled into the denoiser's space as the pipelines
scale it (:func:`scale_latents`), the :class:`Noiser` interface, the noised batch (:class:`NoisedPair`) and the DDPM
noiser of the UNet families (the flow-matching noiser is :class:`~.flow.FlowNoiser`).

One noise level (timestep or sigma) and one noise draw per pair, shared by the winner and the loser, is what makes
the errors of the two branches comparable (the loss compares them at equal level and noise).

DDPM (SD 1.x/2.x, SDXL), for a clean latent ``x0``, a noise ``eps ~ N(0, I)`` and a timestep ``t``:

    x_t    = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                (``DDPMScheduler.add_noise``)
    target = eps, sqrt(abar_t) eps - sqrt(1 - abar_t) x0, or x0    (``prediction_type`` epsilon, v_prediction, sample)

with ``abar_t`` the cumulative product of ``1 - beta`` of the pipeline's schedule.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = [
    "SUPPORTED_PREDICTION_TYPES",
    "check_timestep_range",
    "ddpm_noised_pair",
    "DDPMNoiser",
    "NoisedPair",
    "noising_mode",
    "Noiser",
    "prediction_target",
    "sample_pair_noise",
    "scale_latents",
    "training_scheduler",
    "unet_noiser",
    "unscale_latents",
]

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

Device = torch.device | str


@dataclass
class NoisedPair:
    """The noised batch, ``2B`` rows each (winners, then losers; the two images of a pair share their timestep and
    noise): the clean ``latents``, the ``noise``, the ``noisy`` input at ``timesteps`` and the regression
    ``target``; ``loss_weight`` ``[2B]`` multiplies each row's squared error (the flow families' weighted schemes;
    ``None`` means 1)."""

    latents: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    loss_weight: torch.Tensor | None = None


def pair_latents(mean: torch.Tensor, std: torch.Tensor, posterior_eps: torch.Tensor, vae_config) -> torch.Tensor:
    """The clean latents ``x0 = scale(mean + std * posterior_eps)`` of a pair batch, winners then losers.

    ``mean``/``std`` are ``[2B, C, h, w]`` (winners, then losers); ``posterior_eps`` ``[B, 2, C, h, w]`` per image.
    """
    eps = posterior_eps.to(mean).transpose(0, 1).reshape(mean.shape)  # winners, then losers
    return scale_latents(mean + std * eps, vae_config)


class Noiser(abc.ABC):
    """How a family noises its training inputs: draws one noise level and one noise per pair, then noises a pair
    batch. ``num_train_timesteps`` is the length of the training schedule (MaPO's ``T``)."""

    num_train_timesteps: int

    @abc.abstractmethod
    def draw(
        self, num_pairs: int, latent_shape: tuple[int, ...], generator: torch.Generator | None, device: Device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One noise level ``[num_pairs]`` and one float32 noise ``[num_pairs, *latent_shape]`` per pair, drawn from
        ``generator`` (in that order: a keyed generator must give the same draws on every run) on ``device``."""

    @abc.abstractmethod
    def noise_pairs(
        self, mean: Tensor, std: Tensor, levels: Tensor, noise: Tensor, posterior_eps: Tensor, vae_config: Any
    ) -> NoisedPair:
        """Sample ``x0 = scale(mean + std * posterior_eps)`` and noise it at ``levels`` with ``noise``.

        ``mean``/``std`` are ``[2B, C, h, w]`` (winners, then losers); ``levels`` ``[B]`` and ``noise``
        ``[B, C, h, w]`` from :meth:`draw` are per pair and shared by both images; ``posterior_eps``
        ``[B, 2, C, h, w]`` is per image.
        """


def training_scheduler(pipeline_scheduler: SchedulerMixin) -> DDPMScheduler:
    """A DDPM scheduler with the pipeline scheduler's noise schedule and prediction type.

    Inference pipelines ship PNDM, Euler or DPM-Solver schedulers; training noises with the DDPM forward process of
    the same ``beta`` schedule. Settings such as ``prediction_type`` and ``rescale_betas_zero_snr`` carry over.
    """
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipeline_scheduler.config)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise ValueError(
            f"Unsupported scheduler prediction_type {prediction_type!r}; supported: {SUPPORTED_PREDICTION_TYPES}"
        )
    return scheduler


def check_timestep_range(min_timestep: int, max_timestep: int | None, num_train_timesteps: int) -> None:
    """A ValueError naming the field when ``[min_timestep, max_timestep)`` does not fit the scheduler's timesteps
    (otherwise diffusers fails with an ``IndexError`` at the first step)."""
    if max_timestep is not None and max_timestep > num_train_timesteps:
        raise ValueError(
            f"max_timestep={max_timestep} is beyond the scheduler's num_train_timesteps={num_train_timesteps}; set "
            f"max_timestep to at most {num_train_timesteps} (exclusive bound), or None for all timesteps."
        )
    if min_timestep >= num_train_timesteps:
        raise ValueError(
            f"min_timestep={min_timestep} leaves no timestep to train on: the scheduler has num_train_timesteps="
            f"{num_train_timesteps}; set min_timestep below {num_train_timesteps}."
        )


def sample_pair_noise(
    latents_shape: torch.Size | tuple[int, ...],
    num_train_timesteps: int,
    min_timestep: int,
    max_timestep: int | None,
    device: torch.device | str,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one timestep in ``[min_timestep, max_timestep)`` and one Gaussian noise per pair, in that order.

    ``latents_shape`` is the shape of ONE branch (``[B, C, H, W]``). Draws happen on the generator's device (CPU for
    evaluation's seeded generator) and are moved to ``device``, so a seeded evaluation is reproducible anywhere.
    """
    high = num_train_timesteps if max_timestep is None else max_timestep
    gen_device = generator.device if generator is not None else device
    timesteps = torch.randint(min_timestep, high, (latents_shape[0],), device=gen_device, generator=generator)
    noise = torch.randn(tuple(latents_shape), device=gen_device, dtype=torch.float32, generator=generator)
    return timesteps.to(device), noise.to(device=device, dtype=dtype)


def prediction_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The regression target for the scheduler's ``prediction_type``.

    ``epsilon`` -> ``noise``; ``v_prediction`` -> ``sqrt(abar_t) * noise - sqrt(1 - abar_t) * latents``
    (``scheduler.get_velocity``); ``sample`` -> ``latents``.
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(
        f"Unsupported scheduler prediction_type {prediction_type!r}; supported: {SUPPORTED_PREDICTION_TYPES}"
    )


def ddpm_noised_pair(
    scheduler: DDPMScheduler,
    mean: torch.Tensor,
    std: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    posterior_eps: torch.Tensor,
    vae_config,
) -> NoisedPair:
    """A pair batch noised by DDPM: ``x0 = scale(mean + std * posterior_eps)``, ``x_t`` by ``scheduler.add_noise``
    at ``timesteps`` with ``noise``, and the :func:`prediction_target` (shapes as in :meth:`Noiser.noise_pairs`)."""
    latents = pair_latents(mean, std, posterior_eps, vae_config)
    timesteps = timesteps.repeat(2)
    noise = noise.to(mean).repeat(2, *([1] * (mean.dim() - 1)))
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return NoisedPair(latents, noise, noisy, timesteps, prediction_target(scheduler, latents, noise, timesteps))


class DDPMNoiser(Noiser):
    """The UNet families' noiser: integer timesteps drawn uniformly in ``[min_timestep, max_timestep)`` and the DDPM
    forward process of the pipeline's ``beta`` schedule (:func:`training_scheduler`)."""

    def __init__(self, scheduler: DDPMScheduler, min_timestep: int = 0, max_timestep: int | None = None) -> None:
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        check_timestep_range(min_timestep, max_timestep, self.num_train_timesteps)
        self.min_timestep, self.max_timestep = min_timestep, max_timestep

    @classmethod
    def from_config(cls, pipeline_scheduler: SchedulerMixin, args: Any) -> DDPMNoiser:
        """The noiser of a pipeline whose inference scheduler is ``pipeline_scheduler``, drawing timesteps in the
        ``[min_timestep, max_timestep)`` of ``args`` (checked against the schedule)."""
        return cls(training_scheduler(pipeline_scheduler), args.min_timestep, args.max_timestep)

    def draw(
        self, num_pairs: int, latent_shape: tuple[int, ...], generator: torch.Generator | None, device: Device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_pair_noise(
            (num_pairs, *latent_shape),
            self.num_train_timesteps,
            self.min_timestep,
            self.max_timestep,
            device,
            torch.float32,
            generator,
        )

    def noise_pairs(
        self, mean: Tensor, std: Tensor, levels: Tensor, noise: Tensor, posterior_eps: Tensor, vae_config: Any
    ) -> NoisedPair:
        return ddpm_noised_pair(self.scheduler, mean, std, levels, noise, posterior_eps, vae_config)


def scale_latents(sample: torch.Tensor, vae_config) -> torch.Tensor:
    """A posterior sample ``[N, C, h, w]`` in the denoiser's latent space: ``(sample - shift_factor) *
    scaling_factor`` for the scalar-normalised VAEs (SD, SDXL, SD3, FLUX, Z-Image), or per channel
    ``(sample - latents_mean[c]) / latents_std[c]`` for VAEs whose config carries those lists instead (Qwen-Image,
    Wan), as their pipelines invert it before decoding."""
    latents_mean = getattr(vae_config, "latents_mean", None)
    if latents_mean is not None and getattr(vae_config, "scaling_factor", None) is None:
        view = (1, len(latents_mean), *([1] * (sample.dim() - 2)))
        mean = torch.tensor(latents_mean, dtype=sample.dtype, device=sample.device).view(view)
        std = torch.tensor(vae_config.latents_std, dtype=sample.dtype, device=sample.device).view(view)
        return (sample - mean) / std
    shift = getattr(vae_config, "shift_factor", None)
    if shift is not None:
        sample = sample - shift
    return sample * vae_config.scaling_factor


def unscale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The inverse of :func:`scale_latents`: latents ``[N, C, ...]`` of the denoiser's latent space back to the VAE's
    (what its decoder takes, and what a posterior's mean is in), as the pipelines do before decoding."""
    latents_mean = getattr(vae_config, "latents_mean", None)
    if latents_mean is not None and getattr(vae_config, "scaling_factor", None) is None:
        view = (1, len(latents_mean), *([1] * (latents.dim() - 2)))
        mean = torch.tensor(latents_mean, dtype=latents.dtype, device=latents.device).view(view)
        std = torch.tensor(vae_config.latents_std, dtype=latents.dtype, device=latents.device).view(view)
        return latents * std + mean
    latents = latents / vae_config.scaling_factor
    shift = getattr(vae_config, "shift_factor", None)
    return latents if shift is None else latents + shift


def noising_mode(args: Any) -> str:
    """How the config ``args`` noises: ``"forward"``, or ``"inversion"`` (:mod:`.inversion`); ``noising=None`` takes
    inversion with ``loss_type="smpo"`` (the paper's method) and forward noising otherwise."""
    mode = getattr(args, "noising", None)
    if mode is None:
        mode = "inversion" if getattr(args, "loss_type", None) == "smpo" else "forward"
    return mode


def unet_noiser(family: Any, args: Any) -> Noiser:
    """The UNet families' noiser (``family`` an SD or SDXL family, ``args`` a ``DiffusionSDPOConfig``): DDPM forward
    noising from the pipeline's scheduler, or DDIM ReNoise inversion on top of it under ``noising`` with the family's
    ``inversion_steps`` from the defaults table."""
    family.configure_sources(args)  # refuses source_resolution: no sources
    noiser = DDPMNoiser.from_config(family.pipeline.scheduler, args)
    if noising_mode(args) == "forward":
        return noiser
    # The inversion's module (it imports this one) is loaded by a run that inverts, when it is chosen.
    inversion = importlib.import_module(".inversion", __package__)
    settings = inversion.inversion_settings(args, family.resolve("inversion_steps"))
    return inversion.DDIMInversionNoiser(noiser, settings, family.pipeline.scheduler.config)
