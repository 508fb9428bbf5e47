"""ReNoise inversion, the noising mode of SmPO-Diffusion (Lu et al., arXiv 2506.02698), beside forward noising.

Forward noising makes ``x_t`` from the clean latent ``x0`` and FRESH noise. Inversion instead runs the network's own
deterministic sampler backwards from ``x0`` up to the pair's noise level, without gradients, and trains on the noise
that the inverted ``x_t`` implies: the training input then lies on the trajectory the model would sample through.

The loop (one per micro-batch; a pair's two images share their level and grid; ``n`` grid points ``g_1 < ... < g_n``,
``r`` renoise evaluations). For each row, starting at ``x = x0`` and ``g_0`` "clean", over every grid point
``g_k < level``:

    o_1 = f(x, g_k)                       the network's output at the current sample, at the grid point's timestep
    o_j = f(S_k(x, o_{j-1}), g_k)         j = 2..r: re-evaluated at the sample that the previous output steps to
    x   = S_k(x, mean(o_1, ..., o_r))     the inverse step with the averaged output

``S_k`` is one step of the sampler's ODE from ``g_{k-1}`` to ``g_k``. With ``r = 2`` this is SmPO's training loop
(their ``train.py``: two evaluations, averaged, both at the grid point's timestep); ``r = 1`` is plain DDIM inversion.
The inverted ``x`` sits at the last grid point below the level; the target is what ``x`` implies at the level itself.

DDPM (SD 1.x/2.x, SDXL): diffusers' ``DDIMInverseScheduler`` conventions, read from the pipeline's scheduler config.
Grid ``g_k`` as its ``set_timesteps(n)`` places them (``"leading"``: ``k T/n + steps_offset``, ``k = 0..n-1``;
``"trailing"``); ``S_k`` from ``abar_from = abar[g_k - T // n]`` (or the initial ``abar``: 1 with
``set_alpha_to_one``, else ``abar[0]``) to ``abar_to = abar[g_k]``:

    eps_hat = the output as noise (epsilon; v: sqrt(a_from) v + sqrt(1 - a_from) x; sample: (x - sqrt(a_from) o) /
              sqrt(1 - a_from)),  x0_hat = (x - sqrt(1 - a_from) eps_hat) / sqrt(a_from) (clipped with clip_sample)
    S_k(x, o) = sqrt(a_to) x0_hat + sqrt(1 - a_to) eps_hat
    implied noise  eps* = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t),  target from eps* by the prediction type

This is Euler's method on the probability-flow ODE in the variables ``y = x / sqrt(abar)``,
``sigma = sqrt((1 - abar) / abar)``: ``y_to = y_from + (sigma_to - sigma_from) eps_hat`` (DDIM, Song et al. 2021,
eq. 14).

Rectified flow (SD3, FLUX, Qwen-Image, Z-Image, Wan, FLUX.2): ``x_s = (1 - s) x0 + s eps`` solves
``dx/ds = v = eps - x0``, already the straight variable, so the analogue of the DDIM step is Euler's step in ``s``:

    S_k(x, v) = x + (s_k - s_{k-1}) v                     (s_0 = 0, the clean latent)
    implied noise  eps* = (x_s - (1 - s) x0) / s,  target eps* - x0 = (x_s - x0) / s

with the velocity evaluated at timestep ``1000 s_k`` (the grid point, as in the DDPM loop). Grid: ``n`` points
uniform in the unshifted time, ``u_k = k / n``, mapped to levels exactly as the training levels are (the noiser's
sigma table, carrying the scheduler's static shift, then FLUX's resolution shift where ``flow_shift="resolution"``).

A pair's level is its drawn level; rows whose level is below a grid point stop before it (only their active rows are
evaluated at each step), so a batch costs what its pairs cost one by one. SmPO's own code draws one level per
micro-batch of one pair per device; it uses the first pair's level for every pair when a device holds more (as it
does with the preference weight), which this module does not copy.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..config.checks import Choice, Range
from .noising import DDPMNoiser, Device, NoisedPair, Noiser, noising_mode, prediction_target, unet_noiser

if TYPE_CHECKING:  # annotations only; .flow imports this module
    from .base import ModelFamily, PromptEmbeddings

    FlowNoiser = Noiser  # the flow families' noiser (.flow.FlowNoiser), named without importing .flow

__all__ = [
    "INVERSION_NETWORKS",
    "NOISING_MODES",
    "DDIMInversionNoiser",
    "FlowInversionNoiser",
    "InversionSettings",
    "InversionNoiser",
    "ddim_inverse_step",
    "ddim_inversion_grid",
    "inversion_settings",
    "unet_noiser",
    "renoise_inversion",
    "select_prompts",
]

NOISING_MODES = ("forward", "inversion")
INVERSION_NETWORKS = ("policy", "reference")

# A denoiser call on some rows of the 2B-row batch: (sample [N, ...], timestep [N], row indices [N]) -> output.
RowPredictor = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class InversionSettings:
    """The inversion's grid length ``steps``, its ``renoise`` evaluations per step (averaged), and which network
    inverts (``"policy"``, as SmPO's code does, or ``"reference"``)."""

    steps: int
    renoise: int = 2
    network: str = "policy"

    def __post_init__(self) -> None:
        Range(1, integer=True, hint="SmPO: 5 for SD1.5, 10 for SDXL.").check("inversion_steps", self.steps)
        Range(1, integer=True, hint="SmPO evaluates twice per step (ReNoise).").check(
            "inversion_renoise", self.renoise
        )
        Choice(INVERSION_NETWORKS).check("inversion_network", self.network)


def inversion_settings(args: Any, default_steps: int) -> InversionSettings | None:
    """The inversion the config ``args`` asks for, or ``None`` for forward noising: ``noising="inversion"``, or
    ``noising=None`` with ``loss_type="smpo"`` (the paper's method); ``inversion_steps=None`` takes the family's
    ``default_steps``."""
    if noising_mode(args) == "forward":
        return None
    steps = getattr(args, "inversion_steps", None)
    return InversionSettings(
        steps=default_steps if steps is None else steps,
        renoise=getattr(args, "inversion_renoise", 2),
        network=getattr(args, "inversion_network", "policy"),
    )


def renoise_inversion(
    x0: Tensor,
    levels: Tensor,
    grid: Tensor,
    predict: Callable[[Tensor, int, Tensor], Tensor],
    step: Callable[[int, Tensor, Tensor], Tensor],
    renoise: int,
    num_steps: int | None = None,
) -> Tensor:
    """The ReNoise loop of the module docstring on the rows of ``x0``; returns the inverted samples.

    Args:
        x0: clean latents ``[N, ...]`` (the start).
        levels: each row's level ``[N]``, in the units of ``grid``; a row takes the steps whose grid point is below it.
        grid: the ascending grid points ``[n]``.
        predict: ``predict(sample, k, rows)``: the network's output on ``rows`` at grid point ``k``, without autograd.
        step: ``step(k, sample, output)``: the inverse step ``S_k`` (a pure function of the output).
        renoise: evaluations per step, averaged (``r``).
        num_steps: how many grid points to walk; default: those below the largest level. Every process of a
            multi-process run must pass the same value (the largest level of the GLOBAL micro-batch): the network is
            then called the same number of times on each (a step with no local row evaluates one row and discards
            it), which sharded engines (FSDP, ZeRO-3) need for their collectives.
    """
    x = x0.clone()
    if num_steps is None:
        num_steps = int((grid < levels.max()).sum()) if levels.numel() else 0
    for k in range(num_steps):
        rows = torch.nonzero(grid[k] < levels).flatten()
        if rows.numel() == 0:  # keep the calls in lockstep with the other processes; the output is not used
            probe = torch.zeros(1, dtype=torch.long, device=x.device)
            sample = x[probe]
            for _ in range(renoise):
                predict(sample, k, probe)
            continue
        sample = x[rows]
        outputs = [predict(sample, k, rows).to(sample.dtype)]
        for _ in range(renoise - 1):
            outputs.append(predict(step(k, sample, outputs[-1]), k, rows).to(sample.dtype))
        x[rows] = step(k, sample, sum(outputs[1:], outputs[0]) / len(outputs))
    return x


# -------------------------------------------------------------------------------------------------------------- DDPM


def ddim_inversion_grid(
    num_train_timesteps: int, num_steps: int, timestep_spacing: str = "leading", steps_offset: int = 0
) -> Tensor:
    """The inverse timesteps of an ``num_steps``-step DDIM inversion, ascending (``DDIMInverseScheduler``'s
    placement): ``"leading"``: ``k * (T // n) + steps_offset`` for ``k = 0..n-1``; ``"trailing"``:
    ``round(T - j T / n) - 1`` for ``j = n-1..0``."""
    if num_steps > num_train_timesteps:
        raise ValueError(f"inversion_steps={num_steps} is more than the schedule's {num_train_timesteps} timesteps")
    if timestep_spacing == "leading":
        grid = np.arange(num_steps) * (num_train_timesteps // num_steps) + steps_offset
    elif timestep_spacing == "trailing":
        grid = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)[::-1]).astype(np.int64) - 1
    else:
        raise ValueError(
            f"The scheduler's timestep_spacing={timestep_spacing!r} has no DDIM inversion grid; DDIM inversion "
            "places its timesteps 'leading' or 'trailing'. Set the pipeline scheduler's timestep_spacing to one of "
            "them."
        )
    return torch.as_tensor(np.asarray(grid, dtype=np.int64))


