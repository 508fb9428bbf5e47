"""What a run's records say of its rewinds, and the probe's and the rewind's figures checked against a computation of
their own: the model card and the end-of-run summary name each rewind (step fired, step restored) and the switch of
the safeguard, as the checkpoint's ``trainer_state.json`` logged them; a resumed run keeps the rewinds before its
resume and trains with the safeguard it switched to; unhealthy probes that are not in a row never fire the alarm; the
probe's implicit accuracy is the share of pairs the policy prefers more than the reference does; an inverted pair is
made afresh at every probe; the probe's pairing leaves every global random generator as it found it."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers.rewind import CopyOutputAt, HandDriven, ScriptedAlarm, equal, trained_weights
from trl_diffusion_sdpo.callbacks.health import PathologyRule, config_in_force, remedies
from trl_diffusion_sdpo.callbacks.probe import PROBE_METRICS, HeldOutProbe
from trl_diffusion_sdpo.callbacks.rewind import MemorySnapshot, RewindAction
from trl_diffusion_sdpo.online.probe_pairs import random_states_kept

ROWS, HELD = 8, 2  # 6 training pairs: 3 optimizer steps of 2 per epoch
DPO = {"safeguard_space": "none"}  # Diffusion-DPO (the package defaults to the safeguard)
SUMMARY_LOGGER = "trl_diffusion_sdpo.io.run_summary"
SCRIPTED = {"probe_noise_draws": 2}  # where the alarm is scripted, the probe's figures are unread: two draws do


def _logged_rewinds(trainer_state: dict) -> list[tuple[int, int]]:
    """``(step fired, step restored)`` of each rewind, as the training log recorded it."""
    return [(e["step"], int(e["health/rewind_to"])) for e in trainer_state["log_history"] if "health/rewind_to" in e]


def _first_safeguarded_step(trainer_state: dict) -> int:
    """The first step whose training log carries the safeguard's own metrics: the first step it ran."""
    return next(e["step"] for e in trainer_state["log_history"] if "safeguard/engaged" in e)


def _card_section(readme: str, start: bool = False) -> list[str]:
    """The card's list of alarms, warnings, rewinds and switches (its bullets), empty without the section; without
    ``start``, less the start summary's warnings (the tiny runs' learning rate is above the range recommended)."""
    heading = "## Alarms, warnings and rewinds"
    if heading not in readme:
        return []
    section = readme.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [line[2:] for line in section.splitlines() if line.startswith("- ")]
    return lines if start else [line for line in lines if not line.startswith("At the start: ")]


def _switch_text(trainer) -> str:
    """The safeguard in force, as the trainer runs it (its space and its margin's ``mu``)."""
    return f"safeguard_space={trainer.safeguard.name!r}, safeguard_mu={trainer.safeguard.margin.current()!r}"


def test_a_rewound_runs_card_and_end_summary_name_each_rewind_and_the_safeguard_switch(
    make_trainer, make_pickapic, tmp_path, caplog
):
    out = tmp_path / "rewound"
    trainer = make_trainer(
        train_dataset=make_pickapic(ROWS), max_steps=8, probe_steps=1, probe_pairs=HELD, on_pathology="rewind",
        save_strategy="steps", save_steps=6, output_dir=str(out), rewind_max_times=1, **SCRIPTED, **DPO,
    )  # fmt: skip
    # Healthy at 1, unhealthy at 2 and 3: back to 1, the safeguard on; healthy at 4, unhealthy at 5 and 6: back to 4,
    # and, the ladder's one rung spent, the run stops at 6.
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps={2, 3, 5, 6})
    with caplog.at_level("INFO", logger=SUMMARY_LOGGER):
        trainer.train()
    trainer.create_model_card()
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    rewinds = _logged_rewinds(state)
    assert len(rewinds) == 2
    (first, back), (second, back_again) = rewinds
    switched = _first_safeguarded_step(state) - 1  # the safeguard ran from the step after the switch
    assert switched == first
    lines = _card_section((out / "README.md").read_text())
    assert len(lines) == 2
    assert lines[0].startswith(f"Step {first}:") and f"back to step {back}'s" in lines[0]
    assert f"steps {switched + 1}-{second} trained with the safeguard on ({_switch_text(trainer)})" in lines[0]
    assert lines[1].startswith(f"Step {second}:") and f"back to step {back_again}'s" in lines[1]
    assert "training stopped there" in lines[1] and state["global_step"] == second
    ended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training ended")]
    every = _card_section((out / "README.md").read_text(), start=True)  # the start's warnings too
    assert ended == [f"Training ended at step {second}. " + " ".join(every)]


