"""Where a model name leads, checked before anything loads: a local folder, a shipped model's short name
(``trl-diffusion-sdpo:tiny``), a Hub id already in the Hugging Face cache, or a Hub id the Hub has.

Every command that takes a model (``train``, ``online``, ``cache``, ``export``, ``evaluate``, ``pairs``) asks here
first, so a name that leads nowhere ends in one line naming the real cause (no such folder; the Hub not asked under
``HF_HUB_OFFLINE``; the Hub unreachable; no such repository) within seconds, where diffusers' loaders retry for half a
minute and then report a missing ``model_index.json``. The Hub is asked once, as for a dataset
(:func:`~.formats.hub_dataset_problem`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..families.loading import resolve_model_name
from .formats import hub_dataset_problem

__all__ = ["check_model_exists", "model_problem"]

PIPELINE_FILES = ("model_index.json",)
PIPELINE_NAMES = (
    "a diffusers pipeline folder (model_index.json inside), a Hub id NAMESPACE/NAME or trl-diffusion-sdpo:tiny "
    "(the shipped base)"
)


def _in_hub_cache(repo_id: str, files: Sequence[str]) -> bool:
    """Whether the Hugging Face cache holds one of ``files`` of model ``repo_id`` (what the loaders then read offline:
    huggingface_hub falls back to the cache when the Hub cannot be reached)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in files:
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename), str):
                return True
        except ValueError:  # not a valid repository id: the Hub check names it
            return False
    return False


def model_problem(name: str, files: Sequence[str] = PIPELINE_FILES) -> str | None:
    """Why ``name`` leads to no model, or ``None`` where loading should try it: a local path or shipped name that
    exists, or a Hub id whose ``files`` (any one of them) are in the Hugging Face cache or that the Hub has (or may
    have: a gated or private repository is left to the loader)."""
    resolved = str(resolve_model_name(name))
    if os.path.exists(resolved) or _in_hub_cache(resolved, files):
        return None
    return hub_dataset_problem(resolved, kind="model")


def check_model_exists(
    name: str,
    option: str = "--model_name_or_path",
    expected: str = PIPELINE_NAMES,
    files: Sequence[str] = PIPELINE_FILES,
) -> None:
    """A ``FileNotFoundError`` in one line where ``name`` (given as ``option``) leads to no model
    (:func:`model_problem`), saying what ``expected`` names are read."""
    problem = model_problem(name, files)
    if problem is not None:
        raise FileNotFoundError(
            f"{option} {name}: no such folder ({os.path.abspath(os.path.expanduser(name))}), {problem}. Give "
            f"{expected}."
        )
