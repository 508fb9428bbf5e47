"""The optional parts of the package and the pip extra that installs each: a part that needs a library the trainer
does not asks for it here, so that a missing one fails with the command that installs it."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["TRACKER_EXTRAS", "ExtraNotInstalled", "extra_message", "missing_extra", "require_extra", "tracker_problem"]

# Extras whose distribution lives in the repository (rewards/: the reward-model ports): from a clone, pip takes it
# from that folder when the folder is named on the same command line.
_IN_THE_REPOSITORY = {"rewards": "./rewards"}
#: ``report_to`` trackers whose library an extra installs: the tracker -> (the extra, the modules transformers accepts
#: for it, the first the one the extra installs). The README's install line names them (a test checks).
TRACKER_EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {"tensorboard": ("eval", ("tensorboard", "tensorboardX"))}


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
        raise ExtraNotInstalled(extra_message(extra, module, used_by)) from error


def extra_message(extra: str, module: str, used_by: str) -> str:
    """The one wording of a missing extra: what needs it (``used_by``), the library (``module``'s top level) and the
    pip command that installs ``extra``."""
    local = f" -e {_IN_THE_REPOSITORY[extra]}" if extra in _IN_THE_REPOSITORY else ""
    return (
        f"{used_by}: {module.split('.')[0]} is not installed. Install the package's '{extra}' extra: "
        f'pip install "trl-diffusion-sdpo[{extra}]" (from a clone: pip install -e ".[{extra}]"{local}).'
    )


def missing_extra(extra: str, modules: tuple[str, ...], used_by: str) -> str | None:
    """:func:`extra_message` for the first of ``modules`` where none of them is installed (found without importing
    it), else ``None``: a check made before anything is loaded."""
    if any(importlib.util.find_spec(module) is not None for module in modules):
        return None
    return extra_message(extra, modules[0], used_by)


def tracker_problem(report_to: list[str] | str | None) -> str | None:
    """The first tracker of ``report_to`` (transformers' list) whose library is not installed, as
    :func:`missing_extra` words it; ``None`` where every one of :data:`TRACKER_EXTRAS` it names is installed.
    transformers' own error comes later, when the trainer is built, and names no extra."""
    for tracker in [report_to] if isinstance(report_to, str) else report_to or []:
        if tracker in TRACKER_EXTRAS:
            extra, modules = TRACKER_EXTRAS[tracker]
            problem = missing_extra(extra, modules, f"report_to={tracker!r}")
            if problem is not None:
                return problem
    return None
