"""The parameter-space safeguard's backward stage: one backward pass per branch, ``lambda`` from their gradients.

Replaces the single backward pass of a micro-batch when ``safeguard_space="parameter"``::

    predictions (per branch) -> objective on detached predictions (each branch's cotangent)
    -> winner backward -> loser backward -> lambda = f(<g_w, g_w>, <g_w, g_l>) -> g_w + lambda * h_l
    -> (several processes) the reductions the engine asks for

Where the gradients live and how they are reduced is the engine's business (:mod:`trl_diffusion_sdpo.engines`,
whose :mod:`~trl_diffusion_sdpo.engines.branches` streams them with one extra buffer); the formula is
:func:`.safeguard.parameter_space_lambda`.

With ``update_space=True`` (``safeguard_space="update"``) the same passes feed the update space: ``g_w`` and ``h_l``
are kept apart, averaged over processes by the engine, and ``lambda`` is chosen on the optimizer's actual update
(:class:`~.update_space.OptimizerUpdate`, :func:`~.update_space.update_space_lambda`).
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
from .update_space import OptimizerUpdate, update_space_lambda

__all__ = ["ParameterSpaceBackward"]


class ParameterSpaceBackward:
    """Runs a micro-batch's per-branch backward passes on ``engine`` with margin ``mu`` and cap ``max_lambda``.

    ``global_scope``: one ``lambda`` for the global micro-batch (the inner products are reduced over processes),
    else one per process. The gradient store is built at the first micro-batch (the engine exists by then).
    ``update_space``: choose ``lambda`` on the optimizer's update instead (one ``lambda`` for the global micro-batch
    whatever ``global_scope``), with ``max_grad_norm`` the trainer's clipping threshold (``<= 0``: no clipping).
    """

    def __init__(
        self,
        engine: Engine,
        mu: float,
        max_lambda: float,
        global_scope: bool,
        *,
        update_space: bool = False,
        max_grad_norm: float = 0.0,
    ) -> None:
        if update_space:
            engine.check_update_space()
            global_scope = False  # the engine averages both branches' gradients instead (see _update_space)
        else:
            engine.check_parameter_space("global" if global_scope else "local")
        self.engine = engine
        self.mu, self.max_lambda = mu, max_lambda
        self.global_scope = global_scope and engine.num_processes > 1
        self.update_space, self.max_grad_norm = update_space, max_grad_norm
        self.store: BranchGradients | None = None
        # The update space: 1.0 where the last micro-batch's lambda could not meet the margin (a device tensor, for
        # the metrics); None before the first micro-batch and in the parameter space.
        self.infeasible: torch.Tensor | None = None

    @classmethod
    def from_config(cls, engine: Engine, args) -> ParameterSpaceBackward | None:
        """The stage a ``DiffusionSDPOConfig`` asks for: ``safeguard_space`` ``"parameter"`` or ``"update"``
        (``None`` otherwise: the backward pass stays transformers')."""
        if not args.safeguard or args.safeguard_space not in ("parameter", "update"):
            return None
        return cls(
            engine,
            args.safeguard_mu,
            args.safeguard_max_lambda,
            args.safeguard_scope == "global",
            update_space=args.safeguard_space == "update",
            max_grad_norm=args.max_grad_norm,
        )

    def __call__(
        self,
        policy: torch.nn.Module,
        predict: Callable[[], PreferencePredictions],
        objective_loss: Callable[[PreferencePredictions], torch.Tensor],
        scale: torch.Tensor,
        *,
        contributes: bool = True,
        sync_gradients: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
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
            optimizer: the training optimizer, read (never changed) by the update space.
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
        if self.update_space:
            lam = self._update_space(store, optimizer, scale)
            engine.restore_accumulated(store.parameters, accumulated)
            return loss, lam, predictions
        winner_sq, cross = engine.reduce_branch_sums(winner_sq, cross, self.global_scope)
        lam = parameter_space_lambda(winner_sq, -cross, self.mu, self.max_lambda)
        store.combine(lam)
        engine.restore_accumulated(store.parameters, accumulated)
        engine.reduce_combined_gradients(store.parameters, sync_gradients)
        return loss, lam, predictions

    def _update_space(self, store: BranchGradients, optimizer, scale: torch.Tensor) -> torch.Tensor:
        """``lambda`` on the optimizer's update: ``g_w`` and ``h_l`` averaged over processes (what the optimizer will
        see), ``lambda`` from them and the optimizer's state, and ``.grad = g_w + lambda * h_l``, already reduced."""
        if optimizer is None:
            raise ValueError("safeguard_space='update' needs the optimizer: pass optimizer= to the backward stage")
        winner, loser = store.branch_gradients()
        self.engine.reduce_branch_gradients(winner, loser)
        unscale = 1.0 / scale  # the update is read in the optimizer's units; .grad stays in the backward's
        update = OptimizerUpdate(
            optimizer,
            store.parameters,
            [w * unscale.to(w) for w in winner],
            [h * unscale.to(h) for h in loser],
            self.max_grad_norm,
        )
        lam, self.infeasible = update_space_lambda(update, self.mu, self.max_lambda)
        store.set_combined(lam, winner, loser)
        return lam
