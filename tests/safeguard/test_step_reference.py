"""The trainer's step against a short reference loop written here from the papers' formulas.

The loop trains its own copy of the initial denoiser the way diffusers' Diffusion-DPO research script writes its
step: noise the clean latents, predict with the policy and the frozen reference, take each sample's mean squared
error, form the Diffusion-DPO loss (Wallace et al., arXiv 2311.12908) in the package's convention
(``objectives/dpo.py``: ``u = -beta / 2 * ((e_w - e_w^ref) - (e_l - e_l^ref))``, loss ``mean(-logsigmoid(u))``),
backward, clip, and take a ``torch.optim.AdamW`` step. With a safeguard (Diffusion-SDPO, Fu et al., arXiv
2511.03317) the loser's gradient is scaled by ``lambda``, re-derived here from the paper's rule in each space:

* ``output``: on the predictions' residuals ``r = prediction - target`` (the authors' code), with their ``1e-9``
  added to the dot products of the per-branch mean errors' gradients ``2 r / N``;
* ``parameter``: on the parameter gradients of the loss's winner term ``g_w`` and loser term ``h_l`` themselves;
* ``update``: on the optimizer's actual update: the trainer's ``lambda`` must keep the winner term's first-order
  change ``D = -<g_w, Delta(lambda)>`` at least ``mu`` times that of the winner's own update, and ``lambda`` plus the
  search's resolution must not (``Delta``: a trial step of a copy of the loop's AdamW); the loop then steps with it.

Only the random draws (timesteps or flow levels, the noise, the VAE posterior samples) and the frozen encoders'
outputs are taken from the trainer, as it drew and computed them. After three optimizer steps the trained weights must
equal the loop's within float32 rounding (both run float32 on the CPU, the same kernels on the same shapes mostly,
but their sums in another order). Planted bugs in the loop (a swapped winner and loser, an unscaled loser) show that
the comparison sees a wrong step; the same comparison passes the clean loop in the same test.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.step.predictions import denoising_errors, scale_gradient
from trl_diffusion_sdpo.testing import build_tiny_sd3_pipeline, build_tiny_sd_pipeline

STEPS = 3
BETA = 500.0
MU = 0.5
LR = 1e-3
# AdamW's epsilon above the default 1e-8: its first updates are then linear in a gradient element at float32 rounding
# level instead of sign-like (+-lr whichever way a rounding fell), so two computations of the same step that sum in
# another order end within rounding of each other.
ADAM_EPS = 1e-4
# How far the trainer's weights may be from the loop's, relative to how far training moved them: float32 rounding of
# the same step summed in another order (measured: 0.6e-5 to 2.1e-5 over the cases here); a planted bug moves them by
# the size of the update itself.
WEIGHT_RTOL = 2e-4
# The update space's search returns lambda within max_lambda / 2048 below the largest lambda meeting its target
# (safeguards/update_space.py: RESOLUTION).
UPDATE_RESOLUTION = 1.0 / 2048


@dataclass(frozen=True)
class Kind:
    """A family kind: its tiny pipeline and how the loop noises and calls its denoiser."""

    name: str
    build: Callable[..., Any]
    tokens: int
    flow: bool


KINDS = {
    "unet-epsilon": Kind("unet-epsilon", build_tiny_sd_pipeline, 77, flow=False),
    "flow-velocity": Kind("flow-velocity", build_tiny_sd3_pipeline, 16, flow=True),
}
SPACES = ("none", "output", "parameter", "update")


@dataclass
class Draw:
    """One micro-batch as the trainer drew it: the VAE posterior moments ``mean``/``std`` ``[2B, C, h, w]`` (winners,
    then losers), the posterior samples ``eps [B, 2, C, h, w]``, one noise level ``[B]`` and noise per pair, the
    prompt embeddings of the pairs."""

    mean: torch.Tensor
    std: torch.Tensor
    levels: torch.Tensor
    noise: torch.Tensor
    eps: torch.Tensor
    hidden: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


@dataclass
class LoopResult:
    weights: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    lambdas: list[float] = field(default_factory=list)


# ------------------------------------------------------------------ the reference loop, from the formulas


def clean_latents(draw: Draw, vae_config) -> torch.Tensor:
    """``x0 = (mean + std * eps - shift) * scale``, winners then losers."""
    eps = torch.cat([draw.eps[:, 0], draw.eps[:, 1]])
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (draw.mean + draw.std * eps - shift) * vae_config.scaling_factor


def alphas_cumprod(config) -> torch.Tensor:
    """DDPM's ``abar_t = prod_{s <= t} (1 - beta_s)`` of a linear or scaled-linear ``beta`` schedule."""
    steps = config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, steps, dtype=torch.float64) ** 2
    else:
        assert config.beta_schedule == "linear", config.beta_schedule
        betas = torch.linspace(config.beta_start, config.beta_end, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def noised(kind: Kind, draw: Draw, pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, timestep, target)`` of the ``2B`` rows: DDPM's ``sqrt(abar) x0 + sqrt(1 - abar) eps`` with target
    ``eps``, or rectified flow's ``(1 - s) x0 + s eps`` at timestep ``1000 s`` with target ``eps - x0``; one level and
    one noise per pair, shared by its winner and loser."""
    x0 = clean_latents(draw, pipe.vae.config)
    noise = torch.cat([draw.noise, draw.noise])
    levels = torch.cat([draw.levels, draw.levels])
    if kind.flow:
        s = levels.float().view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * noise, levels.float() * pipe.scheduler.config.num_train_timesteps, noise - x0
    abar = alphas_cumprod(pipe.scheduler.config)[levels].float().view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, levels, noise


def predict(kind: Kind, model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, draw: Draw) -> torch.Tensor:
    hidden = torch.cat([draw.hidden, draw.hidden])
    if kind.flow:
        pooled = torch.cat([draw.pooled, draw.pooled])
        return model(hidden_states=x_t, timestep=t, encoder_hidden_states=hidden, pooled_projections=pooled).sample
    return model(x_t, t, encoder_hidden_states=hidden).sample


def dpo_loss(mse_w, mse_l, ref_w, ref_l, beta: float) -> torch.Tensor:
    """Diffusion-DPO: ``mean(-logsigmoid(-beta / 2 * ((mse_w - ref_w) - (mse_l - ref_l))))``."""
    return -F.logsigmoid(-0.5 * beta * ((mse_w - ref_w) - (mse_l - ref_l))).mean()


def clamp_lambda(numerator: float, rising: float, mu: float) -> float:
    """``clamp((1 - mu) * numerator / rising, 0, 1)`` where the loser's term raises the winner's error
    (``rising > 0``), else 1."""
    return min(max((1 - mu) * numerator / rising, 0.0), 1.0) if rising > 0 else 1.0


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def trial_update(optimizer: torch.optim.AdamW, params: list[torch.Tensor], grad: list[torch.Tensor]) -> torch.Tensor:
    """The update a copy of ``optimizer`` (its moments and step count) would apply to ``params`` given ``grad``."""
    clones = [p.detach().clone().requires_grad_(True) for p in params]
    trial = torch.optim.AdamW(clones, **{k: v for k, v in optimizer.defaults.items() if k in ("lr", "betas", "eps")})
    trial.param_groups[0]["weight_decay"] = optimizer.param_groups[0]["weight_decay"]
    state = copy.deepcopy(optimizer.state_dict())
    state["param_groups"][0]["params"] = list(range(len(clones)))
    trial.load_state_dict(state)
    for c, g in zip(clones, grad):
        c.grad = g.clone()
    trial.step()
    return flat(c.detach() for c in clones) - flat(p.detach() for p in params)


def update_space_decrease(optimizer, params, g_w, h_l, max_norm: float) -> Callable[[float], float]:
    """``D(lambda) = -<g_w, Delta(lambda)>``, ``Delta`` AdamW's update of ``c (g_w + lambda h_l)`` with the clip
    coefficient ``c = min(1, max_norm / (|g_w + lambda h_l| + 1e-6))``."""
    winner = flat(g_w)

    def decrease(lam: float) -> float:
        combined = [w + lam * h for w, h in zip(g_w, h_l)]
        clip = min(1.0, max_norm / (flat(combined).norm().item() + 1e-6))
        return -float(winner @ trial_update(optimizer, params, [clip * g for g in combined]))

    return decrease


def check_update_space_lambda(lam: float, decrease: Callable[[float], float], mu: float, step: int) -> None:
    """The update space's contract: ``lambda`` meets the target ``mu * max(D(0), 0)``, and (below ``max_lambda = 1``)
    ``lambda`` plus the search's resolution misses it: ``lambda`` is within the resolution below the crossing."""
    target = mu * max(decrease(0.0), 0.0)
    slack = 1e-4 * abs(target) + 1e-12  # the trainer's D and the loop's, summed in another order
    assert decrease(lam) >= target - slack, f"step {step}: lambda {lam} lets the winner's error rise past the target"
    if lam < 1.0:
        above = min(lam + UPDATE_RESOLUTION, 1.0)
        assert decrease(above) < target + slack, f"step {step}: lambda {lam} stops short of {above}, which meets it"


def reference_loop(
    kind: Kind,
    space: str,
    pipe,
    initial: torch.nn.Module,
    draws: list[Draw],
    trainer_lambdas: list[float],
    *,
    swap: bool = False,
    unscaled: bool = False,
) -> LoopResult:
    """Train a copy of ``initial`` on ``draws`` (one micro-batch per optimizer step). ``swap`` and ``unscaled`` plant
    bugs: the winner and loser swapped, or the loser's gradient never scaled by ``lambda``. In the update space the
    loop checks the trainer's ``lambda`` (``trainer_lambdas``) against the space's condition and steps with it."""
    policy = copy.deepcopy(initial).train()
    reference = copy.deepcopy(initial).eval().requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=ADAM_EPS, weight_decay=0.0)
    result = LoopResult({})
    for step, draw in enumerate(draws):
        x_t, t, target = noised(kind, draw, pipe)
        prediction = predict(kind, policy, x_t, t, draw)
        with torch.no_grad():
            ref_prediction = predict(kind, reference, x_t, t, draw)
        mse = ((prediction.float() - target.float()) ** 2).mean(dim=[1, 2, 3])
        ref = ((ref_prediction.float() - target.float()) ** 2).mean(dim=[1, 2, 3])
        mse_w, mse_l = mse.chunk(2)
        ref_w, ref_l = ref.chunk(2)
        if swap:
            mse_w, mse_l, ref_w, ref_l = mse_l, mse_w, ref_l, ref_w
        loss = dpo_loss(mse_w, mse_l, ref_w, ref_l, BETA)
        result.losses.append(loss.item())
        if space == "none":
            loss.backward()
        else:
            # the loss's winner term and loser term: each branch's error alone carries the gradient
            g_w = torch.autograd.grad(dpo_loss(mse_w, mse_l.detach(), ref_w, ref_l, BETA), params, retain_graph=True)
            h_l = torch.autograd.grad(dpo_loss(mse_w.detach(), mse_l, ref_w, ref_l, BETA), params)
            if space == "output":
                r_w, r_l = (prediction - target).float().detach().chunk(2)
                n = r_w.numel()
                # the authors' 1e-9 on the gradients 2 r / N of the per-branch mean errors
                dot_ww = (2 / n) ** 2 * float((r_w * r_w).sum())
                dot_lw = (2 / n) ** 2 * float((r_l * r_w).sum())
                lam = min(max((1 - MU) * dot_ww / (dot_lw + 1e-9), 0.0), 1.0) if dot_lw > 0 else 1.0
            elif space == "parameter":
                lam = clamp_lambda(float(flat(g_w) @ flat(g_w)), -float(flat(g_w) @ flat(h_l)), MU)
            else:
                lam = trainer_lambdas[step]
                check_update_space_lambda(lam, update_space_decrease(optimizer, params, g_w, h_l, 1.0), MU, step)
            result.lambdas.append(lam)
            for p, w, h in zip(params, g_w, h_l):
                p.grad = w + (1.0 if unscaled else lam) * h
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result.weights = {name: p.detach().clone() for name, p in policy.named_parameters()}
    return result


