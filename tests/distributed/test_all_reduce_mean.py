"""``all_reduce_mean_`` over two gloo processes: views of one buffer lying back to back (the one pass's rows, its
weights' ``.grad``) are averaged where they lie, in one collective; other tensors one at a time; both equal the
mean."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trl_diffusion_sdpo.engines import collectives

SHAPES = [(3, 4), (5,), (2, 2, 2)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(back_to_back: bool) -> list[torch.Tensor]:
    """Per shape a tensor: views of a buffer's second row (as the one pass hands ``.grad``), or separate ones."""
    sizes = [torch.Size(s).numel() for s in SHAPES]
    if back_to_back:
        return [c.view(s) for c, s in zip(torch.zeros(2, sum(sizes), dtype=torch.float64)[1].split(sizes), SHAPES)]
    return [torch.zeros(s, dtype=torch.float64) for s in SHAPES]


def _worker(rank: int, port: int, back_to_back: bool, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    from accelerate import PartialState

    PartialState(cpu=True, backend="gloo")  # accelerate's reduce (the one-by-one path) reads its state
    try:
        sizes = [torch.Size(s).numel() for s in SHAPES]
        values = torch.arange(sum(sizes), dtype=torch.float64) * (rank + 1)
        tensors = _tensors(back_to_back)
        for t, v in zip(tensors, values.split(sizes)):
            t.copy_(v.view_as(t))
        reduced_in_place = collectives._back_to_back(tensors) is not None
        collectives.all_reduce_mean_(tensors)
        results[rank] = (torch.cat([t.reshape(-1) for t in tensors]), reduced_in_place)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("back_to_back", [True, False], ids=["one-buffer", "separate"])
@pytest.mark.slow  # two spawned processes
def test_all_reduce_mean_averages_views_of_one_buffer_in_place_and_separate_tensors_one_by_one(back_to_back):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), back_to_back, results), nprocs=2, join=True)
    total = sum(torch.Size(s).numel() for s in SHAPES)
    expected = torch.arange(total, dtype=torch.float64) * 1.5  # the mean of (rank + 1) x values over ranks 0 and 1
    for rank in (0, 1):
        reduced, in_place = results[rank]
        torch.testing.assert_close(reduced, expected, rtol=0, atol=0)
        assert in_place == back_to_back
