"""The guards against collapse (docs/safeguard.md, "Guards"): each checked against an independent computation, and
through a real tiny run that the config reaches the step and the logs."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from transformers import TrainerCallback, TrainerControl

from tests.helpers.rewind import CopyOutputAt
from trl_diffusion_sdpo import DiffusionSDPOConfig
from trl_diffusion_sdpo.callbacks.alarm import TrainingLogSignal
from trl_diffusion_sdpo.callbacks.guards import PathologyAction
from trl_diffusion_sdpo.callbacks.health import RULE, WINDOWS, PathologyRule, remedies
from trl_diffusion_sdpo.objectives import AutoBeta, DenoisingErrors, build_objective
from trl_diffusion_sdpo.objectives.auto_beta import AUTO_BETA_DECAY, AUTO_BETA_RANGE
from trl_diffusion_sdpo.safeguards.margin import AUTO_MU_START, SafeguardMargin


def _errors(seed: int = 0, pairs: int = 6, winner_shift: float = 0.0) -> DenoisingErrors:
    g = torch.Generator().manual_seed(seed)
    ref_w, ref_l = torch.rand(pairs, generator=g) + 0.5, torch.rand(pairs, generator=g) + 0.5
    pol_w = ref_w + 0.05 * torch.randn(pairs, generator=g) + winner_shift
    pol_l = ref_l + 0.05 * torch.randn(pairs, generator=g)
    return DenoisingErrors(
        pol_w.double().requires_grad_(), pol_l.double().requires_grad_(), ref_w.double(), ref_l.double()
    )


def _raw_margins(e: DenoisingErrors) -> np.ndarray:
    return ((e.policy_winner - e.policy_loser) - (e.reference_winner - e.reference_loser)).detach().numpy()


# ------------------------------------------------------------------------------------------------- the logit guards


def test_a_margin_cap_stops_the_pairs_past_it_and_leaves_the_others_as_diffusion_dpo():
    errors, beta, cap = _errors(seed=1), 200.0, 1.0
    u = -0.5 * beta * _raw_margins(errors)
    assert (u > cap).any() and (u < cap).any()  # both kinds of pair in the batch
    output = build_objective("dpo", beta=beta, max_margin=cap).loss(None, errors)
    output.loss.backward()
    # by hand: d/de_w of mean_i(-logsigmoid(u_i)) is sigmoid(-u_i) * 0.5 * beta / B below the cap, 0 past it
    expected = np.where(u < cap, 1.0 / (1.0 + np.exp(u)) * 0.5 * beta / len(u), 0.0)
    np.testing.assert_allclose(errors.policy_winner.grad.numpy(), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(errors.policy_loser.grad.numpy(), -expected, rtol=1e-12, atol=1e-15)
    expected_loss = np.mean(np.log1p(np.exp(-np.minimum(u, cap))))
    assert output.loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert output.metrics["guard/capped_fraction"].item() == pytest.approx(np.mean(u >= cap))


def test_the_sft_weight_adds_the_winners_plain_error_to_the_dpo_loss():
    errors, beta, weight = _errors(seed=2), 100.0, 0.7
    u = -0.5 * beta * _raw_margins(errors)
    output = build_objective("smpo", beta=beta, sft_weight=weight).loss(
        None, errors, torch.tensor([[0.28, 0.12]] * len(u), dtype=torch.float64)
    )
    span = 0.28201571106910706 - 0.11543526500463486  # SmPO's PickScore normalisation
    w = 10.0 * (2.0 / (1.0 + math.exp(-(0.28 - 0.12) / span)) - 1.0)
    dpo = np.mean(np.logaddexp(0.0, -w * u))
    sft = errors.policy_winner.detach().numpy().mean()
    assert output.loss.item() == pytest.approx(dpo + weight * sft, rel=1e-9)
    assert output.metrics["guard/sft_loss"].item() == pytest.approx(sft, rel=1e-12)
    plain = build_objective("dpo", beta=beta).loss(None, errors)
    assert "guard/sft_loss" not in plain.metrics and "guard/capped_fraction" not in plain.metrics


def test_auto_beta_gives_the_target_gradient_factor_at_the_ema_of_the_margin():
    base, target = 500.0, 0.2
    auto = AutoBeta(base, target)
    objective = build_objective("dpo", beta=base)
    assert auto.objective(objective) is objective  # the configured beta until a step closes
    first, second = _errors(seed=3), _errors(seed=4, winner_shift=0.02)
    auto.observe(first)
    auto.update()
    mean_1 = np.abs(_raw_margins(first)).mean()
    expected = 2 * math.log((1 - target) / target) / mean_1
    assert auto.current() == pytest.approx(expected, rel=1e-5)
    # at the typical margin the gradient factor sigmoid(-|u|) is the target
    assert 1 / (1 + math.exp(0.5 * auto.current() * mean_1)) == pytest.approx(target, rel=1e-4)
    # a second window moves the EMA, and with it beta; the objective uses the new value
    auto.observe(second)
    auto.update()
    ema = AUTO_BETA_DECAY * mean_1 + (1 - AUTO_BETA_DECAY) * np.abs(_raw_margins(second)).mean()
    assert auto.current() == pytest.approx(2 * math.log(4) / ema, rel=1e-5)
    assert auto.current() != pytest.approx(expected, rel=1e-6)
    assert float(auto.objective(objective).beta) == pytest.approx(auto.current())
    # a policy equal to its reference (LoRA at initialisation): a zero margin, beta at the clamp
    still = AutoBeta(base, target)
    e = _errors(seed=5)
    still.observe(DenoisingErrors(e.reference_winner, e.reference_loser, e.reference_winner, e.reference_loser))
    still.update()
    assert still.current() == pytest.approx(base * AUTO_BETA_RANGE)


# -------------------------------------------------------------------------------------------------- the adaptive mu


def test_auto_mu_rises_by_the_step_times_the_relative_violation_and_falls_with_slack():
    margin, step = SafeguardMargin("auto", step=2.0), 2.0
    assert margin.current() == AUTO_MU_START
    worse = _errors(seed=6, winner_shift=0.05)
    margin.observe(worse)
    margin.update()
    w, r = worse.policy_winner.detach().numpy(), worse.reference_winner.numpy()
    risen = AUTO_MU_START + step * (w - r).sum() / r.sum()
    assert margin.current() == pytest.approx(risen, rel=1e-5) and margin.current() > AUTO_MU_START
    better = _errors(seed=7, winner_shift=-0.05)
    margin.observe(better)
    margin.update()
    w, r = better.policy_winner.detach().numpy(), better.reference_winner.numpy()
    assert margin.current() == pytest.approx(risen + step * (w - r).sum() / r.sum(), rel=1e-5)
    assert margin.current() < risen
    # projected on [0, 1]
    for _ in range(50):
        margin.observe(_errors(seed=8, winner_shift=0.5))
        margin.update()
    assert margin.current() == 1.0
    # a fixed mu never moves but by escalation
    fixed = SafeguardMargin(0.3)
    fixed.observe(worse)
    fixed.update()
    assert fixed.current() == 0.3 and fixed.escalate() == pytest.approx(0.65)


def test_auto_mu_acts_on_the_sums_over_every_process(monkeypatch):
    """As under DDP (a second process's pairs arrive through the all-reduce, faked here by adding its sums): mu moves
    by the violation of every process's pairs together, not by this process's alone."""
    from trl_diffusion_sdpo.safeguards import margin as margin_module

    ours = [_errors(seed=20 + m, winner_shift=0.05) for m in range(2)]
    theirs = [_errors(seed=30 + m, winner_shift=-0.04) for m in range(2)]
    w_theirs = np.concatenate([e.policy_winner.detach().numpy() for e in theirs])
    r_theirs = np.concatenate([e.reference_winner.numpy() for e in theirs])
    reduced = []

    def all_reduce_sum(sums: torch.Tensor) -> torch.Tensor:  # the other process's [sum(e_w - e_ref_w), sum(e_ref_w)]
        reduced.append(sums.clone())
        return sums + torch.tensor([(w_theirs - r_theirs).sum(), r_theirs.sum()], dtype=sums.dtype)

    monkeypatch.setattr(margin_module, "all_reduce_sum", all_reduce_sum)
    args = DiffusionSDPOConfig(output_dir="unused", use_cpu=True, safeguard_mu="auto", safeguard_mu_step=3.0)
    margin = SafeguardMargin.from_config(args, num_processes=2)
    for errors in ours:
        margin.observe(errors)
    margin.update()
    assert len(reduced) == 1  # one all-reduce per optimizer step
    w = np.concatenate([*(e.policy_winner.detach().numpy() for e in ours), w_theirs])
    r = np.concatenate([*(e.reference_winner.numpy() for e in ours), r_theirs])
    alone = AUTO_MU_START + 3.0 * sum(
        (e.policy_winner.detach().numpy() - e.reference_winner.numpy()).sum() for e in ours
    ) / sum(e.reference_winner.numpy().sum() for e in ours)
    assert margin.current() == pytest.approx(AUTO_MU_START + 3.0 * (w - r).sum() / r.sum(), rel=1e-5)
    assert margin.current() != pytest.approx(alone, rel=1e-3)  # the other process's pairs changed the step


def _two_process_worker(rank: int, port: int, queue) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        args = DiffusionSDPOConfig(
            output_dir="unused", use_cpu=True, beta=100.0, auto_beta=True, safeguard_mu="auto", safeguard_mu_step=3.0
        )
        auto, margin = AutoBeta.from_config(args, 2), SafeguardMargin.from_config(args, 2)
        # each process its own pairs: the winner above the reference on one, below it on the other
        for micro_batch in range(2):
            errors = _errors(seed=10 * rank + micro_batch, winner_shift=0.05 if rank == 0 else -0.01)
            auto.observe(errors)
            margin.observe(errors)
        auto.update()
        margin.update()
        queue.put((rank, auto.current(), margin.current()))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # by default: the guards on one process above, their sums under DDP in test_distributed.py
def test_two_processes_use_the_beta_and_mu_of_every_processs_pairs():
    """Two gloo processes with different pairs: auto-beta and auto-mu act on the sums over both, the same value on
    each, equal to the value computed from all the pairs together."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_two_process_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((rank, (beta, mu)) for rank, beta, mu in (queue.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    everything = [
        _errors(seed=10 * rank + m, winner_shift=0.05 if rank == 0 else -0.01) for rank in (0, 1) for m in (0, 1)
    ]
    mean_abs = np.mean(np.concatenate([np.abs(_raw_margins(e)) for e in everything]))
    w = np.concatenate([e.policy_winner.detach().numpy() for e in everything])
    r = np.concatenate([e.reference_winner.numpy() for e in everything])
    expected = (2 * math.log(4) / mean_abs, AUTO_MU_START + 3.0 * (w - r).sum() / r.sum())
    for rank in (0, 1):
        assert results[rank] == pytest.approx(expected, rel=1e-5), rank


