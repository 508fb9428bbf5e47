"""The training-log health check: Diffusion-DPO's pathology (the winner's error held above the reference's while the
implicit accuracy stays low, the calibrated rule) flagged as a metric, with one warning."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from transformers import TrainerCallback

from trl_diffusion_sdpo.callbacks.alarm import TrainingLogSignal
from trl_diffusion_sdpo.callbacks.health import EVIDENCE, RULE, PathologyRule, winner_pathology


def _history(deltas: list[float], accuracies: list[float], logging_steps: int = 1) -> list[dict[str, float]]:
    """Training logs every ``logging_steps`` steps (each the mean of its steps' values), evaluation logs between."""
    history: list[dict[str, float]] = []
    for end in range(logging_steps, len(deltas) + 1, logging_steps):
        delta = float(np.mean(deltas[end - logging_steps : end]))
        acc = float(np.mean(accuracies[end - logging_steps : end]))
        history.append({"loss": 0.6, "delta/winner": delta, "implicit_acc": acc, "step": end})
        history.append({"eval_loss": 0.7, "eval_delta/winner": -1.0, "step": end})  # evaluation logs are skipped
    return history


def _expected(deltas: list[float], accuracies: list[float], upto: int, rule: PathologyRule = RULE) -> bool:
    """The rule computed directly on the per-step values: the last ``windows`` complete blocks of ``window_steps``
    steps before ``upto``, each block's mean delta above the margin and the blocks' mean accuracy below the bound."""
    size, closed = rule.window_steps, upto // rule.window_steps
    if closed < rule.windows:
        return False
    blocks = range(closed - rule.windows, closed)
    block_deltas = [np.mean(deltas[b * size : (b + 1) * size]) for b in blocks]
    block_accs = [np.mean(accuracies[b * size : (b + 1) * size]) for b in blocks]
    return bool(min(block_deltas) > rule.min_delta_winner and np.mean(block_accs) < rule.max_implicit_acc)


def _steps(seed: int, steps: int, delta: float, acc: float) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    return list(delta + 0.01 * rng.standard_normal(steps)), list(np.clip(acc + 0.2 * rng.standard_normal(steps), 0, 1))


def test_the_rule_is_the_calibrated_blocks_of_steps_at_any_logging_interval():
    assert RULE.window_steps == 10 and RULE.max_implicit_acc is not None  # the checks below assume both
    cases = [_steps(0, 60, 0.05, 0.5), _steps(1, 60, 0.05, 0.9), _steps(2, 60, 0.0, 0.4), _steps(3, 60, 0.025, 0.55)]
    # a run that turns: healthy for 30 steps, then the winner's error rises while the accuracy stays low
    healthy, turning = _steps(4, 30, 0.0, 0.8), _steps(5, 30, 0.06, 0.45)
    cases.append((healthy[0] + turning[0], healthy[1] + turning[1]))
    verdicts = set()
    for deltas, accs in cases:
        for logging_steps in (1, 2, 5, 10):
            history = _history(deltas, accs, logging_steps)
            for n in range(1, len(history) + 1):
                upto = int(history[n - 1]["step"])
                # logging every step or every 10, the verdict is the rule on the blocks closed so far
                assert winner_pathology(history[:n]) == _expected(deltas, accs, upto), (logging_steps, upto)
                verdicts.add(_expected(deltas, accs, upto))
    assert verdicts == {True, False}


def test_the_rule_reads_the_winner_margin_and_the_accuracy_bound():
    assert winner_pathology(_history([0.05] * 20, [0.5] * 20, 10))
    assert not winner_pathology(_history([0.05] * 20, [0.9] * 20, 10))  # the preference is being learnt: healthy
    assert not winner_pathology(_history([0.05] * 10 + [0.01] * 10, [0.5] * 20, 10))  # one window within the margin
    assert not winner_pathology(_history([0.05] * 10, [0.5] * 10, 10))  # one window only
    assert not winner_pathology(_history([0.05] * 19, [0.5] * 19, 1))  # the second window is not closed yet
    assert not winner_pathology([{"loss": 0.1, "implicit_acc": 0.1, "step": s} for s in (10, 20, 30)])
    # logs without a step: each log is a window of its own
    assert winner_pathology([{"delta/winner": 0.05, "implicit_acc": 0.5}] * RULE.windows)
    # the rule before calibration, still expressible: every log above the reference and a growing accuracy
    before = PathologyRule(windows=3, window_steps=None, min_delta_winner=0.0, max_implicit_acc=None,
                           accuracy_must_grow=True)  # fmt: skip
    assert winner_pathology(_history([-0.1, 0.01, 0.02, 0.05], [0.4, 0.5, 0.6, 0.7]), before)
    assert not winner_pathology(_history([0.01, 0.02, 0.05], [0.7, 0.6, 0.7]), before)


def _replay(history: list[dict[str, float]], caplog) -> tuple[list[float], list[str]]:
    """Read ``history`` one log at a time, as the alarm's ``on_log`` does once transformers has recorded it."""
    signal, recorded = TrainingLogSignal(), []
    flags = []
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.callbacks.health"):
        for entry in history:
            recorded.append(dict(entry))  # transformers adds the log, with its step, to log_history
            logs = {k: v for k, v in entry.items() if k != "step"}
            logs.update(signal.read(recorded, recorded[-1], int(entry["step"])))
            if "delta/winner" in logs:
                flags.append(logs["health/winner_pathology"])
            else:
                assert "health/winner_pathology" not in logs
    return flags, [r.getMessage() for r in caplog.records]


def test_the_check_logs_the_metric_every_window_and_warns_once_naming_the_remedies_and_the_evidence(caplog):
    flags, warnings = _replay(_history([0.05] * 50, [0.5] * 50, 10), caplog)
    assert flags == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert len(warnings) == 1
    assert all(word in warnings[0] for word in ("safeguard", "learning_rate", EVIDENCE)) and "beta" not in warnings[0]


def test_a_healthy_run_never_warns(caplog):
    # the 1000-step pattern at lr 2e-5: the winner's error above the reference's while the accuracy is high
    flags, warnings = _replay(_history([0.05] * 40, [0.9] * 40, 10), caplog)
    assert flags == [0.0] * 4 and warnings == []


def test_a_real_run_logs_the_verdict_of_its_own_history_at_every_window(make_trainer):
    # A tiny random UNet on 2-pair batches does not reliably show the pathology in a few steps (tried: lr 2e-3 and
    # 3e-2, beta 5000 and 50000): this run checks the wiring; the verdicts themselves are tested above.
    trainer = make_trainer(lora=False, max_steps=5, safeguard_space="none", learning_rate=2e-3, beta=5000.0)
    seen: list[dict[str, float]] = []

    class Seen(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer.add_callback(Seen())
    trainer.train()
    # the reporting callbacks (any on_log) see the metric with the rest of the log
    assert [e["health/winner_pathology"] for e in seen if "delta/winner" in e] == [
        e["health/winner_pathology"] for e in trainer.state.log_history if "delta/winner" in e
    ]
    logs = [entry for entry in trainer.state.log_history if "delta/winner" in entry]
    assert len(logs) == 5 and all("health/winner_pathology" in entry for entry in logs)
    expected = [float(winner_pathology(logs[: i + 1])) for i in range(len(logs))]
    assert [entry["health/winner_pathology"] for entry in logs] == expected


# ------------------------------------------------------------------------------ on_pathology="safeguard" (dormant)


def test_a_dormant_safeguard_switches_on_at_the_step_the_alarm_fires(make_trainer, monkeypatch, caplog):
    from trl_diffusion_sdpo.callbacks import health
    from trl_diffusion_sdpo.safeguards import OutputSpace

    # the tiny run does not show the pathology in 5 steps: the alarm is made to fire on the third training log
    monkeypatch.setattr(
        health, "winner_pathology", lambda history, rule: sum("delta/winner" in h for h in history) >= 3
    )
    trainer = make_trainer(max_steps=5, logging_steps=1, safeguard_space="none", on_pathology="safeguard")
    assert trainer.safeguard is None  # Diffusion-DPO: no safeguard until the alarm fires
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.callbacks.guards"):
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "delta/winner" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4, 5]
    fired = [entry["step"] for entry in logs if entry["health/winner_pathology"] == 1.0]
    assert fired[0] == 3
    # Diffusion-DPO up to the log that fired, the safeguard of SWITCH_TO from the next step on, logged as it happens
    assert [entry["health/safeguard_on"] for entry in logs] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert ["safeguard/lambda_mean" in entry for entry in logs] == [False, False, False, True, True]
    assert isinstance(trainer.safeguard, OutputSpace) and health.SWITCH_TO["safeguard_space"] == "output"
    assert trainer.safeguard.margin.current() == pytest.approx(health.SWITCH_TO["safeguard_mu"])
    assert [r.getMessage() for r in caplog.records if "on_pathology='safeguard'" in r.getMessage()][0].startswith(
        "Step 3"
    )
    assert trainer.alarm.state()["attributes"]["safeguard_switched_at"] == 3  # saved with each checkpoint


def test_the_dormant_safeguard_is_offline_only_and_needs_the_safeguard_off(tmp_path):
    from trl_diffusion_sdpo import DiffusionSDPOConfig
    from trl_diffusion_sdpo.online.config import OnlineDiffusionSDPOConfig

    with pytest.raises(ValueError, match="on_pathology='safeguard' .* needs safeguard_space='none'"):
        DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, on_pathology="safeguard")
    DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, on_pathology="safeguard", safeguard_space="none")
    with pytest.raises(ValueError, match="online no safeguard setting held"):
        OnlineDiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, on_pathology="safeguard")


