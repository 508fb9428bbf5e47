"""What acts on a run from outside the step, as ``transformers.TrainerCallback`` objects the trainer registers:

* :mod:`.guards`: the pathology action (``on_pathology``), early stopping and the state of the guards that adapt
  during a run (auto-beta, ``safeguard_mu="auto"``, escalations): :class:`~.guards.GuardState`;
* :mod:`.ema`: the EMA weights (``ema_decay``): :class:`~.ema.EMAWeights`;
* :mod:`.health`: Diffusion-DPO's pathology, detected in the training logs: :class:`~.health.WinnerHealth`;
* :mod:`.probe`: the policy and the reference on held-out pairs every ``probe_steps`` steps (``probe/...``), or a
  :class:`~.probe.ProbeCallback` built by hand and passed in ``callbacks=``;
* :mod:`.rewind`: ``on_pathology="rewind"``, back to the last step the probe called healthy when its alarm fires, or
  a :class:`~.rewind.RewindCallback` passed in ``callbacks=``;
* :mod:`.interruptions`: a non-finite loss or gradient never reaches the weights, a data stream that yields too few
  valid pairs stops the run, and SIGTERM saves a checkpoint and exits;
* :mod:`.validation`: validation images and rewards during training.

Each decision a callback takes from a process's own data is reduced over processes before it acts. The trainer builds
the health alarm, the guards, the EMA, the probe and the rewind from its config; a Python user may build any of them
and pass it in ``callbacks=`` instead (one of each, :data:`~.guards.RUN_CONTROL`; docs/compose.md), and the trainer
completes it from its public surface (``trainer.policy``, ``trainer.safeguard``, ``trainer.set_safeguard(...)``).

The names below resolve on first use, so a run without ``probe_steps`` loads neither the probe nor the rewind, and
one without ``ema_decay`` no EMA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config._lazy import lazy_attributes
from .guards import GuardState, PathologyAction
from .health import PathologyRule, WinnerHealth

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from .ema import EMAWeights
    from .probe import ProbeCallback, compose_probe, hold_back_pairs, hold_back_rows, probe_for_trainer
    from .rewind import RewindCallback

_EXPORTS = {
    "EMAWeights": ".ema",
    "ProbeCallback": ".probe",
    "RewindCallback": ".rewind",
    "compose_probe": ".probe",
    "hold_back_pairs": ".probe",
    "hold_back_rows": ".probe",
    "probe_for_trainer": ".probe",
}

__all__ = [
    "EMAWeights",
    "GuardState",
    "PathologyAction",
    "PathologyRule",
    "ProbeCallback",
    "RewindCallback",
    "WinnerHealth",
    "compose_probe",
    "hold_back_pairs",
    "hold_back_rows",
    "probe_for_trainer",
]

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
