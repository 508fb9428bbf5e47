"""Reading a released reward model's weights file without unpickling arbitrary objects."""

from __future__ import annotations

import pickle

import torch

__all__: list[str] = []  # nothing here is imported by users; the ports import it directly


def load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``.pt``/``.pth``/``.bin`` file read with ``weights_only=True``
    (no arbitrary unpickling). A ``{"state_dict": ...}`` wrapper, as open_clip checkpoints have, is unwrapped."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds pickled objects besides tensors and is not unpickled here (weights_only=True). If you "
            "trust the file, re-save its state dict once as safetensors (safetensors.torch.save_file) and pass that."
        ) from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict.")
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in state.items()}
