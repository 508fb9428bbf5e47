"""ReNoise inversion (SmPO's noising): the noised input, the implied noise and the SmPO loss against an independent
float64 re-typing of the loop of SmPO's ``train.py`` (one pair per device, as their scripts run) on the tiny SD and
SDXL models, the flow analogue against its own re-typed Euler loop, and the trainer with inversion on.

The re-typed loops below are written from the authors' code as read (policy UNet inverts; diffusers'
``DDIMInverseScheduler`` from the pipeline's scheduler config with 5 / 10 steps; the inverse timesteps below the
pair's timestep; two evaluations per step at the step's timestep, the second at the sample the first steps to,
averaged; the target ``(x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``), with diffusers' scheduler and plain tensor
code, not with the package's functions.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

from tests.helpers.common import cpu_launch_fields, lora_config
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.config import INVERSION_NETWORKS, NOISING_MODES
from trl_diffusion_sdpo.families import DDPMNoiser, FlowNoiser, PromptEmbeddings, family_for_pipeline, inversion
from trl_diffusion_sdpo.families.inversion import (
    DDIMInversionNoiser,
    FlowInversionNoiser,
    ddim_inversion_grid,
    renoise_inversion,
)
from trl_diffusion_sdpo.objectives import DenoisingErrors, build_objective
from trl_diffusion_sdpo.step.predictions import denoising_errors, predict_pairs
from trl_diffusion_sdpo.step.stages import MicroBatchStages
from trl_diffusion_sdpo.testing.flow import build_tiny_sd3_pipeline
from trl_diffusion_sdpo.testing.unet import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

BETA, GAMMA, SCORE_MIN, SCORE_MAX = 2000.0, 10.0, 0.1, 0.3
# (winner, loser) scores of three pairs: SmPO's weights differ per pair.
PAIR_SCORES = torch.tensor([[0.29, 0.12], [0.21, 0.18], [0.25, 0.11]], dtype=torch.float64)

# Stable Diffusion 1.5's scheduler config (scheduler/scheduler_config.json) and SDXL base 1.0's, as published.
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
    clip_sample=False,
)
SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    interpolation_type="linear",
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    clip_sample=False,
    use_karras_sigmas=False,
)


def settings(**overrides) -> SimpleNamespace:
    values = dict(
        min_timestep=0,
        max_timestep=None,
        loss_type="smpo",
        noising=None,
        inversion_steps=None,
        inversion_renoise=2,
        inversion_network="policy",
    )
    return SimpleNamespace(**{**values, **overrides})


def build(kind: str, scheduler: str):
    """A float64 tiny pipeline of ``kind`` ("sd" / "sdxl") with the tiny DDPM scheduler or the published config."""
    pipe = build_tiny_sd_pipeline(seed=0) if kind == "sd" else build_tiny_sdxl_pipeline(seed=0)
    if scheduler == "published":
        pipe.scheduler = (
            PNDMScheduler.from_config(SD15_SCHEDULER)
            if kind == "sd"
            else EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
        )
    pipe.unet.double()
    return pipe


def conditioning_inputs(kind: str, batch: int, generator: torch.Generator):
    """Prompt embeddings per pair and time ids per image (SDXL), float64."""
    if kind == "sd":
        return PromptEmbeddings(torch.randn(batch, 5, 32, generator=generator, dtype=torch.float64)), None
    embeds = PromptEmbeddings(
        torch.randn(batch, 5, 32, generator=generator, dtype=torch.float64),
        torch.randn(batch, 16, generator=generator, dtype=torch.float64),
    )
    return embeds, torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * (2 * batch), dtype=torch.float64)


def authors_pair(unet, ref_unet, scheduler_config, steps, x0_pair, t, embeds, time_ids, score_w, score_l):
    """SmPO's train.py step for ONE pair (their batch of one pair per device), re-typed in float64: the inverted
    ``x_t`` [2, ...], the implied noise [2, ...] and the loss."""
    noise_scheduler = DDIMScheduler.from_config(scheduler_config)
    inverse_scheduler = DDIMInverseScheduler.from_config(scheduler_config)
    inverse_scheduler.set_timesteps(steps)
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(torch.float64)
    inverse_scheduler.alphas_cumprod = inverse_scheduler.alphas_cumprod.to(torch.float64)
    inverse_scheduler.initial_alpha_cumprod = inverse_scheduler.initial_alpha_cumprod.to(torch.float64)
    bsz = 2
    timesteps = torch.tensor([t, t])
    hidden = embeds.encoder_hidden_states.repeat(2, 1, 1)
    added = None
    if embeds.pooled is not None:
        added = {"text_embeds": embeds.pooled.repeat(2, 1), "time_ids": time_ids}
    with torch.no_grad():
        start = x0_pair.clone()
        noisy = x0_pair.clone()
        for step_t in inverse_scheduler.timesteps[inverse_scheduler.timesteps < timesteps[0]]:
            first = unet(noisy, step_t.repeat(bsz), hidden, added_cond_kwargs=added).sample
            renoised = inverse_scheduler.step(first, step_t, noisy).prev_sample
            second = unet(renoised, step_t.repeat(bsz), hidden, added_cond_kwargs=added).sample
            noisy = inverse_scheduler.step((first + second) / 2, step_t, noisy).prev_sample
    abar = noise_scheduler.alphas_cumprod[timesteps[0]]
    noise = (noisy - start * abar**0.5) / (1 - abar) ** 0.5
    with torch.no_grad():
        model_losses = (unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample - noise).pow(2)
        model_losses = model_losses.mean(dim=[1, 2, 3])
        ref_losses = (ref_unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample - noise).pow(2)
        ref_losses = ref_losses.mean(dim=[1, 2, 3])
    model_diff = model_losses[0] - model_losses[1]
    ref_diff = ref_losses[0] - ref_losses[1]
    n_w = (score_w - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)
    n_l = (score_l - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)
    p = torch.exp(n_w) / (torch.exp(n_w) + torch.exp(n_l))
    inside = -0.5 * BETA * (2 * p - 1) * GAMMA * (model_diff - ref_diff)
    return noisy, noise, -F.logsigmoid(inside)


def reference_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """A reference that differs from the policy (so the loss is not log 2)."""
    ref = copy.deepcopy(unet)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.97)
    return ref


@pytest.mark.parametrize(
    "kind, scheduler, levels",
    [
        ("sd", "tiny", [1, 437, 999]),
        ("sd", "published", [1, 437, 999]),  # steps_offset=1 and set_alpha_to_one=False, as SD1.5's
        ("sdxl", "tiny", [0, 640, 951]),
        # by default: sd-published (the published scheduler's grid) and sdxl-tiny (SDXL's conditioning in the loop)
        pytest.param("sdxl", "published", [150, 640, 999], marks=pytest.mark.slow),
    ],
)
def test_inversion_matches_the_authors_loop_in_float64(kind, scheduler, levels):
    pipe = build(kind, scheduler)
    family = family_for_pipeline(pipe)
    noiser = family.noiser(settings())
    assert isinstance(noiser, DDIMInversionNoiser) and noiser.settings.steps == (5 if kind == "sd" else 10)
    ref = reference_unet(pipe.unet)
    g = torch.Generator().manual_seed(1)
    batch = len(levels)
    x0 = torch.randn(2 * batch, 4, 4, 4, generator=g, dtype=torch.float64)
    embeds, time_ids = conditioning_inputs(kind, batch, g)
    t = torch.tensor(levels)
    # x0 enters as the posterior mean with std 0 and a unit scaling factor: the clean latents are exactly x0.
    vae_config = SimpleNamespace(scaling_factor=1.0, shift_factor=None, latents_mean=None)
    zeros = torch.zeros(batch, 2, 4, 4, 4, dtype=torch.float64)
    forward = noiser.noise_pairs(x0, torch.zeros_like(x0), t, zeros[:, 0], zeros, vae_config)
    stages = MicroBatchStages(family, noiser, None, None, None, torch.float64, None, "cpu")
    inverted = noiser.invert(forward, stages.inverting_network(pipe.unet, embeds, time_ids))

    def reference(sample, timestep, **conditioning):
        with torch.no_grad():
            return family.call_denoiser(ref, sample, timestep, conditioning)

    with torch.no_grad():
        predictions = predict_pairs(pipe.unet, reference, family, inverted, embeds, time_ids)
    smpo = build_objective("smpo", beta=BETA, smpo_gamma=GAMMA, smpo_score_min=SCORE_MIN, smpo_score_max=SCORE_MAX)
    # The package takes the per-sample errors in float32 (denoising_error); the float64 comparison takes the same
    # mean squared errors in float64, then the package's SmPO objective.
    errors = DenoisingErrors(
        *(
            (prediction - target).pow(2).flatten(1).mean(1)
            for prediction, target in (
                (predictions.policy_winner, predictions.target_winner),
                (predictions.policy_loser, predictions.target_loser),
                (predictions.reference_winner, predictions.target_winner),
                (predictions.reference_loser, predictions.target_loser),
            )
        )
    )
    loss = smpo(predictions, errors, pair_scores=PAIR_SCORES).loss
    loss32 = smpo(predictions, denoising_errors(predictions), pair_scores=PAIR_SCORES).loss

    losses = []
    for i in range(batch):
        rows = [i, batch + i]
        noisy, noise, pair_loss = authors_pair(
            pipe.unet,
            ref,
            pipe.scheduler.config,
            noiser.settings.steps,
            x0[rows],
            levels[i],
            PromptEmbeddings(
                embeds.encoder_hidden_states[i : i + 1], None if embeds.pooled is None else embeds.pooled[i : i + 1]
            ),
            None if time_ids is None else time_ids[rows],
            PAIR_SCORES[i, 0],
            PAIR_SCORES[i, 1],
        )
        torch.testing.assert_close(inverted.noisy[rows], noisy, rtol=0, atol=1e-10)
        torch.testing.assert_close(inverted.noise[rows], noise, rtol=0, atol=1e-10)
        torch.testing.assert_close(inverted.target[rows], noise, rtol=0, atol=1e-10)
        losses.append(pair_loss)
    torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=0, atol=1e-10)
    torch.testing.assert_close(loss32.double(), loss, rtol=1e-4, atol=1e-6)
    # Not vacuous: the inversion moved the pairs with a grid point below their level away from forward noising,
    # and their implied noise is not the drawn (zero) noise.
    assert (inverted.noisy - forward.noisy).abs().amax() > 1e-3
    assert inverted.noise.abs().amax() > 1e-2


def test_the_grid_is_the_inverse_schedulers_for_both_spacings_and_offsets():
    for config in (dict(), dict(steps_offset=1), dict(timestep_spacing="trailing"), dict(steps_offset=1)):
        for steps in (5, 10, 7):
            expected = DDIMInverseScheduler(**config)
            expected.set_timesteps(steps)
            grid = ddim_inversion_grid(
                1000, steps, config.get("timestep_spacing", "leading"), config.get("steps_offset", 0)
            )
            assert torch.equal(grid, expected.timesteps)
    with pytest.raises(ValueError, match="timestep_spacing='linspace' has no DDIM inversion grid"):
        ddim_inversion_grid(1000, 5, "linspace")


def test_each_process_calls_the_network_as_often_as_the_global_batch_needs():
    """Sharded engines need the same number of forward passes on every process: a process whose pairs need fewer
    steps than the global largest level still calls the network (and keeps its rows' values)."""
    calls: list[int] = []

    def predict(sample, k, rows):
        calls.append(rows.numel())
        return torch.ones_like(sample)

    def step(k, sample, output):
        return sample + output

    x0 = torch.zeros(4, 2)
    levels, grid = torch.tensor([2.5, 2.5, 0.5, 0.5]), torch.tensor([0.0, 1.0, 2.0, 3.0])
    out = renoise_inversion(x0, levels, grid, predict, step, 2)
    assert calls == [4, 4, 2, 2, 2, 2] and out[:2].eq(3).all() and out[2:].eq(1).all()
    calls.clear()
    out = renoise_inversion(x0, torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([0.0, 1.0, 2.0]), predict, step, 3, 3)
    # One step for every row, then two probe steps of 3 evaluations on one row each, which change no row.
    assert calls == [4, 4, 4, 1, 1, 1, 1, 1, 1] and out.eq(1).all()


def authors_style_flow_pair(transformer_call, x0_pair, s, grid, steps_below, embeds_call):
    """The Euler analogue for one pair, re-typed: for each grid level below ``s``, two velocity evaluations at the
    level's timestep (the second at the sample the first steps to), averaged; implied noise ``(x - (1-s) x0) / s``."""
    x = x0_pair.clone()
    prev = 0.0
    for level in grid[:steps_below]:
        t = torch.full((2,), float(level) * 1000, dtype=torch.float64)
        v1 = transformer_call(x, t)
        v2 = transformer_call(x + (level - prev) * v1, t)
        x = x + (level - prev) * (v1 + v2) / 2
        prev = level
    return x, (x - (1 - s) * x0_pair) / s


def test_flow_inversion_matches_a_retyped_euler_renoise_loop_in_float64():
    pipe = build_tiny_sd3_pipeline(seed=0)
    pipe.transformer.double()
    family = family_for_pipeline(pipe)
    noiser = family.noiser(
        settings(
            max_sequence_length=None,
            flow_weighting_scheme=None,
            flow_logit_mean=0.0,
            flow_logit_std=1.0,
            flow_mode_scale=1.29,
            flow_shift=None,
            resolution=32,
            beta=100.0,
            inversion_steps=4,
        )
    )
    assert isinstance(noiser, FlowInversionNoiser)
    g = torch.Generator().manual_seed(2)
    batch = 3
    x0 = torch.randn(2 * batch, 16, 4, 4, generator=g, dtype=torch.float64)
    sigmas = torch.tensor([0.05, 0.55, 0.97], dtype=torch.float64)
    embeds = PromptEmbeddings(
        torch.randn(batch, 6, 32, generator=g, dtype=torch.float64),
        torch.randn(batch, pipe.transformer.config.pooled_projection_dim, generator=g, dtype=torch.float64),
    )
    vae_config = SimpleNamespace(scaling_factor=1.0, shift_factor=None, latents_mean=None)
    zeros = torch.zeros(batch, 2, 16, 4, 4, dtype=torch.float64)
    forward = noiser.noise_pairs(x0, torch.zeros_like(x0), sigmas, zeros[:, 0], zeros, vae_config)
    stages = MicroBatchStages(family, noiser, None, None, None, torch.float64, None, "cpu")
    inverted = noiser.invert(forward, stages.inverting_network(pipe.transformer, embeds, None))

    # The grid: 4 levels at unshifted times 1/4..4/4 through SD3's static shift 3, written out.
    u = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    grid = 3 * u / (1 + 2 * u)
    # The noiser's sigma table is float32 (diffusers'): its levels agree to float32 rounding, so the loop too.
    torch.testing.assert_close(noiser.grid((16, 4, 4)), grid, rtol=0, atol=1e-7)
    for i in range(batch):
        rows = [i, batch + i]
        cond = family.denoiser_conditioning(
            PromptEmbeddings(embeds.encoder_hidden_states[[i, i]], embeds.pooled[[i, i]]), None
        )

        def call(x, t, cond=cond):
            with torch.no_grad():
                return family.call_denoiser(pipe.transformer, x, t, cond)

        s = float(sigmas[i])
        noisy, noise = authors_style_flow_pair(call, x0[rows], s, grid, int((grid < s).sum()), None)
        torch.testing.assert_close(inverted.noisy[rows], noisy, rtol=0, atol=1e-6)
        torch.testing.assert_close(inverted.noise[rows], noise, rtol=0, atol=1e-6)
        torch.testing.assert_close(inverted.target[rows], noise - x0[rows], rtol=0, atol=1e-6)
    assert (inverted.noisy - forward.noisy).abs().amax() > 1e-2


def test_smpo_inverts_by_default_and_other_objectives_can(make_pipeline):
    family = family_for_pipeline(make_pipeline())
    assert isinstance(family.noiser(settings()), DDIMInversionNoiser)
    assert type(family.noiser(settings(noising="forward"))) is DDPMNoiser
    assert type(family.noiser(settings(loss_type="dpo"))) is DDPMNoiser
    dpo = family.noiser(settings(loss_type="dpo", noising="inversion", inversion_steps=3, inversion_renoise=1))
    assert isinstance(dpo, DDIMInversionNoiser) and (dpo.settings.steps, dpo.settings.renoise) == (3, 1)
    assert (NOISING_MODES, INVERSION_NETWORKS) == (inversion.NOISING_MODES, inversion.INVERSION_NETWORKS)
    sd3 = family_for_pipeline(build_tiny_sd3_pipeline(seed=0))
    flow_args = dict(
        max_sequence_length=None,
        flow_weighting_scheme=None,
        flow_logit_mean=0.0,
        flow_logit_std=1.0,
        flow_mode_scale=1.29,
        flow_shift=None,
        resolution=32,
        beta=100.0,
    )
    assert type(sd3.noiser(settings(loss_type="dpo", **flow_args))) is FlowNoiser
    assert sd3.noiser(settings(**flow_args)).settings.steps == 10


def test_config_checks_the_inversion_fields(tmp_path):
    def config(**kw):
        return DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)

    assert config(loss_type="smpo").inverts and not config().inverts and config(noising="inversion").inverts
    with pytest.raises(ValueError, match="noising must be one of"):
        config(noising="ddim")
    with pytest.raises(ValueError, match="inversion_renoise"):
        config(inversion_renoise=0)
    with pytest.raises(ValueError, match="inversion_network must be one of"):
        config(inversion_network="ema")
    with pytest.raises(ValueError, match="inversion_network='reference' needs a reference model"):
        config(loss_type="mapo", noising="inversion", inversion_network="reference", safeguard_space="none")