# ------------------------------------------------------------------ the trainer's run


def recorded_run(
    kind: Kind, space: str, tmp_path, dataset, lora: bool = False
) -> tuple[Any, torch.nn.Module, list[Draw], Any]:
    """Train the kind's tiny pipeline (fully, or its LoRA adapters) for :data:`STEPS` optimizer steps in ``space``;
    return the pipeline, a copy of the initial denoiser, the micro-batches' draws, and the trainer.

    LoRA starts with ``B = 0``: the initial denoiser with its adapters computes exactly what the base does, so the
    loop's frozen copy of it is the reference the trainer forms by disabling the adapters."""
    pipe = kind.build(seed=0, tokenizer_dir=str(tmp_path / "tokenizer"), max_length=kind.tokens)
    values = dict(
        output_dir=str(tmp_path / "out"),
        resolution=32,
        per_device_train_batch_size=2,
        max_steps=STEPS,
        learning_rate=LR,
        scale_lr=False,
        warmup_steps=0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_epsilon=ADAM_EPS,
        max_grad_norm=1.0,
        logging_steps=1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        beta=BETA,
        max_sequence_length=kind.tokens,
        random_flip=False,
        proportion_empty_prompts=0.0,
    )
    if space == "none":
        values["safeguard_space"] = "none"
    else:
        values.update(safeguard_space=space, safeguard_mu=MU)
    peft = LoraConfig(r=4, lora_alpha=8, init_lora_weights=True, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = DiffusionSDPOTrainer(
        pipe, args=DiffusionSDPOConfig(**values), train_dataset=dataset, peft_config=peft if lora else None
    )
    initial = copy.deepcopy(trainer.family.denoiser)
    draws: list[Draw] = []
    stages = trainer.stages
    noise_pairs, noised_pair = stages.noiser.noise_pairs, stages.noised_pair

    def recording_noise_pairs(mean, std, levels, noise, eps, vae_config):
        draws.append(Draw(*(x.detach().clone() for x in (mean, std, levels, noise, eps))))
        return noise_pairs(mean, std, levels, noise, eps, vae_config)

    def recording_noised_pair(policy, inputs, mode, step):
        batch = noised_pair(policy, inputs, mode, step)
        draws[-1].hidden = batch.prompt_embeds.encoder_hidden_states.detach().clone()
        pooled = batch.prompt_embeds.pooled
        draws[-1].pooled = None if pooled is None else pooled.detach().clone()
        return batch

    stages.noiser.noise_pairs = recording_noise_pairs
    stages.noised_pair = recording_noised_pair
    trainer.train()
    return pipe, initial, draws, trainer


def logged(trainer, metric: str) -> list[float]:
    return [entry[metric] for entry in trainer.state.log_history if metric in entry]


def weight_deviation(trained: torch.nn.Module, initial: torch.nn.Module, loop: LoopResult) -> float:
    """``|w_trainer - w_loop| / |w_trainer - w_initial|`` over every weight."""
    got = dict(trained.named_parameters())
    start = dict(initial.named_parameters())
    assert got.keys() == loop.weights.keys()
    diff = flat(got[k].detach() - loop.weights[k] for k in got)
    moved = flat(got[k].detach() - start[k].detach() for k in got)
    assert moved.norm() > 0, "training did not move the weights"
    return float(diff.norm() / moved.norm())


@pytest.fixture
def run(tmp_path, pickapic_dataset):
    runs = iter(range(100))

    def make(kind: str, space: str, lora: bool = False):
        k = KINDS[kind]
        folder = tmp_path / f"run-{next(runs)}"
        pipe, initial, draws, trainer = recorded_run(k, space, folder, pickapic_dataset, lora)
        assert len(draws) == STEPS
        return k, pipe, initial, draws, trainer

    return make


@pytest.fixture(scope="module")
def clean_runs() -> dict[tuple[str, str, bool], tuple]:
    """The runs of the package as it is, by ``(kind, space, lora)``: kept for the module (:func:`clean_run`)."""
    return {}


@pytest.fixture
def clean_run(run, clean_runs):
    """``run`` of the package as it is, made once per module for each case: the tests below that check a planted
    bug against a clean run read the run the test above compared with the loop (a planted run is made with ``run``,
    after the plant). Nothing reads a run's objects but to copy or compare them."""

    def make(kind: str, space: str, lora: bool = False):
        if (kind, space, lora) not in clean_runs:
            clean_runs[kind, space, lora] = run(kind, space, lora)
        return clean_runs[kind, space, lora]

    return make


@pytest.fixture(scope="module")
def clean_loops() -> dict[tuple[str, str, bool], LoopResult]:
    """The reference loop on each clean run's draws, by ``(kind, space, lora)``: kept for the module
    (:func:`clean_loop`)."""
    return {}


@pytest.fixture
def clean_loop(clean_run, clean_loops):
    """``(run, loop)``: :func:`clean_run`'s run and the reference loop on its draws (with the trainer's logged lambdas,
    which only the update space's loop reads and checks), computed once per module for each case: the loop is a pure
    function of the run's initial denoiser and draws."""

    def make(kind: str, space: str, lora: bool = False):
        made = clean_run(kind, space, lora)
        if (kind, space, lora) not in clean_loops:
            k, pipe, initial, draws, trainer = made
            lambdas = logged(trainer, "safeguard/lambda_min")
            clean_loops[kind, space, lora] = reference_loop(k, space, pipe, initial, draws, lambdas)
        return made, clean_loops[kind, space, lora]

    return make


def same_inputs(a: tuple, b: tuple) -> bool:
    """Whether two runs started from the same denoiser and drew the same micro-batches: the reference loop, a pure
    function of those, is then the same for both."""
    (_, _, initial_a, draws_a, _), (_, _, initial_b, draws_b, _) = a, b
    weights_a, weights_b = dict(initial_a.named_parameters()), dict(initial_b.named_parameters())
    if weights_a.keys() != weights_b.keys() or len(draws_a) != len(draws_b):
        return False
    if not all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a):
        return False
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for da, db in zip(draws_a, draws_b)
        for x, y in zip(vars(da).values(), vars(db).values())
    )


