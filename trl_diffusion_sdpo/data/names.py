"""What a dataset or model name means before anything is read: a local path, or a Hub id that the Hub (or the
Hugging Face cache) may hold, and the one line that names a name leading nowhere. Imports nothing heavy (the Hub's
client only where a request or its cache is needed): the command line asks it before torch, transformers or
``datasets`` load; :mod:`.formats` and :mod:`.model_names` ask it when they read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

__all__ = [
    "HUB_ID",
    "PIPELINE_FILES",
    "PIPELINE_NAMES",
    "TABLE_EXTENSIONS",
    "hub_dataset_problem",
    "hub_offline",
    "in_hub_cache",
    "looks_local",
    "model_name_problem",
    "model_not_found_message",
    "not_found_message",
]

TABLE_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")
# A Hub dataset id as huggingface_hub accepts one: NAME or NAMESPACE/NAME, letters, digits, '-', '_' and '.'.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
HUB_PROBE_TIMEOUT_S = 10.0  # one request asking the Hub whether the dataset exists, before load_dataset's retries
PIPELINE_FILES = ("model_index.json",)
PIPELINE_NAMES = (
    "a diffusers pipeline folder (model_index.json inside), a Hub id NAMESPACE/NAME or trl-diffusion-sdpo:tiny "
    "(the shipped base)"
)


def looks_local(name: str) -> bool:
    """Whether ``name`` can only mean a local path: ``./x``, ``../x``, ``/x``, ``~/x``, ``x/``, a file suffix, or a
    ``a/b`` whose folder ``a`` exists here."""
    if name.startswith((".", "/", "~", os.sep)) or name.endswith(("/", os.sep)) or os.path.isabs(name):
        return True
    if name.lower().endswith((*TABLE_EXTENSIONS, ".parquet", ".arrow")):
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


def hub_offline() -> bool:
    """Whether the Hub may not be asked (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``, read when called)."""
    from huggingface_hub import constants  # the Hub's client, for names that may be Hub ids only

    values = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(v.strip().upper() in {"1", "ON", "YES", "TRUE"} for v in values)


def hub_dataset_problem(name: str, kind: str = "dataset") -> str | None:
    """Why ``name`` (no local file or folder) cannot be a Hub ``kind`` (``"dataset"`` or ``"model"``), or ``None``
    where the loader should try it. One request at most (:data:`HUB_PROBE_TIMEOUT_S`, no retries): the Hub says it
    does not exist, or cannot be reached; any other answer (a gated or private repository) is left to the loader."""
    if looks_local(name):
        return "and, written as a local path, it is not looked for on the Hub"
    if not HUB_ID.match(name) or "--" in name or ".." in name:
        return f"and it is not a Hub {kind} id either (NAME or NAMESPACE/NAME: letters, digits, '-', '_', '.')"
    if hub_offline():
        return "and the Hub is not asked (HF_HUB_OFFLINE=1)"
    # the Hub's client, for a name that may be a Hub id only
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    api = HfApi()
    try:
        (api.dataset_info if kind == "dataset" else api.model_info)(name, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        return None
    except RepositoryNotFoundError:
        return f"and the Hub has no {kind} of that name (or it is private: log in with `hf auth login`)"
    except HfHubHTTPError:
        return None
    except Exception as err:  # no answer: a connection refused, a name not resolved, a timeout, offline
        return f"and the Hub cannot be reached ({type(err).__name__})"
    return None


def not_found_message(name: str, problem: str) -> str:
    """One line: ``name`` was not found locally (the path looked at), ``problem`` with the Hub, and the layouts and
    Hub forms that are read."""
    return (
        f"dataset_name {name}: no such file or folder ({os.path.abspath(os.path.expanduser(name))}), {problem}. "
        "Read locally (docs/data.md): pair folders, a .jsonl/.json/.csv/.tsv table of prompt, chosen and rejected "
        "paths, an image folder with metadata.jsonl or metadata.csv, HPD annotation files, a save_to_disk folder or "
        "data files (parquet, arrow); from the Hub: a dataset id NAMESPACE/NAME (e.g. yuvalkirstain/pickapic_v2)."
    )


def in_hub_cache(repo_id: str, files: Sequence[str]) -> bool:
    """Whether the Hugging Face cache holds one of ``files`` of model ``repo_id`` (what the loaders then read offline:
    huggingface_hub falls back to the cache when the Hub cannot be reached)."""
    from huggingface_hub import try_to_load_from_cache  # the Hub's cache, for a name found nowhere on disk

    for filename in files:
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename), str):
                return True
        except ValueError:  # not a valid repository id: the Hub check names it
            return False
    return False


def model_name_problem(path: str, files: Sequence[str] = PIPELINE_FILES) -> str | None:
    """Why the model ``path`` (a shipped model's short name already read as its folder) leads nowhere, or ``None``
    where loading should try it: a local path that exists, or a Hub id whose ``files`` (any one of them) are in the
    Hugging Face cache or that the Hub has (or may have: a gated or private repository is left to the loader)."""
    if os.path.exists(path) or in_hub_cache(path, files):
        return None
    return hub_dataset_problem(path, kind="model")


def model_not_found_message(name: str, option: str, problem: str, expected: str = PIPELINE_NAMES) -> str:
    """One line: the model ``name`` (given as ``option``) is no local folder (the path looked at), ``problem`` with
    the Hub, and the ``expected`` names that are read."""
    return (
        f"{option} {name}: no such folder ({os.path.abspath(os.path.expanduser(name))}), {problem}. Give {expected}."
    )
