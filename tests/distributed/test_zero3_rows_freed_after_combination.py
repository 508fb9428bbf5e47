"""The one pass under ZeRO-3 gives the store's rows back as soon as the engine holds the combination: ZeRO-3's own
store on one process (a stand-in for the process group: one process, whose reduce-scatter hands its input back),
through DeepSpeed's accessors (a stand-in engine's partitions); each micro-batch's ``g_w + lambda h_l`` reaches the
engine's partitions (equal to autograd's per-branch gradients, computed apart), and after each hand-over, mid-window
and at the step, the store's pieces hold no bytes; the next micro-batch's pass takes them again and is right again."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from trl_diffusion_sdpo.engines import DeepSpeedEngine
from trl_diffusion_sdpo.safeguards.gradients import one_pass_sharded
from trl_diffusion_sdpo.safeguards.gradients.one_pass_sharded import ZeRO3OnePassBranchGradients
from trl_diffusion_sdpo.safeguards.gradients.zero3 import DeepSpeedZeRO3Collectives

PAIRS = 3


class _Partitions:
    """A one-process stand-in for a ZeRO-3 engine: each weight's partition is its whole gradient, flat; a step
    records them."""

    def __init__(self, parameters: list[nn.Parameter]) -> None:
        self.parameters = parameters
        self.partitions = {id(p): torch.zeros(p.numel(), dtype=p.dtype) for p in parameters}
        self.steps: list[list[torch.Tensor]] = []
        self.boundary: bool | None = None

    def get(self, p: nn.Parameter) -> torch.Tensor:
        return self.partitions[id(p)]

    def set(self, p: nn.Parameter, value: torch.Tensor) -> None:
        self.partitions[id(p)].copy_(value.reshape(-1))

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        self.boundary = boundary

    def step(self) -> None:
        assert self.boundary is True
        self.steps.append([self.partitions[id(p)].clone() for p in self.parameters])


def _branch_gradients(module: nn.Module, x: torch.Tensor, cotangent: torch.Tensor) -> list[torch.Tensor]:
    """``g_w + lambda h_l`` is formed from these: autograd's gradient of each branch's rows alone, flat."""
    params = list(module.parameters())
    half = x.shape[0] // 2
    winner = torch.autograd.grad(module(x[:half]), params, cotangent[:half])
    loser = torch.autograd.grad(module(x[half:]), params, cotangent[half:])
    return [torch.cat([w.reshape(-1) for w in winner]), torch.cat([h.reshape(-1) for h in loser])]


def test_zero3_one_pass_store_holds_no_rows_after_each_hand_over(monkeypatch):
    import deepspeed.utils

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    params = list(module.parameters())
    engine = _Partitions(params)
    monkeypatch.setattr(deepspeed.utils, "safe_get_local_grad", engine.get)
    monkeypatch.setattr(deepspeed.utils, "safe_set_local_grad", engine.set)
    accelerator = SimpleNamespace(num_processes=1, deepspeed_engine_wrapped=SimpleNamespace(engine=engine))
    collectives = DeepSpeedZeRO3Collectives(DeepSpeedEngine(accelerator, 3))
    one_process = SimpleNamespace(
        get_world_size=lambda: 1,
        get_rank=lambda: 0,
        reduce_scatter_tensor=lambda received, sent, op: received.copy_(sent),
        ReduceOp=torch.distributed.ReduceOp,
    )
    monkeypatch.setattr(one_pass_sharded, "dist", one_process)
    for p in params:  # ZeRO-3's partition of each weight: all of it, flat, on one process
        p.ds_tensor = SimpleNamespace(ds_numel=p.numel())
    store = ZeRO3OnePassBranchGradients(module, params)
    gen = torch.Generator().manual_seed(1)
    expected_window = None
    for sync, lam in ((False, 0.25), (True, 0.75), (True, 0.5)):  # a window of two micro-batches, then one of one
        x = torch.randn(2 * PAIRS, 4, generator=gen)
        cotangent = torch.randn(2 * PAIRS, 3, generator=gen)
        with store.split(2):
            module(x).backward(cotangent)
        assert all(p.grad is None for p in params)
        assert all(piece.untyped_storage().nbytes() > 0 for piece in store.pieces)  # the pass's rows
        lam = torch.tensor(lam)
        collectives.add_combined(store, store.combination(lam), sync, reduced=False)
        assert all(piece.untyped_storage().nbytes() == 0 for piece in store.pieces), "rows held after the hand-over"
        winner, loser = _branch_gradients(module, x, cotangent)
        micro = winner + lam * loser
        expected_window = micro if expected_window is None else expected_window + micro
        if sync:
            assert len(engine.steps) == (1 if lam.item() == 0.75 else 2)
            torch.testing.assert_close(torch.cat(engine.steps[-1]), expected_window)
            expected_window = None
