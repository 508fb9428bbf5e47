"""The families' noisers against independent computations: DDPM ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with
``abar`` computed here from the schedule's betas, rectified flow ``x_s = (1 - s) x0 + s eps`` with target
``eps - x0``; the draw order (level, then noise, from one generator) that keyed draws rely on; and the checks each
family's ``noiser(args)`` makes on the config."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, PNDMScheduler

from trl_diffusion_sdpo.families import (
    DDPMNoiser,
    FlowNoiser,
    FluxFamily,
    StableDiffusion3Family,
    StableDiffusionFamily,
)

SHAPE = (4, 6, 6)
VAE = SimpleNamespace(scaling_factor=0.5, shift_factor=0.2)


def sd_scheduler(prediction_type: str = "epsilon") -> PNDMScheduler:
    """An SD-style inference scheduler (scaled-linear betas), as pipelines ship it."""
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


def noise_args(**overrides) -> SimpleNamespace:
    values = dict(
        min_timestep=0,
        max_timestep=None,
        loss_type="dpo",
        beta=100.0,
        resolution=64,
        flow_weighting_scheme=None,
        flow_logit_mean=0.0,
        flow_logit_std=1.0,
        flow_mode_scale=1.29,
        flow_shift=None,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def pair_inputs(pairs: int = 3):
    gen = torch.Generator().manual_seed(1)
    mean, std = torch.randn((2 * pairs, *SHAPE), generator=gen), torch.rand((2 * pairs, *SHAPE), generator=gen)
    return mean, std, torch.randn((pairs, 2, *SHAPE), generator=gen)


def clean_latent(mean, std, eps, row: int, pairs: int) -> torch.Tensor:
    """Row ``row`` of the 2B rows (winners, then losers): ``(mean + std * eps - shift) * scale``."""
    pair, branch = row % pairs, row // pairs
    return (mean[row] + std[row] * eps[pair, branch] - VAE.shift_factor) * VAE.scaling_factor


# ---------------------------------------------------------------------------------------------------------- DDPM


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_noiser_noises_and_targets_as_the_forward_process(prediction_type: str) -> None:
    noiser = StableDiffusionFamily(SimpleNamespace(scheduler=sd_scheduler(prediction_type))).noiser(noise_args())
    assert isinstance(noiser, DDPMNoiser) and noiser.num_train_timesteps == 1000
    # independent: scaled-linear betas, abar_t = prod_{i <= t} (1 - beta_i)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, dim=0)
    pairs = 3
    timesteps = torch.tensor([0, 417, 999])
    noise = torch.randn((pairs, *SHAPE), generator=torch.Generator().manual_seed(2))
    mean, std, eps = pair_inputs(pairs)
    noised = noiser.noise_pairs(mean, std, timesteps, noise, eps, VAE)
    assert torch.equal(noised.timesteps, timesteps.repeat(2))
    assert noised.loss_weight is None
    for row in range(2 * pairs):
        x0 = clean_latent(mean, std, eps, row, pairs).double()
        a = abar[timesteps[row % pairs]]
        e = noise[row % pairs].double()  # the same noise for the winner and the loser of a pair
        torch.testing.assert_close(noised.latents[row].double(), x0, atol=1e-5, rtol=0)
        torch.testing.assert_close(noised.noisy[row].double(), a.sqrt() * x0 + (1 - a).sqrt() * e, atol=1e-5, rtol=0)
        target = {"epsilon": e, "v_prediction": a.sqrt() * e - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
        torch.testing.assert_close(noised.target[row].double(), target, atol=1e-5, rtol=0)


def test_ddpm_draw_is_a_timestep_in_range_then_the_noise_from_one_generator() -> None:
    noiser = StableDiffusionFamily(SimpleNamespace(scheduler=sd_scheduler())).noiser(
        noise_args(min_timestep=200, max_timestep=300)
    )
    levels, noise = noiser.draw(64, SHAPE, torch.Generator().manual_seed(7), "cpu")
    replay = torch.Generator().manual_seed(7)
    expected_levels = torch.randint(200, 300, (64,), generator=replay)
    assert torch.equal(levels, expected_levels) and int(levels.min()) >= 200 and int(levels.max()) < 300
    assert torch.equal(noise, torch.randn((64, *SHAPE), generator=replay))
    assert noise.dtype == torch.float32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_timestep": 5000}, "max_timestep=5000 is beyond the scheduler's num_train_timesteps=1000"),
        ({"min_timestep": 1000}, "min_timestep=1000 leaves no timestep to train on"),
    ],
)
def test_ddpm_noiser_refuses_timesteps_beyond_the_schedule(overrides, message) -> None:
    family = StableDiffusionFamily(SimpleNamespace(scheduler=sd_scheduler()))
    with pytest.raises(ValueError, match=message):
        family.noiser(noise_args(**overrides))


# ---------------------------------------------------------------------------------------------------------- flow


def flow_family(kind, **scheduler_kwargs):
    pipeline = SimpleNamespace(vae_scale_factor=8, scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_kwargs))
    return kind(pipeline)


def test_flow_noiser_interpolates_between_data_and_noise() -> None:
    noiser = flow_family(StableDiffusion3Family, shift=3.0).noiser(noise_args())
    assert isinstance(noiser, FlowNoiser) and noiser.num_train_timesteps == 1000
    pairs = 3
    sigmas = torch.tensor([0.05, 0.5, 1.0])
    noise = torch.randn((pairs, *SHAPE), generator=torch.Generator().manual_seed(2))
    mean, std, eps = pair_inputs(pairs)
    noised = noiser.noise_pairs(mean, std, sigmas, noise, eps, VAE)
    for row in range(2 * pairs):
        x0, s, e = clean_latent(mean, std, eps, row, pairs), sigmas[row % pairs], noise[row % pairs]
        torch.testing.assert_close(noised.noisy[row], (1 - s) * x0 + s * e)
        torch.testing.assert_close(noised.target[row], e - x0)
        torch.testing.assert_close(noised.timesteps[row], 1000 * s)
    assert noised.loss_weight is None  # logit-normal: every row weighs 1


def test_flow_draw_is_the_level_then_the_noise_from_one_generator() -> None:
    noiser = flow_family(StableDiffusion3Family, shift=3.0).noiser(noise_args(flow_logit_mean=0.3))
    levels, noise = noiser.draw(32, SHAPE, torch.Generator().manual_seed(5), "cpu")
    replay = torch.Generator().manual_seed(5)
    u = torch.sigmoid(torch.normal(0.3, 1.0, (32,), generator=replay))
    t = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    torch.testing.assert_close(levels.double(), (3 * t / (1 + 2 * t))[(u * 1000).long()], atol=1e-6, rtol=0)
    assert torch.equal(noise, torch.randn((32, *SHAPE), generator=replay))


def test_flow_noisers_take_each_familys_sampling_defaults() -> None:
    assert flow_family(StableDiffusion3Family).noiser(noise_args()).sampling.shift == "scheduler"
    flux = flow_family(FluxFamily, use_dynamic_shifting=True).noiser(noise_args())
    assert flux.sampling.shift == "resolution" and flux.sampling.weighting_scheme == "logit_normal"
    chosen = flow_family(FluxFamily).noiser(noise_args(flow_shift="none", flow_weighting_scheme="cosmap"))
    assert chosen.sampling.shift == "none" and chosen.sampling.weighting_scheme == "cosmap"


def test_flow_noiser_warns_about_a_unet_scale_beta(caplog) -> None:
    family = flow_family(StableDiffusion3Family)
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.families.flow"):
        family.noiser(noise_args(beta=100.0))
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.families.flow"):
        family.noiser(noise_args(beta=5000.0))
    assert "beta=5000 is Diffusion-DPO's value for SD UNets" in caplog.text


@pytest.mark.parametrize(("loss_type", "warns"), [("dpo", True), ("smpo", True), ("dmpo", True), ("dspo", False)])
def test_the_unet_scale_beta_warning_is_for_the_objectives_whose_beta_scales_the_dpo_logit(loss_type, warns, caplog):
    """DSPO's beta is another quantity (0.001 in its SD1.5 form), so 5000 is not a UNet-scale slip there."""
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.families.flow"):
        flow_family(StableDiffusion3Family).noiser(noise_args(loss_type=loss_type, beta=5000.0))
    assert ("Diffusion-DPO's value for SD UNets" in caplog.text) is warns