def test_the_dormant_safeguards_target_is_the_configs_own_in_one_place(tmp_path, monkeypatch):
    """Offline the switch goes to ``SWITCH_TO``; online to the online table's ``ONLINE_SWITCH_TO``, which is none, so
    the online config refuses with the one stated reason. Given a target there, the online config takes it and the
    switch uses it."""
    from trl_diffusion_sdpo import DiffusionSDPOConfig
    from trl_diffusion_sdpo.callbacks import health
    from trl_diffusion_sdpo.callbacks.guards import PathologyAction
    from trl_diffusion_sdpo.online import defaults as online_defaults
    from trl_diffusion_sdpo.online.config import OnlineDiffusionSDPOConfig

    offline = DiffusionSDPOConfig(
        output_dir=str(tmp_path), use_cpu=True, on_pathology="safeguard", safeguard_space="none"
    )
    assert health.switch_target(offline) == health.SWITCH_TO
    assert online_defaults.ONLINE_SWITCH_TO is None
    with pytest.raises(ValueError) as refused:
        OnlineDiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, on_pathology="safeguard")
    assert online_defaults.NO_ONLINE_SWITCH in str(refused.value)
    target = {"safeguard_space": "output", "safeguard_mu": 0.7}
    monkeypatch.setattr(online_defaults, "ONLINE_SWITCH_TO", target)
    online = OnlineDiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, on_pathology="safeguard")
    switched = health.switched_config(online)
    assert (switched.safeguard_space, switched.safeguard_mu) == ("output", 0.7)
    assert (online.safeguard_space, health.switched_config(offline).safeguard_mu) == ("none", 0.5)
    action = PathologyAction(online.on_pathology)
    action.bind(SimpleNamespace(args=online, safeguard=None, dormant_safeguard=SimpleNamespace(name="output")))
    assert action.switch_to == target  # the warning names what the run switches to


