"""The held-out probe's CUSUM rule (``ProbeAlarmRule.cusum``, built by hand; the config builds the relative rise's:
``test_probe_alarm_rise.py``), the one-sided CUSUM of ``probe/winner_rise_z`` (``S_t = max(0, S_(t-1) + z_t - k)``,
firing above ``h`` and starting again from 0): the steps it fires at, through :class:`ProbeSignal` as a run reads it
and through ``alarm_steps``, against sums worked out by hand; its state carried by a checkpoint."""

from __future__ import annotations

import math

import pytest

from trl_diffusion_sdpo.callbacks.probe_signal import ProbeSignal
from trl_diffusion_sdpo.callbacks.rewind import ProbeAlarmRule, alarm_steps

K, H = 6.5, 6.0
SIGNAL = ProbeAlarmRule.SIGNAL


def _fired(rule: ProbeAlarmRule, readings: list[float]) -> list[int]:
    """The steps (1, 2, ...) at which a :class:`ProbeSignal` of ``rule`` fires on ``readings``, one probe per step."""
    signal = ProbeSignal(probe=object(), rule=rule)
    return [step for step, z in enumerate(readings, 1) if signal.judge({SIGNAL: z}, step).fired]


# Each case: the readings and the steps the CUSUM with k 6.5, h 6 fires at, its sums worked out by hand.
CASES = {
    # 1.5 a probe: 1.5, 3, 4.5, 6 (not above 6), 7.5 fires at step 5
    "a rise just above k adds up": ([8.0] * 5, [5]),
    # the sum cannot go below 0: four quiet probes leave it at 0, then 3.5, 7 fires at step 6 (without the floor
    # it would sit at -26 and never fire)
    "quiet probes leave the sum at zero": ([0.0] * 4 + [10.0, 10.0], [6]),
    # 13.5 fires at once; the sum starts again from 0, so 0.5 a probe reaches 2.5 (carried on, it would fire again)
    "it counts afresh after firing": ([20.0] + [7.0] * 5, [1]),
    # a reading without a spread (nan) reads as no rise: 0 - 6.5 drains the sum to 0, so 1.5, 3, 4.5, 6 then 7.5
    "no spread reads as no rise": ([8.0, 8.0, math.nan, 8.0, 8.0, 8.0, 8.0, 8.0], [8]),
    # a healthy run's readings below k never fire
    "readings below k never fire": ([6.0, 6.4, 5.0, 6.49] * 4, []),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_cusum_fires_where_its_sum_worked_out_by_hand_exceeds_h(case):
    readings, expected = CASES[case]
    rule = ProbeAlarmRule.cusum(K, H)
    assert _fired(rule, readings) == expected
    assert alarm_steps(rule, [(step, {SIGNAL: z}) for step, z in enumerate(readings, 1)]) == expected


def test_a_checkpoint_carries_the_sum_and_a_resumed_signal_fires_where_the_uninterrupted_one_does():
    rule = ProbeAlarmRule.cusum(K, H)
    first = ProbeSignal(probe=object(), rule=rule)
    for step in range(1, 4):  # 1.5, 3, 4.5
        assert not first.judge({SIGNAL: 8.0}, step).fired
    resumed = ProbeSignal(probe=object(), rule=rule)
    resumed.restore(first.state())
    assert not resumed.judge({SIGNAL: 8.0}, 4).fired  # 6: not above h
    assert resumed.judge({SIGNAL: 8.0}, 5).fired  # 7.5, as the uninterrupted signal


def test_the_start_summary_and_records_describe_the_cusum():
    text = ProbeAlarmRule.cusum(K, H).describe()
    assert "CUSUM" in text and "z_t - 6.5" in text and "above 6" in text
