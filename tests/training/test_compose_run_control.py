"""A probe and an alarm on it that rewinds, built by hand with the trainer and added with ``trainer.add_callback``, act
as the config's do (docs/compose.md): a forced alarm restores the step-0 weights, bit for bit those of the run that
the config composed; a probe or a rewind beside the config field that builds another is refused, and one that needs
the trainer is refused without it, in one line naming the fix."""

from __future__ import annotations

import pytest
from datasets import Dataset

from tests.helpers.online import PROMPTS as ONLINE_PROMPTS
from tests.helpers.online import make_trainer as make_online_trainer
from tests.helpers.rewind import ScriptedAlarm, equal, trained_weights
from trl_diffusion_sdpo.callbacks import AlarmCallback, ProbeCallback, ProbeSignal, RewindAction, hold_back_rows

ROWS, HELD = 8, 2
# The safeguard on and no rung of the ladder: after its rewind the run stops with the healthy weights, whoever
# composed it (the hand-built rewind reads the ladder from the trainer's config).
SAFEGUARDED = {"safeguard_space": "output", "safeguard_mu": 0.5, "rewind_max_times": 0}


def test_a_rewind_added_by_hand_restores_the_step_0_weights_as_the_configs_does(make_trainer, make_pickapic):
    data = make_pickapic(ROWS)
    configured = make_trainer(
        train_dataset=data, max_steps=4, probe_steps=1, probe_pairs=HELD, on_pathology="rewind", **SAFEGUARDED
    )
    start = trained_weights(configured)
    configured.probe_alarm.signal.rule = ScriptedAlarm(patience=1, unhealthy_steps={1})
    configured.train()

    train, held = hold_back_rows(data, HELD, seed=configured.args.seed)  # the pairs the config's probe_steps holds
    composed = make_trainer(train_dataset=train, max_steps=4, **SAFEGUARDED)
    probe = ProbeCallback.held_out(every=1, pairs=held, trainer=composed)
    rule = ScriptedAlarm(patience=1, unhealthy_steps={1})
    rewind = AlarmCallback(ProbeSignal(probe, rule), RewindAction(), trainer=composed)
    composed.add_callback(probe)
    composed.add_callback(rewind)
    assert equal(trained_weights(composed), start)  # the same base and seed: the same step-0 weights
    composed.train()

    # The alarm at step 1 put the step-0 weights back and stopped the run: bit for bit, and as the config's run did.
    assert equal(trained_weights(composed), start)
    assert equal(trained_weights(composed), trained_weights(configured))
    assert composed.state.global_step == configured.state.global_step == 1
    assert composed.probe is probe and composed.probe_alarm is rewind  # the ones added act
    assert rewind.action.rewinds == configured.probe_alarm.action.rewinds == [(1, 0)]
    assert [m for _, m in probe.readings] == [m for _, m in configured.probe.readings]


def test_a_hand_built_probe_reads_the_pairs_it_was_given(make_trainer, make_pickapic):
    data = make_pickapic(ROWS)
    train, held = hold_back_rows(data, HELD)
    trainer = make_trainer(train_dataset=train, max_steps=4, safeguard_space="none")
    probe = ProbeCallback.held_out(every=2, pairs=held, trainer=trainer)
    trainer.add_callback(probe)
    tokens = trainer.family.prompt_tokenizer()(list(held["caption"]))
    assert (probe.probe.batch["input_ids"].cpu() == tokens["input_ids"]).all()
    assert probe.summary().startswith(f"held-out probe every 2 optimizer steps on {HELD} pairs passed to")
    trainer.train()
    assert [step for step, _ in probe.readings] == [2, 4]
    assert [e["step"] for e in trainer.state.log_history if "probe/delta_winner" in e] == [2, 4]


def test_a_probe_or_rewind_beside_the_configs_is_refused(make_trainer, make_pickapic):
    data = make_pickapic(ROWS)
    train, held = hold_back_rows(data, HELD)
    configured = make_trainer(train_dataset=train, probe_steps=1, probe_pairs=HELD, on_pathology="rewind")
    probe = ProbeCallback.held_out(1, held, trainer=configured)
    with pytest.raises(ValueError, match="ProbeCallback was given and the config sets probe_steps"):
        configured.add_callback(probe)
    rewind = AlarmCallback(ProbeSignal(probe), RewindAction(), trainer=configured)
    with pytest.raises(ValueError, match="RewindAction was given and the config sets on_pathology='rewind'"):
        configured.add_callback(rewind)
    assert configured.callbacks_of(ProbeCallback) == [configured.probe] != [probe]  # the config's alone
    assert configured.callbacks_of(AlarmCallback) == [configured.alarm, configured.probe_alarm]
    plain = make_trainer(train_dataset=train)
    plain.add_callback(ProbeCallback.held_out(1, held, trainer=plain))
    with pytest.raises(ValueError, match="two ProbeCallback given: a run has one"):
        plain.add_callback(ProbeCallback.held_out(1, held, trainer=plain))


def test_one_that_needs_the_trainer_is_refused_without_it_naming_the_fix(make_pickapic):
    """Refused where it is built, before a trainer could take it in ``callbacks=``: one line, naming the fix."""
    refusals = {
        "ProbeCallback.held_out(every, pairs, trainer=trainer), and add it with trainer.add_callback(probe)": (
            lambda: ProbeCallback.held_out(1, make_pickapic(HELD))
        ),
        "a ProbeSignal() reads the trainer's held-out probe; RewindAction() keeps and restores the trainer's weights: "
        "build the alarm once the trainer is, AlarmCallback(signal, action, trainer=trainer), and add it with "
        "trainer.add_callback(alarm)": lambda: AlarmCallback(ProbeSignal(), RewindAction()),
    }
    for fix, build in refusals.items():
        with pytest.raises(ValueError) as refused:
            build()
        assert fix in str(refused.value) and "\n" not in str(refused.value)


def test_an_online_probe_built_by_hand_has_its_prompts_paired_when_added(tmp_path):
    """An online run's held-out rows are prompts: a probe built by hand is paired when it is added (the run's sampler
    and reward, before training), as the config's is when the trainer is built, and then probes."""
    trainer = make_online_trainer(tmp_path, max_steps=1)
    probe = ProbeCallback.held_out(1, Dataset.from_dict({"prompt": ONLINE_PROMPTS[:2]}), trainer=trainer)
    assert probe.probe.batch is None  # prompts, not yet pairs
    trainer.add_callback(probe)
    assert probe.probe.batch is not None and " pairs of 2 prompts held back " in probe.source
    trainer.train()
    assert [step for step, _ in probe.readings] == [1] and "probe/delta_winner" in trainer.state.log_history[0]


def test_the_docs_example_composes_a_probe_and_a_rewind(make_pipeline, make_config, make_pickapic):
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "compose.md").read_text()
    block = page.split("```python\n", 1)[1].split("```", 1)[0]
    names = {"pipeline": make_pipeline(), "dataset": make_pickapic(ROWS), "args": make_config(max_steps=2)}
    exec(compile(block, "docs/compose.md", "exec"), names)  # noqa: S102 (the page's own example, run as written)
    trainer, probe, rewind = names["trainer"], names["probe"], names["rewind"]
    assert trainer.probe is probe and rewind.signal.probe is probe and rewind.action.snapshot is not None
    assert trainer.probe_alarm is rewind
    assert [step for step, _ in probe.readings] == [1, 2] and trainer.state.global_step == 2
