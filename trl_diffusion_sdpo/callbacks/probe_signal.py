"""The held-out probe's alarm signal: :class:`ProbeSignal`, which an :class:`~.alarm.AlarmCallback` reads in
``on_step_end``, and its verdict on each probe, :class:`ProbeVerdict`, which the alarm's action acts on (the
:class:`~.guards.PathologyAction` of ``on_pathology``, or the :class:`~.rewind.RewindAction`).

The signal reads the reading the probe published at the end of the same optimizer step
(:attr:`~.probe.ProbeCallback.last_reading`; the probe stands before the alarm) and counts its unhealthy probes in a
row, or a CUSUM of them, by :class:`~.rewind.ProbeAlarmRule`, keeping the last restore point. Only a run that probes
(``probe_steps``, or a :class:`~.probe.ProbeCallback` added) loads it; the alarm on the training logs
(:class:`~.alarm.TrainingLogSignal`) lives with the alarm callback in :mod:`.alarm`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .rewind import ProbeAlarmRule

__all__ = ["ProbeSignal", "ProbeVerdict"]


@dataclass(frozen=True)
class ProbeVerdict:
    """What :class:`ProbeSignal` says of the probe of optimizer step ``step`` (``metrics``: its reduced figures):
    whether the alarm fires there, whether that probe is a restore point (:meth:`~.rewind.ProbeAlarmRule.restorable`),
    and the last restore point so far (``healthy_step``, 0: the start; ``healthy_z``: its reading, ``None`` at the
    start), judged by ``rule``."""

    step: int
    metrics: Mapping[str, float]
    fired: bool
    restore_point: bool
    healthy_step: int
    healthy_z: float | None
    rule: ProbeAlarmRule


class ProbeSignal:
    """The held-out probe's alarm: reads the reading ``probe`` published at the end of an optimizer step
    (:attr:`~.probe.ProbeCallback.last_reading`, its figures reduced over processes, so every process reads the same)
    and moves ``rule``'s statistic on (:class:`~.rewind.ProbeAlarmRule`: by default the unhealthy probes in a row,
    a probe unhealthy where the held-out winner error's rise exceeds ``probe_alarm_rise`` of the reference's error
    with ``probe/winner_rise_z`` above ``probe_alarm_z``, firing at the first; or a CUSUM of ``probe/winner_rise_z``),
    keeping the last restore point.

    Args:
        probe: the :class:`~.probe.ProbeCallback` it reads, which must run before the alarm in ``on_step_end``
            (stand before it in the callbacks); ``None``: the trainer's
            :attr:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.probe`, when the alarm is given one.
        rule: the alarm's rule; ``None``: the config's (:func:`~.rewind.probe_alarm`): the trainer's, or the ``args``
            transformers hands ``on_train_begin``.
    """

    #: the event the signal is read in
    event = "step_end"
    #: the key of its state among a checkpoint's alarms
    name = "probe"

    def __init__(self, probe: Any | None = None, rule: ProbeAlarmRule | None = None) -> None:
        self.probe, self.rule = probe, rule
        self.healthy_step = 0  # the last restore point (0: the start)
        self.healthy_z: float | None = None  # its reading (none at the start)
        self.alarm_statistic = 0.0  # the rule's statistic: the CUSUM's sum, or the unhealthy probes in a row

    def describe(self) -> str:
        return "" if self.rule is None else self.rule.describe()

    def bind(self, trainer: Any) -> None:
        """What was left unset, from the alarm's ``trainer``: its probe and its config's rule."""
        if self.probe is None:
            self.probe = trainer.probe
        if self.probe is None:
            raise ValueError(
                "a ProbeSignal reads the held-out probe: set probe_steps, or add a ProbeCallback with "
                "trainer.add_callback before the alarm"
            )
        self.configure(trainer.args)

    def configure(self, args: Any) -> None:
        """The rule of ``args`` (the config's ``probe_alarm_rise`` and ``probe_alarm_z``) where none was given."""
        if self.rule is None:
            from .rewind import probe_alarm  # the rewind's module loads only in a run that probes

            self.rule = probe_alarm(args)

    def lacks(self) -> str | None:
        """What it needs of a trainer and was not given: the probe it reads (its rule comes from the ``args`` of the
        alarm's ``on_train_begin``)."""
        return None if self.probe is not None else "a ProbeSignal() reads the trainer's held-out probe"

    def read(self, step: int) -> ProbeVerdict | None:
        """The verdict on the probe of step ``step``, ``None`` where the probe did not run at this step."""
        reading = self.probe.last_reading
        if reading is None or reading[0] != step:
            return None
        return self.judge(reading[1], step)

    def judge(self, metrics: Mapping[str, float], step: int) -> ProbeVerdict:
        """The verdict on a probe's ``metrics`` at ``step``, the rule's statistic moved on
        (:meth:`~.rewind.ProbeAlarmRule.advance`: the unhealthy probes in a row firing at the patience, or the CUSUM
        ``S_t = max(0, S_(t-1) + z_t - k)`` firing above ``h``), starting afresh from 0 where it fires."""
        self.alarm_statistic, fired = self.rule.advance(self.alarm_statistic, metrics, step)
        restore_point = self.rule.restorable(metrics, step)
        if restore_point:
            self.healthy_step, self.healthy_z = step, float(metrics.get(self.rule.SIGNAL, math.nan))
        return ProbeVerdict(step, metrics, fired, restore_point, self.healthy_step, self.healthy_z, self.rule)

    def state(self) -> dict[str, Any]:
        return {
            "healthy_step": self.healthy_step,
            "healthy_z": self.healthy_z,
            "alarm_statistic": self.alarm_statistic,
        }

    def restore(self, saved: Mapping[str, Any]) -> None:
        self.healthy_step, self.alarm_statistic = saved["healthy_step"], float(saved["alarm_statistic"])
        self.healthy_z = saved.get("healthy_z")

    def act(self, alarm: Any, step: int, control: Any, optimizer: Any = None, lr_scheduler: Any = None) -> None:
        """The verdict on the probe of ``step`` handed to ``alarm``'s action (an :class:`~.alarm.AlarmCallback` on
        this signal, in its ``on_step_end``; the optimizer and the schedule are the rewind's to change): a firing is
        kept in ``alarm.firings`` and logged at its step, and the flags wait in ``alarm.pending`` for the next training
        log (handed to ``alarm.publish``, the trainer's ``log_next``, where the alarm has a trainer)."""
        verdict = self.read(step)
        if verdict is None:
            return
        flags, done = alarm.action.on_probe(verdict, control, optimizer, lr_scheduler)
        flags = {"health/probe_alarm": float(verdict.fired), **flags}
        if verdict.fired:
            alarm.firings.append([verdict.step, verdict.healthy_step, verdict.healthy_z, done])
            control.should_log = True  # the alarm's step is logged as it fired, also where the run stops there
        # A log may follow several probes (logging_steps above probe_steps): it carries 1 where the alarm fired at
        # any of them, and the last rewind's step.
        fired = max(alarm.pending.get("health/probe_alarm", 0.0), flags["health/probe_alarm"])
        alarm.pending = {**alarm.pending, **flags, "health/probe_alarm": fired}
        if alarm.publish is not None:
            alarm.publish(alarm.pending)

    def lines(self, action: Any, firings: list[list[Any]], last_step: int) -> list[str]:
        """The record of an alarm on this signal (:meth:`~.alarm.AlarmCallback.lines`), one sentence per firing
        (``firings``: the alarm's ``[step, restore point, its reading, what was done]``; ``last_step``: the run's step
        now), or one saying that it never fired; a rewind (``action``, a :class:`~.rewind.RewindAction`) keeps its own
        record."""
        if hasattr(action, "record"):
            return action.record().lines(last_step)
        if not firings:
            return [f"The held-out probe's alarm ({self.describe()}) never fired (on_pathology={action.action!r})."]
        from .rewind import restore_point_note  # the rewind's module loads only in a run that probes

        lines = []
        for step, restore, z, done in firings:
            text = f"Step {step}: the held-out probe's alarm fired ({self.describe()})"
            text += f"; {done}" if done else ""
            note = restore_point_note(restore, z, self.rule)
            text += f"; on_pathology='rewind' would have gone back to step {restore}'s weights ({note})"
            lines.append(text + ".")
        return lines
