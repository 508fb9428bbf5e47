"""The Diffusion-SDPO winner-preserving safeguard (Fu et al., arXiv 2511.03317).

Diffusion-DPO can raise the denoising error of the preferred (winner) image while the preference margin grows. The
safeguard scales the gradient of the loser's error by a scalar ``lambda`` chosen so that, to first order, the
winner's error does not increase:

    <g_w, g_w - lambda * g_l> >= mu * ||g_w||^2.

Two ways to evaluate it, one detached ``lambda`` per micro-batch either way:

* ``"output"`` space, the authors' rule: the gradients are taken with respect to the predictions, which treats the
  network Jacobians of the two branches as equal. From the policy's residuals ``r = prediction - target``
  (``N`` elements per branch):

      num    = sum(r_w * r_w)
      den    = sum(r_l * r_w)
      lambda = clamp((1 - mu) * num / (den + eps), 0, max_lambda)   if den > 0
      lambda = max_lambda                                            otherwise

  with ``eps = 1e-9 * N^2 / 4``: the authors add 1e-9 to the dot products of the gradients of the per-branch MEAN
  errors (``2 r / N``), which is this in residual-sum units.
* ``"parameter"`` space, exact: ``g_w`` and ``g_l`` are the gradients, over the trainable weights, of the loss's
  winner and loser terms, from one backward pass with the branches' gradients split inside it (the default), or one
  per branch with ``safeguard_passes="two"`` (:func:`parameter_space_lambda`, :func:`safeguarded_gradients`; the
  streaming implementation is in :mod:`.branches`).

Everything here is a pure function over tensors; sums are taken in float32 whatever the input dtype, because fp16
sums of squared residuals over a whole micro-batch overflow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..objectives import PreferencePredictions

__all__ = [
    "gradient_dots",
    "lambda_from_sums",
    "output_space_eps",
    "output_space_lambda",
    "parameter_space_lambda",
    "safeguard_sums",
    "safeguarded_gradients",
    "scale_gradient",
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


def scale_gradient(value: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Straight-through gradient scaling: returns ``value`` unchanged, with its gradient multiplied by ``scale``.

    ``value.detach() + scale * (value - value.detach())``: the forward value is exactly ``value`` and
    ``d out / d value = scale``.
    """
    detached = value.detach()
    return detached + scale * (value - detached)


