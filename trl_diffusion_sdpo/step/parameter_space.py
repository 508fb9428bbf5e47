"""The parameter-space safeguard's backward stage: one backward pass per branch, ``lambda`` from their gradients.

Replaces the single backward pass of a micro-batch when ``safeguard_space="parameter"``::

    predictions (per branch) -> objective on detached predictions (each branch's cotangent)
    -> winner backward -> loser backward -> lambda = f(<g_w, g_w>, <g_w, g_l>) -> g_w + lambda * h_l
    -> (several processes) the reductions the engine asks for

Where the gradients live and how they are reduced is the engine's business (:mod:`trl_diffusion_sdpo.engines`,
whose :mod:`~trl_diffusion_sdpo.engines.branches` streams them with one extra buffer); the formula is
:func:`.safeguard.parameter_space_lambda`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..engines import BranchGradients, Engine
from ..engines.branches import branch_cotangents
from ..objectives import PreferencePredictions
from .optimizer import trainable_parameters
from .safeguard import parameter_space_lambda

__all__ = ["ParameterSpaceBackward"]


class ParameterSpaceBackward:
    """Runs a micro-batch's per-branch backward passes on ``engine`` with margin ``mu`` and cap ``max_lambda``.

    ``global_scope``: one ``lambda`` for the global micro-batch (the inner products are reduced over processes),
    else one per process. The gradient store is built at the first micro-batch (the engine exists by then).
    """

    def __init__(self, engine: Engine, mu: float, max_lambda: float, global_scope: bool) -> None:
        engine.check_parameter_space("global" if global_scope else "local")
        self.engine = engine
        self.mu, self.max_lambda = mu, max_lambda
        self.global_scope = global_scope and engine.num_processes > 1
        self.store: BranchGradients | None = None

    def __call__(
        self,
        policy: torch.nn.Module,
        predict: Callable[[], PreferencePredictions],
        objective_loss: Callable[[PreferencePredictions], torch.Tensor],
        scale: torch.Tensor,
        *,
        contributes: bool = True,
        sync_gradients: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, PreferencePredictions]:
        """``(loss, lambda, predictions)`` after adding ``scale * (g_w + lambda * h_l)`` to the gradients.

        Args:
            policy: the unwrapped denoiser (the branches bypass DDP's hooks; the engine reduces once).
            predict: the micro-batch's predictions, one forward pass per branch.
            objective_loss: the loss of a micro-batch's predictions (errors and objective); it is evaluated on
                detached copies of the policy's predictions to get each branch's cotangent.
            scale: what a plain backward would multiply the loss by (accumulation average, fp16 loss scale).
            contributes: ``False`` for a replayed micro-batch that joins the other processes' collectives with a
                zero contribution.
            sync_gradients: whether this micro-batch closes the accumulation window.
        """
        engine = self.engine
        if self.store is None:
            self.store = engine.branch_gradients(trainable_parameters(policy))
        store = self.store
        accumulated = engine.set_aside_accumulated(policy, store.parameters)
        predictions = predict()

        def loss_of(policy_winner: torch.Tensor, policy_loser: torch.Tensor) -> torch.Tensor:
            branches = dataclasses.replace(predictions, policy_winner=policy_winner, policy_loser=policy_loser)
            return objective_loss(branches)

        loss, cot_winner, cot_loser = branch_cotangents(loss_of, predictions.policy_winner, predictions.policy_loser)
        scale = scale.to(cot_winner)
        if not contributes:
            cot_winner, cot_loser = torch.zeros_like(cot_winner), torch.zeros_like(cot_loser)
        winner_sq = store.backward_winner(
            predictions.policy_winner, cot_winner * scale, engine.winner_reduction(self.global_scope)
        )
        cross = store.backward_loser(predictions.policy_loser, cot_loser * scale)
        winner_sq, cross = engine.reduce_branch_sums(winner_sq, cross, self.global_scope)
        lam = parameter_space_lambda(winner_sq, -cross, self.mu, self.max_lambda)
        store.combine(lam)
        engine.restore_accumulated(store.parameters, accumulated)
        engine.reduce_combined_gradients(store.parameters, sync_gradients)
        return loss, lam, predictions
