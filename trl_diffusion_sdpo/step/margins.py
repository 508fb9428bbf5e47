"""The preference margin by timestep quartile: where along the noise schedule the margin grows.

For each quartile ``q`` of the training timesteps ``[0, T)`` (``T`` the scheduler's ``num_train_timesteps``), a log
reports ``margin/t_q{q}`` = the mean logit ``u`` over the pairs drawn in that quartile since the last log, over every
process. Each micro-batch records the quartile's sum and count as two metrics (device tensors, no host sync);
:func:`finish_margin_quartiles` divides the reduced means, which is the pooled mean since both are averaged over the
same micro-batches.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

__all__ = ["QUARTILE_METRICS", "finish_margin_quartiles", "record_margin_quartiles"]

QUARTILES = 4
#: the recorded metrics (sum and count per quartile), reduced with the others and replaced by ``margin/t_q{q}``
QUARTILE_METRICS = tuple(f"margin/t_q{q}_{part}" for q in range(1, QUARTILES + 1) for part in ("sum", "count"))


def record_margin_quartiles(
    stored: MutableMapping[str, list[torch.Tensor]],
    logits: torch.Tensor,
    timesteps: torch.Tensor,
    num_train_timesteps: int,
) -> None:
    """Append one micro-batch's per-quartile sums and counts of ``logits`` (``[B]``) by ``timesteps`` (``[B]``)."""
    quartile = (timesteps.detach().float() * QUARTILES / num_train_timesteps).floor().clamp(0, QUARTILES - 1)
    u = logits.detach().float()
    for q in range(QUARTILES):
        inside = (quartile == q).float()
        stored[f"margin/t_q{q + 1}_sum"].append((u * inside).sum())
        stored[f"margin/t_q{q + 1}_count"].append(inside.sum())


def finish_margin_quartiles(reduced: dict[str, float]) -> None:
    """Replace the reduced sums and counts in ``reduced`` by ``margin/t_q{q}`` (quartiles without pairs left out)."""
    for q in range(1, QUARTILES + 1):
        total, count = reduced.pop(f"margin/t_q{q}_sum", None), reduced.pop(f"margin/t_q{q}_count", None)
        if total is not None and count:
            reduced[f"margin/t_q{q}"] = total / count
