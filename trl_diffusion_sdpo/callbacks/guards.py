"""The guards that act on the run rather than on the loss: what happens when health's alarm fires.

* :class:`PathologyAction` (``on_pathology``): ``warn`` leaves the warning to health; ``escalate`` raises the
  safeguard's ``mu`` halfway to 1; ``stop`` saves a checkpoint and stops, through transformers' ``control``;
  ``safeguard`` switches a Diffusion-DPO run to the safeguard of ``health.switch_target``, once. The held-out probe's
  alarm reaches it too (:meth:`PathologyAction.probe_alarm`; ``warn`` then warns once per unhealthy episode, naming
  the step a rewind would restore). Its acts (escalating, switching, stopping, the answer to the probe's alarm) live in
  :mod:`.pathology_acts`, which a run loads when an action first acts: one that only warns never does.

Early stopping (``--early_stopping_patience``) lives in :mod:`.early_stopping`, which only a run that uses it loads.

The guards that adapt as the run goes are the objective's and the safeguard's own: the auto-beta
(:class:`~trl_diffusion_sdpo.objectives.AutoBeta`, the trainer's ``auto_beta``) and ``safeguard_mu="auto"``
(:class:`~trl_diffusion_sdpo.safeguards.margin.SafeguardMargin`, ``safeguard.margin``), each kept in every checkpoint
through its ``state_dict()``.

The components take what they need (the trainer's save function, the margin object), never the trainer's internals.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .health import WINDOWS

__all__ = ["PathologyAction"]


def _acts() -> ModuleType:
    """:mod:`.pathology_acts`, imported when an action first acts (escalates, switches, stops or answers the held-out
    probe's alarm) or binds a switch: a run that only warns on the training logs never loads it."""
    return importlib.import_module(".pathology_acts", __package__)


class PathologyAction:
    """What an alarm's firing does (the action of an :class:`~.alarm.AlarmCallback`), beyond its signal's warning.

    The log it reads is reduced over every process before transformers records it (the trainer's ``log``), so every
    process sees the same verdict and acts at the same step: ``safeguard`` switches every process together.

    Args:
        action: ``warn``, ``escalate``, ``stop`` or ``safeguard`` (the config's ``on_pathology``).
        margin: the safeguard's ``mu`` (``escalate`` raises it); ``None`` without a safeguard.
        switch: ``switch()`` turns the safeguard ``switch_to`` on for the steps after this log (``safeguard``; the
            trainer's).
        switch_to: the fields of that safeguard (:func:`~.health.switch_target`), for the log line.
    """

    def __init__(
        self,
        action: str,
        margin: Any | None = None,
        switch: Callable[[], Any] | None = None,
        switch_to: dict[str, Any] | None = None,
    ) -> None:
        self.action, self.margin, self.switch, self.switch_to = action, margin, switch, switch_to or {}
        self.switched_at: int | None = None  # the step of the log that switched the safeguard on
        self.switched_by: str | None = None  # which alarm switched it: the training logs' or the held-out probe's
        self.escalations = 0
        #: the healthy step of the probe alarm's episode last warned about
        self.warned_after: int | None = None
        #: the training logs since the last escalation: escalate at once; then again only once the raised mu has had
        #: WINDOWS logs
        self.logs_since = WINDOWS

    def bind(self, trainer: Any) -> None:
        """What was left unset, from ``trainer``'s public surface (the trainer its alarm is given): the margin of its
        :attr:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.safeguard`, and for ``"safeguard"`` a switch to its
        :attr:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.dormant_safeguard` (or, where the config has none, the
        run's :func:`~.health.switch_target`, built by
        :meth:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.safeguard_by_name` and checked against the engine now)."""
        if self.margin is None and trainer.safeguard is not None:
            self.margin = trainer.safeguard.margin
        if self.action == "safeguard" and self.switch is None:
            _acts().bind_switch(self, trainer)

    def lacks(self) -> str | None:
        """What it needs of a trainer and was not given: for ``safeguard`` the switch, for ``escalate`` the margin."""
        if self.action == "safeguard" and self.switch is None:
            return "PathologyAction('safeguard') switches on the trainer's safeguard"
        if self.action == "escalate" and self.margin is None:
            return "PathologyAction('escalate') raises the trainer's safeguard_mu"
        return None

    def state(self) -> dict[str, Any]:
        """What the action has done, for a checkpoint (a resumed run continues as the uninterrupted one)."""
        done: dict[str, Any] = {"escalations": self.escalations, "logs_since": self.logs_since}
        if self.switched_at is not None:
            done["safeguard_switched_at"], done["safeguard_switched_by"] = self.switched_at, self.switched_by
        return done

    def restore(self, saved: dict[str, Any]) -> None:
        """A resumed run: :meth:`state` as the checkpoint saved it; a safeguard switched on before is on again."""
        self.escalations, self.logs_since = saved["escalations"], saved["logs_since"]
        if saved.get("safeguard_switched_at") is not None and self.switch is not None and self.switched_at is None:
            self.switch()  # the resumed run trains on with the safeguard the uninterrupted one switched to
            self.switched_at, self.switched_by = saved["safeguard_switched_at"], saved.get("safeguard_switched_by")

    def __call__(self, logs: dict[str, float], control, step: int) -> None:
        """Act on ``logs`` (annotated by health, in place) through transformers' ``control``."""
        if "health/winner_pathology" not in logs:
            return
        self.logs_since += 1
        fired = logs["health/winner_pathology"] == 1.0
        why = "the pathology alarm fired (health/winner_pathology)"
        if self.action == "escalate":
            if fired and self.logs_since > WINDOWS and self.margin is not None:
                logs["safeguard/mu"] = _acts().escalate(self, step, why)
            logs["health/escalations"] = float(self.escalations)
        elif self.action == "safeguard":
            if fired and self.switched_at is None and self.switch is not None:
                _acts().switch_on(self, step, why, "the training logs' pathology alarm")
            logs["health/safeguard_on"] = float(self.switched_at is not None)
        elif self.action == "stop" and fired:
            why = "the winner's error has stayed above the reference's while the implicit accuracy grew "
            _acts().stop(control, step, why + "(health/winner_pathology)")

    def on_probe(
        self, verdict: Any, control, optimizer: Any = None, lr_scheduler: Any = None
    ) -> tuple[dict[str, float], str]:
        """The held-out probe's verdict (:class:`~.probe_signal.ProbeVerdict`, read by an
        :class:`~.alarm.AlarmCallback` with a :class:`~.probe_signal.ProbeSignal`): where its alarm fired,
        :meth:`probe_alarm` (the optimizer and the schedule are the rewind's to change, not read here). Returns what
        the training log adds (nothing beyond the alarm's own flag) and what was done, in words."""
        if not verdict.fired:
            return {}, ""
        return {}, self.probe_alarm(verdict.step, control, verdict.rule.describe(), verdict.healthy_step)

    def probe_alarm(self, step: int, control, rule: str, healthy_step: int) -> str:
        """The held-out probe's alarm fired at ``step`` (:meth:`on_probe`; ``rule``: what it reads;
        ``healthy_step``: the last restore point, the step ``on_pathology="rewind"`` would restore). Its figures were
        reduced over every process, so every process acts here at the same step. A warning (``warn``, or an action
        that has already acted) is logged once per episode: the alarm firing again before another restore point (the
        same ``healthy_step``) says nothing new. Returns what was done, in words, for the run's record."""
        return _acts().probe_alarm(self, step, control, rule, healthy_step)
