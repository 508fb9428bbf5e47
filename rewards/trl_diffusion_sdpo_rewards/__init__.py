"""Ports of published reward models onto transformers, as `trl_diffusion_sdpo` scorers: HPSv2 / HPSv2.1 (``hps``),
HPSv3 (``hps_v3``), ImageReward (``image_reward``), the LAION aesthetic predictor (``aesthetic``) and, for edits,
EditReward (``edit_reward``); ``qwen_vl_reward`` holds what HPSv3 and EditReward share.

`trl_diffusion_sdpo` registers their names (``hpsv2``, ``hpsv2.1``, ``hpsv3``, ``imagereward``, ``aesthetic``,
``editreward``) and imports a module here only when its scorer is built: ``build_scorer("hpsv3", ...)``. Each class
and weight conversion is importable from here by name; importing this package alone loads no model code.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module defining it, imported on first access.
_EXPORTS = {
    "AestheticMLP": "aesthetic",
    "AestheticScorer": "aesthetic",
    "EditRewardScorer": "edit_reward",
    "editreward_to_transformers": "edit_reward",
    "HPSv2Scorer": "hps",
    "hps_v21_scorer": "hps",
    "open_clip_to_transformers": "hps",
    "HPSv3Scorer": "hps_v3",
    "hpsv3_to_transformers": "hps_v3",
    "ImageRewardModel": "image_reward",
    "ImageRewardScorer": "image_reward",
    "blip_to_transformers": "image_reward",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
