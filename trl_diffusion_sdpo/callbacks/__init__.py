"""What acts on a run from outside the step, as ``transformers.TrainerCallback`` objects the trainer registers:

* :mod:`.guards`: the pathology action (``on_pathology``); :mod:`.early_stopping`: early stopping;
* :mod:`.ema`: the EMA weights (``ema_decay``): :class:`~.ema.EMAWeights`;
* :mod:`.alarm`: one alarm callback, a signal and an action: Diffusion-DPO's pathology in the training logs
  (:class:`~.alarm.TrainingLogSignal`, its rule in :mod:`.health`) or the held-out probe's readings
  (:class:`~.probe_signal.ProbeSignal`, in :mod:`.probe_signal`), acted on as ``on_pathology`` asks;
* :mod:`.probe`: the policy and the reference on held-out pairs every ``probe_steps`` steps (``probe/...``), or a
  :class:`~.probe.ProbeCallback` built by hand and passed in ``callbacks=``;
* :mod:`.rewind`: ``on_pathology="rewind"``, back to the last step the probe called healthy when its alarm fires
  (:class:`~.rewind.RewindAction`, the action of an alarm on the probe);
* :mod:`.interruptions`: a non-finite loss or gradient never reaches the weights, and a data stream that yields too
  few valid pairs stops the run;
* :mod:`.preemption`: SIGTERM, SIGUSR1 or Ctrl-C saves a checkpoint and stops
  (:class:`~.preemption.PreemptionCallback`, which the command line passes);
* :mod:`.validation`: validation images and rewards during training.

Each decision a callback takes from a process's own data is reduced over processes before it acts. The trainer builds
the alarms, the EMA, the probe and the rewind from its config, in a fixed order (docs/compose.md), each given what it
needs at construction. A Python user builds any of them as TRL's ``LogCompletionsCallback(trainer, ...)`` is built:
once the trainer is, with ``trainer=trainer`` (whose public surface it reads: ``trainer.policy``,
``trainer.safeguard``, ``trainer.set_safeguard(...)``), and adds it with ``trainer.add_callback(...)`` in the order
they should act; one that needs the trainer is refused without it, in one line naming the fix. The trainer calls none
of their events itself, and finds them only through ``trainer.callbacks_of(kind)``.

The names below resolve on first use, so a run without ``probe_steps`` loads neither the probe, its alarm's signal nor
the rewind, and one without ``ema_decay`` no EMA, and one without a ``PreemptionCallback`` no preemption handling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config._lazy import lazy_attributes
from .alarm import AlarmCallback, TrainingLogAlarm, TrainingLogSignal
from .guards import PathologyAction
from .health import PathologyRule

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from .ema import EMAWeights
    from .preemption import PreemptionCallback, TrainingPreempted
    from .probe import ProbeCallback, ProbePieces, hold_back_pairs, hold_back_rows, probe_for_trainer
    from .probe_signal import ProbeSignal
    from .rewind import RewindAction

_EXPORTS = {
    "EMAWeights": ".ema",
    "PreemptionCallback": ".preemption",
    "TrainingPreempted": ".preemption",
    "ProbeCallback": ".probe",
    "ProbePieces": ".probe",
    "ProbeSignal": ".probe_signal",
    "RewindAction": ".rewind",
    "hold_back_pairs": ".probe",
    "hold_back_rows": ".probe",
    "probe_for_trainer": ".probe",
}

__all__ = [
    "AlarmCallback",
    "EMAWeights",
    "PathologyAction",
    "PathologyRule",
    "PreemptionCallback",
    "ProbeCallback",
    "ProbePieces",
    "ProbeSignal",
    "RewindAction",
    "TrainingLogAlarm",
    "TrainingLogSignal",
    "TrainingPreempted",
    "hold_back_pairs",
    "hold_back_rows",
    "probe_for_trainer",
]

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
