"""The held-out probe (``probe_steps``) and ``on_pathology="rewind"`` (docs/safeguard.md, "The held-out probe and the
rewind"), through real tiny SD runs: the probe leaves the training bit for bit, reads only held-out pairs at fixed
draws, and a rewind puts the weights and the optimizer state back to the last healthy probe's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers.rewind import Recorder, ScriptedAlarm, equal, states_equal, trained_weights
from trl_diffusion_sdpo.callbacks.probe import hold_back_pairs
from trl_diffusion_sdpo.callbacks.rewind import ProbeAlarmRule, probe_alarm
from trl_diffusion_sdpo.engines.base import trainable_parameters

ROWS, HELD = 8, 2  # 6 training pairs: 3 optimizer steps of 2 per epoch
DPO = {"safeguard_space": "none"}  # Diffusion-DPO (the package defaults to the safeguard)
TWO = {"probe_noise_draws": 2}  # where the probe's figures are unread (the alarm scripted or never acting)


@pytest.mark.parametrize(  # full tuning by default: test_a_rewind_restores_the_last_healthy_steps_weights_...
    "lora", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["lora", "full"]
)
def test_a_probed_run_and_a_quiet_rewind_train_bit_for_bit_as_diffusion_dpo_on_the_same_split(
    make_trainer, make_pickapic, make_config, lora
):
    data = make_pickapic(ROWS)
    kept, _ = hold_back_pairs(data, None, make_config(probe_steps=1, probe_pairs=HELD))  # the probed runs' split
    plain = make_trainer(lora=lora, train_dataset=kept, max_steps=4, **DPO)
    plain.train()
    expected = trained_weights(plain)
    probed = make_trainer(lora=lora, train_dataset=data, max_steps=4, probe_steps=1, probe_pairs=HELD, **TWO, **DPO)
    probed.train()
    assert equal(trained_weights(probed), expected)
    logged = [entry for entry in probed.state.log_history if "probe/delta_winner" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]
    # A rewind whose alarm stays quiet: snapshots at every probe, and the weights Diffusion-DPO's.
    quiet = make_trainer(
        lora=lora,
        train_dataset=data,
        max_steps=4,
        probe_steps=1,
        probe_pairs=HELD,
        on_pathology="rewind",
        **TWO,
        **DPO,
    )
    quiet.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps=set())
    quiet.train()
    assert equal(trained_weights(quiet), expected)
    assert not any("health/rewind_to" in entry for entry in quiet.state.log_history)


def test_the_probe_reads_the_held_back_pairs_and_training_never_sees_them(make_trainer, make_pickapic, make_config):
    data = make_pickapic(ROWS)
    trainer = make_trainer(train_dataset=data, probe_steps=1, probe_pairs=HELD)
    kept, held = hold_back_pairs(data, None, trainer.args)
    held_captions = list(held["caption"])
    assert sorted(trainer.train_dataset["prompt"]) == sorted(kept["caption"])
    assert sorted([*held_captions, *kept["caption"]]) == sorted(data["caption"])
    tokens = trainer.family.prompt_tokenizer()(held_captions)
    assert torch.equal(trainer.probe.probe.batch["input_ids"].cpu(), tokens["input_ids"])
    # With an eval split the probe reads its first pairs, and the training data stay whole.
    evaluation = make_pickapic(4)
    with_eval = make_trainer(train_dataset=data, eval_dataset=evaluation, probe_steps=1, probe_pairs=HELD)
    assert len(with_eval.train_dataset) == ROWS
    tokens = with_eval.family.prompt_tokenizer()(evaluation["caption"][:HELD])
    assert torch.equal(with_eval.probe.probe.batch["input_ids"].cpu(), tokens["input_ids"])
    # The split itself: the rows held back are taken out of the rows trained on.
    kept, held = hold_back_pairs(data, None, make_config(probe_steps=1, probe_pairs=3))
    assert set(kept["caption"]).isdisjoint(held["caption"]) and len(kept) + len(held) == ROWS


def test_the_probe_measures_at_the_same_draws_every_time(make_trainer, make_pickapic, make_pipeline):
    # A policy that does not move (learning rate 0) against a reference that differs from it: every probe must read
    # the same figures, which it can only do at fixed noise and timesteps.
    reference = make_pipeline(seed=1).unet
    trainer = make_trainer(
        lora=False,
        train_dataset=make_pickapic(ROWS),
        ref_model=reference,
        learning_rate=0.0,
        max_steps=3,
        probe_steps=1,
        probe_pairs=HELD,
        probe_noise_draws=2,  # several draws, each probe taking them again from the first
    )
    trainer.train()
    readings = [metrics for _, metrics in trainer.probe.readings]
    assert len(readings) == 3
    assert readings[0]["probe/delta_winner"] != 0.0
    assert readings[0] == readings[1] == readings[2]
    # The figures are the reduced means of the errors: delta = policy - reference.
    first = readings[0]
    difference = first["probe/mse_policy_winner"] - first["probe/mse_ref_winner"]
    assert first["probe/delta_winner"] == pytest.approx(difference)


# the snapshot in memory by default: test_online_probe.py's test_an_online_rewind_restores_...[lora-in-memory]
@pytest.mark.parametrize(
    "lora", [pytest.param(True, marks=pytest.mark.slow), False], ids=["lora-in-memory", "full-on-disk"]
)
def test_a_rewind_restores_the_last_healthy_steps_weights_and_optimizer_state(make_trainer, make_pickapic, lora):
    recorder = Recorder()
    trainer = make_trainer(
        lora=lora,
        train_dataset=make_pickapic(ROWS),
        callbacks=[recorder],
        max_steps=5,
        probe_steps=1,
        probe_pairs=HELD,
        on_pathology="rewind",
        **TWO,
        **DPO,
    )
    recorder.parameters = list(trainable_parameters(trainer.family.denoiser))
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps={2, 3})
    trainer.train()
    # Healthy at 1, unhealthy at 2 and 3: the alarm fires at 3 and the run goes back to step 1.
    healthy_weights, healthy_optimizer = recorder.at_end[1]
    broken_weights, broken_optimizer = recorder.at_end[3]
    restored_weights, restored_optimizer = recorder.at_begin[3]  # the start of the step after the rewind
    assert not equal(broken_weights, healthy_weights)
    assert equal(restored_weights, healthy_weights)
    assert states_equal(restored_optimizer, healthy_optimizer)
    assert not states_equal(restored_optimizer, broken_optimizer)
    rewinds = [entry for entry in trainer.state.log_history if "health/rewind_to" in entry]
    assert [(entry["step"], entry["health/rewind_to"]) for entry in rewinds] == [(3, 1.0)]
    # The response: the safeguard on_pathology="safeguard" switches to, in force after the rewind.
    assert trainer.safeguard is not None and trainer.probe_alarm.action.safeguard_on


def test_a_safeguarded_run_stops_after_its_rewind_with_the_healthy_weights(make_trainer, make_pickapic):
    recorder = Recorder()
    trainer = make_trainer(
        train_dataset=make_pickapic(ROWS),
        callbacks=[recorder],
        max_steps=6,
        probe_steps=1,
        probe_pairs=HELD,
        on_pathology="rewind",
        rewind_max_times=0,  # no rung to train on: the rewind stops (the ladder: test_rewind_ladder.py)
        safeguard_space="output",
        safeguard_mu=0.5,
        **TWO,
    )
    recorder.parameters = list(trainable_parameters(trainer.family.denoiser))
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=1, unhealthy_steps={3})
    trainer.train()
    assert trainer.state.global_step == 3
    assert equal(trained_weights(trainer), recorder.at_end[2][0])
    assert trainer.probe_alarm.action.rewinds == [(3, 2)]


def test_rewind_needs_the_probe(make_config):
    with pytest.raises(ValueError, match="probe_steps"):
        make_config(on_pathology="rewind")
    assert make_config(on_pathology="rewind", probe_steps=5).on_pathology == "rewind"


def test_the_alarms_rule_calls_a_probe_unhealthy_when_the_winner_rise_exceeds_its_threshold_in_standard_errors():
    rule = ProbeAlarmRule(patience=2, threshold=3.0)
    assert rule.unhealthy({"probe/winner_rise_z": 3.0 + 1e-6}, 1)
    assert not rule.unhealthy({"probe/winner_rise_z": 3.0}, 1)
    assert not rule.unhealthy({"probe/winner_rise_z": float("nan")}, 1)  # no spread to measure: healthy


def test_offline_and_online_configs_read_one_rule_from_the_config_fields():
    from trl_diffusion_sdpo import DiffusionSDPOConfig
    from trl_diffusion_sdpo.online.config import OnlineDiffusionSDPOConfig

    offline = probe_alarm(DiffusionSDPOConfig(output_dir="unused", use_cpu=True))
    online = probe_alarm(OnlineDiffusionSDPOConfig(output_dir="unused", use_cpu=True))
    assert offline == online
    assert probe_alarm(SimpleNamespace(probe_alarm_z=1.5, probe_alarm_rise=3.0)) == ProbeAlarmRule.relative(3.0, 1.5)


def test_the_start_summary_states_the_held_back_pairs_and_where_the_snapshot_is_kept(
    make_trainer, make_pickapic, caplog
):
    trainer = make_trainer(
        lora=False, train_dataset=make_pickapic(ROWS), max_steps=1, probe_steps=1, probe_pairs=HELD,
        on_pathology="rewind", **TWO, **DPO,
    )  # fmt: skip
    with caplog.at_level("INFO", logger="trl_diffusion_sdpo.io.run_summary"):
        trainer.train()
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Training "))
    assert f"held-out probe every 1 optimizer steps on {HELD} pairs held back from the training data" in summary
    assert f"kept on disk in {trainer.args.output_dir}/rewind-healthy" in summary
    assert "safeguard_space='output', safeguard_mu=0.5" in summary
    # The alarm the run reads is the config's rule, and the summary states it.
    assert trainer.probe_alarm.signal.rule == probe_alarm(trainer.args)
    assert f"the alarm ({probe_alarm(trainer.args).describe()})" in summary


def test_the_docs_state_the_alarms_rule_and_the_measured_cost():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    page = " ".join((root / "docs" / "safeguard.md").read_text().split())
    from trl_diffusion_sdpo import DiffusionSDPOConfig

    fields = DiffusionSDPOConfig.__dataclass_fields__
    rise, z, draws = (fields[f].default for f in ("probe_alarm_rise", "probe_alarm_z", "probe_noise_draws"))
    assert "the relative rise `probe/delta_winner / probe/mse_ref_winner` exceeds `probe_alarm_rise`" in page
    assert f"`probe/winner_rise_z` exceeds `probe_alarm_z` (defaults {rise:g} and {z:g})" in page
    assert f"`probe_noise_draws` times (default {draws}," in page
    # One rule online: the online page names the same fields and no rule of its own.
    online = " ".join((root / "docs" / "online.md").read_text().split())
    assert "the same rule online as offline" in online and "above `probe_alarm_rise`" in online
    assert "above `probe_alarm_z`" in online
    runs = json.loads((root / "benchmarks" / "results" / "probe" / "cpu-probe-cost-tiny.json").read_text())["runs"]
    shares = {run["probe_steps"]: f"{100 * run['probe_share_of_training']:.1f}%" for run in runs}
    assert f"{shares[10]} of the training time at `probe_steps=10`, {shares[20]} at 20, {shares[50]} at 50" in page
    # The price at the defaults, each run with the reference's errors kept and with the reference rerun at every probe.
    price = json.loads((root / "benchmarks" / "results" / "probe" / "cpu-probe-price-defaults.json").read_text())
    runs = {(run["mode"], run["path"]): run for run in price["runs"]}
    assert all(run["readings_equal_other_path"] for run in runs.values())
    share = {key: f"{100 * run['probe_share_of_training']:.1f}%" for key, run in runs.items()}
    lora, full, generated = "offline-lora", "offline-full", "online"
    online_run = runs[(generated, "kept")]
    for run in runs.values():  # the probe's defaults, every 20 steps (probe_steps has none)
        assert (run["probe_steps"], run["probe_pairs"], run["probe_noise_draws"]) == (
            20, fields["probe_pairs"].default, draws
        )  # fmt: skip
    assert (
        f"{share[(lora, 'kept')]} of the offline LoRA run's training time ({share[(lora, 'rerun')]} running the "
        f"reference at every probe), {share[(full, 'kept')]} of the full-tuning run's ({share[(full, 'rerun')]}) and "
        f"{share[(generated, 'kept')]} of the online run's ({share[(generated, 'rerun')]})"
    ) in page
    pairing = f"{online_run['pairing_s']:.1f} s ({100 * online_run['pairing_share_of_training']:.1f}% of its training"
    assert pairing in page and pairing in online


@pytest.mark.slow  # by default: test_checkpoint_parts.py's test_a_full_tuning_run_resumed_between_the_healthy_...
def test_a_run_resumed_from_a_checkpoint_rewinds_as_the_uninterrupted_one(make_trainer, make_pickapic, tmp_path):
    from tests.helpers.common import StopAt

    def run(output_dir, callbacks=(), resume=None):
        trainer = make_trainer(
            train_dataset=make_pickapic(ROWS), callbacks=list(callbacks), max_steps=5, probe_steps=1,
            probe_pairs=HELD, on_pathology="rewind", save_strategy="steps", save_steps=3, output_dir=str(output_dir),
            **DPO,
        )  # fmt: skip
        # Healthy at 1 and 2, unhealthy at 3 (the checkpoint's step: one unhealthy probe so far, the snapshot step
        # 2's) and 4: the alarm fires at 4, back to step 2.
        trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps={3, 4})
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", callbacks=[StopAt(3)])
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-3"))
    assert straight.probe_alarm.action.rewinds == resumed.probe_alarm.action.rewinds == [(4, 2)]
    assert resumed.safeguard is not None
    assert equal(trained_weights(resumed), trained_weights(straight))