# ----------------------------------------------------------------------------------------------------------- health


def _pathological_history() -> list[dict[str, float]]:
    # the calibrated rule's pattern: the winner's error above the reference's by more than its margin while the
    # implicit accuracy stays below its bound, in every window of the rule
    delta, acc = RULE.min_delta_winner + 0.03, (RULE.max_implicit_acc or 1.0) - 0.1
    return [{"delta/winner": delta, "implicit_acc": acc, "step": (RULE.window_steps or 1) * k} for k in range(1, 4)]


def _alarm(args, caplog) -> str:
    import logging

    signal, health_logger = TrainingLogSignal(args=args), "trl_diffusion_sdpo.callbacks.health"
    with caplog.at_level(logging.WARNING, logger=health_logger):
        recorded: list[dict[str, float]] = []
        for entry in _pathological_history():
            recorded.append(dict(entry))  # transformers records the log before on_log reads it
            recorded[-1].update(signal.read(recorded, recorded[-1], int(entry["step"])))
    assert recorded[-1]["health/winner_pathology"] == 1.0
    # the alarm's records only: what else the test ran may have logged at INFO, had an earlier test lowered the level
    (message,) = [r.getMessage() for r in caplog.records if r.name == health_logger and r.levelno >= logging.WARNING]
    caplog.clear()
    return message


