"""The rewind's ladder (``rewind_max_times``, ``rewind_lr_factor``): each rewind that trains on lowers the learning
rate through the optimizer's parameter groups and the scheduler's ``base_lrs`` (the rate logged is the lowered
schedule's, computed here apart), the alarm after the ladder is spent stops the run, and a run that ends on the weights
it started from says so in its metrics, its card, its end-of-run summary and, on the command line, its last line and
exit status."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.helpers.cli_runs import FAST, pair_folders
from tests.helpers.rewind import ScriptedAlarm, equal, trained_weights
from trl_diffusion_sdpo.callbacks.health import ENDED_AT_START
from trl_diffusion_sdpo.callbacks.learning_rate import scale_learning_rate
from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.cli.train import ENDED_AT_START_STATUS, exit_status
from trl_diffusion_sdpo.config import DiffusionSDPOConfig

ROWS, HELD = 8, 2  # 6 training pairs: 3 optimizer steps of 2 per epoch
DPO = {"safeguard_space": "none"}
TWO = {"probe_noise_draws": 2}  # the probe's figures unread: the alarm is scripted
SUMMARY_LOGGER = "trl_diffusion_sdpo.io.run_summary"
START = "ends on the weights it started from"


def _card_events(readme: str) -> list[str]:
    section = readme.split("## Alarms, warnings and rewinds", 1)[1].split("\n## ", 1)[0]
    return [line[2:] for line in section.splitlines() if line.startswith("- ") and not line.startswith("- At the ")]


def _linear(step: int, steps: int) -> float:
    """transformers' linear schedule without warmup at optimizer step ``step`` (0-based), written out here."""
    return max(0.0, (steps - step) / steps)


def test_the_ladders_defaults_step_from_the_breaking_rate_to_the_healthy_one():
    """The fields' help: the full ladder lowers the rate at least tenfold (2e-4, where Diffusion-DPO broke on the
    stability benchmark, to 2e-5, where it held)."""
    fields = DiffusionSDPOConfig.__dataclass_fields__
    factor, rungs = fields["rewind_lr_factor"].default, fields["rewind_max_times"].default
    assert rungs >= 1 and 0 < factor < 1
    assert 2e-4 * factor**rungs <= 2e-5


def test_each_rewind_that_trains_on_lowers_the_schedules_rate_and_the_run_goes_on(
    make_trainer, make_pickapic, tmp_path
):
    steps, factor = 8, 0.5
    trainer = make_trainer(
        train_dataset=make_pickapic(ROWS), max_steps=steps, probe_steps=1, probe_pairs=HELD, on_pathology="rewind",
        learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, rewind_max_times=2,
        rewind_lr_factor=factor, output_dir=str(tmp_path / "out"), **DPO, **TWO,
    )  # fmt: skip
    # Healthy at 1 and 4, unhealthy at 2-3 and 5-6: the alarm fires at 3 (back to 1) and at 6 (back to 4).
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps={2, 3, 5, 6})
    peak = trainer.args.learning_rate
    output = trainer.train()
    assert trainer.state.global_step == steps and ENDED_AT_START not in output.metrics  # both rewinds trained on
    scale = {step: 1.0 if step <= 3 else factor if step <= 6 else factor**2 for step in range(1, steps + 1)}
    logged = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    assert logged == pytest.approx({s: peak * scale[s] * _linear(s - 1, steps) for s in range(1, steps + 1)})
    lowered = {e["step"]: e["health/lr_factor"] for e in trainer.state.log_history if "health/lr_factor" in e}
    assert lowered == {3: factor, 6: factor**2}
    # the lowering is in the public state the next steps read: the schedule's peak and the groups' rates
    assert trainer.lr_scheduler.base_lrs == pytest.approx([peak * factor**2] * len(trainer.optimizer.param_groups))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(peak * factor**2 * _linear(steps, steps))
    trainer.create_model_card()
    first, second = _card_events((tmp_path / "out" / "README.md").read_text())
    assert first.startswith("Step 3:") and "steps 4-6 trained with the safeguard on" in first
    assert "at 0.5 x the learning rate" in first
    assert second.startswith("Step 6:") and "steps 7-8 trained with the safeguard on" in second
    assert "at 0.25 x the learning rate" in second


