"""The optional parts of the package and the pip extra that installs each: a part that needs a library the trainer
does not asks for it here, so that a missing one fails with the command that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require_extra"]


def require_extra(extra: str, module: str, used_by: str) -> ModuleType:
    """``module`` imported, or an ``ImportError`` naming ``pip install "trl-diffusion-sdpo[<extra>]"``.

    ``used_by`` says what needs it (``"the demo's figures"``), so that the message tells the user what they ran.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or module.split(".")[0] != error.name.split(".")[0]:
            raise  # the library is there but one of its own imports failed: that error is the one to read
        raise ImportError(
            f"{used_by}: {module.split('.')[0]} is not installed. Install the package's '{extra}' extra: "
            f'pip install "trl-diffusion-sdpo[{extra}]" (from a clone: pip install -e ".[{extra}]").'
        ) from error