def loop_of(made: tuple, space: str, clean: tuple, clean_result: LoopResult) -> LoopResult:
    """The reference loop on ``made``'s draws: the clean run's loop where both runs had the same inputs (a bug planted
    after the draws leaves them alone), else computed."""
    if same_inputs(made, clean):
        return clean_result
    k, pipe, initial, draws, _ = made
    return reference_loop(k, space, pipe, initial, draws, [])


CASES = [(kind, space, lora) for kind in KINDS for space in SPACES for lora in (False, True)]
# Full tuning of the UNet in every space, of the flow transformer in the exact rule's parameter space, and the UNet's
# LoRA adapters in the parameter space in the default tier; the other cases (the same rules on another denoiser or
# other weights) in the slow tier: plain Diffusion-DPO on the flow transformer and on LoRA adapters is checked by
# default by unet-epsilon-none-full (its gradient) with flow-velocity-parameter-full (the flow's noising, target
# and loss) and unet-epsilon-parameter-lora (the adapters' weights).
DEFAULT = {("unet-epsilon", s, False) for s in SPACES} | {
    ("flow-velocity", "parameter", False),
    ("unet-epsilon", "parameter", True),
}


@pytest.mark.parametrize(
    "kind,space,lora",
    [c if c in DEFAULT else pytest.param(*c, marks=pytest.mark.slow) for c in CASES],
    ids=[f"{k}-{s}-{'lora' if lora else 'full'}" for k, s, lora in CASES],
)
def test_the_trainer_trains_as_the_reference_loop(clean_loop, kind, space, lora):
    (k, pipe, initial, draws, trainer), loop = clean_loop(kind, space, lora)
    lambdas = logged(trainer, "safeguard/lambda_min")
    # rel 2e-4: AdamW turns float32 rounding in a gradient element near zero into a step of the learning rate's size,
    # so the kernels a CPU picks move step 2's loss (LoRA at lr 1e-3 under AVX2 on an AMD EPYC: 8.2e-5 from the loop;
    # 0 with ATEN_CPU_CAPABILITY=default); a swapped branch or a missing lambda moves it by orders more
    assert logged(trainer, "loss") == pytest.approx(loop.losses, rel=2e-4, abs=1e-6)
    if space != "none":
        assert lambdas == pytest.approx(loop.lambdas, abs=1e-4)
        assert min(loop.lambdas) < 1.0 or space == "output", "the safeguard never restricted a step"
    assert weight_deviation(trainer.family.denoiser, initial, loop) < WEIGHT_RTOL


