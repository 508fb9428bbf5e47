"""Safeguards: hooks the trainer's Diffusion-DPO step calls to form a micro-batch's gradient from its winner's and
loser's branches, one object per ``safeguard_space`` behind :class:`Safeguard` (:mod:`.base`), chosen once by
:func:`safeguard_for`; each module holds its rule's formula and the object that applies it. Plain Diffusion-DPO
(``safeguard_space="none"``) has no safeguard and runs none of this folder.

The rule (Diffusion-SDPO, Fu et al., arXiv 2511.03317), in the one sign convention every module uses: ``g_w`` and
``h_l`` are the gradients of the loss's winner term and of its loser term as the loss sees them, so Diffusion-DPO's
gradient is ``g_w + h_l``. The safeguarded gradient is ``g_w + lambda * h_l``, with the detached scalar ``lambda``
chosen so that, to first order, the winner's error does not increase::

    <g_w, g_w + lambda * h_l> >= mu * |g_w|^2
    lambda = clamp((1 - mu) * |g_w|^2 / -<g_w, h_l>, 0, max_lambda)   if <g_w, h_l> < 0
    lambda = max_lambda                                                otherwise

* :class:`OutputSpace`: the authors' rule, ``g_w`` and ``h_l`` taken on the predictions' residuals, its hook on the
  predictions before the objective (:mod:`.output`);
* :class:`ParameterSpace`: the exact rule on the parameter gradients, its hook after a backward that keeps the
  branches apart (one pass or two), per process, global or per pair (:mod:`.parameter`);
* :class:`UpdateSpace`: the exact rule on the optimizer's update, on the parameter space's separated branches
  (:mod:`.update_space`, its search there and in :mod:`.update_runs` and :mod:`.crossing`).

A space's module is imported when the space is chosen (:data:`SAFEGUARDS` names it; the public names below resolve
on first use, as the package's do). To add one, subclass :class:`Safeguard` in a module of this folder and register
it in :data:`SAFEGUARDS` under the ``safeguard_space`` value that selects it (see CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..config._lazy import lazy_attributes

if TYPE_CHECKING:
    from ..engines import Engine
    from .base import Safeguard
    from .output import OutputSpace, OutputSpaceRule
    from .parameter import ParameterSpace
    from .update_space import UpdateSpace

__all__ = [
    "SAFEGUARDS",
    "OutputSpace",
    "OutputSpaceRule",
    "ParameterSpace",
    "Safeguard",
    "UpdateSpace",
    "safeguard_for",
]

#: ``safeguard_space`` -> its safeguard, as ``"module:class"`` (imported when chosen) or the class itself; ``None``:
#: no safeguard, the trainer's Diffusion-DPO step alone
SAFEGUARDS: dict[str, str | type[Safeguard] | None] = {
    "none": None,
    "output": "trl_diffusion_sdpo.safeguards.output:OutputSpace",
    "parameter": "trl_diffusion_sdpo.safeguards.parameter:ParameterSpace",
    "update": "trl_diffusion_sdpo.safeguards.update_space:UpdateSpace",
}

__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "OutputSpace": ".output",
        "OutputSpaceRule": ".output",
        "ParameterSpace": ".parameter",
        "Safeguard": ".base",
        "UpdateSpace": ".update_space",
    },
    globals(),
)


def safeguard_class(space: str) -> type[Safeguard] | None:
    """The safeguard class registered for ``space`` (its module imported now), or ``None`` for ``"none"``."""
    entry: Any = SAFEGUARDS[space]
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
    return entry


def safeguard_for(args, engine: Engine, *, lora: bool = True, trainable_elements: int = 0) -> Safeguard | None:
    """The safeguard ``args.safeguard_space`` asks for, checked against ``engine`` (a ValueError names what to use
    instead where it cannot run); ``None`` for ``"none"``, plain Diffusion-DPO. ``lora`` and ``trainable_elements``
    describe the trained weights (the per-pair scope's memory)."""
    cls = safeguard_class(args.safeguard_space)
    return None if cls is None else cls(args, engine, lora=lora, trainable_elements=trainable_elements)