def test_the_alarm_never_recommends_what_the_run_already_uses(tmp_path, caplog):
    default = DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, safeguard_mu=0.5)
    message = _alarm(default, caplog)
    assert default.safeguarded and default.safeguard_space == "output"
    assert "safeguard_space='output'" not in message
    assert "safeguard_space='update'" in message and "a larger safeguard_mu than 0.5" in message
    off = _alarm(DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, safeguard_space="none"), caplog)
    assert "the safeguard (safeguard_space='output')" in off and "safeguard_space='update'" not in off
    auto = remedies(DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, safeguard_mu="auto"))
    assert "a fixed safeguard_mu such as 0.9" in auto and not any("'auto'" in remedy for remedy in auto)
    strict = DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, safeguard_space="update", safeguard_mu=0.9)
    assert remedies(strict) == ["a smaller learning_rate"]


def test_on_pathology_stop_saves_and_stops_and_escalate_raises_mu_once_per_windows():
    control = TrainerControl()
    PathologyAction("stop")({"health/winner_pathology": 0.0}, control, 1)
    assert not control.should_save and not control.should_training_stop
    PathologyAction("stop")({"health/winner_pathology": 1.0}, control, 2)
    assert control.should_save and control.should_training_stop
    margin = SafeguardMargin(0.5)
    escalate, seen = PathologyAction("escalate", margin), []
    for _ in range(2 * WINDOWS + 2):
        logs = {"health/winner_pathology": 1.0}
        escalate(logs, TrainerControl(), 0)
        seen.append(logs["health/escalations"])
    # at once, then only after the raised mu has had WINDOWS logs to show
    assert seen == [1.0] + [1.0] * WINDOWS + [2.0] + [2.0] * WINDOWS
    assert margin.current() == pytest.approx(0.875)
    warn = {"health/winner_pathology": 1.0}
    PathologyAction("warn", margin)(warn, control := TrainerControl(), 0)
    assert warn == {"health/winner_pathology": 1.0} and not control.should_training_stop


