"""Safeguards: how a micro-batch's gradient is formed from its winner's and loser's branches, one object per
``safeguard_space`` behind :class:`Safeguard`, chosen once by :func:`safeguard_for`; each module holds its rule's
formula and the object that applies it.

The rule (Diffusion-SDPO, Fu et al., arXiv 2511.03317), in the one sign convention every module uses: ``g_w`` and
``h_l`` are the gradients of the loss's winner term and of its loser term as the loss sees them, so Diffusion-DPO's
gradient is ``g_w + h_l``. The safeguarded gradient is ``g_w + lambda * h_l``, with the detached scalar ``lambda``
chosen so that, to first order, the winner's error does not increase::

    <g_w, g_w + lambda * h_l> >= mu * |g_w|^2
    lambda = clamp((1 - mu) * |g_w|^2 / -<g_w, h_l>, 0, max_lambda)   if <g_w, h_l> < 0
    lambda = max_lambda                                                otherwise

* :class:`DiffusionDPO`: no safeguard (``safeguard_space="none"``), Diffusion-DPO's gradient (:mod:`.output`);
* :class:`OutputSpace`: the authors' rule, ``g_w`` and ``h_l`` taken on the predictions' residuals (:mod:`.output`);
* :class:`ParameterSpace`: the exact rule on the parameter gradients, one pass or two, per process, global or per
  pair (:mod:`.parameter`);
* :class:`UpdateSpace`: the exact rule on the optimizer's update (:mod:`.parameter`, its search in
  :mod:`.update_space` and :mod:`.crossing`).

To add one, subclass :class:`Safeguard` in a module of this folder and register it in :data:`SAFEGUARDS` under the
``safeguard_space`` value that selects it (see CONTRIBUTING.md).
"""

from __future__ import annotations

from ..engines import Engine
from .base import MicroBatch, Safeguard, StepResult
from .output import DiffusionDPO, OutputSpace, OutputSpaceRule
from .parameter import ParameterSpace, UpdateSpace

__all__ = [
    "SAFEGUARDS",
    "DiffusionDPO",
    "MicroBatch",
    "OutputSpace",
    "OutputSpaceRule",
    "ParameterSpace",
    "Safeguard",
    "StepResult",
    "UpdateSpace",
    "safeguard_for",
]

#: ``safeguard_space`` -> its safeguard (``"none"``: ``safeguard_space="none"``)
SAFEGUARDS: dict[str, type[Safeguard]] = {
    "none": DiffusionDPO,
    "output": OutputSpace,
    "parameter": ParameterSpace,
    "update": UpdateSpace,
}


def safeguard_for(args, engine: Engine, *, lora: bool = True, trainable_elements: int = 0) -> Safeguard:
    """The safeguard ``args`` asks for, checked against ``engine`` (a ValueError names what to use instead where it
    cannot run). ``lora`` and ``trainable_elements`` describe the trained weights (the per-pair scope's memory)."""
    cls = SAFEGUARDS[args.safeguard_space]
    if issubclass(cls, ParameterSpace):
        return cls(args, engine, lora=lora, trainable_elements=trainable_elements)
    return cls(args, engine)
