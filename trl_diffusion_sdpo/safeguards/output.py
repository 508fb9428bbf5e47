"""The authors' output-space rule with its formula.

It acts on the predictions of the trainer's one forward pass and leaves the backward to the engine: its hook
(:meth:`OutputSpace.loser_weight`) chooses ``lambda`` on the policy's residuals before the objective
(:func:`output_space_lambda`), and the trainer weights the gradient of the loser's error by it
(:func:`~trl_diffusion_sdpo.step.predictions.scale_gradient`).

The rule (Fu et al., arXiv 2511.03317) is the package's rule (:mod:`trl_diffusion_sdpo.safeguards`) with the
gradients taken with respect to the predictions, which treats the network Jacobians of the two branches as equal.
Then ``g_w`` is a positive multiple of the winner's residual ``r_w = prediction - target`` and ``h_l`` the same
multiple of ``-r_l`` (the loss lowers the winner's error and raises the loser's), so ``-<g_w, h_l>`` and
``|g_w|^2`` are, up to one positive factor, ``sum(r_l * r_w)`` and ``sum(r_w * r_w)`` over the ``N`` elements of a
branch::

    num    = sum(r_w * r_w)
    den    = sum(r_l * r_w)                                     (= -<g_w, h_l> in residual-sum units)
    lambda = clamp((1 - mu) * num / (den + eps), 0, max_lambda)   if den > 0
    lambda = max_lambda                                            otherwise

with ``eps = 1e-9 * N^2 / 4``: the authors add 1e-9 to the dot products of the gradients of the per-branch MEAN
errors (``2 r / N``), which is this in residual-sum units. Sums are taken in float32 whatever the input dtype,
because fp16 sums of squared residuals over a whole micro-batch overflow.

With a loss mask the residuals are weighted first, ``r <- w * r`` with ``w = m * N_i / sum(m)`` per sample
(:func:`~trl_diffusion_sdpo.objectives.masked_residual`): then the sums are those of the masked errors' gradients,
so the winner-preserving constraint holds on the region trained.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..engines.collectives import all_reduce_sum
from ..objectives import PreferencePredictions, masked_residual
from .base import Safeguard
from .margin import SafeguardMargin

__all__ = [
    "OutputSpace",
    "OutputSpaceRule",
    "lambda_from_sums",
    "output_space_eps",
    "output_space_lambda",
    "safeguard_sums",
    "winner_preserving_lambda",
]

_AUTHORS_EPS = 1e-9  # added to den in units of the gradients of the per-branch mean errors


def output_space_eps(num_elements: int) -> float:
    """The authors' ``1e-9`` in residual-sum units: ``1e-9 * N^2 / 4`` for ``N`` elements per branch.

    The authors differentiate the per-branch MEAN errors, whose gradients are ``2 r / N``; their dot products are
    ``4 / N^2`` times the residual sums used here, so the same epsilon reads ``1e-9 * N^2 / 4`` in these units
    (about 4.3 for SD1.5 with 8 pairs, 69 for SDXL).
    """
    return _AUTHORS_EPS * float(num_elements) ** 2 / 4.0


def safeguard_sums(winner_residual: torch.Tensor, loser_residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(sum(r_w * r_w), sum(r_l * r_w))`` in float32, detached.

    These two scalars are all that ``lambda`` depends on; they are exposed separately so that several processes can
    all-reduce them and share one ``lambda`` for a global micro-batch.
    """
    if winner_residual.shape != loser_residual.shape:
        raise ValueError(
            f"winner and loser residuals must have the same shape, got {tuple(winner_residual.shape)} and "
            f"{tuple(loser_residual.shape)}"
        )
    r_w = winner_residual.detach().float()
    r_l = loser_residual.detach().float()
    return (r_w * r_w).sum(), (r_l * r_w).sum()


def lambda_from_sums(
    winner_sq_sum: torch.Tensor,
    cross_sum: torch.Tensor,
    mu: float,
    max_lambda: float = 1.0,
    num_elements: int | torch.Tensor = 0,
) -> torch.Tensor:
    """``lambda = clamp((1 - mu) * num / (den + eps), 0, max_lambda)`` if ``den > 0`` else ``max_lambda``.

    Args:
        winner_sq_sum: ``num = sum(r_w * r_w)``, a 0-dim tensor.
        cross_sum: ``den = sum(r_l * r_w)``, a 0-dim tensor.
        mu: the safeguard margin in [0, 1]; larger is more conservative (smaller ``lambda``).
        max_lambda: upper bound of ``lambda``; 1.0 recovers plain Diffusion-DPO when the constraint is inactive.
        num_elements: ``N``, elements per branch over which the sums ran (a tensor when it was all-reduced); sets
            ``eps = 1e-9 * N^2 / 4`` (:func:`output_space_eps`), the authors' epsilon. 0 gives ``eps = 0``.
    """
    num = winner_sq_sum.float()
    den = cross_sum.float()
    n = num_elements.double() if isinstance(num_elements, torch.Tensor) else float(num_elements)
    eps = (_AUTHORS_EPS * n * n / 4.0).float() if isinstance(n, torch.Tensor) else output_space_eps(num_elements)
    ratio = ((1.0 - mu) * num / (den + eps)).clamp(min=0.0, max=max_lambda)
    return torch.where(den > 0, ratio, torch.full_like(ratio, max_lambda))