def gradient_dots(
    winner_grads: Sequence[torch.Tensor | None], loser_grads: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(<g_w, g_w>, <g_w, h_l>)`` over lists of per-parameter gradients, accumulated in float32.

    ``None`` entries (a parameter without a gradient in that branch) count as zeros.
    """
    if len(winner_grads) != len(loser_grads):
        raise ValueError(f"{len(winner_grads)} winner gradients but {len(loser_grads)} loser gradients")
    sq = torch.zeros((), dtype=torch.float32)
    cross = torch.zeros((), dtype=torch.float32)
    for g_w, h_l in zip(winner_grads, loser_grads):
        if g_w is None:
            continue
        flat_w = g_w.detach().reshape(-1).float()
        sq = sq.to(flat_w.device) + torch.dot(flat_w, flat_w)
        if h_l is not None:
            cross = cross.to(flat_w.device) + torch.dot(flat_w, h_l.detach().reshape(-1).float())
    return sq, cross.to(sq.device)


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
    winner_residual = predictions.policy_winner - predictions.target_winner
    loser_residual = predictions.policy_loser - predictions.target_loser
    num, den = safeguard_sums(winner_residual, loser_residual)
    count: int | torch.Tensor = winner_residual.numel()
    if not contributes:
        num, den, count = torch.zeros_like(num), torch.zeros_like(den), 0
    if reduce_sum is not None:
        # torch.full, not torch.tensor: a host-to-device copy would make the host wait for the device
        num, den, count = reduce_sum(torch.stack([num, den, torch.full_like(num, float(count))]))
    return lambda_from_sums(num, den, mu, max_lambda, count)


def parameter_space_lambda(
    winner_sq_norm: torch.Tensor, winner_loser_dot: torch.Tensor, mu: float, max_lambda: float = 1.0
) -> torch.Tensor:
    """The exact Diffusion-SDPO ``lambda`` from parameter-gradient dot products (a detached float32 0-dim tensor).

    With ``g_w`` the gradient of the loss's winner term and ``g_l`` the gradient of its loser term taken with the
    sign of the errors (so the Diffusion-DPO gradient is ``g_w - g_l``)::

        lambda = clamp((1 - mu) * <g_w, g_w> / <g_w, g_l>, 0, max_lambda)   if <g_w, g_l> > 0
        lambda = max_lambda                                                   otherwise

    Args:
        winner_sq_norm: ``<g_w, g_w>``.
        winner_loser_dot: ``<g_w, g_l>`` (errors' sign convention: positive when the loser term's descent direction
            also raises the winner's error, the case the safeguard restricts).
        mu: safeguard margin in [0, 1].
        max_lambda: upper bound of ``lambda``.
    """
    sq = winner_sq_norm.detach().float()
    dot = winner_loser_dot.detach().float()
    ratio = torch.where(dot > 0, (1.0 - mu) * sq / torch.where(dot > 0, dot, torch.ones_like(dot)), max_lambda)
    return ratio.clamp(min=0.0, max=max_lambda)


def safeguarded_gradients(
    winner_grads: Sequence[torch.Tensor | None],
    loser_grads: Sequence[torch.Tensor | None],
    mu: float,
    max_lambda: float = 1.0,
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """The parameter-space safeguard as a pure function: the gradient handed to the optimizer, and ``lambda``.

    Args:
        winner_grads: per-parameter gradients of the loss's winner term, ``d/dtheta <dL/dpred_w, pred_w(theta)>``.
        loser_grads: per-parameter gradients of the loss's loser term as the loss sees them,
            ``h_l = d/dtheta <dL/dpred_l, pred_l(theta)>``; the full Diffusion-DPO gradient is ``g_w + h_l``. In the
            errors' sign convention ``g_l = -h_l``.
        mu: see :func:`parameter_space_lambda`.
        max_lambda: see :func:`parameter_space_lambda`.

    Returns:
        ``g_w + lambda * h_l`` (``= g_w - lambda * g_l``: the Diffusion-DPO gradient with its loser term scaled by
        ``lambda``; ``lambda = 1`` is plain Diffusion-DPO) and ``lambda``.

    Guarantee: let ``W(theta) = <dL/dpred_w, pred_w(theta)>`` be the loss's winner term with its coefficients held
    at their current values (for Diffusion-DPO ``W = sum_i a_i e_w,i`` with ``a_i = dL/de_w,i > 0``). A gradient step
    ``theta - eta * g`` with the returned ``g`` changes ``W`` by ``-eta <g_w, g> + O(eta^2)`` and
    ``<g_w, g> = |g_w|^2 - lambda <g_w, g_l> >= mu |g_w|^2 >= 0``: to first order the winner term does not increase.
    With equal pair weights ``a_i``, the case at the start of training (policy = reference, ``u = 0``), ``W`` is a
    positive multiple of the micro-batch's mean winner error. No assumption on the network's Jacobians is made.
    """
    sq, cross = gradient_dots(winner_grads, loser_grads)
    lam = parameter_space_lambda(sq, -cross, mu, max_lambda)
    combined: list[torch.Tensor | None] = []
    for g_w, h_l in zip(winner_grads, loser_grads):
        if g_w is None and h_l is None:
            combined.append(None)
        elif h_l is None:
            combined.append(g_w.detach().clone())
        elif g_w is None:
            combined.append(lam.to(h_l) * h_l.detach())
        else:
            combined.append(g_w.detach() + lam.to(h_l) * h_l.detach())
    return combined, lam
