"""The update space on sharded weights (FSDP2's case, simulated without processes): ``OptimizerUpdate`` on each of two
shards of every tensor, with a reduction that adds up the two shards' partial sums, gives the ``D(lambda)`` and the
``lambda`` of ``OptimizerUpdate`` on the whole weights, the same on both shards.

The two shards run in two threads; the reduction is an all-reduce between them (a barrier, then both read
``partial_0 + partial_1`` in that order: the same bits on both, as an all-reduce hands every process)."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.helpers.update_space_problems import _counted, _grouped_problem
from trl_diffusion_sdpo.safeguards.update_space import OptimizerUpdate, update_space_lambda

LAMBDAS = torch.linspace(0, 1, 9, dtype=torch.float64)


def _shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """Process ``rank``'s shard of ``tensor`` among two, as FSDP2 cuts it: ``torch.chunk`` along the first dimension,
    an empty shard past the last chunk (a one-row tensor leaves the second process nothing)."""
    chunks = tensor.detach().chunk(2, dim=0)
    return chunks[rank].clone() if rank < len(chunks) else tensor.detach().new_empty((0, *tensor.shape[1:]))


def _sharded(params, optimizer, g_w, h_l, rank: int):
    """``rank``'s shards of the weights, of an optimizer with the same groups and the same state, and of the
    gradients (separate tensors, as FSDP2's per-parameter gradient shards)."""
    shards = [torch.nn.Parameter(_shard(p, rank)) for p in params]
    index = {id(p): i for i, p in enumerate(params)}
    groups = [{**group, "params": [shards[index[id(p)]] for p in group["params"]]} for group in optimizer.param_groups]
    sharded = type(optimizer)(groups)
    for p, shard in zip(params, shards):
        sharded.state[shard] = {
            k: v.clone() if k == "step" else (None if v is None else _shard(v, rank))
            for k, v in optimizer.state[p].items()
        }
    return shards, sharded, [_shard(w, rank) for w in g_w], [_shard(h, rank) for h in h_l]


class _TwoShardSum:
    """An all-reduce between two threads: each hands its partial sums and both get their total; calls counted."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=10)  # a missed collective fails, not hangs
        self.partials: list[torch.Tensor | None] = [None, None]
        self.calls = [0, 0]

    def of(self, rank: int):
        def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.partials[rank] = tensor.clone()
            self.barrier.wait()
            total = self.partials[0] + self.partials[1]
            self.barrier.wait()  # both have read before either hands the next call's partial
            return tensor.copy_(total)

        return reduce_sum


def _on_two_shards(problem, max_grad_norm: float, mu: float) -> tuple[list[tuple], _TwoShardSum]:
    """Per shard: ``(D at LAMBDAS, lambda, infeasible, evaluation passes of the search)``, both shards run together."""
    reduction, results, errors = _TwoShardSum(), [None, None], []

    def run(rank: int) -> None:
        try:
            params, optimizer, g_w, h_l = _sharded(*problem, rank)
            update = OptimizerUpdate(
                optimizer, params, g_w, h_l, max_grad_norm, unscale=0.5, reduce_sum=reduction.of(rank)
            )
            decreases = update.winner_decreases(LAMBDAS)
            passes = _counted(update)
            lam, infeasible = update_space_lambda(update, mu)
            results[rank] = (decreases, lam, infeasible, passes)
        except BaseException as error:  # a hang in the other thread would hide it: break the barrier
            errors.append(error)
            reduction.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results, reduction


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd-momentum", "sgd-nesterov"])
@pytest.mark.parametrize("max_grad_norm", [0.0, 2.0], ids=["unclipped", "clipped"])
def test_optimizer_update_on_two_shards_with_a_reduction_is_that_of_the_whole_weights(kind, max_grad_norm):
    """Every sum the update forms over the shards (the clip coefficient's three, AdamW's weight-decay term, SGD's
    four, D at each evaluation) is added up over them: D and lambda are the whole weights', on both shards alike.

    Tolerance: the shards' float64 sums differ from the whole's by their order only (~1e-16 relative per term), so
    D agrees to 1e-12 relative; lambda is decided on D at float32 candidates, which such rounding moves only where D
    lies within 1e-15 of the target there: lambda is equal. One collective builds the update, one per evaluation
    pass of Adam's search; SGD's search reads its four sums, added up once, and needs none."""
    binding = 0
    for seed, conflict in ((0, 1.5), (2, 3.0)):
        problem = _grouped_problem(kind, seed, conflict)
        params, optimizer, g_w, h_l = problem
        whole = OptimizerUpdate(optimizer, params, g_w, h_l, max_grad_norm, unscale=0.5)
        if max_grad_norm:  # the clip coefficient binds: its sums matter
            assert (whole.clip_coefficient(LAMBDAS) < 1).all()
        expected_decreases = whole.winner_decreases(LAMBDAS)
        expected_lam, expected_infeasible = update_space_lambda(whole, 0.9)
        binding += 0.0 < expected_lam.item() < 1.0
        results, reduction = _on_two_shards(problem, max_grad_norm, 0.9)
        for decreases, lam, infeasible, passes in results:
            assert torch.equal(decreases, results[0][0])  # the same bits on both shards: the same host decisions
            torch.testing.assert_close(decreases, expected_decreases, rtol=1e-12, atol=1e-15)
            assert lam.item() == expected_lam.item() and infeasible.item() == expected_infeasible.item()
            assert reduction.calls == [2 + len(passes)] * 2 if kind.startswith("adam") else [1, 1]
    assert binding  # the margin binds in at least one problem: lambda is found by the search, not capped
