"""transformers' reporting callbacks as the trainer tells them apart from the rest: the trackers ``report_to`` names
and the console's callbacks, which it keeps after every other callback. What wraps a tracker (:mod:`.trackers`) loads
with the first tracker registered; a run with ``report_to="none"`` and no tracker given loads none of it."""

from __future__ import annotations

from typing import Any

from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.integrations import INTEGRATION_TO_CALLBACK
from transformers.utils.notebook import NotebookProgressCallback

__all__ = ["CONSOLE_CALLBACKS", "REPORTING_CALLBACKS", "TRACKER_CALLBACK", "is_tracker"]

#: transformers' reporting callbacks (those ``report_to`` names)
REPORTING_CALLBACKS: tuple[type[TrainerCallback], ...] = tuple(INTEGRATION_TO_CALLBACK.values())
#: transformers' console callbacks, which take figures they do not print (``total_flos``) out of the logs: the trainer
#: keeps them after the trackers
CONSOLE_CALLBACKS: tuple[type[TrainerCallback], ...] = (ProgressCallback, PrinterCallback, NotebookProgressCallback)
#: the callback a tracker is registered in, by the ``"module:Class"`` name ``trainer.callbacks_of`` takes
TRACKER_CALLBACK = "trl_diffusion_sdpo.io.trackers:TrackerCallback"


def is_tracker(callback: Any) -> bool:
    """Whether ``callback`` (an instance or a class) is one of transformers' reporting callbacks."""
    kind = callback if isinstance(callback, type) else type(callback)
    return issubclass(kind, REPORTING_CALLBACKS)