# --------------------------------------------------------------------------------------------------- through a run


class _Weights(TrainerCallback):
    """The trained weights after every optimizer step (before any EMA swap), by name."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.steps = module, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append({k: p.detach().clone() for k, p in self.module.named_parameters() if p.requires_grad})


def _diffusers_ema(steps: list[dict[str, torch.Tensor]], initial: dict[str, torch.Tensor], decay: float):
    """diffusers' EMAModel update, written out: at optimization step ``n`` (from 1) the decay is
    ``min(decay, (1 + k) / (10 + k))`` with ``k = n - 1`` (0 at the first step), and
    ``ema <- ema - (1 - d) * (ema - theta)``."""
    ema = {k: v.clone() for k, v in initial.items()}
    for n, weights in enumerate(steps, start=1):
        k = n - 1
        d = 0.0 if k <= 0 else min(decay, (1 + k) / (10 + k))
        for name, theta in weights.items():
            ema[name] = ema[name] - (1 - d) * (ema[name] - theta)
    return ema


def test_a_run_with_every_guard_logs_them_keeps_the_best_checkpoint_and_saves_the_ema(
    make_trainer, make_pickapic, tmp_path
):
    from diffusers import UNet2DConditionModel

    decay = 0.5
    trainer = make_trainer(
        lora=False,
        eval_dataset=make_pickapic(4),
        max_steps=4,
        beta=500.0,
        auto_beta=True,
        max_margin=0.5,
        sft_weight=0.1,
        safeguard_mu="auto",
        safeguard_mu_step=5.0,
        ema_decay=decay,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        metric_for_best_model="implicit_acc",
        load_best_model_at_end=True,
    )
    initial = {k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
    weights = _Weights(trainer.model)
    trainer.add_callback(weights)
    trainer.train()
    train_logs = [log for log in trainer.state.log_history if "delta/winner" in log]
    eval_logs = [log for log in trainer.state.log_history if "eval_delta/winner" in log]
    assert len(train_logs) == 4 and len(eval_logs) == 2
    for log in train_logs:
        assert {"beta", "safeguard/mu", "guard/capped_fraction", "guard/sft_loss", "margin"} <= set(log)
        assert any(key.startswith("margin/t_q") for key in log)
        assert 50.0 <= log["beta"] <= 5000.0
    assert len({log["beta"] for log in train_logs[1:]}) > 1  # auto-beta moves from step to step
    assert len({log["safeguard/mu"] for log in train_logs}) > 1  # and so does mu
    for log in eval_logs:
        assert {"eval_implicit_acc", "eval_delta/winner", "eval_delta/loser", "eval_margin"} <= set(log)
    assert trainer.state.best_model_checkpoint is not None
    assert trainer.state.best_metric == max(log["eval_implicit_acc"] for log in eval_logs)
    # the EMA saved beside the weights, loaded by diffusers, is the average of the trained weights
    ema = _diffusers_ema(weights.steps, initial, decay)
    saved = UNet2DConditionModel.from_pretrained(str(tmp_path / "out" / "checkpoint-4" / "ema" / "unet"))
    state = saved.state_dict()
    assert not torch.equal(ema["conv_in.weight"], weights.steps[-1]["conv_in.weight"])
    for name, value in ema.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _trained(make_trainer, **overrides) -> dict[str, torch.Tensor]:
    trainer = make_trainer(max_steps=3, beta=500.0, **overrides)
    trainer.train()
    return {k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("adaptive", "fixed"),
    [
        ({"auto_beta": True}, {}),
        ({"safeguard_mu": "auto", "safeguard_mu_step": 50.0}, {"safeguard_mu": 0.5}),
        pytest.param(  # auto mu reaches the step in one space by default (auto_mu)
            {"safeguard_mu": "auto", "safeguard_mu_step": 50.0, "safeguard_space": "parameter"},
            {"safeguard_mu": 0.5, "safeguard_space": "parameter"},
            marks=pytest.mark.slow,
        ),
    ],
    ids=["auto_beta", "auto_mu", "auto_mu_parameter_space"],
)
def test_what_the_adaptive_guards_choose_reaches_the_next_step(make_trainer, adaptive, fixed):
    """The adapted beta and mu move after each step (LoRA starts equal to its reference: the first step's margins
    and winner deltas are 0), so a run whose later steps ignored them would end with the fixed run's weights."""
    moved, still = _trained(make_trainer, **adaptive), _trained(make_trainer, **fixed)
    assert any(not torch.equal(moved[k], still[k]) for k in moved)


