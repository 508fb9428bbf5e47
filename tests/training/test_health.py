"""The training-log health check: Diffusion-DPO's pathology (winner error above the reference's while the implicit
accuracy grows) flagged as a metric, with one warning."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from trl_diffusion_sdpo.callbacks.health import WinnerHealth, winner_pathology


def _history(deltas: list[float], accuracies: list[float]) -> list[dict[str, float]]:
    history: list[dict[str, float]] = []
    for step, (delta, acc) in enumerate(zip(deltas, accuracies), start=1):
        history.append({"loss": 0.6, "delta/winner": delta, "implicit_acc": acc, "step": step})
        history.append({"eval_loss": 0.7, "eval_delta/winner": -1.0, "step": step})  # evaluation logs are skipped
    return history


def test_the_pathology_needs_every_window_above_the_reference_and_a_growing_accuracy():
    assert winner_pathology(_history([-0.1, 0.01, 0.02, 0.05], [0.4, 0.5, 0.6, 0.7]))
    # the last three windows only: an early healthy window does not matter, a late one does
    assert not winner_pathology(_history([0.01, 0.02, 0.05, -0.01], [0.4, 0.5, 0.6, 0.7]))
    # winner error above the reference but the accuracy not growing: not the pathology
    assert not winner_pathology(_history([0.01, 0.02, 0.05], [0.7, 0.6, 0.7]))
    # accuracy growing with the winner improving too: the healthy case
    assert not winner_pathology(_history([-0.01, -0.02, -0.05], [0.4, 0.5, 0.7]))
    # fewer windows than asked for, and reference-free logs (no delta/winner)
    assert not winner_pathology(_history([0.01, 0.02], [0.4, 0.5]))
    assert not winner_pathology([{"loss": 0.1, "implicit_acc": a} for a in (0.1, 0.5, 0.9)])
    assert winner_pathology(_history([0.01, 0.02], [0.4, 0.5]), windows=2)


def _replay(history: list[dict[str, float]], caplog) -> tuple[list[float], list[str]]:
    """Annotate ``history`` one log at a time, as the trainer's ``log`` does before transformers records it."""
    health, recorded = WinnerHealth(), []
    flags = []
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.callbacks.health"):
        for step, entry in enumerate(history):
            logs = {k: v for k, v in entry.items() if k != "step"}
            health.annotate(logs, recorded, step)
            recorded.append(logs)
            if "delta/winner" in logs:
                flags.append(logs["health/winner_pathology"])
            else:
                assert "health/winner_pathology" not in logs
    return flags, [r.getMessage() for r in caplog.records]


def test_the_check_logs_the_metric_every_window_and_warns_once_naming_the_remedies(caplog):
    flags, warnings = _replay(_history([0.01, 0.02, 0.03, 0.04, 0.05], [0.5, 0.6, 0.7, 0.8, 0.9]), caplog)
    assert flags == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert len(warnings) == 1
    assert all(word in warnings[0] for word in ("safeguard", "learning_rate")) and "beta" not in warnings[0]


def test_a_healthy_run_never_warns(caplog):
    flags, warnings = _replay(_history([-0.01, -0.02, -0.03, -0.04], [0.5, 0.6, 0.7, 0.8]), caplog)
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
