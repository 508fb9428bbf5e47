"""The alarms and the EMA built by hand with the trainer and added with ``trainer.add_callback`` are the ones the
trainer uses (docs/compose.md), completed from its public surface; a forced alarm acts through them as through the
config's; the safeguard changes by name, built as the config's and checked by its rules."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerCallback, TrainerControl

from tests.helpers.online import make_trainer as make_online_trainer
from tests.helpers.rewind import ScriptedAlarm, equal, trained_weights
from trl_diffusion_sdpo.callbacks import (
    AlarmCallback,
    EMAWeights,
    PathologyAction,
    PathologyRule,
    TrainingLogSignal,
)
from trl_diffusion_sdpo.callbacks.alarm import TrainingLogAlarm
from trl_diffusion_sdpo.callbacks.health import remedies
from trl_diffusion_sdpo.io.reporting import console_callbacks
from trl_diffusion_sdpo.online.config import OnlineDiffusionSDPOConfig

ROWS = 8
SAFEGUARDED = {"safeguard_space": "output", "safeguard_mu": 0.5}
# An alarm that fires on the first training log that has delta/winner: the action is tested apart from the rule
ALWAYS = PathologyRule(windows=1, window_steps=None, min_delta_winner=-1e9, max_implicit_acc=None)


def test_the_docs_example_composes_the_alarms_ema_probe_and_rewind(make_pipeline, make_config, make_pickapic):
    page = (Path(__file__).resolve().parents[2] / "docs" / "compose.md").read_text()
    block = page.split("```python\n")[2].split("```", 1)[0]
    setup, run = block.split("trainer.train()\n")
    assert not run.strip()  # the block ends with the training
    names = {
        "pipeline": make_pipeline(),
        "dataset": make_pickapic(ROWS),
        "args": make_config(max_steps=4, rewind_max_times=0, **SAFEGUARDED),  # the rewind stops at its first alarm
    }
    exec(compile(setup, "docs/compose.md", "exec"), names)  # noqa: S102 (the page's own example, as written)
    trainer, health, rewind = names["trainer"], names["health"], names["rewind"]
    assert trainer.alarm is health and trainer.probe_alarm is rewind  # the ones added act: the config's alarm went
    assert trainer.callbacks_of(TrainingLogAlarm) == []
    assert trainer.ema is names["ema"] and trainer.probe is names["probe"]
    # In the order added, the probe before its alarm, all before transformers' console callback
    order = trainer.callbacks_of(TrainerCallback)
    added = [order.index(c) for c in (names["ema"], health, names["probe"], rewind)]
    assert added == sorted(added) and added[-1] < order.index(trainer.callbacks_of(console_callbacks())[0])
    # Completed from the trainer: the policy's trainable weights; the action's margin, the rewind's snapshot
    assert [id(p) for p in trainer.ema.parameters] == [id(p) for p in trainer.policy.parameters() if p.requires_grad]
    assert health.action.margin is trainer.safeguard.margin and rewind.action.snapshot is not None
    held = names["held"]
    assert len(held) == 2 and trainer.probe.summary().count("drawn at random with seed 0") == 1
    start = trained_weights(trainer)
    rewind.signal.rule = ScriptedAlarm(patience=1, unhealthy_steps={1})  # the probe's alarm at step 1
    trainer.train()
    # The rewind given put back the step-0 weights (bit for bit) and, its ladder of none spent, stopped the run there
    assert equal(trained_weights(trainer), start)
    assert trainer.state.global_step == 1 and rewind.action.rewinds == [(1, 0)]
    [log] = [e for e in trainer.state.log_history if "loss" in e]
    assert log["health/probe_alarm"] == 1.0 and log["health/rewind_to"] == 0.0 and "probe/winner_rise_z" in log
    assert trainer.ema.ema is not None  # the EMA given was started with the training


def test_a_forced_alarm_of_an_added_health_switches_the_safeguard(make_trainer, make_pickapic):
    trainer = make_trainer(train_dataset=make_pickapic(ROWS), max_steps=2, safeguard_space="none")
    health = AlarmCallback(TrainingLogSignal(rule=ALWAYS), PathologyAction("safeguard"), trainer=trainer)
    trainer.add_callback(health)
    assert trainer.safeguard is None and trainer.alarm is health
    trainer.train()
    # The alarm fired at the first log; its action switched on the regime's safeguard (the output space, mu 0.5)
    logs = [e for e in trainer.state.log_history if "health/winner_pathology" in e]
    assert logs[0]["health/winner_pathology"] == 1.0 and logs[0]["health/safeguard_on"] == 1.0
    assert trainer.safeguard is not None and trainer.safeguard.name == "output"
    assert float(trainer.safeguard.margin.current()) == 0.5
    assert any("safeguard/lambda_mean" in e for e in trainer.state.log_history[1:])  # the step after it ran with it


def test_a_health_given_without_arguments_names_the_remedies_of_the_runs_regime(make_trainer, tmp_path, caplog):
    """``TrainingLogSignal()`` passed in ``callbacks=`` without a trainer takes the remedies of the config transformers
    hands its ``on_log``, the trainer's: an offline run with the output space at mu 0.5 is told of the update space and
    a larger mu; an online run, whose evidence rules every safeguard out, is told to remove its safeguard (never the
    offline defaults' "turn the safeguard on")."""
    offline = make_trainer(callbacks=[AlarmCallback(TrainingLogSignal(rule=ALWAYS))], **SAFEGUARDED)
    online = make_online_trainer(
        tmp_path, callbacks=[AlarmCallback(TrainingLogSignal(rule=ALWAYS))], safeguard_space="output"
    )
    assert isinstance(online.args, OnlineDiffusionSDPOConfig)
    warnings = []
    for trainer in (offline, online):
        [alarm] = trainer.callbacks_of(AlarmCallback)
        caplog.clear()
        log = {"delta/winner": 0.1, "implicit_acc": 0.5}
        state = SimpleNamespace(log_history=[{**log, "step": 1}], global_step=1)
        with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.callbacks.health"):
            alarm.on_log(trainer.args, state, TrainerControl(), logs=log)  # the event, with the trainer's args
        assert log["health/winner_pathology"] == 1.0  # the alarm fired
        warnings.append(caplog.records[-1].getMessage())
        named = warnings[-1].split("Remedies not in use in this run: ", 1)[1].removesuffix(".")
        assert named.split("; ") == remedies(trainer.args) != remedies(None)
    assert "safeguard_space='update'" in warnings[0] and "safeguard_space='none'" in warnings[1]


def test_an_added_ema_averages_as_the_configs_does(make_trainer, make_pickapic):
    data = make_pickapic(ROWS)
    configured = make_trainer(train_dataset=data, max_steps=2, ema_decay=0.9, safeguard_space="none")
    configured.train()
    composed = make_trainer(train_dataset=data, max_steps=2, safeguard_space="none")
    ema = EMAWeights(decay=0.9, trainer=composed)
    composed.add_callback(ema)
    composed.train()
    assert composed.ema is ema
    assert equal(ema.ema.shadow_params, configured.ema.ema.shadow_params)
    assert not equal(ema.ema.shadow_params, trained_weights(composed))  # an average, not the trained weights
    assert (Path(composed.args.output_dir) / "ema").is_dir()


def test_one_beside_its_config_field_is_refused(make_trainer, make_pickapic):
    configured = make_trainer(ema_decay=0.9)
    with pytest.raises(ValueError, match="EMAWeights was given and the config sets ema_decay"):
        configured.add_callback(EMAWeights(decay=0.9, trainer=configured))
    built = EMAWeights(configured.ema.parameters, 0.9, configured.save_weights)  # complete: callbacks= takes it
    with pytest.raises(ValueError, match="EMAWeights was given and the config sets ema_decay"):
        make_trainer(callbacks=[built], ema_decay=0.9)
    with pytest.raises(ValueError, match="two EMAWeights given: a run has one"):
        make_trainer(callbacks=[built, EMAWeights(configured.ema.parameters, 0.9, configured.save_weights)])
    with pytest.raises(ValueError, match=r"^EMAWeights averages the trainer's weights .*trainer=trainer\)"):
        EMAWeights(decay=0.9)  # without the trainer, nothing to average


def test_set_safeguard_by_name_builds_it_as_the_config_does_and_checks_its_rules(make_trainer):
    trainer = make_trainer(max_steps=1, safeguard_space="none")
    trainer.set_safeguard(space="parameter", mu=0.25)
    assert trainer.safeguard.name == "parameter" and float(trainer.safeguard.margin.current()) == 0.25
    trainer.train()  # the exact rule, switched in by name, trains
    assert any("safeguard/lambda_mean" in e for e in trainer.state.log_history)
    with pytest.raises(TypeError, match="safeguard_nonsense"):
        trainer.set_safeguard(space="output", nonsense=1)
    accumulating = make_trainer(max_steps=1, safeguard_space="none", gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="safeguard_space='update' needs gradient_accumulation_steps=1"):
        accumulating.set_safeguard(space="update", mu=0.5)  # the config's rule, as DiffusionSDPOConfig checks it
    assert accumulating.safeguard is None
    trainer.set_safeguard(None)
    assert trainer.safeguard is None


def test_a_safeguard_built_by_name_leaves_the_runs_config_as_it_was(make_trainer):
    """``safeguard_by_name`` builds from a changed copy of the config: the run's own config (what its checkpoints
    record and a resume compares) keeps the safeguard it was given, whatever is built or switched in by name."""
    trainer = make_trainer(max_steps=1, safeguard_space="none")
    before = trainer.args.to_dict()
    built = trainer.safeguard_by_name("parameter", mu=0.25, scope="global")
    assert built.name == "parameter" and float(built.margin.current()) == 0.25
    trainer.set_safeguard(space="output", mu=0.75)
    assert trainer.safeguard.name == "output"
    assert trainer.args.to_dict() == before
