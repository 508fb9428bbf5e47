"""State dicts on disk as safetensors and JSON, never pickles: the states that move with training (the EMA's, the
auto-beta's, the safeguard's ``mu``, the gradient scaler's), as the rewind's snapshot and every checkpoint keep them.

A state is a nest of dicts (string keys) and lists of tensors, numbers, strings, booleans and ``None``, as torch's and
diffusers' ``state_dict()`` return. :func:`write_state` writes its tensors to ``<name>.safetensors``, each under its
path in the nest (``ema/shadow_params/0``), and the rest to ``<name>.json``, where a tensor stands as
``{"__tensor__": path}``; :func:`read_state` puts the two back together (tensors on the CPU, tuples as lists).

:class:`~trl_diffusion_sdpo.io.run_files.StatesPart` keeps named states in every checkpoint (a
:class:`~trl_diffusion_sdpo.io.run_files.CheckpointPart`): the trainer's auto-beta and its safeguard's ``mu``, read
and put back through their ``state_dict()`` / ``load_state_dict()``, written and read here (a run imports this module
with its first checkpoint save or its resume).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from ..config.file_modes import follow_umask

__all__ = [
    "STATES_FILE",
    "Stateful",
    "join_tensors",
    "read_state",
    "read_states",
    "split_tensors",
    "write_state",
    "write_states",
]

#: the name of :class:`~trl_diffusion_sdpo.io.run_files.StatesPart`'s files in a checkpoint (``.json`` and
#: ``.safetensors``)
STATES_FILE = "training_states"

_TENSOR = "__tensor__"


def split_tensors(state: Any, path: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """``(skeleton, tensors)``: ``state`` with each tensor replaced by ``{"__tensor__": its path}``, and the tensors
    by path (detached, on the CPU, contiguous). Raises ``TypeError`` on what JSON would change or cannot hold (a
    non-string key, an object)."""
    tensors: dict[str, torch.Tensor] = {}

    def split(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[where] = value.detach().cpu().contiguous()
            return {_TENSOR: where}
        if isinstance(value, dict):
            if not all(isinstance(key, str) for key in value):
                raise TypeError(f"a state's keys are strings: {where or 'the state'} has {list(value)!r}")
            return {key: split(item, f"{where}{key}/") for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [split(item, f"{where}{i}/") for i, item in enumerate(value)]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"{type(value).__name__} at {where or 'the state'}: a state holds tensors, numbers and text")

    return split(state, path), tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The state :func:`split_tensors` split into ``skeleton`` and ``tensors``."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        return {key: join_tensors(item, tensors) for key, item in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(item, tensors) for item in skeleton]
    return skeleton


def write_state(folder: str, name: str, state: Any) -> None:
    """``state`` into ``folder`` as ``<name>.safetensors`` (its tensors) and ``<name>.json`` (the rest)."""
    skeleton, tensors = split_tensors(state)
    paths = [os.path.join(folder, f"{name}.{kind}") for kind in ("safetensors", "json")]
    save_file(tensors, paths[0])
    with open(paths[1], "w", encoding="utf-8") as f:
        json.dump(skeleton, f, indent=1)
    follow_umask(*paths)  # safetensors writes its file owner-only


def read_state(folder: str, name: str) -> Any:
    """The state :func:`write_state` wrote into ``folder`` under ``name``, its tensors on the CPU."""
    with open(os.path.join(folder, f"{name}.json"), encoding="utf-8") as f:
        skeleton = json.load(f)
    return join_tensors(skeleton, load_file(os.path.join(folder, f"{name}.safetensors")))


class Stateful(Protocol):
    """What has a state to keep: torch's ``state_dict()`` / ``load_state_dict()`` pair."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def write_states(checkpoint: str, states: Mapping[str, Stateful]) -> None:
    """``states`` (name -> :class:`Stateful`) written into ``checkpoint`` as :data:`STATES_FILE`, each its
    ``state_dict()`` (:class:`~trl_diffusion_sdpo.io.run_files.StatesPart`)."""
    write_state(checkpoint, STATES_FILE, {name: held.state_dict() for name, held in states.items()})


def read_states(checkpoint: str, states: Mapping[str, Stateful]) -> None:
    """Each of ``states`` that ``checkpoint``'s :data:`STATES_FILE` holds, loaded back (``load_state_dict``); the
    others, and all of them where the checkpoint holds no such file, left as they are."""
    if not os.path.exists(os.path.join(checkpoint, f"{STATES_FILE}.json")):
        return
    saved = read_state(checkpoint, STATES_FILE)
    for name, held in states.items():
        if name in saved:
            held.load_state_dict(saved[name])