def ddim_inverse_step(
    sample: Tensor,
    output: Tensor,
    alpha_from: Tensor,
    alpha_to: Tensor,
    prediction_type: str = "epsilon",
    clip_range: float | None = None,
) -> Tensor:
    """One DDIM inversion step from ``abar = alpha_from`` to ``alpha_to``: the output as noise ``eps_hat`` and the
    clean estimate ``x0_hat`` at ``alpha_from``, then ``sqrt(alpha_to) x0_hat + sqrt(1 - alpha_to) eps_hat``.
    ``clip_range`` clamps ``x0_hat`` (the scheduler's ``clip_sample``)."""
    beta_from = 1 - alpha_from
    if prediction_type == "epsilon":
        x0_hat = (sample - beta_from**0.5 * output) / alpha_from**0.5
        eps_hat = output
    elif prediction_type == "sample":
        x0_hat = output
        eps_hat = (sample - alpha_from**0.5 * x0_hat) / beta_from**0.5
    elif prediction_type == "v_prediction":
        x0_hat = alpha_from**0.5 * sample - beta_from**0.5 * output
        eps_hat = alpha_from**0.5 * output + beta_from**0.5 * sample
    else:
        raise ValueError(f"Unsupported prediction_type {prediction_type!r} for DDIM inversion")
    if clip_range is not None:
        x0_hat = x0_hat.clamp(-clip_range, clip_range)
    return alpha_to**0.5 * x0_hat + (1 - alpha_to) ** 0.5 * eps_hat


