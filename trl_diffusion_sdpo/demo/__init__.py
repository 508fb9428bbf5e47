"""A CPU demo comparing Diffusion-DPO and Diffusion-SDPO's safeguards on a tiny text-to-image model.

Run it with ``trl-diffusion-sdpo demo --output-dir DIR`` or ``python -m trl_diffusion_sdpo.demo`` (all options).
Modules: :mod:`.shapes` (procedural images and the colour reward), :mod:`.scorer` (that reward as a ``Scorer``),
:mod:`.pretrain` (the shipped base model, its recipe and pretraining), :mod:`.base_check` (its check and
rebuild), :mod:`.pairs` (sampling and ranking), :mod:`.methods` (the compared methods and the breaking regime's
guards), :mod:`.recipe` (the demo's settings), :mod:`.run` (the runs, the breaking regime's included), :mod:`.report`
(summary and tables), :mod:`.stats` (intervals), :mod:`.plots`
(figures) and :mod:`.cli` (options).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config._lazy import lazy_attributes

if TYPE_CHECKING:
    from .base_check import check_base, rebuild_and_check
    from .methods import METHODS, Method
    from .pretrain import PretrainRecipe, load_base, load_or_pretrain
    from .recipe import DemoRecipe
    from .run import run_demo, run_pretrain
    from .scorer import ColourRewardScorer

_EXPORTS = {
    "METHODS": ".methods",
    "ColourRewardScorer": ".scorer",
    "DemoRecipe": ".recipe",
    "Method": ".methods",
    "PretrainRecipe": ".pretrain",
    "check_base": ".base_check",
    "load_base": ".pretrain",
    "load_or_pretrain": ".pretrain",
    "rebuild_and_check": ".base_check",
    "run_demo": ".run",
    "run_pretrain": ".run",
}

__all__ = [
    "METHODS",
    "ColourRewardScorer",
    "DemoRecipe",
    "Method",
    "PretrainRecipe",
    "check_base",
    "load_base",
    "load_or_pretrain",
    "rebuild_and_check",
    "run_demo",
    "run_pretrain",
]

# Resolved on first use, so that ``trl-diffusion-sdpo --help`` builds the demo's options without importing torch.
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
