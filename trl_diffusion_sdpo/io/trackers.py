"""Hand transformers' tracker callbacks (``report_to``) a diffusers model's config in the form they read.

transformers' callbacks describe the model through ``model.config.to_json_string()`` (TensorBoard) or
``model.config.to_dict()`` (MLflow, Comet, Neptune, ClearML), the methods of a transformers ``PretrainedConfig``.
A diffusers model's ``config`` is a ``FrozenDict`` without them, so ``report_to="tensorboard"`` would fail before the
first step. The trainer registers each tracker inside a :class:`TrackerCallback` (whether it comes from
``report_to``, ``callbacks=`` or a later ``trainer.add_callback``), which hands it, in every event,
:class:`ModelForTrackers`: a module holding the model, whose ``config`` is a :class:`TrackerConfig` copy of the
model's. Every object says what it is (``type()`` is its own class); the model and its config are left as they are.

Loaded with the first tracker the trainer registers (which ones are trackers: :mod:`.reporting`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .reporting import is_tracker

__all__ = [
    "ModelForTrackers",
    "TrackerCallback",
    "TrackerConfig",
    "tracker_callback",
    "for_trackers",
]


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a config value (tuples as lists, paths and dtypes as strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (Path, torch.dtype)):
        return str(value)
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return _plain(value.to_dict())
    return value


class TrackerConfig(dict):
    """A copy of a diffusers config (a ``dict``, as W&B, Trackio and SwanLab take it) with the ``to_dict`` and
    ``to_json_string`` that the other trackers call on a transformers config."""

    def to_dict(self) -> dict[str, Any]:
        """The public entries (no ``_use_default_values`` and the like) as plain Python values."""
        return {k: _plain(v) for k, v in self.items() if not k.startswith("_") or k == "_class_name"}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n"


class ModelForTrackers(torch.nn.Module):
    """The model as a tracker reads it: a module whose one child is ``model`` (so its ``parameters()`` are the
    model's, which W&B's ``watch`` hooks) and whose ``config`` is a :class:`TrackerConfig` copy of the model's config.
    Other attributes a tracker reads (``peft_config``, ``num_parameters``) are the model's."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = TrackerConfig(model.config)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not registered yet: no recursion
                raise
            return getattr(super().__getattr__("model"), name)


def for_trackers(model: Any) -> Any:
    """What a tracker is handed for ``model``: ``model`` itself where its config already has ``to_dict`` (a
    transformers model) or it has no mapping config, else a :class:`ModelForTrackers` around it."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(config, Mapping):
        return model
    if callable(getattr(config, "to_dict", None)):
        return model
    return ModelForTrackers(model)


def _forward(event: str) -> Callable[..., Any]:
    def handle(self: TrackerCallback, args, state, control, **kwargs):
        if kwargs.get("model") is not None:
            kwargs["model"] = self.model_for(kwargs["model"])
        return getattr(self.tracker, event)(args, state, control, **kwargs)

    handle.__name__ = event
    handle.__doc__ = f"The tracker's ``{event}``, handed the model as trackers read it."
    return handle


class TrackerCallback(TrainerCallback):
    """One reporting callback (``tracker``) whose events are handed the model as :class:`ModelForTrackers`: what
    the trainer registers in a tracker's place. ``tracker`` is the instance given; the trainer's ``pop_callback`` and
    ``remove_callback`` find this by the tracker's class or by the tracker itself."""

    def __init__(self, tracker: TrainerCallback) -> None:
        if not is_tracker(tracker):
            raise TypeError(f"TrackerCallback wraps one of transformers' reporting callbacks, not {tracker!r}")
        self.tracker = tracker
        self._view: tuple[Any, Any] | None = None  # (model, its view): one view per model, so W&B hooks it once

    def model_for(self, model: Any) -> Any:
        """The object the tracker is handed for ``model`` (:func:`for_trackers`), built once per model."""
        if self._view is None or self._view[0] is not model:
            self._view = (model, for_trackers(model))
        return self._view[1]

    def matches(self, callback: type[TrainerCallback] | TrainerCallback) -> bool:
        """Whether ``callback`` (a class or an instance, as ``Trainer.pop_callback`` takes it) names this tracker."""
        if isinstance(callback, type):
            return isinstance(self.tracker, callback)
        return callback is self or callback is self.tracker

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tracker!r})"


for _event in (name for name in vars(TrainerCallback) if name.startswith("on_")):
    setattr(TrackerCallback, _event, _forward(_event))


#: one :class:`TrackerCallback` subclass per tracker class (``TrackedTensorBoardCallback``, ...): transformers warns of
#: two callbacks of one class, which two trackers of different kinds are not
_TRACKED: dict[type, type[TrackerCallback]] = {}


def tracker_callback(tracker: TrainerCallback) -> TrackerCallback:
    """``tracker`` registered in a :class:`TrackerCallback` of the subclass named after its class."""
    kind = _TRACKED.get(type(tracker))
    if kind is None:
        name = f"Tracked{type(tracker).__name__}"
        doc = f"A :class:`TrackerCallback` holding a ``{type(tracker).__name__}``."
        kind = _TRACKED[type(tracker)] = type(name, (TrackerCallback,), {"__module__": __name__, "__doc__": doc})
    return kind(tracker)
