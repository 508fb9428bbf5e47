"""The one pass's buffer in pieces gives the whole gradient's inner products and combination, on one process and on
two.

A large model's buffer is cut into pieces of consecutive weights (``engines/memory/pieces.py``); every tiny test model
fits in one piece, so here the piece size is forced small (``PIECE_ELEMENTS``) and a small network of linear layers
spans several pieces. Through the store's documented API (``split`` around the forward and backward, ``branch_sums``
with the global scope's averaging of the winner's gradient, ``combine``), ``<g_w, g_w>``, ``<g_w, h_l>``, ``lambda``
and the combined ``.grad`` are checked against the whole gradients computed independently by ``torch.autograd.grad``
of each branch alone (on two processes: averaged over them with ``all_gather``).
"""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from trl_diffusion_sdpo import parameter_space_lambda
from trl_diffusion_sdpo.engines.memory import pieces
from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients

PAIRS = 3
MU = 0.5
# 144 + 272 + 272 + 68 weights (eight tensors) in pieces of 150 elements: six pieces
PIECE = 150


def network() -> nn.Module:
    """The same double-precision network on every process."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    ).double()


def branches(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A micro-batch of ``PAIRS`` winner and loser inputs (a loser near its winner, so that the branches' gradients
    correlate and the rule binds) and the loss's cotangents on each branch's outputs."""
    generator = torch.Generator().manual_seed(seed)
    winners = torch.randn(PAIRS, 8, generator=generator, dtype=torch.float64)
    losers = winners + 0.3 * torch.randn(PAIRS, 8, generator=generator, dtype=torch.float64)
    cot_winner = torch.randn(PAIRS, 4, generator=generator, dtype=torch.float64)
    cot_loser = -cot_winner + 0.5 * torch.randn(PAIRS, 4, generator=generator, dtype=torch.float64)
    return winners, losers, cot_winner, cot_loser


