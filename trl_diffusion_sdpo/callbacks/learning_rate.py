"""The run's learning rate changed while it trains, through torch's public state: the rewind's ladder lowers it
(:class:`~.rewind.RewindAction`) and a resume with another ``learning_rate`` applies it
(:mod:`~trl_diffusion_sdpo.io.resume_check`), both by :func:`scale_learning_rate`.

A rate is changed where the optimizer and the schedule read it: each parameter group's ``lr`` (what the next
optimizer step uses) and ``initial_lr``, and the scheduler's ``base_lrs`` (the peak its later values are computed
from), so the schedule goes on counting steps at the new peak. transformers logs ``get_last_lr()``, which a
scheduler sets only when it steps: a ``LambdaLR`` (every schedule transformers' ``get_scheduler`` makes but
``reduce_lr_on_plateau``) computes its rate from ``base_lrs`` and its public step count ``last_epoch`` alone, so it is
stepped again onto the step it had reached (``last_epoch`` one back, then ``step()``), which sets the groups' rates
and the rate transformers logs to the new schedule's. Under ``ReduceLROnPlateau`` transformers logs the groups' rate
itself.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["scale_learning_rate"]


def scale_learning_rate(optimizer: torch.optim.Optimizer, lr_scheduler: Any | None, factor: float) -> list[float]:
    """Multiply the learning rate of ``optimizer``'s groups by ``factor`` from its next step on, and the peak of
    ``lr_scheduler`` (``None``: no schedule; accelerate's wrapper is read through its public ``scheduler``) with it
    (module docstring). Returns each group's rate for the next step."""
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps it
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:  # what a scheduler built on this optimizer would start from
            group["initial_lr"] = group["initial_lr"] * factor
    if schedule is not None and hasattr(schedule, "base_lrs"):
        schedule.base_lrs = [rate * factor for rate in schedule.base_lrs]
        if isinstance(schedule, torch.optim.lr_scheduler.LambdaLR):
            # closed form in last_epoch: stepping onto the same step recomputes the groups' rates and get_last_lr()
            schedule.last_epoch -= 1
            schedule.step()
    return [float(group["lr"]) for group in optimizer.param_groups]
