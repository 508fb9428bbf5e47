"""Before any image is generated: each scorer can score the prompts, and can load its models.

Generation takes minutes to hours and the scorers run after it, so a scorer that cannot work must say so first:

* :func:`check_prompts`: a scorer that reads its prompts in a fixed form (the demo's ``colour``) names the first
  prompt it cannot parse (``Scorer.check_prompts``).
* :func:`check_models`: each model a scorer loads (``Scorer.model_sources``) is a local path, or a Hub id already in
  the Hugging Face cache, or the Hub is reachable. Offline (``HF_HUB_OFFLINE``) or when a connection to the Hub
  fails within :data:`CONNECT_TIMEOUT_S`, a missing model is refused at once, naming the scorer, the model id and the
  ``--scorer_arg`` that points the scorer at a local copy, instead of the Hub client's retries after generation.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

from .base import Scorer
from .registry import scorer_factory

__all__: list[str] = []  # nothing here is imported by users; the package imports its names directly

# Seconds a connection to the Hub may take before the check calls it unreachable.
CONNECT_TIMEOUT_S = 3.0
# "owner/name" or "name": what from_pretrained would look up on the Hub.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_TRUE = {"1", "on", "yes", "true"}
# Arguments naming a Hub repository a file is downloaded from, and the argument that takes the local file instead.
_LOCAL_ARGUMENT = {"hub_repo": "checkpoint", "head_repo": "weights"}


class ScorerModelUnavailable(RuntimeError):
    """A scorer's model is neither local, nor cached, nor reachable on the Hub."""


class ScorerPromptError(ValueError):
    """A scorer cannot score one of the prompts (raised by a scorer's ``check_prompts``)."""


def _factory(entry: str | Scorer) -> Any:
    return entry if isinstance(entry, Scorer) else scorer_factory(entry)


def _name(entry: str | Scorer) -> str:
    return entry if isinstance(entry, str) else entry.name


def check_prompts(scorers: Sequence[str | Scorer], prompts: Sequence[str]) -> None:
    """Each scorer's ``check_prompts(prompts)``: a ``ValueError`` naming the first prompt one cannot score."""
    for entry in scorers:
        check = getattr(_factory(entry), "check_prompts", None)
        if callable(check):
            check(list(prompts))


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a snapshot of model ``repo_id``."""
    from huggingface_hub import constants

    folder = os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"), "snapshots")
    return os.path.isdir(folder) and bool(os.listdir(folder))


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (offline mode, or a failed connection within :data:`CONNECT_TIMEOUT_S`), or
    ``None`` when it can."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        return f"no connection to {host}:{port} within {CONNECT_TIMEOUT_S:g} s: {err}"
    return None


def check_models(
    scorers: Sequence[str | Scorer], scorer_kwargs: Mapping[str, Mapping[str, Any]] | None = None
) -> None:
    """Refuse a named scorer whose model cannot be loaded here (see the module docstring); instances were built
    already and are not checked."""
    scorer_kwargs = scorer_kwargs or {}
    unreachable: str | None = None
    checked_hub = False
    for entry in scorers:
        if isinstance(entry, Scorer):
            continue
        sources = getattr(_factory(entry), "model_sources", None)
        if not callable(sources):
            continue
        for argument, ref in sources(**dict(scorer_kwargs.get(entry, {}))).items():
            if os.path.exists(ref):
                continue
            if not _HUB_ID.match(ref) or ref.startswith((".", "~")):
                raise ScorerModelUnavailable(
                    f"Scorer {entry!r}: its model {argument}={ref!r} is not an existing file or folder. Pass a local "
                    f"copy with --scorer_arg {entry}.{argument}=/path/to/it (Python: scorer_kwargs={{{entry!r}: "
                    f"{{{argument!r}: path}}}})."
                )
            if _in_hub_cache(ref):
                continue
            if not checked_hub:
                unreachable, checked_hub = hub_unreachable(), True
            if unreachable is not None:
                local = _LOCAL_ARGUMENT.get(argument, argument)
                raise ScorerModelUnavailable(
                    f"Scorer {entry!r} needs the model {ref!r} ({argument}), which is neither a local path nor in the "
                    f"Hugging Face cache, and the Hub cannot be reached ({unreachable}). Download it where there is a "
                    f"network (`hf download {ref} --local-dir {ref.split('/')[-1]}`), then point the scorer at the "
                    f"copy: --scorer_arg {entry}.{local}=/path/to/{'file' if local != argument else 'folder'} "
                    f"(Python: scorer_kwargs={{{entry!r}: {{{local!r}: path}}}}), or put it in the Hugging Face cache "
                    "(HF_HOME)."
                )
