"""The health alarm, the guards and the EMA built by hand and passed in ``callbacks=`` are the ones the trainer uses
(docs/compose.md), completed from its public surface; a forced alarm acts through them as through the config's; the
safeguard changes by name, built as the config's and checked by its rules."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.helpers.online import make_trainer as make_online_trainer
from tests.helpers.rewind import ScriptedAlarm, equal, trained_weights
from trl_diffusion_sdpo.callbacks import EMAWeights, GuardState, PathologyAction, PathologyRule, WinnerHealth
from trl_diffusion_sdpo.callbacks.health import remedies
from trl_diffusion_sdpo.safeguards.margin import AUTO_MU_START

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
    assert len(held) == 2 and trainer.probe.summary().count("drawn at random with seed 0") == 1
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


def test_guards_given_without_a_margin_move_an_auto_mu_as_the_configs_do(make_trainer, make_pickapic):
    """``GuardState()`` passed in ``callbacks=`` takes the safeguard's margin from the trainer; with
    ``safeguard_mu="auto"`` that margin then adapts at every step, the ``mu`` of each log the config-built guards'."""
    settings = {
        "train_dataset": make_pickapic(ROWS),
        "max_steps": 2,
        "beta": 500.0,
        "safeguard_space": "output",
        "safeguard_mu": "auto",
        "safeguard_mu_step": 50.0,
    }
    configured = make_trainer(**settings)
    configured.train()
    guards = GuardState()
    composed = make_trainer(callbacks=[guards], **settings)
    assert composed.guards is guards and guards.margin is composed.safeguard.margin
    composed.train()

    def mus(trainer) -> list[float]:
        return [e["safeguard/mu"] for e in trainer.state.log_history if "delta/winner" in e]

    assert len(mus(configured)) == 2 and any(mu != AUTO_MU_START for mu in mus(configured))  # the config's moved
    assert mus(composed) == pytest.approx(mus(configured), rel=1e-6)


def test_a_health_given_without_arguments_names_the_remedies_of_the_runs_regime(make_trainer, tmp_path, caplog):
    """``WinnerHealth()`` passed in ``callbacks=`` takes the remedies of the trainer's config: an offline run with the
    output space at mu 0.5 is told of the update space and a larger mu; an online run, whose evidence rules every
    safeguard out, is told to remove its safeguard (never the offline defaults' "turn the safeguard on")."""
    offline = make_trainer(callbacks=[WinnerHealth(rule=ALWAYS)], **SAFEGUARDED)
    online = make_online_trainer(tmp_path, callbacks=[WinnerHealth(rule=ALWAYS)], safeguard_space="output")
    assert online.args.regime == "online"
    warnings = []
    for trainer in (offline, online):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.callbacks.health"):
            trainer.health.annotate({"delta/winner": 0.1, "implicit_acc": 0.5}, [], 1)  # the alarm fires
        warnings.append(caplog.records[-1].getMessage())
        named = warnings[-1].split("Remedies not in use in this run: ", 1)[1].removesuffix(".")
        assert named.split("; ") == remedies(trainer.args) != remedies(None)
    assert "safeguard_space='update'" in warnings[0] and "safeguard_space='none'" in warnings[1]


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
