"""Where a model name leads, checked before anything loads: a local folder, a shipped model's short name
(``trl-diffusion-sdpo:tiny``), a Hub id already in the Hugging Face cache, or a Hub id the Hub has.

Every command that takes a model (``train``, ``online``, ``cache``, ``export``, ``evaluate``, ``pairs``) asks here
first, so a name that leads nowhere ends in one line naming the real cause (no such folder; the Hub not asked under
``HF_HUB_OFFLINE``; the Hub unreachable; no such repository) within seconds, where diffusers' loaders retry for half a
minute and then report a missing ``model_index.json``. The Hub is asked once, as for a dataset
(:func:`~.names.hub_dataset_problem`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..families.loading import resolve_model_name
from .names import PIPELINE_FILES, PIPELINE_NAMES, model_name_problem, model_not_found_message

__all__ = ["check_model_exists", "model_problem"]


def model_problem(name: str, files: Sequence[str] = PIPELINE_FILES) -> str | None:
    """Why ``name`` leads to no model, or ``None`` where loading should try it: a local path or shipped name that
    exists, or a Hub id whose ``files`` (any one of them) are in the Hugging Face cache or that the Hub has (or may
    have: a gated or private repository is left to the loader; :func:`~.names.model_name_problem`)."""
    return model_name_problem(str(resolve_model_name(name)), files)


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
        raise FileNotFoundError(model_not_found_message(name, option, problem, expected))
