"""``all_reduce_mean_`` on two gloo processes: every tensor becomes the mean over processes, in place, any dtype."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

SHAPES = [(3, 4), (7,), (2, 2, 2), ()]
DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.float64]


def _tensors(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape, dtype in zip(SHAPES, DTYPES)]


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    from accelerate import PartialState

    from trl_diffusion_sdpo.engines.collectives import all_reduce_mean_

    PartialState(cpu=True)  # the gloo process group, as accelerate sets it up for a run
    tensors = _tensors(rank)
    objects = [t.data_ptr() for t in tensors]
    all_reduce_mean_(tensors)
    # plain lists: a shared tensor would not outlive its process
    queue.put((rank, [t.double().tolist() for t in tensors], [t.data_ptr() for t in tensors] == objects))
    torch.distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # by default: test_distributed.py's parameter-space global scope (all_reduce_mean_) trains like one
def test_all_reduce_mean_averages_every_tensor_in_place_over_two_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((rank, (tensors, same)) for rank, tensors, same in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=600)  # a loaded machine takes its time to end two torch processes: None is still running
    assert [p.exitcode for p in procs] == [0, 0]
    first, second = _tensors(0), _tensors(1)
    for rank, (values, same_storage) in results.items():
        tensors = [torch.tensor(v, dtype=torch.float64).to(dtype) for v, dtype in zip(values, DTYPES)]
        assert same_storage, f"process {rank}: the tensors were replaced, not averaged in place"
        for got, a, b, dtype in zip(tensors, first, second, DTYPES):
            assert got.shape == a.shape
            expected = ((a.double() + b.double()) / 2).to(dtype)
            torch.testing.assert_close(got, expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
        for got, a in zip(tensors, first if rank == 0 else second):  # not left as they were
            assert not torch.equal(got, a)


def test_all_reduce_mean_on_one_process_leaves_the_tensors_alone():
    from trl_diffusion_sdpo.engines.collectives import all_reduce_mean_

    tensors = _tensors(0)
    all_reduce_mean_(tensors)
    for got, a in zip(tensors, _tensors(0)):
        assert torch.equal(got, a)