def whole_gradients(model: nn.Module, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(g_w, h_l)``: each branch's gradient by autograd, one pass per branch."""
    winners, losers, cot_winner, cot_loser = branches(seed)
    params = list(model.parameters())
    g_w = torch.autograd.grad((model(winners) * cot_winner).sum(), params)
    h_l = torch.autograd.grad((model(losers) * cot_loser).sum(), params)
    return list(g_w), list(h_l)


def one_pass(model: nn.Module, seed: int, reduce_winner=None) -> tuple[int, float, float, float]:
    """One tapped forward and backward of the micro-batch, ``lambda`` from the store's sums and ``.grad`` set to the
    combination: ``(pieces, <g_w, g_w>, <g_w, h_l>, lambda)``."""
    winners, losers, cot_winner, cot_loser = branches(seed)
    store = OnePassBranchGradients(model, list(model.parameters()))
    with store.split(2):
        out_winner, out_loser = model(torch.cat([winners, losers])).chunk(2)
        torch.autograd.backward((out_winner, out_loser), (cot_winner, cot_loser))
    winner_sq, cross = store.branch_sums(reduce_winner)
    if reduce_winner is not None:  # the global scope: the cross term of the averaged winner, averaged too
        torch.distributed.all_reduce(cross)
        cross = cross / torch.distributed.get_world_size()
    lam = parameter_space_lambda(winner_sq, cross, MU)
    store.combine(lam)
    return len(store.pieces), float(winner_sq), float(cross), float(lam)


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def rule(winner_sq: float, cross: float) -> float:
    """The paper's rule: ``lambda = clamp((1 - mu) <g_w, g_w> / -<g_w, h_l>, 0, 1)`` where the loser's term raises
    the winner's error, else 1."""
    return min(max((1 - MU) * winner_sq / -cross, 0.0), 1.0) if cross < 0 else 1.0


def combined(g_w: list[torch.Tensor], h_l: list[torch.Tensor], lam: float) -> list[torch.Tensor]:
    """``g_w + lambda h_l``, with the ``lambda`` the trainer uses (a float32 number)."""
    return [w + lam * h for w, h in zip(g_w, h_l)]


def test_several_pieces_give_the_whole_gradients_sums_lambda_and_combination(monkeypatch) -> None:
    monkeypatch.setattr(pieces, "PIECE_ELEMENTS", PIECE)
    model = network()
    g_w, h_l = whole_gradients(model, seed=1)
    count, winner_sq, cross, lam = one_pass(model, seed=1)
    assert count == 6  # the case under test: the buffer in several pieces
    assert winner_sq == pytest.approx(dot(g_w, g_w), rel=1e-10)
    assert cross == pytest.approx(dot(g_w, h_l), rel=1e-10)
    want_lam = rule(dot(g_w, g_w), dot(g_w, h_l))
    assert 0.0 < want_lam < 1.0  # the rule binds: a lambda from part of the gradient would differ
    assert lam == pytest.approx(want_lam, rel=1e-6)  # float32
    for p, g in zip(model.parameters(), combined(g_w, h_l, lam)):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------- two processes


def _worker(rank: int, port: int, queue) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    pieces.PIECE_ELEMENTS = PIECE  # this process's own copy of the module
    try:

        def average(tensors: list[torch.Tensor]) -> None:  # the global scope's in-place mean over processes
            for tensor in tensors:
                torch.distributed.all_reduce(tensor)
                tensor.div_(2)

        model = network()
        g_w, h_l = whole_gradients(model, seed=10 + rank)  # each process its own pairs
        count, winner_sq, cross_found, lam = one_pass(model, seed=10 + rank, reduce_winner=average)
        gathered = [[torch.empty_like(w) for w in g_w] for _ in range(2)]
        for k, w in enumerate(g_w):
            torch.distributed.all_gather([gathered[0][k], gathered[1][k]], w)
        mean_winner = [(a + b) / 2 for a, b in zip(*gathered)]
        cross = torch.tensor(dot(mean_winner, h_l), dtype=torch.float64)
        torch.distributed.all_reduce(cross)
        want_lam = rule(dot(mean_winner, mean_winner), float(cross) / 2)
        want = combined(mean_winner, h_l, lam)
        queue.put(
            (
                rank,
                {
                    "pieces": count,
                    "winner_sq": (winner_sq, dot(mean_winner, mean_winner)),
                    "cross": (cross_found, float(cross) / 2),
                    "lambda": (lam, want_lam),
                    # numpy copies: a tensor sent through the queue shares memory that dies with this process
                    "grads": [(p.grad.numpy().copy(), g.numpy().copy()) for p, g in zip(model.parameters(), want)],
                },
            )
        )
    finally:
        torch.distributed.destroy_process_group()


def test_on_two_processes_every_piece_of_the_winners_gradient_is_averaged() -> None:
    """The global scope: ``g_w`` averaged over processes in every piece before ``<g_w, g_w>``, ``<g_w, h_l>`` and the
    combination, each process combining the mean winner with its own loser (the engine averages the rest)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Forked, the processes start with this one's imports: spawned, each imports torch, diffusers (through the
    # store's layer taps) and the package afresh, ~10 s of a 2-core machine. Where a GPU is, autograd's device threads
    # (started by any earlier backward in this process) leave a forked child unable to run a backward: spawn there.
    ctx = mp.get_context("spawn" if torch.cuda.is_available() else "fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=300) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for rank, found in results.items():
        assert found["pieces"] == 6
        for name, rel in (("winner_sq", 1e-10), ("cross", 1e-10), ("lambda", 1e-6)):
            got, want = found[name]
            assert got == pytest.approx(want, rel=rel), (rank, name)
        assert 0.0 < found["lambda"][1] < 1.0, rank
        for got, want in found["grads"]:
            torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-10, atol=1e-12)
    assert results[0]["lambda"] == results[1]["lambda"]  # one lambda for the global micro-batch
