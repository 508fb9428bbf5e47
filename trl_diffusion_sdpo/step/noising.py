"""Forward noising and regression targets for the diffusion training objective.

One timestep and one noise draw per pair, shared by the winner and the loser, is what makes the errors of the two
branches comparable (the loss compares them at equal ``t`` and ``eps``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..families import scale_latents

__all__ = [
    "SUPPORTED_PREDICTION_TYPES",
    "NoisedPair",
    "check_timestep_range",
    "noise_pairs",
    "prediction_target",
    "sample_pair_noise",
    "training_scheduler",
]

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def training_scheduler(pipeline_scheduler: SchedulerMixin) -> DDPMScheduler:
    """A DDPM scheduler with the pipeline scheduler's noise schedule and prediction type.

    Inference pipelines ship PNDM, Euler or DPM-Solver schedulers; training noises with the DDPM forward process of
    the same ``beta`` schedule. Settings such as ``prediction_type`` and ``rescale_betas_zero_snr`` carry over.
    """
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
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one timestep in ``[min_timestep, max_timestep)`` and one Gaussian noise per pair.

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


def noise_pairs(
    scheduler: DDPMScheduler,
    mean: torch.Tensor,
    std: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    posterior_eps: torch.Tensor,
    vae_config,
) -> NoisedPair:
    """Sample latents ``mean + std * posterior_eps`` (scaled), noise them at ``timesteps`` with ``noise``.

    ``mean``/``std`` are ``[2B, C, h, w]``; ``timesteps`` ``[B]`` and ``noise`` ``[B, C, h, w]`` are per pair and
    shared by both images; ``posterior_eps`` ``[B, 2, C, h, w]`` is per image.
    """
    eps = posterior_eps.to(mean).transpose(0, 1).reshape(mean.shape)  # winners, then losers
    latents = scale_latents(mean + std * eps, vae_config)
    timesteps = timesteps.repeat(2)
    noise = noise.to(mean).repeat(2, *([1] * (mean.dim() - 1)))
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return NoisedPair(latents, noise, noisy, timesteps, prediction_target(scheduler, latents, noise, timesteps))