def test_a_quiet_rewind_runs_card_says_no_rewind_happened_and_a_run_without_the_alarm_has_no_section(
    make_trainer, make_pickapic, tmp_path, caplog
):
    quiet = make_trainer(
        train_dataset=make_pickapic(ROWS), max_steps=2, probe_steps=1, probe_pairs=HELD, on_pathology="rewind",
        output_dir=str(tmp_path / "quiet"), **SCRIPTED, **DPO,
    )  # fmt: skip
    quiet.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps=set())
    with caplog.at_level("INFO", logger=SUMMARY_LOGGER):
        quiet.train()
    quiet.create_model_card()
    assert _logged_rewinds({"log_history": quiet.state.log_history}) == []
    lines = _card_section((tmp_path / "quiet" / "README.md").read_text())
    assert len(lines) == 1 and "never fired" in lines[0] and "no rewind happened" in lines[0]
    assert any(r.getMessage().endswith(lines[0]) for r in caplog.records)
    plain = make_trainer(max_steps=1, output_dir=str(tmp_path / "plain"), **DPO)
    plain.create_model_card()
    readme = (tmp_path / "plain" / "README.md").read_text()
    assert _card_section(readme) == [] and "rewind" not in readme.lower()


def test_a_resumed_run_lists_the_rewinds_before_its_resume_and_trains_on_with_the_safeguard(
    make_trainer, make_pickapic, tmp_path
):
    def run(output_dir, callbacks=(), resume=None):
        trainer = make_trainer(
            train_dataset=make_pickapic(ROWS), callbacks=list(callbacks), max_steps=6, probe_steps=1,
            probe_pairs=HELD, on_pathology="rewind", save_strategy="steps", save_steps=4, output_dir=str(output_dir),
            **SCRIPTED, **DPO,
        )  # fmt: skip
        # Unhealthy at 2 and 3: back to step 1 at 3 and the safeguard on; the checkpoint is step 4's, after it.
        trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps={2, 3})
        trainer.train(resume_from_checkpoint=resume)
        trainer.create_model_card()
        return trainer

    # The run interrupted after step 4 is the uninterrupted one up to there: its output folder right after that save.
    straight = run(tmp_path / "straight", callbacks=[CopyOutputAt(4, tmp_path / "resumed")])
    checkpoint = tmp_path / "resumed" / "checkpoint-4"
    resumed = run(tmp_path / "resumed", resume=str(checkpoint))
    # Steps 5 and 6 trained with the safeguard the uninterrupted run had switched to before the checkpoint.
    assert resumed.safeguard is not None
    assert equal(trained_weights(resumed), trained_weights(straight))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    [(fired, back)] = _logged_rewinds(state)
    cards = [_card_section((tmp_path / name / "README.md").read_text()) for name in ("straight", "resumed")]
    assert cards[0] == cards[1] and len(cards[1]) == 1
    assert cards[1][0].startswith(f"Step {fired}:") and f"back to step {back}'s" in cards[1][0]
    assert f"steps {fired + 1}-6 trained with the safeguard on ({_switch_text(resumed)})" in cards[1][0]


