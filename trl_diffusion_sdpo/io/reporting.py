"""transformers' reporting callbacks as the trainer tells them apart from the rest: the trackers ``report_to`` names
and the console's callbacks, which it keeps after every other callback. What wraps a tracker (:mod:`.trackers`) loads
with the first tracker registered; a run with ``report_to="none"`` and no tracker given loads none of it."""

from __future__ import annotations

import sys
from typing import Any

from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.integrations import INTEGRATION_TO_CALLBACK

__all__ = ["REPORTING_CALLBACKS", "TRACKER_CALLBACK", "console_callbacks", "is_tracker", "loaded_class"]

#: transformers' reporting callbacks (those ``report_to`` names)
REPORTING_CALLBACKS: tuple[type[TrainerCallback], ...] = tuple(INTEGRATION_TO_CALLBACK.values())
#: transformers' notebook progress bar, whose module imports IPython: transformers loads it in a notebook only
NOTEBOOK_CALLBACK = "transformers.utils.notebook:NotebookProgressCallback"
#: the callback a tracker is registered in, by the ``"module:Class"`` name ``trainer.callbacks_of`` takes
TRACKER_CALLBACK = "trl_diffusion_sdpo.io.trackers:TrackerCallback"


def console_callbacks() -> tuple[type[TrainerCallback], ...]:
    """transformers' console callbacks, which take figures they do not print (``total_flos``) out of the logs: the
    trainer keeps them after the trackers. The notebook's bar is among them where its module is loaded: no instance of
    it can exist before, and importing it for the check would import IPython into every run."""
    return (ProgressCallback, PrinterCallback, *loaded_class(NOTEBOOK_CALLBACK))


def loaded_class(kind: str) -> tuple[type, ...]:
    """The class ``kind`` names (``"module:Class"``) where its module is loaded, else ``()``: a class whose module a
    run loads only when it uses it has no instance before."""
    module, _, name = kind.partition(":")
    loaded = sys.modules.get(module)
    return () if loaded is None else (getattr(loaded, name),)


def is_tracker(callback: Any) -> bool:
    """Whether ``callback`` (an instance or a class) is one of transformers' reporting callbacks."""
    kind = callback if isinstance(callback, type) else type(callback)
    return issubclass(kind, REPORTING_CALLBACKS)
