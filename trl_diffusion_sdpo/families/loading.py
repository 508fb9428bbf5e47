"""How pipelines are named and loaded: the short names of the models shipped inside the package, and the dtype
keyword diffusers takes.

``--model_name_or_path trl-diffusion-sdpo:tiny`` (or ``evaluate --base trl-diffusion-sdpo:tiny``) loads the CPU
demo's tiny Stable Diffusion base (``trl_diffusion_sdpo/demo/base``: 32x32 images, about 5 MB, docs/demo.md), for
trying the package offline. Every place that loads a pipeline by name (``distributed.load_pipeline``, the
evaluation's generation) resolves the name here first; any other name or path passes through unchanged.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

__all__: list[str] = []  # nothing here is imported by users; the package imports its names directly

SHIPPED_MODELS: dict[str, Path] = {
    "trl-diffusion-sdpo:tiny": Path(__file__).resolve().parents[1] / "demo" / "base",
}


def resolve_model_name(name: str | os.PathLike) -> str | os.PathLike:
    """The folder of a shipped model's short name (:data:`SHIPPED_MODELS`), else ``name`` as given."""
    if isinstance(name, str) and name in SHIPPED_MODELS:
        return str(SHIPPED_MODELS[name])
    return name


def import_own_components(pretrained: str | os.PathLike) -> None:
    """Import the package's own modules that a local pipeline folder's ``model_index.json`` names as the library of a
    component (a tiny test pipeline's processor, ``trl_diffusion_sdpo.testing.qwen_image21``): diffusers loads a
    component only from a module already imported. Only ``trl_diffusion_sdpo.*`` names are imported, never another
    library a folder names (that would run code the folder chose)."""
    index = Path(pretrained) / "model_index.json"
    if not index.is_file():
        return
    own = __package__.split(".")[0] + "."
    for entry in json.loads(index.read_text()).values():
        if isinstance(entry, list) and entry and isinstance(entry[0], str) and entry[0].startswith(own):
            importlib.import_module(entry[0])


def dtype_keyword(dtype: Any) -> dict[str, Any]:
    """``{"dtype": dtype}`` for diffusers' ``from_pretrained`` where it takes ``dtype`` (it warns that ``torch_dtype``
    is deprecated), ``{"torch_dtype": dtype}`` on the older releases that take only that; ``{}`` for ``None``."""
    if dtype is None:
        return {}
    import diffusers.utils

    # The releases that accept dtype resolve it against the deprecated torch_dtype with this function.
    return {"dtype": dtype} if hasattr(diffusers.utils, "_resolve_dtype") else {"torch_dtype": dtype}
