"""The metrics stage: reduction over micro-batches and processes, against hand-computed values."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from trl_diffusion_sdpo.step.predictions import reduce_metrics

NAMES = ["data/skipped_rows", "implicit_acc", "safeguard/lambda", "safeguard/output_lambda"]


def stored_values() -> defaultdict[str, list[torch.Tensor]]:
    stored: defaultdict[str, list[torch.Tensor]] = defaultdict(list)
    for skipped, acc, lam, out in [(1.0, 0.5, 0.25, 1.0), (2.0, 1.0, 1.0, 0.5)]:
        stored["data/skipped_rows"].append(torch.tensor(skipped))
        stored["implicit_acc"].append(torch.tensor(acc))
        stored["safeguard/lambda"].append(torch.tensor(lam))
        stored["safeguard/output_lambda"].append(torch.tensor(out))
    return stored


def test_one_process_means_sums_extremes_and_engagement():
    stored = stored_values()
    reduced = reduce_metrics(stored, NAMES, max_lambda=1.0, device="cpu")
    assert reduced["data/skipped_rows"] == 3.0  # summed, not averaged
    assert reduced["implicit_acc"] == pytest.approx(0.75)
    assert reduced["safeguard/lambda_mean"] == pytest.approx(0.625)
    assert (reduced["safeguard/lambda_min"], reduced["safeguard/lambda_max"]) == (0.25, 1.0)
    assert reduced["safeguard/engaged"] == 0.5  # one of two micro-batches below max_lambda
    assert reduced["safeguard/output_lambda_engaged"] == 0.5
    assert not stored  # cleared for the next logging window


def test_several_processes_combine_partial_sums_and_extremes():
    # A second process recorded one micro-batch: skipped 4, accuracy 0, lambda 0.1, output lambda 1.
    other = {"sums": torch.tensor([4.0, 0.0, 0.1, 1.0, 1.0, 0.0]), "counts": torch.tensor([1.0] * 6)}
    other_extremes = torch.tensor([-0.1, 0.1, -1.0, 1.0])

    def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
        return t + torch.stack([other["sums"], other["counts"]])

    def all_gather(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, other_extremes.reshape(1, -1)])

    reduced = reduce_metrics(stored_values(), NAMES, 1.0, "cpu", all_reduce_sum, all_gather)
    assert reduced["data/skipped_rows"] == 7.0
    assert reduced["implicit_acc"] == pytest.approx(0.5)  # (0.5 + 1.0 + 0.0) / 3
    assert reduced["safeguard/lambda_mean"] == pytest.approx((0.25 + 1.0 + 0.1) / 3)
    assert reduced["safeguard/lambda_min"] == pytest.approx(0.1)
    assert reduced["safeguard/lambda_max"] == 1.0
    assert reduced["safeguard/engaged"] == pytest.approx(2 / 3)
