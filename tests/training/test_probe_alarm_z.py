"""The held-out probe's alarm in its own units (``probe/winner_rise_z``, ``probe_alarm_z``, ``probe_alarm_rise``):
the statistic against scipy's one-sample t on the per-pair, per-draw differences, the one rule offline and online, and
every ``on_pathology`` acting on the alarm (``warn`` naming the step a rewind would restore)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from tests.helpers.rewind import HandDriven, ScriptedAlarm
from trl_diffusion_sdpo.callbacks.guards import PathologyAction
from trl_diffusion_sdpo.callbacks.probe import winner_rise_z
from trl_diffusion_sdpo.callbacks.rewind import RESTORE_Z, ProbeAlarmRule, alarm_steps, probe_alarm
from trl_diffusion_sdpo.step.predictions import denoising_errors

ROWS, HELD = 8, 2
DPO = {"safeguard_space": "none"}
SCRIPTED = {"probe_noise_draws": 2}  # where the alarm is scripted, the probe's figures are unread: two draws do


@pytest.mark.parametrize("shape", [(4, 8), (2, 3), (16, 1)])
def test_the_statistic_is_the_one_sample_t_of_the_differences_over_pairs_and_draws(shape):
    d = np.random.default_rng(sum(shape)).normal(0.01, 0.02, size=shape)
    z = winner_rise_z(float(d.sum()), float((d * d).sum()), d.size)
    assert z == pytest.approx(stats.ttest_1samp(d.ravel(), 0.0).statistic, rel=1e-9)


def test_the_statistic_without_a_spread():
    assert np.isnan(winner_rise_z(0.3, 0.09, 1))  # one reading: nothing to measure its spread by
    assert winner_rise_z(0.0, 0.0, 8) == 0.0  # the policy is still the reference
    assert winner_rise_z(0.8, 0.08, 8) == np.inf  # eight equal rises


def _differences_by_hand(probe, policy) -> np.ndarray:
    """``d_ij`` (draw ``j``, pair ``i``): the probe's draws taken again one after another from its generator, each
    noised pair predicted and its winner errors subtracted here."""
    stages, rows = probe.stages, []
    stages.draws.start_evaluation(probe.seed)
    try:
        with torch.no_grad():
            noised = [stages.noised_pair(policy, probe.batch, "eval", 0) for _ in range(probe.draws)]
            for pair in noised:
                errors = denoising_errors(stages.predict_noised(policy, pair, separate_branches=False))
                rows.append((errors.policy_winner.double() - errors.reference_winner.double()).cpu().numpy())
    finally:
        stages.draws.end_evaluation()
    return np.stack(rows)


def test_the_probes_statistic_equals_scipy_on_its_per_pair_per_draw_differences(make_trainer, make_pickapic):
    trainer = make_trainer(
        train_dataset=make_pickapic(ROWS), max_steps=2, probe_steps=1, probe_pairs=HELD, probe_noise_draws=3, **DPO
    )
    trainer.train()  # the policy moved away from the reference: the differences are not all 0
    probe, policy = trainer.probe.probe, trainer.policy
    policy.eval()
    d = _differences_by_hand(probe, policy)
    metrics = probe.measure(policy, trainer.args.device)
    assert d.shape == (3, HELD) and np.ptp(d[:, 0]) > 0  # the draws differ
    assert metrics["probe/winner_rise_z"] == pytest.approx(stats.ttest_1samp(d.ravel(), 0.0).statistic, rel=1e-6)
    assert metrics["probe/delta_winner"] == pytest.approx(d.mean(), rel=1e-6)


def test_the_sums_are_reduced_over_processes_before_the_statistic_is_formed(make_trainer, make_pickapic):
    trainer = make_trainer(train_dataset=make_pickapic(ROWS), max_steps=1, probe_steps=1, probe_pairs=HELD,
                           probe_noise_draws=2, **DPO)  # fmt: skip
    trainer.train()
    probe, policy = trainer.probe.probe, trainer.policy
    policy.eval()
    # Two processes of one pair each: process 1's sums, then process 0 measures with a reduction that adds them.
    batch, sums = probe.batch, {}

    def keep(local):
        sums["process 1"] = local
        return local

    def add(local):
        return local + sums["process 1"]

    draws = probe.stages.draws  # each process keeps its own row of the draws made for both
    draws.num_processes, draws.rows_per_process["eval"] = 2, 1
    whole = []
    for index, reduce in ((1, keep), (0, add)):
        draws.process_index, probe._noised, probe.reduce = index, None, reduce
        probe.batch = {k: v[index : index + 1] if getattr(v, "dim", lambda: 1)() else v for k, v in batch.items()}
        whole.append(_differences_by_hand(probe, policy))
        reduced = probe.measure(policy, trainer.args.device)
    whole = np.concatenate(whole, axis=1)
    assert np.ptp(whole) > 0
    assert reduced["probe/winner_rise_z"] == pytest.approx(stats.ttest_1samp(whole.ravel(), 0.0).statistic, rel=1e-6)


def test_one_rule_offline_and_online_from_the_config_fields():
    from trl_diffusion_sdpo import DiffusionSDPOConfig
    from trl_diffusion_sdpo.online.config import OnlineDiffusionSDPOConfig

    kinds = (DiffusionSDPOConfig, OnlineDiffusionSDPOConfig)
    defaults = [probe_alarm(kind(output_dir="unused", use_cpu=True)) for kind in kinds]
    assert defaults[0] == defaults[1]
    fields = DiffusionSDPOConfig.__dataclass_fields__
    assert defaults[0] == ProbeAlarmRule.relative(fields["probe_alarm_rise"].default, fields["probe_alarm_z"].default)
    set_ = [probe_alarm(kind(output_dir="unused", use_cpu=True, probe_alarm_z=1.25, probe_alarm_rise=3.0))
            for kind in kinds]  # fmt: skip
    assert set_ == [ProbeAlarmRule.relative(3.0, 1.25)] * 2


def _forced(trainer, unhealthy: set[int], patience: int = 2) -> None:
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=patience, unhealthy_steps=unhealthy)


@pytest.mark.slow  # by default: test_warn_warns_once_per_unhealthy_episode reads the same summary and warnings
def test_warn_warns_naming_the_step_a_rewind_would_restore(make_trainer, make_pickapic, caplog):
    trainer = make_trainer(train_dataset=make_pickapic(ROWS), max_steps=4, probe_steps=1, probe_pairs=HELD,
                           **SCRIPTED, **DPO)  # fmt: skip
    assert trainer.args.on_pathology == "warn"
    _forced(trainer, {3, 4})  # healthy at steps 1 and 2; fires at 4
    with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo"):
        trainer.train()
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Training "))
    assert f"its alarm ({trainer.probe_alarm.signal.rule.describe()}) acts as on_pathology='warn'" in summary
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "held-out probe's alarm" in r.getMessage()
    ]
    assert len(warnings) == 1 and warnings[0].startswith("Step 4:")
    assert "on_pathology='rewind' would restore step 2's weights" in warnings[0]
    assert trainer.state.global_step == 4  # warn only
    fired = [e["step"] for e in trainer.state.log_history if e.get("health/probe_alarm") == 1.0]
    assert fired == [4]


@pytest.mark.slow  # by default: test_run_record.py's test_health_probe_alarm_is_in_every_log_after_a_probe[stop]
def test_stop_stops_at_the_probes_alarm(make_trainer, make_pickapic):
    stop = make_trainer(train_dataset=make_pickapic(ROWS), max_steps=6, probe_steps=1, probe_pairs=HELD,
                        on_pathology="stop", **SCRIPTED, **DPO)  # fmt: skip
    _forced(stop, {2, 3})
    stop.train()
    assert stop.state.global_step == 3


def test_safeguard_switches_at_the_probes_alarm(make_trainer, make_pickapic):
    switch = make_trainer(train_dataset=make_pickapic(ROWS), max_steps=4, probe_steps=1, probe_pairs=HELD,
                          on_pathology="safeguard", **SCRIPTED, **DPO)  # fmt: skip
    assert switch.safeguard is None
    _forced(switch, {2}, patience=1)
    switch.train()
    assert switch.alarm.action.switched_at == 2
    assert switch.safeguard is not None and switch.state.global_step == 4


def test_the_docs_state_the_measured_cost_of_the_noise_draws():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    page = " ".join((root / "docs" / "safeguard.md").read_text().split())
    result = json.loads((root / "benchmarks" / "results" / "probe" / "cpu-probe-cost-draws-tiny.json").read_text())
    shares = {run["probe_noise_draws"]: f"{100 * run['probe_share_of_training']:.1f}%" for run in result["runs"]}
    stated = f"{shares[1]} of the training time with 1 draw, {shares[4]} with 4, {shares[8]} with 8 (the default)"
    assert stated in page


def test_warn_warns_once_per_unhealthy_episode(make_trainer, make_pickapic, caplog):
    trainer = make_trainer(train_dataset=make_pickapic(ROWS), max_steps=8, probe_steps=1, probe_pairs=HELD,
                           **SCRIPTED, **DPO)  # fmt: skip
    # patience 2: the alarm fires at 3 and again at 5 (no healthy probe between: one episode), healthy at 6, fires at 8
    assert trainer.args.on_pathology == "warn"
    _forced(trainer, {2, 3, 4, 5, 7, 8})
    with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo"):
        trainer.train()
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Training "))
    assert f"its alarm ({trainer.probe_alarm.signal.rule.describe()}) acts as on_pathology='warn'" in summary
    assert trainer.state.global_step == 8  # warn only
    fired = [e["step"] for e in trainer.state.log_history if e.get("health/probe_alarm") == 1.0]
    assert fired == [3, 5, 8]
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "held-out probe's alarm" in r.getMessage()
    ]
    assert [w.split(":")[0] for w in warnings] == ["Step 3", "Step 8"]
    assert "on_pathology='rewind' would restore step 1's weights" in warnings[0]
    assert "on_pathology='rewind' would restore step 6's weights" in warnings[1]


def _windows_rule(z: list[float], threshold: float, patience: int) -> list[int]:
    """The alarm's steps by its definition read another way: a probe fires when it closes ``patience`` readings above
    the threshold that lie after the previous firing (steps are 1-based probe indices)."""
    fired: list[int] = []
    for t in range(patience, len(z) + 1):
        window = z[t - patience : t]
        after_last = not fired or t - patience >= fired[-1]
        if after_last and all(v > threshold for v in window):
            fired.append(t)
    return fired


class _Recorded(PathologyAction):
    def __init__(self) -> None:
        super().__init__("warn")
        self.calls: list[tuple[int, int]] = []

    def probe_alarm(self, step, control, rule, healthy_step) -> str:
        self.calls.append((step, healthy_step))
        return "recorded"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("patience", [1, 2, 4])
def test_the_alarm_fires_at_patience_readings_above_the_threshold_counting_afresh_after_healthy_ones(seed, patience):
    # runs of high readings of every length, broken by single healthy readings: some a rise the probe cannot tell
    # from zero (1.0), some healthy for the alarm only (3.0)
    rng = np.random.default_rng(seed)
    z = [float(v) for v in rng.choice([1.0, 3.0, 12.0], size=60, p=[0.15, 0.15, 0.7])] + [float("nan")]
    rule = ProbeAlarmRule(patience=patience, threshold=10.0)
    expected = _windows_rule(z, 10.0, patience)
    probes = [(t, {ProbeAlarmRule.SIGNAL: v}) for t, v in enumerate(z, start=1)]
    assert alarm_steps(rule, probes) == expected
    # the run's alarm fires at the same probes, naming the last restore point before each: a reading at most
    # RESTORE_Z, not merely below the alarm's threshold
    recorded = _Recorded()
    driven = HandDriven(rule, recorded)
    control = SimpleNamespace(should_training_stop=False, should_log=False)
    logged = [driven.read(metrics, t, None, control)["health/probe_alarm"] for t, metrics in probes]
    assert [t for t, flag in zip(range(1, len(z) + 1), logged, strict=True) if flag == 1.0] == expected
    healthy = [max((s for s in range(1, t) if z[s - 1] <= RESTORE_Z), default=0) for t in expected]
    assert recorded.calls == list(zip(expected, healthy, strict=True))
    firings = driven.alarm.firings  # [step, restore point, its reading, what was done]
    assert [f[0] for f in firings] == expected
    assert [f[1] for f in firings] == healthy and all(f[3] == "recorded" for f in firings)
