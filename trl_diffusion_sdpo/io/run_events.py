"""What a run's alarms did, one sentence each, for its model card (:mod:`.hub`) and its end-of-run summary
(:class:`~.run_summary.StartSummary`): each rewind of ``on_pathology="rewind"`` and the switch of the safeguard,
read from where the alarms keep them (the rewind's :meth:`~trl_diffusion_sdpo.callbacks.rewind.Rewind.record`, the
pathology action's ``switched_at``), which a checkpoint saves and a resumed run reads back.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_events"]


def run_events(trainer: Any) -> list[str]:
    """What the run's alarms have done up to its current step, one sentence each: every rewind of
    ``on_pathology="rewind"`` (:meth:`~trl_diffusion_sdpo.callbacks.rewind.Rewind.record`, the steps before a resume
    included) and the switch of ``on_pathology="safeguard"``; a sentence saying that none happened where the run has
    such an alarm; nothing where it has none."""
    step = trainer.state.global_step
    probe = getattr(trainer, "probe", None)
    rewind = None if probe is None else probe.rewind
    lines = [] if rewind is None else rewind.record().lines(step)
    action = getattr(getattr(trainer, "guards", None), "action", None)  # on_pathology's, on the training logs
    if action is not None and action.action == "safeguard" and action.switch is not None:
        settings = ", ".join(f"{k}={v!r}" for k, v in action.switch_to.items())
        switched = action.switched_at
        if switched is None:
            lines.append("on_pathology='safeguard': the pathology alarm never fired, so the safeguard stayed off.")
        else:
            steps = f"steps {switched + 1}-{step}" if step > switched else f"every step after step {switched}"
            lines.append(
                f"Step {switched}: the training logs' pathology alarm fired (on_pathology='safeguard'); {steps} "
                f"trained with the safeguard on ({settings})."
            )
    return lines
