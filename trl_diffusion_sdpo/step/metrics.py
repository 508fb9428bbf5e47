"""The step's last stage: metrics recorded as device tensors every micro-batch, reduced only when logging.

Recording never makes the host wait for the device. :func:`reduce_metrics` turns what was recorded since the last
log into floats with one all-reduce and one gather over the processes, however many metrics there are, and a single
host sync.

The margin by timestep quartile, where along the noise schedule the margin grows: for each quartile ``q`` of the
training timesteps ``[0, T)`` (``T`` the scheduler's ``num_train_timesteps``), a log reports ``margin/t_q{q}`` = the
mean logit ``u`` over the pairs drawn in that quartile since the last log, over every process. Each micro-batch
records the quartile's sum and count as two metrics (device tensors, no host sync); :func:`finish_margin_quartiles`
divides the reduced means, which is the pooled mean since both are averaged over the same micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence

import torch

from ..objectives import DenoisingErrors, ObjectiveOutput, PreferenceObjective, implicit_accuracy

__all__ = [
    "QUARTILE_METRICS",
    "finish_margin_quartiles",
    "metric_names",
    "record_margin_quartiles",
    "record_metrics",
    "reduce_metrics",
]

Stored = MutableMapping[str, list[torch.Tensor]]


def metric_names(objective: PreferenceObjective, safeguard_names: Sequence[str] = ()) -> list[str]:
    """The metrics every micro-batch records: the data's, the objective's and the safeguard's (its
    ``metric_names``), the same list on every process, since they are reduced together."""
    names = ["data/skipped_rows", "implicit_acc", "margin", "mse/policy_winner", "mse/policy_loser"]
    if objective.requires_reference:
        names += ["mse/ref_winner", "mse/ref_loser", "delta/winner", "delta/loser"]
    names += list(getattr(objective, "metric_names", ()))  # a user's objective may declare none
    return names + list(safeguard_names)


def record_metrics(
    stored: Stored,
    errors: DenoisingErrors,
    output: ObjectiveOutput,
    lambdas: dict[str, torch.Tensor | None],
) -> None:
    """Append one micro-batch's metrics to ``stored`` (detached device tensors)."""
    stored["implicit_acc"].append(implicit_accuracy(output.logits.detach()))
    stored["margin"].append(output.logits.detach().float().mean())  # the mean logit u (the objective's margin)
    for name, value in output.metrics.items():
        stored[name].append(value.detach().float().mean())
    stored["mse/policy_winner"].append(errors.policy_winner.detach().mean())
    stored["mse/policy_loser"].append(errors.policy_loser.detach().mean())
    if errors.reference_winner is not None:
        stored["mse/ref_winner"].append(errors.reference_winner.mean())
        stored["mse/ref_loser"].append(errors.reference_loser.mean())
        stored["delta/winner"].append((errors.policy_winner.detach() - errors.reference_winner).mean())
        stored["delta/loser"].append((errors.policy_loser.detach() - errors.reference_loser).mean())
    for name, lam in lambdas.items():
        if lam is not None:
            stored[name].append(lam)


def reduce_metrics(
    stored: Stored,
    names: list[str],
    max_lambda: float,
    device: torch.device | str,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Means over the micro-batches of all processes since the last log, and ``stored`` cleared.

    ``data/skipped_rows`` is summed; each ``safeguard/*lambda`` gives ``_mean``, ``_min``, ``_max`` and the fraction
    of micro-batches below ``max_lambda`` (``safeguard/engaged`` for the rule in force, ``<name>_engaged`` for the
    other). ``all_reduce_sum`` and ``all_gather`` (``None`` on one process) combine the processes' partial sums.
    """
    lambdas = [n for n in names if n.startswith("safeguard/") and n.endswith("lambda")]
    # per metric: sum and count; per lambda: the count below max_lambda (engaged), and -min and max
    sums = torch.zeros(len(names) + len(lambdas), device=device)
    counts = torch.zeros_like(sums)
    extremes = torch.full((2 * len(lambdas),), -torch.inf, device=device)
    for i, name in enumerate(names):
        values = stored.get(name)
        if not values:
            continue
        stacked = torch.cat([v.detach().float().reshape(-1).to(device) for v in values])  # the pair scope: a vector
        sums[i], counts[i] = stacked.sum(), stacked.numel()
        if name in lambdas:
            k = lambdas.index(name)
            sums[len(names) + k] = (stacked < max_lambda).float().sum()
            counts[len(names) + k] = stacked.numel()
            extremes[2 * k], extremes[2 * k + 1] = -stacked.min(), stacked.max()
    stored.clear()
    if all_reduce_sum is not None:
        totals = all_reduce_sum(torch.stack([sums, counts]))
        sums, counts = totals[0], totals[1]
    if all_gather is not None:
        extremes = all_gather(extremes.reshape(1, -1)).amax(dim=0)
    sums, counts, extremes = sums.tolist(), counts.tolist(), extremes.tolist()  # the one host sync
    reduced: dict[str, float] = {}
    for i, name in enumerate(names):
        if counts[i] == 0:
            continue
        if name == "data/skipped_rows":
            reduced[name] = sums[i]
        elif name in lambdas:
            k = lambdas.index(name)
            reduced[f"{name}_mean"] = sums[i] / counts[i]
            reduced[f"{name}_min"] = -extremes[2 * k]
            reduced[f"{name}_max"] = extremes[2 * k + 1]
            engaged = "safeguard/engaged" if name == "safeguard/lambda" else f"{name}_engaged"
            reduced[engaged] = sums[len(names) + k] / counts[len(names) + k]
        else:
            reduced[name] = sums[i] / counts[i]
    return reduced


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