def test_the_rate_logged_after_a_rewind_is_the_lowered_schedules_under_a_hand_made_scheduler():
    """:func:`scale_learning_rate` alone, on torch's objects: the next step's rate, ``get_last_lr()`` (what
    transformers logs) and the steps after follow the peak times the factor."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        optimizer.step()
        schedule.step()
    assert scale_learning_rate(optimizer, schedule, 0.25) == pytest.approx([0.1 * 0.25 / 4])
    assert schedule.get_last_lr() == pytest.approx([0.1 * 0.25 / 4]) and schedule.last_epoch == 3
    optimizer.step()
    schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25 / 5)


def test_a_run_whose_ladder_ends_at_the_start_says_so_and_flags_its_metrics(
    make_trainer, make_pickapic, tmp_path, caplog
):
    trainer = make_trainer(
        train_dataset=make_pickapic(ROWS), max_steps=6, probe_steps=1, probe_pairs=HELD, on_pathology="rewind",
        rewind_max_times=1, output_dir=str(tmp_path / "out"), **DPO, **TWO,
    )  # fmt: skip
    # Never a restore point: the alarm fires at 1 (back to the start, trains on) and at 2 (back to the start, stops).
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=1, unhealthy_steps=set(range(1, 7)))
    start = trained_weights(trainer)
    with caplog.at_level(logging.INFO, logger=SUMMARY_LOGGER):
        output = trainer.train()
    assert trainer.state.global_step == 2 and equal(trained_weights(trainer), start)
    assert output.metrics[ENDED_AT_START] == 1.0 and trainer.state.log_history[-1][ENDED_AT_START] == 1.0
    summary = [r.getMessage() for r in caplog.records if r.name == SUMMARY_LOGGER]
    assert any(START in message for message in summary)
    trainer.create_model_card()
    *_, last = _card_events((tmp_path / "out" / "README.md").read_text())
    assert last.startswith("Step 2:") and "training stopped there" in last and START in last
    assert exit_status(trainer) == ENDED_AT_START_STATUS != 0
    trainer.args.rewind_allow_start_weights = True  # asked for: the command line exits 0
    assert exit_status(trainer) == 0


def test_a_run_stopping_on_a_later_restore_point_is_not_flagged(make_trainer, make_pickapic):
    trainer = make_trainer(
        train_dataset=make_pickapic(ROWS), max_steps=4, probe_steps=1, probe_pairs=HELD, on_pathology="rewind",
        rewind_max_times=0, **DPO, **TWO,
    )  # fmt: skip
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps={2, 3})
    output = trainer.train()
    assert trainer.state.global_step == 3 and ENDED_AT_START not in output.metrics  # stopped at step 1's weights
    assert exit_status(trainer) == 0


def test_the_command_line_exits_non_zero_when_the_run_ends_on_its_starting_weights(tmp_path, capsys):
    data = pair_folders(tmp_path / "pairs", n=6)
    argv = ["train", "--model_name_or_path", "trl-diffusion-sdpo:tiny", "--dataset_name", str(data)]
    argv += ["--output_dir", str(tmp_path / "out"), *FAST, "--max_steps", "3", "--safeguard_space", "none"]
    # every probe reads above a rise of -100 and a floor of -100: no restore point, and the alarm fires at the first
    argv += ["--on_pathology", "rewind", "--probe_steps", "1", "--probe_pairs", "2", "--probe_alarm_z", "-100"]
    argv += ["--probe_alarm_rise", "-100", "--rewind_max_times", "0"]
    status = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == ENDED_AT_START_STATUS
    assert START in lines[-1] and "--rewind_allow_start_weights true exits 0" in lines[-1]
    assert (tmp_path / "out" / "README.md").exists() and START in (tmp_path / "out" / "README.md").read_text()


def test_the_docs_state_the_ladders_defaults_and_exit_status_as_the_code_has_them():
    fields = DiffusionSDPOConfig.__dataclass_fields__
    factor, rungs = fields["rewind_lr_factor"].default, fields["rewind_max_times"].default
    page = (Path(__file__).resolve().parents[2] / "docs" / "safeguard.md").read_text()
    assert f"each of the first `rewind_max_times` rewinds (default {rungs})" in page
    lowered = f"(default {factor:g}; a second rewind lowers it again, to {factor**2:g} of the configured rate)"
    assert f"times `rewind_lr_factor` {lowered}" in page
    assert f"exits with\nstatus {ENDED_AT_START_STATUS} unless `--rewind_allow_start_weights true`" in page