def test_an_objective_without_a_flow_counterpart_is_refused_with_its_reason_and_the_usable_ones(objective_registry):
    from dataclasses import dataclass

    from trl_diffusion_sdpo.objectives import PreferenceObjective, register_objective

    with pytest.raises(
        ValueError, match=r"DDPM timestep count T.*Use one of \['dmpo', 'dpo', 'dspo', 'sft', 'smpo'\]"
    ):
        flow_family(StableDiffusion3Family).noiser(noise_args(loss_type="mapo"))

    @register_objective
    @dataclass(frozen=True)
    class EpsilonOnly(PreferenceObjective):
        name = "epsilon_only"
        not_for_flow_matching = "it weights by the epsilon-space SNR"

        def loss(self, predictions, errors):
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="'epsilon_only' is not supported for stable-diffusion-3: it weights by"):
        flow_family(StableDiffusion3Family).noiser(noise_args(loss_type="epsilon_only"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss_type": "mapo"}, "loss_type='mapo' is not supported for stable-diffusion-3"),
        ({"max_timestep": 500}, "min_timestep/max_timestep apply to the UNet families"),
        ({"resolution": 40}, "resolution must be a multiple of 16"),
    ],
)
def test_flow_noiser_refuses_settings_without_flow_meaning(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        flow_family(StableDiffusion3Family).noiser(noise_args(**overrides))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"weighting_scheme": "uniform"}, r"flow_weighting_scheme must be one of \['logit_normal'"),
        ({"weighting_scheme": "logit_normal", "shift": "dynamic"}, r"flow_shift must be one of \['scheduler'"),
        ({"weighting_scheme": "logit_normal", "logit_std": float("nan")}, "flow_logit_std must be finite"),
    ],
)
def test_flow_timestep_sampling_refuses_bad_settings_named_as_the_config_fields(fields, message) -> None:
    from trl_diffusion_sdpo.families.flow import FlowTimestepSampling

    with pytest.raises(ValueError, match=message):
        FlowTimestepSampling(**fields)
