"""Keyed draws are made for the global micro-batch and each process keeps its own rows: two processes' draws, put
together, are one process's draws for the same global batch."""

from __future__ import annotations

import torch

from trl_diffusion_sdpo.step.stages import MicroBatchDraws


def _processes(rows_per_process: int, count: int) -> list[MicroBatchDraws]:
    return [MicroBatchDraws(7, rows_per_process, rows_per_process, rank, count, "cpu") for rank in range(count)]


def test_two_processes_keep_their_rows_of_one_process_draws():
    (whole,) = _processes(4, 1)
    halves = _processes(2, 2)
    expected = whole.augmentation(whole.generator("train", 3), "train", 4, independent=True, cropping=True)
    parts = [d.augmentation(d.generator("train", 3), "train", 2, independent=True, cropping=True) for d in halves]
    for i, tensor in enumerate(expected):
        assert torch.equal(torch.cat([part[i] for part in parts]), tensor)
    # a noise-like draw through span and local, as the noising stage makes it
    n, rows = whole.span("train", 4)
    expected = whole.local((torch.randn((n, 3), generator=whole.generator("train", 4)),), rows)[0]
    kept = []
    for d in halves:
        n, rows = d.span("train", 2)
        assert n == 4  # every process draws the global micro-batch
        kept.append(d.local((torch.randn((n, 3), generator=d.generator("train", 4)),), rows)[0])
    assert torch.equal(torch.cat(kept), expected)


def test_a_short_last_micro_batch_keeps_the_rows_a_full_one_would_start_at():
    # process 1 of 2 with 1 row left of its 2: it keeps global row 2, as with a full micro-batch
    assert _processes(2, 2)[1].span("train", 1) == (4, slice(2, 3))
    assert _processes(2, 2)[0].span("eval", 2) == (4, slice(0, 2))
