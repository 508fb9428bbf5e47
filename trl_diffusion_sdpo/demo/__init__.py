"""A CPU demo of Diffusion-DPO's pathology and Diffusion-SDPO's safeguard on a tiny text-to-image model.

Run it with ``trl-diffusion-sdpo demo --output-dir DIR``. Modules: :mod:`.shapes` (procedural images and the colour
reward), :mod:`.pretrain` (the cached base model), :mod:`.pairs` (sampling and ranking), :mod:`.plots` (figures)
and :mod:`.run` (orchestration and the summary).
"""

from .pretrain import PretrainRecipe, load_or_pretrain
from .run import DemoRecipe, run_demo

__all__ = ["DemoRecipe", "PretrainRecipe", "load_or_pretrain", "run_demo"]
