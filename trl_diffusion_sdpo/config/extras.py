"""The optional parts of the package and the pip extra that installs each: a part that needs a library the trainer
does not asks for it here, so that a missing one fails with the command that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["ExtraNotInstalled", "require_extra"]

# Extras whose distribution lives in the repository (rewards/: the reward-model ports): from a clone, pip takes it
# from that folder when the folder is named on the same command line.
_IN_THE_REPOSITORY = {"rewards": "./rewards"}


class ExtraNotInstalled(ImportError):
    """An optional part's library is not installed; the message names the pip command that installs it."""


def require_extra(extra: str, module: str, used_by: str) -> ModuleType:
    """``module`` imported, or an `ExtraNotInstalled` naming ``pip install "trl-diffusion-sdpo[<extra>]"``.

    ``used_by`` says what needs it (``"the demo's figures"``), so that the message tells the user what they ran.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or module.split(".")[0] != error.name.split(".")[0]:
            raise  # the library is there but one of its own imports failed: that error is the one to read
        local = f" -e {_IN_THE_REPOSITORY[extra]}" if extra in _IN_THE_REPOSITORY else ""
        raise ExtraNotInstalled(
            f"{used_by}: {module.split('.')[0]} is not installed. Install the package's '{extra}' extra: "
            f'pip install "trl-diffusion-sdpo[{extra}]" (from a clone: pip install -e ".[{extra}]"{local}).'
        ) from error