def select_prompts(prompt_embeds: PromptEmbeddings, index: torch.Tensor) -> PromptEmbeddings:
    """The rows ``index`` of every tensor field of ``prompt_embeds`` (a family's embeddings may carry more fields)."""
    values = {
        field.name: value[index] if isinstance(value := getattr(prompt_embeds, field.name), torch.Tensor) else value
        for field in dataclasses.fields(prompt_embeds)
    }
    return type(prompt_embeds)(**values)


class InversionNoiser(Noiser):
    """A family's forward noiser with ReNoise inversion on top: draws and the clean latents come from ``base``; the
    noised input comes from :meth:`invert` (the micro-batch stages call it with the inverting network)."""

    inverts = True

    def __init__(self, base: Noiser, settings: InversionSettings) -> None:
        self.base, self.settings = base, settings
        self.num_train_timesteps = base.num_train_timesteps

    def draw(
        self, num_pairs: int, latent_shape: tuple[int, ...], generator: torch.Generator | None, device: Device
    ) -> tuple[Tensor, Tensor]:
        # The base's draws, unchanged: a run draws the same levels (and its keyed stream stays the same) whichever
        # noising it uses; inversion does not use the noise.
        return self.base.draw(num_pairs, latent_shape, generator, device)

    def noise_pairs(
        self, mean: Tensor, std: Tensor, levels: Tensor, noise: Tensor, posterior_eps: Tensor, vae_config: Any
    ) -> NoisedPair:
        """Forward noising by the base (its ``latents`` and ``timesteps`` are the inversion's start and levels)."""
        return self.base.noise_pairs(mean, std, levels, noise, posterior_eps, vae_config)

    def network(
        self,
        family: ModelFamily,
        policy: torch.nn.Module,
        reference: Callable[..., Tensor] | None,
        prompt_embeds: PromptEmbeddings,
        time_ids: Tensor | None,
    ) -> RowPredictor:
        """The network that inverts (:meth:`~trl_diffusion_sdpo.step.stages.MicroBatchStages.inverting_network`): rows
        of the ``2B``-row batch (winners, then losers), each with its pair's prompt and its own time ids, without
        autograd; ``policy`` (SmPO's code) or ``reference`` (its ``predict``), as the ``settings`` say."""
        batch = prompt_embeds.encoder_hidden_states.shape[0]
        use_reference = self.settings.network == "reference"

        def predict(sample: torch.Tensor, timestep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            pairs = (rows % batch).to(prompt_embeds.encoder_hidden_states.device)
            conditioning = family.denoiser_conditioning(
                select_prompts(prompt_embeds, pairs), None if time_ids is None else time_ids[rows.to(time_ids.device)]
            )
            if use_reference:
                return reference(sample, timestep, **conditioning)
            with torch.no_grad():
                return family.call_denoiser(policy, sample, timestep, conditioning)

        return predict

    @abc.abstractmethod
    def invert(self, noised: NoisedPair, predict: RowPredictor, max_level: Tensor | float | None = None) -> NoisedPair:
        """``noised`` with its ``noisy`` input inverted from its ``latents`` up to its ``timesteps`` by ``predict``
        (the inverting network on rows of the batch, see :data:`RowPredictor`), and the ``noise`` and ``target`` this
        input implies. ``max_level``: the largest level of the global micro-batch (see :func:`renoise_inversion`)."""


class DDIMInversionNoiser(InversionNoiser):
    """The UNet families' inversion: DDIM inversion of the pipeline's schedule with ReNoise averaging (module
    docstring). ``scheduler_config`` is the pipeline scheduler's (grid placement, initial ``abar``, clipping)."""

    def __init__(self, base: DDPMNoiser, settings: InversionSettings, scheduler_config: Any) -> None:
        super().__init__(base, settings)
        from diffusers import DDIMInverseScheduler

        # The config as DDIMInverseScheduler resolves it (its defaults where the pipeline's config has none, or
        # marks a value as defaulted), as SmPO's code builds its inverse scheduler from the pipeline's config.
        config = dict(DDIMInverseScheduler.from_config(scheduler_config).config)
        self.scheduler = base.scheduler
        self.prediction_type = self.scheduler.config.prediction_type
        T = self.num_train_timesteps
        self.grid = ddim_inversion_grid(T, settings.steps, config["timestep_spacing"], int(config["steps_offset"]))
        abar = self.scheduler.alphas_cumprod
        initial = torch.tensor(1.0) if config["set_alpha_to_one"] else abar[0]
        # From g - T // n (or the initial abar below 0) to g, as DDIMInverseScheduler.step goes.
        start = self.grid - T // settings.steps
        start_alpha = torch.where(start >= 0, abar[start.clamp(0, T - 1)], initial)
        self.alpha_from, self.alpha_to = start_alpha, abar[self.grid.clamp(max=T - 1)]
        self.clip_range = float(config["clip_sample_range"]) if config["clip_sample"] else None

    def step(self, k: int, sample: Tensor, output: Tensor) -> Tensor:
        """``S_k``: the DDIM inversion step of grid point ``k``."""
        a_from, a_to = self.alpha_from[k].to(sample), self.alpha_to[k].to(sample)
        return ddim_inverse_step(sample, output, a_from, a_to, self.prediction_type, self.clip_range)

    def invert(self, noised: NoisedPair, predict: RowPredictor, max_level: Tensor | float | None = None) -> NoisedPair:
        x0, t = noised.latents, noised.timesteps
        grid = self.grid.to(t.device)
        num_steps = None if max_level is None else int((grid < max_level).sum())

        def network(sample: Tensor, k: int, rows: Tensor) -> Tensor:
            return predict(sample, grid[k].repeat(rows.numel()), rows)

        noisy = renoise_inversion(x0, t, grid, network, self.step, self.settings.renoise, num_steps)
        abar = self.scheduler.alphas_cumprod.to(device=x0.device)[t].to(x0.dtype)
        abar = abar.view(-1, *([1] * (x0.dim() - 1)))
        noise = (noisy - abar**0.5 * x0) / (1 - abar) ** 0.5
        target = prediction_target(self.scheduler, x0, noise, t)
        return NoisedPair(x0, noise, noisy, t, target, noised.loss_weight)


# --------------------------------------------------------------------------------------------------- rectified flow


class FlowInversionNoiser(InversionNoiser):
    """The flow families' inversion: Euler inversion of the velocity field with ReNoise averaging (module
    docstring)."""

    def __init__(self, base: FlowNoiser, settings: InversionSettings) -> None:
        super().__init__(base, settings)

    def grid(self, latent_shape: tuple[int, ...]) -> Tensor:
        """``settings.steps`` levels at the unshifted times ``k / n`` mapped as the training levels are
        (:meth:`~.flow.FlowNoiser.level_grid`): ascending, float64."""
        return self.base.level_grid(self.settings.steps, latent_shape)

    def invert(self, noised: NoisedPair, predict: RowPredictor, max_level: Tensor | float | None = None) -> NoisedPair:
        x0 = noised.latents
        T = self.num_train_timesteps
        s = noised.timesteps.to(torch.float64) / T  # the rows' levels (timesteps are 1000 s)
        grid = self.grid(tuple(x0.shape[1:])).to(x0.device)
        previous = torch.cat([grid.new_zeros(1), grid[:-1]])
        num_steps = None if max_level is None else int((grid < float(max_level)).sum())

        def network(sample: Tensor, k: int, rows: Tensor) -> Tensor:
            timestep = (grid[k] * T).to(noised.timesteps.dtype).repeat(rows.numel())
            return predict(sample, timestep, rows)

        def step(k: int, sample: Tensor, velocity: Tensor) -> Tensor:
            return sample + (grid[k] - previous[k]).to(sample.dtype) * velocity

        noisy = renoise_inversion(x0, s, grid, network, step, self.settings.renoise, num_steps)
        s_b = s.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        noise = (noisy - (1 - s_b) * x0) / s_b
        return NoisedPair(x0, noise, noisy, noised.timesteps, noise - x0, noised.loss_weight)