def test_margins_by_timestep_quartile_are_the_pooled_means_of_each_quarter_of_the_schedule():
    from collections import defaultdict

    from trl_diffusion_sdpo.step.predictions import (
        QUARTILE_METRICS,
        finish_margin_quartiles,
        record_margin_quartiles,
        reduce_metrics,
    )

    stored: defaultdict[str, list[torch.Tensor]] = defaultdict(list)
    batches = [
        (torch.tensor([0.5, -1.0, 2.0]), torch.tensor([10, 260, 999])),
        (torch.tensor([1.5, 3.0, -0.5, 4.0]), torch.tensor([249, 500, 749, 750])),
    ]
    for logits, timesteps in batches:
        record_margin_quartiles(stored, logits, timesteps, 1000)
    reduced = reduce_metrics(stored, list(QUARTILE_METRICS), 1.0, "cpu")
    finish_margin_quartiles(reduced)
    u = np.concatenate([b[0].numpy() for b in batches])
    quarter = np.concatenate([b[1].numpy() for b in batches]) // 250
    assert set(reduced) == {f"margin/t_q{q + 1}" for q in range(4)}
    for q in range(4):
        assert reduced[f"margin/t_q{q + 1}"] == pytest.approx(u[quarter == q].mean())


def test_early_stopping_patience_on_the_command_line_is_transformers_callback():
    from transformers import EarlyStoppingCallback

    from trl_diffusion_sdpo.callbacks.early_stopping import early_stopping
    from trl_diffusion_sdpo.cli.train import parse_args

    argv = ["--dataset_name", "d", "--model_name_or_path", "m", "--output_dir", "o", "--safeguard_mu", "auto"]
    *_, training_args, _, diffusion_args = parse_args([*argv, "--early_stopping_patience", "2"])
    assert training_args.safeguard_mu == "auto"
    (callback,) = early_stopping(diffusion_args.early_stopping_patience)
    assert isinstance(callback, EarlyStoppingCallback) and callback.early_stopping_patience == 2
    assert early_stopping(parse_args(argv)[3].early_stopping_patience) == []


# ------------------------------------------------------------------------------------- defaults, alarm and resume


def test_an_unset_mu_is_the_authors_value_where_they_measured_the_family_else_the_fallback(make_trainer):
    from trl_diffusion_sdpo.config.defaults import resolve_default
    from trl_diffusion_sdpo.families.sd import StableDiffusionFamily
    from trl_diffusion_sdpo.families.sd3 import StableDiffusion3Family
    from trl_diffusion_sdpo.families.sdxl import StableDiffusionXLFamily

    def mu(family, loss_type):
        return resolve_default("safeguard_mu", family, loss_type).value

    # Fu et al., arXiv 2511.03317: SD1.5 0.9 with Diffusion-DPO and DMPO, 0.2 with DSPO; SDXL 0.6
    assert [mu(StableDiffusionFamily, t) for t in ("dpo", "dmpo", "dspo", "smpo")] == [0.9, 0.9, 0.2, 0.5]
    assert {mu(StableDiffusionXLFamily, t) for t in ("dpo", "dmpo", "dspo", "smpo")} == {0.6}
    assert mu(StableDiffusion3Family, "dpo") == resolve_default("safeguard_mu").value == 0.5
    # through a trainer on the tiny SD base: the run uses 0.9, the saved config keeps "unset", a given mu wins
    trainer = make_trainer()
    assert trainer.args_as_given.safeguard_mu is None
    assert trainer.args.safeguard_mu == 0.9 and trainer.safeguard.margin.current() == 0.9
    assert make_trainer(safeguard_mu=0.3).safeguard.margin.current() == 0.3


