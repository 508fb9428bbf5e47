"""The held-out probe keeps the reference's errors on its fixed noised pairs from its first probe (docs/safeguard.md,
"The held-out probe and the rewind"): its readings are bit for bit those of a probe that runs the reference at every
probe, the reference runs once per run (again only after it changes), through a rewind, LoRA's adapter-disabled base
and full tuning's frozen copy, and an online run whose reference is refreshed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import online
from tests.helpers.rewind import ScriptedAlarm

ROWS, HELD, DRAWS = 8, 2, 2
DPO = {"safeguard_space": "none"}


def count_reference_calls(probe: Any) -> list[int]:
    """Wraps the probe's reference (the test's own wrapper on the probe's stages) so that each call is counted."""
    calls = [0]
    reference: Callable[..., Any] = probe.stages.reference

    def counted(*args, **kwargs):
        calls[0] += 1
        return reference(*args, **kwargs)

    probe.stages.reference = counted
    return calls


def probed_run(make_trainer, make_pickapic, lora: bool, keep: bool):
    """A Diffusion-DPO run of 4 steps probed at every step whose alarm fires at step 3 and rewinds to step 1 (step 4's
    probe reads the restored weights trained on); ``keep=False``: the probe runs the reference at every probe (no key
    to keep its errors under)."""
    trainer = make_trainer(
        lora=lora, train_dataset=make_pickapic(ROWS), max_steps=4, probe_steps=1, probe_pairs=HELD,
        probe_noise_draws=DRAWS, on_pathology="rewind", **DPO,
    )  # fmt: skip
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps={2, 3})
    probe = trainer.probe.probe
    if not keep:
        probe.reference_key = None
    calls = count_reference_calls(probe)
    trainer.train()
    return trainer, calls[0]


@pytest.mark.parametrize(  # full tuning's frozen copy by default too: a reference of its own, on disk for the rewind
    "lora", [True, False], ids=["lora-base", "full-frozen-copy"]
)
def test_the_kept_reference_errors_give_the_readings_of_a_probe_that_runs_the_reference_every_time(
    make_trainer, make_pickapic, lora
):
    kept, kept_calls = probed_run(make_trainer, make_pickapic, lora, keep=True)
    rerun, rerun_calls = probed_run(make_trainer, make_pickapic, lora, keep=False)
    assert [step for step, _ in kept.probe.readings] == [1, 2, 3, 4]
    assert [(e["step"], e["health/rewind_to"]) for e in kept.state.log_history if "health/rewind_to" in e] == [
        (3, 1.0)
    ]
    # The policy moved (the readings differ between probes) and the figures match bit for bit, after the rewind too.
    readings = [figures for _, figures in kept.probe.readings]
    assert readings[0]["probe/mse_policy_winner"] != readings[1]["probe/mse_policy_winner"]
    assert kept.probe.readings == rerun.probe.readings
    # One reference pass per noise draw: at the first probe only, against one at every probe.
    assert kept_calls == DRAWS
    assert rerun_calls == DRAWS * 4


def test_an_online_probe_runs_the_refreshed_reference_and_keeps_it_until_the_next_refresh(tmp_path):
    def run(name: str, keep: bool):
        trainer = online.make_trainer(
            tmp_path / name, max_steps=4, ref_update_steps=2, probe_steps=1, probe_pairs=HELD,
            probe_noise_draws=DRAWS, **online.CHEAP_SAMPLING, **DPO,
        )  # fmt: skip
        probe = trainer.probe.probe
        if not keep:
            probe.reference_key = None
        calls = count_reference_calls(probe)
        trainer.train()
        return trainer.probe.readings, calls[0]

    kept, kept_calls = run("kept", keep=True)
    rerun, _ = run("rerun", keep=False)
    assert kept == rerun
    # The refresh after step 2's probe moves the reference the probe reads (LoRA's becomes a merged copy): the
    # reference's errors at step 3 are those of the policy as it was at step 2.
    by_step = dict(kept)
    assert by_step[3]["probe/mse_ref_winner"] != by_step[1]["probe/mse_ref_winner"]
    assert by_step[3]["probe/mse_ref_winner"] == pytest.approx(by_step[2]["probe/mse_policy_winner"], rel=1e-4)
    assert by_step[4]["probe/mse_ref_winner"] == by_step[3]["probe/mse_ref_winner"]  # kept until the next refresh
    assert kept_calls == DRAWS * 2  # the first probe's, and the first after the refresh