def test_every_process_switches_at_the_same_step_from_the_reduced_signals():
    """Two processes with different pairs, each reducing its window's metrics with the other's (a fake all-reduce
    over a barrier) before its own alarm and action read them, as the trainer's ``log`` does."""
    import threading

    import torch
    from transformers import TrainerControl

    from trl_diffusion_sdpo.callbacks.guards import PathologyAction
    from trl_diffusion_sdpo.step.predictions import reduce_metrics

    names = ["delta/winner", "implicit_acc"]
    # per process and window: (delta/winner, implicit_acc) of its micro-batches. Alone, process 0 would switch at
    # its second window (step 20) and process 1 never (its accuracy 0.5 but its winner error within the margin);
    # pooled, the winner's mean error is 0.025, 0.005, 0.035, 0.035 with accuracy 0.45: the rule fires at step 40
    local = {
        0: [(0.05, 0.4), (0.05, 0.4), (0.05, 0.4), (0.05, 0.4)],
        1: [(0.00, 0.5), (-0.04, 0.5), (0.02, 0.5), (0.02, 0.5)],
    }
    pooled = [((a[0] + b[0]) / 2, (a[1] + b[1]) / 2) for a, b in zip(local[0], local[1])]
    expected = next(
        10 * (k + 1)
        for k in range(1, len(pooled))
        if all(d > RULE.min_delta_winner for d, _ in pooled[k - 1 : k + 1])
        and sum(acc for _, acc in pooled[k - 1 : k + 1]) / 2 < RULE.max_implicit_acc
    )
    barrier, deposits, switched = threading.Barrier(2), {}, {}

    def all_reduce_sum(rank: int):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            deposits[rank] = tensor.clone()
            barrier.wait()
            total = deposits[0] + deposits[1]
            barrier.wait()
            return total

        return reduce

    def process(rank: int) -> None:
        signal, recorded = TrainingLogSignal(), []
        action = PathologyAction("safeguard", switch=lambda: None)
        for window, (delta, acc) in enumerate(local[rank]):
            step = 10 * (window + 1)
            stored = {"delta/winner": [torch.tensor(delta)] * 10, "implicit_acc": [torch.tensor(acc)] * 10}
            logs = reduce_metrics(stored, names, 1.0, "cpu", all_reduce_sum(rank))
            recorded.append({**logs, "step": step})  # transformers records the log before on_log
            flags = signal.read(recorded, recorded[-1], step)
            action(flags, TrainerControl(), step)
        switched[rank] = action.switched_at

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert switched == {0: expected, 1: expected} and expected == 40