def winner_preserving_lambda(
    winner_residual: torch.Tensor, loser_residual: torch.Tensor, mu: float, max_lambda: float = 1.0
) -> torch.Tensor:
    """The Diffusion-SDPO loser-gradient scale for one micro-batch (a detached float32 0-dim tensor).

    Args:
        winner_residual: policy prediction minus target on the winner images, shape ``[B, C, H, W]``.
        loser_residual: the same on the loser images, same shape, same timesteps and noise.
        mu: safeguard margin ``mu`` (authors: 0.9 for SD1.5 DPO, 0.6 for SDXL).
        max_lambda: upper bound of ``lambda`` (authors: 1.0).

    Returns:
        ``clamp((1 - mu) * sum(r_w^2) / (sum(r_l * r_w) + 1e-9 * N^2 / 4), 0, max_lambda)`` when
        ``sum(r_l * r_w) > 0``, else ``max_lambda`` (``N = winner_residual.numel()``; the epsilon is the authors', see
        :func:`output_space_eps`). Zero residuals give ``den = 0`` and hence ``max_lambda``.
    """
    num, den = safeguard_sums(winner_residual, loser_residual)
    return lambda_from_sums(num, den, mu, max_lambda, winner_residual.numel())


def output_space_lambda(
    predictions: PreferencePredictions,
    mu: float,
    max_lambda: float = 1.0,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    contributes: bool = True,
) -> torch.Tensor:
    """The authors' output-space ``lambda`` on the policy's residuals ``r = prediction - target``, one detached
    float32 scalar per micro-batch (see the module docstring for the formula).

    ``reduce_sum``, when given, sums ``[num, den, N]`` over processes first (``safeguard_scope="global"``), so
    ``lambda`` is that of the global micro-batch and the epsilon uses the global element count. ``contributes=False``
    (a zero-weighted replay of a process whose micro-batch lost every row): this process joins the reduction with
    ``[0, 0, 0]``, so ``lambda`` is that of the other processes' pairs.
    """
    winner_residual = masked_residual(predictions.policy_winner - predictions.target_winner, predictions.winner_mask)
    loser_residual = masked_residual(predictions.policy_loser - predictions.target_loser, predictions.loser_mask)
    num, den = safeguard_sums(winner_residual, loser_residual)
    count: int | torch.Tensor = winner_residual.numel()
    if not contributes:
        num, den, count = torch.zeros_like(num), torch.zeros_like(den), 0
    if reduce_sum is not None:
        # torch.full, not torch.tensor: a host-to-device copy would make the host wait for the device
        num, den, count = reduce_sum(torch.stack([num, den, torch.full_like(num, float(count))]))
    return lambda_from_sums(num, den, mu, max_lambda, count)


class OutputSpaceRule:
    """The authors' ``lambda`` with the config's margin, cap and scope: with ``safeguard_scope="global"`` on several
    processes its sums are added up over processes first (every process enters that reduction at every micro-batch;
    a replay adds zeros)."""

    def __init__(self, args, num_processes: int, margin: SafeguardMargin | None = None) -> None:
        self.margin = margin if margin is not None else SafeguardMargin.from_config(args, num_processes)
        self.max_lambda = args.safeguard_max_lambda
        self.reduce_sum = all_reduce_sum if args.safeguard_scope == "global" and num_processes > 1 else None

    @property
    def mu(self) -> float | torch.Tensor:
        return self.margin.value

    def __call__(self, predictions: PreferencePredictions, contributes: bool) -> torch.Tensor:
        return output_space_lambda(predictions, self.mu, self.max_lambda, self.reduce_sum, contributes=contributes)


class OutputSpace(Safeguard):
    """``safeguard_space="output"``: ``lambda`` from the residuals, the loser error's gradient weighted by it
    (:meth:`loser_weight`, before the objective; the engine's backward follows)."""

    name = "output"
    metric_names = ("safeguard/lambda",)

    def __init__(self, args, engine, *, lora: bool = True, trainable_elements: int = 0) -> None:
        super().__init__(args, engine)
        self.rule = OutputSpaceRule(args, engine.num_processes, self.margin)

    def loser_weight(self, predictions: PreferencePredictions, contributes: bool) -> torch.Tensor:
        return self.rule(predictions, contributes)

    def evaluation_lambdas(self, predictions: PreferencePredictions, contributes: bool) -> dict[str, torch.Tensor]:
        return {"safeguard/lambda": self.rule(predictions, contributes)}