@pytest.mark.parametrize(  # one space by default: the planted swap is caught before any safeguard acts
    "space", ["none", pytest.param("parameter", marks=pytest.mark.slow)]
)
def test_a_swapped_winner_and_loser_is_caught(clean_loop, space):
    (k, pipe, initial, draws, trainer), clean = clean_loop("unet-epsilon", space)  # the swap is planted in the loop
    lambdas = logged(trainer, "safeguard/lambda_min")
    assert weight_deviation(trainer.family.denoiser, initial, clean) < WEIGHT_RTOL  # the clean loop passes
    planted = reference_loop(k, space, pipe, initial, draws, lambdas, swap=True)
    assert weight_deviation(trainer.family.denoiser, initial, planted) > 10 * WEIGHT_RTOL


def test_an_unscaled_loser_is_caught(clean_loop):
    (k, pipe, initial, draws, trainer), clean = clean_loop("unet-epsilon", "parameter")  # planted in the loop
    lambdas = logged(trainer, "safeguard/lambda_min")
    assert min(clean.lambdas) < 1.0  # the safeguard restricts here, so leaving the loser unscaled changes the step
    assert weight_deviation(trainer.family.denoiser, initial, clean) < WEIGHT_RTOL
    planted = reference_loop(k, "parameter", pipe, initial, draws, lambdas, unscaled=True)
    assert weight_deviation(trainer.family.denoiser, initial, planted) > 10 * WEIGHT_RTOL


