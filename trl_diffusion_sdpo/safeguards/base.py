"""The interface every safeguard implements: hooks the trainer's Diffusion-DPO step calls.

The trainer's step is Diffusion-DPO's (``DiffusionSDPOTrainer.training_step``)::

    noised pair -> predictions -> [loser_weight] -> errors -> objective -> backward -> [combine] -> metrics

and a safeguard, chosen once (:func:`~trl_diffusion_sdpo.safeguards.safeguard_for`; none for
``safeguard_space="none"``), acts at one of its two hook points:

* :meth:`Safeguard.loser_weight`, on the predictions before the objective: the output space's ``lambda`` from the
  residuals, which weights the gradient of the loser's error (its value, and so the loss, unchanged);
* :meth:`Safeguard.combine`, after the backward: the parameter and update spaces ask for a backward that keeps the
  winner's and the loser's gradients apart (:attr:`Safeguard.backward_stage`, built on the gradient stores of
  :mod:`~trl_diffusion_sdpo.safeguards.gradients`); the hook receives those branches, chooses ``lambda`` from their
  inner products (or from the optimizer's update) and has the store write ``g_w + lambda * h_l``.

A safeguard never calls back into the trainer: each hook receives what it acts on and returns each ``lambda`` it
chose, by metric name, for the step's metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..engines import Engine
from ..objectives import PreferencePredictions
from .margin import SafeguardMargin

if TYPE_CHECKING:
    from ..config import DiffusionSDPOConfig
    from .passes import Backward

__all__ = ["Safeguard"]


class Safeguard:
    """A Diffusion-SDPO safeguard: where ``lambda`` is chosen and how it scales the loser's gradient. A safeguard
    subclasses it, sets :attr:`name` and :attr:`metric_names`, and overrides :meth:`loser_weight` (on the
    predictions) or sets :attr:`backward_stage` and overrides :meth:`combine` (on the branches' gradients).

    Args:
        args: the training's ``DiffusionSDPOConfig`` (``safeguard_mu``, ``safeguard_max_lambda``,
            ``safeguard_scope`` and the rest of the fields a safeguard reads).
        engine: the training engine (a rule checks it can run there when built).
        lora: whether LoRA adapters are trained, and ``trainable_elements`` the number of trained weights: what a
            rule's memory check reads (the per-pair scope's).
    """

    #: the ``safeguard_space`` it implements
    name: ClassVar[str] = "base"
    #: the metrics its hooks record, the same on every process (they are reduced together)
    metric_names: ClassVar[tuple[str, ...]] = ()
    #: the backward that keeps the branches' gradients apart for :meth:`combine` (``None``: the engine's backward,
    #: Diffusion-DPO's)
    backward_stage: Backward | None = None

    def __init__(
        self, args: DiffusionSDPOConfig, engine: Engine, *, lora: bool = True, trainable_elements: int = 0
    ) -> None:
        self.args = args
        self.engine = engine
        #: ``mu``, fixed or ``"auto"`` (:mod:`.margin`): the rules read it at every micro-batch
        self.margin = SafeguardMargin.from_config(args, engine.num_processes)

    def loser_weight(self, predictions: PreferencePredictions, contributes: bool) -> torch.Tensor | None:
        """Before the objective: the detached ``lambda`` that weights the gradient of the loser's error, chosen on
        ``predictions`` (``contributes=False``: a zero-weighted replay joins the rule's reductions with nothing);
        ``None``: the loser's gradient as the objective forms it."""
        return None

    def combine(self, branches: Any, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor | None]:
        """After :attr:`backward_stage`'s backward: choose ``lambda`` from ``branches`` (their inner products, or
        their gradients and ``optimizer``'s update), have them write ``g_w + lambda * h_l`` where the optimizer reads
        it, and return each ``lambda`` by metric name."""
        raise NotImplementedError(f"{type(self).__name__} keeps no branches apart: it has no backward_stage")

    def evaluation_lambdas(self, predictions: PreferencePredictions, contributes: bool) -> dict[str, torch.Tensor]:
        """The ``lambda`` an evaluation micro-batch records (no backward runs there); none by default."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