def test_a_switched_runs_card_and_end_summary_name_the_step_the_training_logs_alarm_switched_the_safeguard_on(
    make_trainer, tmp_path, monkeypatch, caplog
):
    from trl_diffusion_sdpo.callbacks import health

    # the tiny run does not show the pathology in 4 steps: the alarm is made to fire on the second training log
    monkeypatch.setattr(
        health, "winner_pathology", lambda history, rule: sum("delta/winner" in h for h in history) >= 2
    )
    trainer = make_trainer(max_steps=4, on_pathology="safeguard", output_dir=str(tmp_path / "switched"), **DPO)
    with caplog.at_level("INFO", logger=SUMMARY_LOGGER):
        trainer.train()
    trainer.create_model_card()
    switched = _first_safeguarded_step({"log_history": trainer.state.log_history}) - 1
    flagged, line = _card_section((tmp_path / "switched" / "README.md").read_text())
    assert flagged.startswith(f"Step {switched}: the training logs' pathology alarm fired (health/winner_pathology")
    assert line.startswith(f"Step {switched}: the training logs' pathology alarm fired (on_pathology='safeguard')")
    assert f"steps {switched + 1}-4 trained with the safeguard on ({_switch_text(trainer)})" in line
    every = " ".join(_card_section((tmp_path / "switched" / "README.md").read_text(), start=True))
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training ended")] == [
        f"Training ended at step 4. {every}"
    ]


def _fires(unhealthy: set[int], steps: int, patience: int) -> list[int]:
    """The steps the alarm fires at: ``patience`` unhealthy probes in a row, counted afresh after each alarm."""
    fired, run = [], 0
    for step in range(1, steps + 1):
        run = run + 1 if step in unhealthy else 0
        if run == patience:
            fired.append(step)
            run = 0
    return fired


@pytest.mark.parametrize(
    "unhealthy", [{1, 3, 5, 7}, {2, 3, 5}, {1, 2, 4, 6, 7}], ids=lambda steps: "-".join(map(str, sorted(steps)))
)
def test_the_alarm_fires_only_on_unhealthy_probes_in_a_row(unhealthy):
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    rewind = HandDriven(ScriptedAlarm(patience=2, unhealthy_steps=unhealthy), RewindAction(MemorySnapshot([weight])))
    rewind.action.snapshot.take(optimizer)
    control = SimpleNamespace(should_training_stop=False)
    fired = []
    for step in range(1, 9):
        with torch.no_grad():
            weight.add_(1.0)
        if rewind.read({}, step, optimizer, control)["health/probe_alarm"] == 1.0:
            fired.append(step)
    assert fired == _fires(unhealthy, 8, 2)


def _per_pair_metrics(probe: HeldOutProbe, policy: torch.nn.Module) -> dict[str, float]:
    """The probe's figures computed here from its own noised pair: each image's mean squared error, then the share
    of pairs whose winner-minus-loser error gap the policy keeps below the reference's."""
    probe.stages.draws.start_evaluation(probe.seed)
    policy.eval()
    try:
        with torch.no_grad():
            noised = probe.stages.noised_pair(policy, probe.batch, "eval", 0)
            p = probe.stages.predict_noised(policy, noised, separate_branches=False)
    finally:
        probe.stages.draws.end_evaluation()
        policy.train()

    def error(prediction, target):
        return ((prediction.double() - target.double()) ** 2).flatten(1).mean(1)

    pw, rw = error(p.policy_winner, p.target_winner), error(p.reference_winner, p.target_winner)
    pl, rl = error(p.policy_loser, p.target_loser), error(p.reference_loser, p.target_loser)
    gap, reference_gap = pw - pl, rw - rl
    accuracy = ((gap < reference_gap).double() + 0.5 * (gap == reference_gap).double()).mean()  # a tie: half
    figures = [pw.mean(), rw.mean(), pl.mean(), rl.mean(), (pw - rw).mean(), (pl - rl).mean(), accuracy]
    return dict(zip(PROBE_METRICS[: len(figures)], (float(v) for v in figures), strict=True))  # one draw's figures


