"""The guards that act on the run rather than on the loss: what happens when health's alarm fires.

* :class:`PathologyAction` (``on_pathology``): ``warn`` leaves the warning to health; ``escalate`` raises the
  safeguard's ``mu`` halfway to 1; ``stop`` saves a checkpoint and stops, through transformers' ``control``;
  ``safeguard`` switches a Diffusion-DPO run to the safeguard of ``health.switch_target``, once. The held-out probe's
  alarm reaches it too (:meth:`PathologyAction.probe_alarm`; ``warn`` then warns once per unhealthy episode, naming
  the step a rewind would restore).

Early stopping (``--early_stopping_patience``) lives in :mod:`.early_stopping`, which only a run that uses it loads.

The guards that adapt as the run goes are the objective's and the safeguard's own: the auto-beta
(:class:`~trl_diffusion_sdpo.objectives.AutoBeta`, the trainer's ``auto_beta``) and ``safeguard_mu="auto"``
(:class:`~trl_diffusion_sdpo.safeguards.margin.SafeguardMargin`, ``safeguard.margin``), each kept in every checkpoint
through its ``state_dict()``.

The components take what they need (the trainer's save function, the margin object), never the trainer's internals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .health import WINDOWS, switch_target

__all__ = ["PathologyAction"]

logger = logging.getLogger(__name__)


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
        self._warned_after: int | None = None  # the healthy step of the probe alarm's episode last warned about
        self._logs_since = WINDOWS  # escalate at once; then again only once the raised mu has had WINDOWS logs

    def bind(self, trainer: Any) -> None:
        """What was left unset, from ``trainer``'s public surface (the trainer its alarm is given): the margin of its
        :attr:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.safeguard`, and for ``"safeguard"`` a switch to its
        :attr:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.dormant_safeguard` (or, where the config has none, the
        run's :func:`~.health.switch_target`, built by
        :meth:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.safeguard_by_name` and checked against the engine now)."""
        if self.margin is None and trainer.safeguard is not None:
            self.margin = trainer.safeguard.margin
        if self.action == "safeguard" and self.switch is None:
            target = switch_target(trainer.args)
            dormant = trainer.dormant_safeguard
            if dormant is None:  # built and checked against the engine now, in force when the alarm fires
                if target is None:
                    raise ValueError("PathologyAction('safeguard'): this run has no safeguard to switch to")
                fields = {k.removeprefix("safeguard_"): v for k, v in target.items() if k != "safeguard_space"}
                dormant = trainer.safeguard_by_name(target["safeguard_space"], **fields)
            self.switch = lambda: trainer.set_safeguard(dormant)
            self.switch_to = dict(target or {"safeguard_space": dormant.name})

    def lacks(self) -> str | None:
        """What it needs of a trainer and was not given: for ``safeguard`` the switch, for ``escalate`` the margin."""
        if self.action == "safeguard" and self.switch is None:
            return "PathologyAction('safeguard') switches on the trainer's safeguard"
        if self.action == "escalate" and self.margin is None:
            return "PathologyAction('escalate') raises the trainer's safeguard_mu"
        return None

    def state(self) -> dict[str, Any]:
        """What the action has done, for a checkpoint (a resumed run continues as the uninterrupted one)."""
        done: dict[str, Any] = {"escalations": self.escalations, "logs_since": self._logs_since}
        if self.switched_at is not None:
            done["safeguard_switched_at"], done["safeguard_switched_by"] = self.switched_at, self.switched_by
        return done

    def restore(self, saved: dict[str, Any]) -> None:
        """A resumed run: :meth:`state` as the checkpoint saved it; a safeguard switched on before is on again."""
        self.escalations, self._logs_since = saved["escalations"], saved["logs_since"]
        if saved.get("safeguard_switched_at") is not None and self.switch is not None and self.switched_at is None:
            self.switch()  # the resumed run trains on with the safeguard the uninterrupted one switched to
            self.switched_at, self.switched_by = saved["safeguard_switched_at"], saved.get("safeguard_switched_by")

    def __call__(self, logs: dict[str, float], control, step: int) -> None:
        """Act on ``logs`` (annotated by health, in place) through transformers' ``control``."""
        if "health/winner_pathology" not in logs:
            return
        self._logs_since += 1
        fired = logs["health/winner_pathology"] == 1.0
        why = "the pathology alarm fired (health/winner_pathology)"
        if self.action == "escalate":
            if fired and self._logs_since > WINDOWS and self.margin is not None:
                logs["safeguard/mu"] = self._escalate(step, why)
            logs["health/escalations"] = float(self.escalations)
        elif self.action == "safeguard":
            if fired and self.switched_at is None and self.switch is not None:
                self._switch_on(step, why, "the training logs' pathology alarm")
            logs["health/safeguard_on"] = float(self.switched_at is not None)
        elif self.action == "stop" and fired:
            why = "the winner's error has stayed above the reference's while the implicit accuracy grew "
            self._stop(control, step, why + "(health/winner_pathology)")

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
        why = f"the held-out probe's alarm fired ({rule})"
        restore = f"step {healthy_step}'s weights"
        if self.action == "escalate" and self.margin is not None:
            return f"on_pathology='escalate' raised safeguard_mu to {self._escalate(step, why):g}"
        if self.action == "safeguard" and self.switch is not None and self.switched_at is None:
            self._switch_on(step, why, "the held-out probe's alarm")
            return "on_pathology='safeguard' switched the safeguard on from the next step"
        if self.action == "stop":
            self._stop(
                control, step, why, f" (on_pathology='rewind' would have restored {restore}, the last restore point)"
            )
            return "on_pathology='stop' saved a checkpoint and stopped training"
        acted = "" if self.action == "warn" else f"; on_pathology={self.action!r} has already acted"
        if healthy_step == self._warned_after:
            return f"no new warning (the same unhealthy episode as the last alarm's){acted}"
        self._warned_after = healthy_step
        logger.warning(
            "Step %d: %s. on_pathology='rewind' would restore %s and optimizer state (the last restore point)%s; no "
            "further warning until another probe is a restore point.",
            step,
            why,
            restore,
            acted,
        )
        return f"a warning named {restore} as what on_pathology='rewind' would restore (the last restore point){acted}"

    def _escalate(self, step: int, why: str) -> float:
        """``escalate``: ``mu`` raised halfway to 1, the next escalation a full ``WINDOWS`` of logs away."""
        self.escalations += 1
        self._logs_since = 0
        mu = self.margin.escalate()
        logger.warning("Step %d: %s; on_pathology='escalate' raised safeguard_mu to %g.", step, why, mu)
        return mu

    def _switch_on(self, step: int, why: str, by: str) -> None:
        """``safeguard``: the safeguard ``switch_to`` on from the next step, once (``by``: the alarm that fired)."""
        self.switch()
        self.switched_at, self.switched_by = step, by
        logger.warning(
            "Step %d: %s; on_pathology='safeguard': training goes on with the safeguard on (%s) from the next step.",
            step,
            why,
            ", ".join(f"{k}={v!r}" for k, v in self.switch_to.items()),
        )

    def _stop(self, control, step: int, why: str, note: str = "") -> None:
        """``stop``: a checkpoint saved and training stopped, through transformers' ``control``."""
        logger.warning("Step %d: %s; on_pathology='stop': saving a checkpoint and stopping%s.", step, why, note)
        control.should_save = True
        control.should_training_stop = True
