"""Hand transformers' tracker callbacks (``report_to``) a diffusers model's config in the form they read.

transformers' callbacks describe the model through ``model.config.to_json_string()`` (TensorBoard) or
``model.config.to_dict()`` (MLflow, Comet, Neptune, ClearML), the methods of a transformers ``PretrainedConfig``.
A diffusers model's ``config`` is a ``FrozenDict`` without them, so ``report_to="tensorboard"`` would fail before the
first step. Each reporting callback is wrapped in a :class:`TrackerAdapter`, which hands it, in every event, a
:class:`ModelForTrackers`: the model, except that its ``config`` is a copy with those two methods
(:class:`TrackerConfig`). The model and its config are left as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.integrations import INTEGRATION_TO_CALLBACK
from transformers.trainer_callback import CallbackHandler

__all__ = ["ModelForTrackers", "TrackerAdapter", "TrackerConfig", "adapt_trackers"]


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


class ModelForTrackers:
    """The model as a tracker sees it: ``config`` is a :class:`TrackerConfig` copy of the model's config; any other
    attribute, read or set, is the model's own (W&B's ``watch`` hooks the model's parameters, Trackio sets its
    ``model_tags``). ``__class__`` answers the model's class, as ``unittest.mock``'s ``spec`` does, so a tracker's
    ``isinstance(model, torch.nn.Module)`` still holds."""

    __slots__ = ("_model", "_config")

    def __init__(self, model: Any) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_config", TrackerConfig(model.config))

    @classmethod
    def wrap(cls, model: Any) -> Any:
        """``model`` itself where its config already has ``to_dict`` (a transformers model) or it has none."""
        config = getattr(model, "config", None)
        if not isinstance(config, Mapping) or callable(getattr(config, "to_dict", None)):
            return model
        return cls(model)

    @property
    def config(self) -> TrackerConfig:
        return self._config

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self._model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._model, name, value)

    def __repr__(self) -> str:  # the architecture W&B writes to a text file
        return repr(self._model)


def _forward(event: str) -> Callable[..., Any]:
    def handle(self: TrackerAdapter, args, state, control, **kwargs):
        if kwargs.get("model") is not None:
            kwargs["model"] = ModelForTrackers.wrap(kwargs["model"])
        return getattr(self.tracker, event)(args, state, control, **kwargs)

    handle.__name__ = event
    handle.__doc__ = f"The tracker's ``{event}``, handed the model as trackers read it."
    return handle


class TrackerAdapter(TrainerCallback):
    """One reporting callback (``tracker``), its events handed the model as :class:`ModelForTrackers`.

    Its other attributes read through to the tracker (a TensorBoard callback's ``tb_writer``, which the validation
    images are written with). It answers the tracker's class and equals the tracker, so the trainer's
    ``pop_callback`` / ``remove_callback`` find it by the tracker's class or by the instance given."""

    def __init__(self, tracker: TrainerCallback) -> None:
        self.tracker = tracker

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self.tracker)

    def __eq__(self, other: object) -> bool:
        return other is self or other is self.tracker

    __hash__ = object.__hash__

    def __getattr__(self, name: str) -> Any:
        if name == "tracker":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.tracker, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tracker!r})"


for _event in (name for name in vars(TrainerCallback) if name.startswith("on_")):
    setattr(TrackerAdapter, _event, _forward(_event))


def adapt_trackers(handler: CallbackHandler) -> None:
    """Wrap each of ``handler``'s reporting callbacks (those of ``report_to``, and any instance of their classes
    passed in ``callbacks=``) in a :class:`TrackerAdapter`, in its place in the order of the callbacks."""
    reporting = tuple(INTEGRATION_TO_CALLBACK.values())
    handler.callbacks[:] = [
        TrackerAdapter(cb) if isinstance(cb, reporting) and not isinstance(cb, TrackerAdapter) else cb
        for cb in handler.callbacks
    ]
