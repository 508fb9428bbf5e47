"""Make a diffusers model readable by transformers' tracker callbacks (``report_to``).

transformers' callbacks describe the model through ``model.config.to_json_string()`` (TensorBoard) or
``model.config.to_dict()`` (MLflow, Comet, Neptune, ClearML), the methods of a transformers ``PretrainedConfig``.
A diffusers model's ``config`` is a ``FrozenDict`` without them, so ``report_to="tensorboard"`` failed before the
first step. :func:`make_config_trackable` swaps in the same mapping with those two methods added; diffusers keeps
reading and saving it as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict

__all__ = ["TrackableConfig", "make_config_trackable"]


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


class TrackableConfig(FrozenDict):
    """A diffusers ``FrozenDict`` config with ``to_dict`` and ``to_json_string``, as trackers expect of a config."""

    def to_dict(self) -> dict[str, Any]:
        """The public entries (no ``_use_default_values`` and the like) as plain Python values."""
        return {k: _plain(v) for k, v in self.items() if not k.startswith("_") or k == "_class_name"}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n"


def make_config_trackable(model: torch.nn.Module) -> Callable[[], None] | None:
    """Give ``model.config`` (a diffusers ``ConfigMixin``'s ``FrozenDict``) the two methods trackers call. Returns
    what puts the model's own config back (``None`` where nothing was changed)."""
    config = getattr(model, "_internal_dict", None)
    if isinstance(config, FrozenDict) and not isinstance(config, TrackableConfig):
        model._internal_dict = TrackableConfig(config)
        return lambda: setattr(model, "_internal_dict", config)
    return None