def test_a_resumed_run_switches_again_from_the_checkpoints_state():
    from types import SimpleNamespace

    from trl_diffusion_sdpo.callbacks.alarm import AlarmCallback
    from trl_diffusion_sdpo.callbacks.guards import PathologyAction

    switches: list[str] = []
    saved = AlarmCallback(action=PathologyAction("safeguard", switch=lambda: switches.append("before")))
    saved.action.switched_at = 30
    state = SimpleNamespace(global_step=40, stateful_callbacks={"AlarmCallback": saved.state()})
    resumed = AlarmCallback(action=PathologyAction("safeguard", switch=lambda: switches.append("resumed")))
    resumed.on_train_begin(SimpleNamespace(device="cpu"), state, None)
    assert switches == ["resumed"] and resumed.action.switched_at == 30
    # a checkpoint saved before the switch leaves the resumed run on Diffusion-DPO
    fresh = AlarmCallback(action=PathologyAction("safeguard", switch=lambda: switches.append("never")))
    fresh.on_train_begin(SimpleNamespace(device="cpu"), SimpleNamespace(global_step=10, stateful_callbacks={
        "AlarmCallback": AlarmCallback(action=PathologyAction("safeguard", switch=list)).state()}), None)  # fmt: skip
    assert switches == ["resumed"] and fresh.action.switched_at is None
