"""The health alarm, the guards and the EMA built by hand and passed in ``callbacks=`` are the ones the trainer uses
(docs/compose.md), completed from its public surface; a forced alarm acts through them as through the config's; the
safeguard changes by name, built as the config's and checked by its rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.rewind import ScriptedAlarm, equal, trained_weights
from trl_diffusion_sdpo.callbacks import EMAWeights, GuardState, PathologyAction, PathologyRule, WinnerHealth

ROWS = 8
SAFEGUARDED = {"safeguard_space": "output", "safeguard_mu": 0.5}
# An alarm that fires on the first training log that has delta/winner: the guards' action is tested apart from the rule
ALWAYS = PathologyRule(windows=1, window_steps=None, min_delta_winner=-1e9, max_implicit_acc=None)


def test_the_docs_example_composes_health_guards_ema_probe_and_rewind(make_pipeline, make_config, make_pickapic):
    page = (Path(__file__).resolve().parents[2] / "docs" / "compose.md").read_text()
    block = page.split("```python\n")[2].split("```", 1)[0]
    setup, run = block.split("trainer.train()\n")
    assert not run.strip()  # the block ends with the training
    names = {
        "pipeline": make_pipeline(),
        "dataset": make_pickapic(ROWS),
        "args": make_config(max_steps=4, **SAFEGUARDED),
    }
    exec(compile(setup, "docs/compose.md", "exec"), names)  # noqa: S102 (the page's own example, as written)
    trainer = names["trainer"]
    assert trainer.health is names["health"] and trainer.guards is names["guards"] and trainer.ema is names["ema"]
    assert trainer.probe is names["probe"] and trainer.probe.rewind is names["rewind"].rewind is not None
    # Completed from the trainer: the safeguard's margin, the policy's trainable weights
    assert trainer.guards.margin is trainer.safeguard.margin
    assert [id(p) for p in trainer.ema.parameters] == [id(p) for p in trainer.policy.parameters() if p.requires_grad]
    held = names["held"]
    assert len(held) == 2 and trainer.probe.summary().count("drawn with seed 0") == 1
    start = trained_weights(trainer)
    trainer.probe.rewind.rule = ScriptedAlarm(patience=1, unhealthy_steps={1})  # the probe's alarm at step 1
    trainer.train()
    # The rewind given put back the step-0 weights (bit for bit) and, the safeguard on, stopped the run there
    assert equal(trained_weights(trainer), start)
    assert trainer.state.global_step == 1 and trainer.probe.rewind.rewinds == [(1, 0)]
    assert trainer.ema.ema is not None  # the EMA given was started with the training


def test_a_forced_alarm_of_a_given_health_switches_the_safeguard_of_given_guards(make_trainer, make_pickapic):
    health, guards = WinnerHealth(rule=ALWAYS), GuardState(action=PathologyAction("safeguard"))
    trainer = make_trainer(
        train_dataset=make_pickapic(ROWS), callbacks=[health, guards], max_steps=2, safeguard_space="none"
    )
    assert trainer.safeguard is None and trainer.health is health and trainer.guards is guards
    trainer.train()
    # The alarm fired at the first log; the guards switched on the regime's safeguard (the output space, mu 0.5)
    logs = [e for e in trainer.state.log_history if "health/winner_pathology" in e]
    assert logs[0]["health/winner_pathology"] == 1.0 and logs[0]["health/safeguard_on"] == 1.0
    assert trainer.safeguard is not None and trainer.safeguard.name == "output"
    assert float(trainer.safeguard.margin.current()) == 0.5
    assert any("safeguard/lambda_mean" in e for e in trainer.state.log_history[1:])  # the step after it ran with it


def test_a_given_ema_averages_as_the_configs_does(make_trainer, make_pickapic):
    data = make_pickapic(ROWS)
    configured = make_trainer(train_dataset=data, max_steps=2, ema_decay=0.9, safeguard_space="none")
    configured.train()
    ema = EMAWeights(decay=0.9)
    composed = make_trainer(train_dataset=data, callbacks=[ema], max_steps=2, safeguard_space="none")
    composed.train()
    assert composed.ema is ema
    assert equal(ema.ema.shadow_params, configured.ema.ema.shadow_params)
    assert not equal(ema.ema.shadow_params, trained_weights(composed))  # an average, not the trained weights
    assert (Path(composed.args.output_dir) / "ema").is_dir()


def test_a_second_of_a_kind_or_one_beside_its_config_field_is_refused(make_trainer):
    with pytest.raises(ValueError, match="two WinnerHealth"):
        make_trainer(callbacks=[WinnerHealth(), WinnerHealth()])
    with pytest.raises(ValueError, match="EMAWeights was passed in callbacks= and the config sets ema_decay"):
        make_trainer(callbacks=[EMAWeights(decay=0.9)], ema_decay=0.9)


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