@pytest.mark.parametrize(
    "overrides",
    [
        # by default: the second case trains SMPO's inversion under a safeguard (the parameter space, with the
        # reference network), the third inverts with the policy network, and the output space's step is
        # test_step_reference.py's; the noised pair reaches either space alike
        pytest.param(dict(loss_type="smpo", safeguard_space="output"), marks=pytest.mark.slow),
        dict(loss_type="smpo", safeguard_space="parameter", inversion_network="reference"),
        dict(loss_type="dpo", noising="inversion", safeguard_space="none"),
    ],
)
def test_trainer_trains_with_inversion(make_pickapic, make_pipeline, make_config, overrides, monkeypatch):
    """The trainer's noised pair comes from the inversion (the invert stage runs, with the configured network) and
    the step trains with the safeguard in either space."""
    from tests.helpers.rewards import colour_reward

    calls: list[str] = []
    original = DDIMInversionNoiser.invert

    def recording(self, noised, predict, max_level=None):
        calls.append(self.settings.network)
        return original(self, noised, predict, max_level)

    monkeypatch.setattr(DDIMInversionNoiser, "invert", recording)
    trainer = DiffusionSDPOTrainer(
        make_pipeline(),
        args=make_config(max_steps=2, smpo_score_min=0.1, smpo_score_max=0.3, **overrides),
        train_dataset=make_pickapic(4),
        peft_config=lora_config(),
        reward_funcs=(lambda prompts, images: colour_reward(images, prompts))
        if overrides["loss_type"] == "smpo"
        else None,
    )
    before = {k: v.clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 2
    assert calls == [overrides.get("inversion_network", "policy")] * 2
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_families_train_with_euler_inversion(kind, tmp_path, make_config, monkeypatch):
    """SD3 (static shift) and FLUX.1 (resolution shift) train with the flow inversion: the invert stage runs, with the
    grid the noiser's levels give, and the step moves the adapters."""
    from datasets import Dataset
    from peft import LoraConfig

    from tests.helpers.common import pickapic_rows
    from trl_diffusion_sdpo.testing.flow import build_tiny_flux_pipeline

    build = build_tiny_sd3_pipeline if kind == "sd3" else build_tiny_flux_pipeline
    pipe = build(seed=0, tokenizer_dir=str(tmp_path / "tok"), max_length=16)
    seen: list[tuple[float, ...]] = []
    original = FlowInversionNoiser.invert

    def recording(self, noised, predict, max_level=None):
        seen.append(tuple(self.grid(tuple(noised.latents.shape[1:])).tolist()))
        return original(self, noised, predict, max_level)

    monkeypatch.setattr(FlowInversionNoiser, "invert", recording)
    trainer = DiffusionSDPOTrainer(
        pipe,
        args=make_config(
            beta=100.0,
            max_sequence_length=16,
            max_steps=2,
            noising="inversion",
            inversion_steps=3,
            safeguard_space="none",
        ),
        train_dataset=Dataset.from_list(pickapic_rows(4)),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k"]),
    )
    before = {k: v.clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    assert len(seen) == 2 and len(seen[0]) == 3 and seen[0][-1] == pytest.approx(1.0)
    assert list(seen[0]) == sorted(seen[0]) and seen[0][0] > 0
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("config, space", [("fsdp2.yaml", "parameter"), ("deepspeed_zero3.yaml", "output")])
def test_two_processes_call_the_network_equally_often_whatever_their_own_timesteps(tmp_path, config, space):
    """FSDP2 and ZeRO-3 gather weights inside every forward: each process's inversion must call the network as
    often as the other's, or the run hangs. Two CPU processes, SmPO with inversion, 3 steps: they finish, and each
    step's call count is the same on both although their timesteps (and so their own grid points) differ."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = tmp_path / "calls"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(root / "examples" / "accelerate_configs" / config), "--num_processes", "2", "--mixed_precision", "no",
        "--main_process_port", str(port), str(root / "tests" / "inversion_worker.py"), str(result), space,
        json.dumps(cpu_launch_fields(root / "examples" / "accelerate_configs" / config)),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{result}.{rank}.json").read_text()) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    for (_, calls_0), (_, calls_1) in zip(*ranks):
        assert calls_0 == calls_1 > 0
    grid = [0, 200, 400, 600, 800]  # the tiny scheduler's 5-step grid (steps_offset 0)
    own = [[2 * sum(g < max(levels) for g in grid) for levels, _ in rank] for rank in ranks]
    assert own[0] != own[1]  # the processes' own needs differed at some step: the equal counts are not a coincidence