def test_the_probes_figures_are_the_mean_errors_and_the_share_of_pairs_preferred(
    make_trainer, make_pickapic, make_pipeline
):
    # A reference unlike the policy, and three pairs: the implicit accuracy is a third, two thirds, 0 or 1, never
    # the half that a flipped sign would leave unchanged.
    trainer = make_trainer(
        lora=False, train_dataset=make_pickapic(ROWS + 1), ref_model=make_pipeline(seed=1).unet, probe_steps=1,
        probe_pairs=3, probe_noise_draws=1,
    )  # fmt: skip
    probe, policy = trainer.probe.probe, trainer._policy()
    measured = probe.measure(policy, trainer.args.device)
    expected = _per_pair_metrics(probe, policy)
    assert expected["probe/implicit_acc"] != 0.5
    # The probe's per-image mean errors are float32 (about 1.1 here, within about 1e-7 of the float64 means), and a
    # delta, the difference of two, carries the errors' absolute rounding, not a share of its own size (delta_loser
    # read 1.2e-6 of itself apart under AVX2 kernels): hence abs at 1e-6 of the errors' scale.
    assert {k: measured[k] for k in expected} == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_a_policy_equal_to_its_reference_ties_on_every_pair(make_trainer, make_pickapic):
    # LoRA adapters as initialised add exactly zero: the policy's errors are the reference's, every pair a tie.
    trainer = make_trainer(train_dataset=make_pickapic(ROWS), probe_steps=1, probe_pairs=HELD, probe_noise_draws=1)
    probe, policy = trainer.probe.probe, trainer._policy()
    expected = _per_pair_metrics(probe, policy)
    assert expected["probe/delta_winner"] == expected["probe/delta_loser"] == 0.0
    assert expected["probe/implicit_acc"] == 0.5
    measured = probe.measure(policy, trainer.args.device)
    assert {k: measured[k] for k in expected} == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_an_inverted_pair_is_made_afresh_at_every_probe(make_trainer, make_pickapic):
    # Inversion runs the policy: the pair of a later probe is not the first probe's. The probe's last reading must be
    # what a new probe measures on the trained weights.
    trainer = make_trainer(
        train_dataset=make_pickapic(ROWS), max_steps=2, probe_steps=1, probe_pairs=HELD, noising="inversion",
        inversion_steps=2, probe_noise_draws=2, **DPO,
    )  # fmt: skip
    trainer.train()
    probe = trainer.probe.probe
    fresh = HeldOutProbe(probe.stages, probe.batch, probe.seed, probe.reduce, probe.forward_context, probe.draws)
    (first_step, first), (last_step, last) = trainer.probe.readings
    assert (first_step, last_step) == (1, 2) and first != last
    assert last == fresh.measure(trainer._policy(), trainer.args.device)


def test_the_probes_pairing_leaves_torchs_numpys_and_pythons_generators_as_it_found_them():
    def draws() -> tuple:
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    def seed() -> None:
        torch.manual_seed(7)
        np.random.seed(7)
        random.seed(7)

    seed()
    expected = draws()  # a process that never paired
    seed()
    with random_states_kept("cpu"):
        draws()  # a pipeline and a reward drawing from every global generator
    assert draws() == expected


def test_a_warning_after_the_rewind_switched_the_safeguard_on_reads_it_in_use_and_the_card_keeps_the_order(
    make_trainer, make_pickapic, tmp_path, caplog
):
    out = tmp_path / "out"
    trainer = make_trainer(
        train_dataset=make_pickapic(ROWS), max_steps=3, probe_steps=1, probe_pairs=HELD, on_pathology="rewind",
        logging_steps=1, output_dir=str(out), **SCRIPTED, **DPO,
    )  # fmt: skip
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=1, unhealthy_steps={1})  # step 1: the safeguard on
    # the training logs' alarm made to fire once two logs carry delta/winner: at step 2, after the switch
    trainer.alarm.signal.rule = PathologyRule(
        windows=2, window_steps=None, min_delta_winner=-1e9, max_implicit_acc=None
    )
    with caplog.at_level("WARNING", logger="trl_diffusion_sdpo.callbacks.health"):
        trainer.train()
    [warning] = [r.getMessage() for r in caplog.records if "Remedies not in use" in r.getMessage()]
    assert warning.startswith("Step 2:") and trainer.safeguard is not None
    in_force = remedies(config_in_force(trainer.args, trainer.safeguard))  # those of a run with the output space on
    assert "the safeguard (safeguard_space='output')" not in warning and "safeguard_space='update'" in warning
    assert warning.endswith(f"Remedies not in use in this run: {'; '.join(in_force)}.")
    trainer.create_model_card()
    rewind, flagged = _card_section((out / "README.md").read_text())
    assert rewind.startswith("Step 1: the held-out probe's alarm fired")  # the events in the order they happened
    assert flagged.startswith("Step 2: the training logs' pathology alarm fired")
    assert f"a warning named the remedies not in use then: {'; '.join(in_force)};" in flagged
