"""A CPU demo comparing Diffusion-DPO and Diffusion-SDPO's safeguards on a tiny text-to-image model.

Run it with ``trl-diffusion-sdpo demo --output-dir DIR`` or ``python -m trl_diffusion_sdpo.demo`` (all options).
Modules: :mod:`.shapes` (procedural images and the colour reward), :mod:`.scorer` (that reward as a ``Scorer``),
:mod:`.pretrain` (the shipped base model, its recipe and check), :mod:`.pairs` (sampling and ranking),
:mod:`.methods` (the compared methods), :mod:`.stats` (intervals), :mod:`.plots` (figures), :mod:`.run`
(orchestration and the summary) and :mod:`.cli` (options).
"""

from .methods import METHODS, Method
from .pretrain import PretrainRecipe, check_base, load_base, load_or_pretrain, rebuild_and_check
from .run import DemoRecipe, run_demo, run_pretrain
from .scorer import ColourRewardScorer

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