def test_the_loops_alphas_match_the_schedule_formula():
    """The loop's ``abar`` is DDPM's product (a check of the loop itself against diffusers' schedule)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(alphas_cumprod(scheduler.config).float(), scheduler.alphas_cumprod, rtol=1e-5)
    assert math.isclose(float(alphas_cumprod(scheduler.config)[0]), 1 - 0.00085, rel_tol=1e-9)


def _never_applied(evaluate):
    """Planted: the output space's lambda chosen and logged, never applied to the loser's error."""

    def evaluate_objective(objective, predictions, pair_scores=None, errors=None, loser_weight=None):
        return evaluate(objective, predictions, pair_scores, errors)

    return evaluate_objective


def _applied_to_the_winner(evaluate):
    """Planted: the loser's lambda applied to the winner's error instead."""

    def evaluate_objective(objective, predictions, pair_scores=None, errors=None, loser_weight=None):
        errors = denoising_errors(predictions) if errors is None else errors
        if loser_weight is not None:
            errors.policy_winner = scale_gradient(errors.policy_winner, loser_weight)
        return evaluate(objective, predictions, pair_scores, errors)

    return evaluate_objective


@pytest.mark.parametrize(  # one planted misuse of the lambda by default
    "planted",
    [_never_applied, pytest.param(_applied_to_the_winner, marks=pytest.mark.slow)],
    ids=["never-applied", "on-the-winner"],
)
def test_an_output_space_lambda_applied_wrongly_is_caught(run, clean_loop, monkeypatch, planted):
    """A bug planted in the package: the trainer's step weights the wrong error (or none) by the output space's
    lambda."""
    import trl_diffusion_sdpo.trainer as trainer_module

    made, clean = clean_loop("unet-epsilon", "output")
    k, pipe, initial, draws, trainer = made
    assert weight_deviation(trainer.family.denoiser, initial, clean) < WEIGHT_RTOL  # the clean step passes
    assert min(clean.lambdas) < 1.0  # the safeguard restricts here, so where lambda goes changes the step

    monkeypatch.setattr(trainer_module, "evaluate_objective", planted(trainer_module.evaluate_objective))
    planted_run = run("unet-epsilon", "output")
    k, pipe, initial, draws, trainer = planted_run
    planted_loop = loop_of(planted_run, "output", made, clean)
    assert weight_deviation(trainer.family.denoiser, initial, planted_loop) > 10 * WEIGHT_RTOL


def test_a_store_that_swaps_the_branches_is_caught(run, clean_loop, monkeypatch):
    """A bug planted in the package: the exact rule's one-pass store takes the loser's gradient for the winner's."""
    from trl_diffusion_sdpo.safeguards.gradients import OnePassBranchGradients

    made, clean = clean_loop("unet-epsilon", "parameter")
    k, pipe, initial, draws, trainer = made
    assert weight_deviation(trainer.family.denoiser, initial, clean) < WEIGHT_RTOL  # the clean step passes
    combination = OnePassBranchGradients.combination

    def swapped(self, lam):
        for piece in self.pieces:  # planted: the loser's rows taken for the winner's
            piece[[0, 1]] = piece[[1, 0]]
        return combination(self, lam)

    monkeypatch.setattr(OnePassBranchGradients, "combination", swapped)
    planted_run = run("unet-epsilon", "parameter")
    k, pipe, initial, draws, trainer = planted_run
    planted = loop_of(planted_run, "parameter", made, clean)
    assert weight_deviation(trainer.family.denoiser, initial, planted) > 10 * WEIGHT_RTOL
