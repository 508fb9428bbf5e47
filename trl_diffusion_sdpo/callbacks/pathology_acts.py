"""What ``on_pathology`` does when an alarm fires, beyond the warning (:class:`~.guards.PathologyAction`'s acts):
``escalate`` raises the safeguard's ``mu`` halfway to 1, ``safeguard`` switches the run to the safeguard of
:func:`~.health.switch_target` once, ``stop`` saves a checkpoint and stops through transformers' ``control``; and the
action's answer to the held-out probe's alarm (:meth:`~.guards.PathologyAction.probe_alarm`); and the safeguard a
switch puts in force (:func:`dormant_safeguard`). Imported when an action first acts, answers the probe or binds its
switch, and by a run whose ``on_pathology`` may switch a safeguard on: a run that only warns on the training logs
never loads it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..safeguards import safeguard_for
from .health import switch_target, switched_config

if TYPE_CHECKING:
    from ..safeguards import Safeguard
    from .guards import PathologyAction

__all__ = ["bind_switch", "dormant_safeguard", "escalate", "probe_alarm", "records", "stop", "switch_on"]

# the actions' warnings keep the logger name of the action's module, which users filter on
logger = logging.getLogger(f"{__package__}.guards")


def dormant_safeguard(args: Any, engine: Any) -> Safeguard | None:
    """``on_pathology="safeguard"`` (or ``"rewind"`` in an offline Diffusion-DPO run, which switches to it after its
    rewind): the safeguard the run switches to when the alarm fires, checked against ``engine`` when the trainer is
    built and dormant until then; ``None`` otherwise."""
    rewinds_to_it = (
        args.on_pathology == "rewind" and args.safeguard_space == "none" and switch_target(args) is not None
    )
    return safeguard_for(switched_config(args), engine) if args.on_pathology == "safeguard" or rewinds_to_it else None


def bind_switch(action: PathologyAction, trainer: Any) -> None:
    """``safeguard``: ``action``'s switch to ``trainer``'s
    :attr:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.dormant_safeguard` (or, where the config has none, the run's
    :func:`~.health.switch_target`, built by :meth:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.safeguard_by_name` and
    checked against the engine now)."""
    target = switch_target(trainer.args)
    dormant = trainer.dormant_safeguard
    if dormant is None:  # built and checked against the engine now, in force when the alarm fires
        if target is None:
            raise ValueError("PathologyAction('safeguard'): this run has no safeguard to switch to")
        fields = {k.removeprefix("safeguard_"): v for k, v in target.items() if k != "safeguard_space"}
        dormant = trainer.safeguard_by_name(target["safeguard_space"], **fields)
    action.switch = lambda: trainer.set_safeguard(dormant)
    action.switch_to = dict(target or {"safeguard_space": dormant.name})


def probe_alarm(action: PathologyAction, step: int, control, rule: str, healthy_step: int) -> str:
    """:meth:`~.guards.PathologyAction.probe_alarm` of ``action``: what it does where the held-out probe's alarm fired
    at ``step``, and what was done, in words."""
    why = f"the held-out probe's alarm fired ({rule})"
    restore = f"step {healthy_step}'s weights"
    if action.action == "escalate" and action.margin is not None:
        return f"on_pathology='escalate' raised safeguard_mu to {escalate(action, step, why):g}"
    if action.action == "safeguard" and action.switch is not None and action.switched_at is None:
        switch_on(action, step, why, "the held-out probe's alarm")
        return "on_pathology='safeguard' switched the safeguard on from the next step"
    if action.action == "stop":
        stop(control, step, why, f" (on_pathology='rewind' would have restored {restore}, the last restore point)")
        return "on_pathology='stop' saved a checkpoint and stopped training"
    acted = "" if action.action == "warn" else f"; on_pathology={action.action!r} has already acted"
    if healthy_step == action.warned_after:
        return f"no new warning (the same unhealthy episode as the last alarm's){acted}"
    action.warned_after = healthy_step
    logger.warning(
        "Step %d: %s. on_pathology='rewind' would restore %s and optimizer state (the last restore point)%s; no "
        "further warning until another probe is a restore point.",
        step,
        why,
        restore,
        acted,
    )
    return f"a warning named {restore} as what on_pathology='rewind' would restore (the last restore point){acted}"


def escalate(action: PathologyAction, step: int, why: str) -> float:
    """``escalate``: ``action``'s ``mu`` raised halfway to 1, the next escalation a full ``WINDOWS`` of logs away."""
    action.escalations += 1
    action.logs_since = 0
    mu = action.margin.escalate()
    logger.warning("Step %d: %s; on_pathology='escalate' raised safeguard_mu to %g.", step, why, mu)
    return mu


def switch_on(action: PathologyAction, step: int, why: str, by: str) -> None:
    """``safeguard``: ``action``'s safeguard (its ``switch_to``) on from the next step, once (``by``: the alarm that
    fired)."""
    action.switch()
    action.switched_at, action.switched_by = step, by
    logger.warning(
        "Step %d: %s; on_pathology='safeguard': training goes on with the safeguard on (%s) from the next step.",
        step,
        why,
        ", ".join(f"{k}={v!r}" for k, v in action.switch_to.items()),
    )


def stop(control, step: int, why: str, note: str = "") -> None:
    """``stop``: a checkpoint saved and training stopped, through transformers' ``control``."""
    logger.warning("Step %d: %s; on_pathology='stop': saving a checkpoint and stopping%s.", step, why, note)
    control.should_save = True
    control.should_training_stop = True


def records(action: PathologyAction, step: int) -> list[str]:
    """What ``action`` did up to ``step`` for the run's records (:func:`~trl_diffusion_sdpo.io.run_events.run_events`):
    the switch of ``on_pathology="safeguard"`` (or that it never fired) and the escalations of ``mu``."""
    lines = []
    if action.action == "safeguard" and action.switch is not None:
        settings = ", ".join(f"{k}={v!r}" for k, v in action.switch_to.items())
        switched = action.switched_at
        if switched is None:
            lines.append("on_pathology='safeguard': the pathology alarm never fired, so the safeguard stayed off.")
        else:
            steps = f"steps {switched + 1}-{step}" if step > switched else f"every step after step {switched}"
            by = action.switched_by or "the training logs' pathology alarm"
            lines.append(
                f"Step {switched}: {by} fired (on_pathology='safeguard'); {steps} trained with the safeguard on "
                f"({settings})."
            )
    if action.escalations:
        mu = action.margin.current() if action.margin is not None else None
        to = f", to {float(mu):g}" if mu is not None else ""
        lines.append(f"on_pathology='escalate' raised safeguard_mu {action.escalations} time(s) in all{to}.")
    return lines