def test_with_the_default_settings_on_the_tiny_base_the_alarm_recommends_only_what_is_off(make_trainer, caplog):
    trainer = make_trainer()
    message = _alarm(trainer.args, caplog)
    assert trainer.alarm.signal.args is trainer.args  # the trainer's alarm names the remedies of the run's own config
    assert "safeguard_space='output'" not in message
    assert "safeguard_mu" not in message  # the mu in force is the authors' 0.9, not 0.5: no larger one to name
    assert "safeguard_space='update'" in message and "learning_rate" in message


def _guarded_run(make_trainer, output_dir, copy_at=None, resume=None):
    trainer = make_trainer(
        output_dir=str(output_dir),
        max_steps=5,
        beta=500.0,
        auto_beta=True,
        safeguard_mu="auto",
        safeguard_mu_step=5.0,
        on_pathology="escalate",
        save_strategy="steps",
        save_steps=2,
    )
    if copy_at is not None:
        trainer.add_callback(CopyOutputAt(*copy_at))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_a_resumed_run_continues_with_the_guards_state_of_the_uninterrupted_one(make_trainer, tmp_path):
    """The auto-beta's EMA, the auto mu and the escalations travel in the checkpoint: a run resumed at step 2 logs
    the beta and mu of the uninterrupted run at steps 3 to 5 and ends with its weights (a resume that started the
    guards afresh would restart the EMA and mu from their first values)."""
    # The run interrupted after step 2 is the uninterrupted one up to there: its output folder right after that save.
    straight = _guarded_run(make_trainer, tmp_path / "straight", copy_at=(2, tmp_path / "cut"))
    resumed = _guarded_run(make_trainer, tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))

    def tail(trainer):
        logs = [log for log in trainer.state.log_history if "delta/winner" in log and log["step"] > 2]
        return [log[key] for log in logs for key in ("beta", "safeguard/mu", "health/escalations")]

    assert len(tail(straight)) == 9 and tail(resumed) == pytest.approx(tail(straight), rel=1e-6)
    assert tail(straight)[0] != 500.0 and tail(straight)[1] != AUTO_MU_START  # the guards had moved
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)


def test_on_pathology_escalate_raises_the_mu_the_trainers_safeguard_uses(make_trainer):
    """Through a trainer (not a hand-built PathologyAction): a flagged log raises the safeguard's own mu halfway to 1,
    the next steps' logs carry it, and a run that is not flagged keeps its mu."""
    # the first log escalates; the next WINDOWS logs (the closing summary log among them) wait under the raised mu
    steps = WINDOWS
    flagged = make_trainer(max_steps=steps, logging_steps=1, safeguard_mu=0.5, on_pathology="escalate")
    assert flagged.safeguard.margin.current() == 0.5

    flagged.alarm.signal.rule = PathologyRule(
        windows=1, window_steps=None, min_delta_winner=-1e9, max_implicit_acc=None
    )
    flagged.train()
    logs = [log for log in flagged.state.log_history if "health/escalations" in log and "loss" in log]
    # escalated at the first log, then not again before WINDOWS more logs have passed under the raised mu
    assert len(logs) == steps
    assert [log["safeguard/mu"] for log in logs] == pytest.approx([0.75] * steps)
    assert [log["health/escalations"] for log in logs] == [1.0] * steps
    assert flagged.safeguard.margin.current() == pytest.approx(0.75)

    calm = make_trainer(max_steps=2, logging_steps=1, safeguard_mu=0.5, on_pathology="escalate")
    calm.alarm.signal.rule = PathologyRule(windows=1, window_steps=None, min_delta_winner=1e9, max_implicit_acc=None)
    calm.train()
    assert calm.safeguard.margin.current() == 0.5
    assert all(log["safeguard/mu"] == 0.5 for log in calm.state.log_history if "health/escalations" in log)
