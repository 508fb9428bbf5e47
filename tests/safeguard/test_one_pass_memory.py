"""The one pass's memory and precision: beyond Diffusion-DPO's gradient, the rows' second gradient and one piece of
the combination (formed piece by piece, each piece of the rows given back as it is read), in the weights' dtype where
they are bfloat16, with ``lambda`` and the gradient as exact as the per-branch passes.

Peaks are the bytes a step allocates beyond what it starts with (``torch.profiler``'s memory events,
:func:`~trl_diffusion_sdpo.testing.operations.peak_allocated_bytes`), from empty gradients and a fresh stage, on a
model whose weights dwarf its activations (four 256 x 256 linear layers, four rows).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from types import SimpleNamespace

import pytest
import torch

from trl_diffusion_sdpo.engines import PlainEngine
from trl_diffusion_sdpo.engines.memory import pieces as memory_model
from trl_diffusion_sdpo.safeguards.gradients import one_pass
from trl_diffusion_sdpo.safeguards.parameter import ParameterSpaceBackward
from trl_diffusion_sdpo.testing.operations import peak_allocated_bytes

PAIRS, WIDTH = 2, 256


@dataclasses.dataclass
class Branches:
    policy_winner: torch.Tensor
    policy_loser: torch.Tensor


def _model(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(4)]).to(dtype)


def _inputs(dtype: torch.dtype) -> torch.Tensor:
    winners = torch.randn(PAIRS, WIDTH, generator=torch.Generator().manual_seed(1))
    return torch.cat([winners, winners + 0.3 * torch.randn(PAIRS, WIDTH, generator=torch.Generator())]).to(dtype)


def _loss(branches: Branches) -> torch.Tensor:
    """A DPO-like objective on the two branches' outputs (the winner's error down, the loser's up)."""
    winner, loser = branches.policy_winner.float(), branches.policy_loser.float()
    return -torch.nn.functional.logsigmoid(loser.square().mean() - winner.square().mean())


def _stage(passes: str = "one") -> ParameterSpaceBackward:
    return ParameterSpaceBackward(PlainEngine(SimpleNamespace(num_processes=1)), 0.5, 1.0, False, passes=passes)


def _one_pass(
    model: torch.nn.Module, x: torch.Tensor, passes: str = "one", stage: ParameterSpaceBackward | None = None
) -> tuple[torch.Tensor, list]:
    """``(lambda, [.grad])`` of one micro-batch through ``stage`` (a fresh one by default), from empty gradients."""
    stage = stage if stage is not None else _stage(passes)
    for p in model.parameters():
        p.grad = None

    def predict(separate_branches: bool) -> Branches:
        if separate_branches:
            return Branches(model(x[:PAIRS]), model(x[PAIRS:]))
        out = model(x)
        return Branches(out[:PAIRS], out[PAIRS:])

    _, lam, _ = stage(model, predict, _loss, torch.tensor(1.0), pairs=PAIRS)
    return lam, [p.grad for p in model.parameters()]


def _dpo(model: torch.nn.Module, x: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    out = model(x)
    _loss(Branches(out[:PAIRS], out[PAIRS:])).backward()


def _extra_bytes(dtype: torch.dtype, rows: int | None = None, steps: int = 1) -> tuple[int, int]:
    """``(one pass's peak - Diffusion-DPO's peak, a float32 gradient's bytes)`` on the same model and batch (of
    ``rows`` rows: many rows make the activations, not the weights, set the peak); the one pass's peak is over
    ``steps`` micro-batches through one stage (``.grad`` emptied before each, as ``zero_grad`` does), so what it keeps
    from one to the next counts."""
    model = _model(dtype)
    x = _inputs(dtype) if rows is None else torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(2))
    dpo = peak_allocated_bytes(lambda: _dpo(model, x))
    for p in model.parameters():
        p.grad = None
    stage = _stage()
    # each micro-batch's .grad dropped by the next (as zero_grad drops it): only lambda kept
    one = peak_allocated_bytes(lambda: [_one_pass(model, x, stage=stage)[0] for _ in range(steps)])
    return one - dpo, 4 * sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def small_widening(monkeypatch):
    """bfloat16 rows are widened to float32 in pieces; pieces much smaller than this model's gradient keep that
    transient out of the comparison (on a real model a piece is a small fraction of it)."""
    monkeypatch.setattr(one_pass, "WIDENED_PIECE", 1 << 10)
    # a piece per layer (four): the combination's new tensor for one piece is a quarter of a gradient
    monkeypatch.setattr(memory_model, "PIECE_ELEMENTS", WIDTH * WIDTH + WIDTH)


# the allowance beyond the buffer: cotangents, inner products, lambda (a few KB here)
SLACK = 0.03
PIECE_SHARE = 0.25  # one piece's combination, formed while the rows are still held


@pytest.mark.parametrize(
    "dtype,buffers", [(torch.float32, 1.0 + PIECE_SHARE), (torch.bfloat16, 0.5 * (1.0 + PIECE_SHARE))],
    ids=["float32", "bf16"],
)  # fmt: skip
def test_the_one_pass_holds_one_gradient_sized_buffer_beyond_diffusion_dpo(dtype, buffers):
    """At most one float32 gradient beyond Diffusion-DPO's peak, and one piece of the combination; with bfloat16
    weights, half of that (the rows in bfloat16)."""
    extra, float32_gradient = _extra_bytes(dtype)
    assert extra <= (buffers + SLACK) * float32_gradient, (extra, float32_gradient)
    assert extra >= (buffers - SLACK) * float32_gradient  # the loser's row is there: the accounting sees it


@pytest.mark.parametrize("plant", ["float32-rows-for-bf16", "rows-kept-through-the-combination"])
def test_a_second_gradient_sized_buffer_is_caught(plant, monkeypatch):
    """Planted: bfloat16 weights' rows kept in float32 (the halves of old), or the rows' pieces not given back as the
    combination reads them (the combination then adds a gradient to both rows). The clean path passes first."""
    one = 1.0 + PIECE_SHARE
    dtype, buffers = (torch.bfloat16, 0.5 * one) if plant.startswith("float32") else (torch.float32, one)
    extra, float32_gradient = _extra_bytes(dtype)
    assert extra <= (buffers + SLACK) * float32_gradient
    if plant.startswith("float32"):
        monkeypatch.setattr(one_pass, "buffer_dtype", lambda p: torch.promote_types(p.dtype, torch.float32))
    else:
        monkeypatch.setattr(one_pass.OnePassBranchGradients, "_free", lambda self, piece: None)
    extra, float32_gradient = _extra_bytes(dtype)
    assert extra > (buffers + SLACK) * float32_gradient, (extra, float32_gradient)


ACTIVATION_ROWS = 512  # activations (4 layers x rows x WIDTH float32) about twice a float32 gradient
LAYER = WIDTH * WIDTH + WIDTH  # one layer's weights: with pieces of this size, a piece per layer


def _activation_extra(monkeypatch, piece: int) -> tuple[int, int]:
    monkeypatch.setattr(sys.modules[__name__], "PAIRS", ACTIVATION_ROWS // 2)
    monkeypatch.setattr(memory_model, "PIECE_ELEMENTS", piece)
    return _extra_bytes(torch.float32, rows=ACTIVATION_ROWS, steps=2)


def test_where_activations_set_the_peak_the_pass_adds_two_pieces_not_two_gradients(monkeypatch):
    """Diffusion-DPO's step holds no gradient while its activations peak. The one pass gives its pieces' memory back
    before the forward and takes each again when the backward reaches it, so at that peak it adds at most two pieces'
    rows (here four pieces, one per layer: half a float32 gradient), at the second micro-batch of a stage as at the
    first."""
    extra, float32_gradient = _activation_extra(monkeypatch, LAYER)
    assert extra <= (2 * 0.25 + SLACK) * float32_gradient, (extra, float32_gradient)


def test_a_buffer_held_through_the_forward_is_caught(monkeypatch):
    """One piece (a model under ``PIECE_ELEMENTS`` weights) is taken whole when the backward starts: both rows
    add to the activations' peak, as the whole buffer did when it was held from before the forward. Planted with
    pieces: the pieces taken before the forward, or their memory never given back between micro-batches."""
    extra, float32_gradient = _activation_extra(monkeypatch, 1 << 26)
    assert extra >= (1.5 - SLACK) * float32_gradient, (extra, float32_gradient)
    prepare = one_pass.OnePassBranchGradients._prepare

    def eager(self, groups):
        prepare(self, groups)
        for piece in range(len(self.pieces)):
            self._take(piece)

    free = one_pass.OnePassBranchGradients._free
    for name, plant, original in (("_prepare", eager, prepare), ("_free", lambda self, piece: None, free)):
        monkeypatch.setattr(one_pass.OnePassBranchGradients, name, plant)
        extra, float32_gradient = _activation_extra(monkeypatch, LAYER)
        assert extra >= (1.5 - SLACK) * float32_gradient, (name, extra, float32_gradient)
        monkeypatch.setattr(one_pass.OnePassBranchGradients, name, original)


def test_lambda_and_the_gradient_stay_within_float32_noise_of_the_per_branch_passes():
    """float32: the one pass against the per-branch passes (the reference implementation) in float32 and against
    both in float64; bfloat16 weights: the one pass (bfloat16 rows, inner products in float32) against float64
    within bfloat16's precision, its gradient in bfloat16."""
    x = _inputs(torch.float32)
    lam, grads = _one_pass(_model(torch.float32), x)
    lam_two, grads_two = _one_pass(_model(torch.float32), x, passes="two")
    lam_64, grads_64 = _one_pass(_model(torch.float64), x.double(), passes="two")
    assert 0.0 < float(lam_64) < 1.0  # the margin binds: lambda is computed, not the cap
    scale = max(float(g.abs().max()) for g in grads_64)
    for mine, other, rel in ((lam, lam_two, 1e-5), (lam, lam_64, 1e-5)):
        torch.testing.assert_close(mine.double(), other.double(), rtol=rel, atol=0.0)
    for mine, two, exact in zip(grads, grads_two, grads_64):
        torch.testing.assert_close(mine, two, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(mine.double(), exact, rtol=1e-5, atol=1e-5 * scale)
    model = _model(torch.bfloat16)
    lam_bf16, grads_bf16 = _one_pass(model, x.bfloat16())
    assert {g.dtype for g in grads_bf16} == {torch.bfloat16}
    reference = copy.deepcopy(model).double()
    lam_ref, grads_ref = _one_pass(reference, x.bfloat16().double(), passes="two")
    torch.testing.assert_close(lam_bf16.double(), lam_ref.double(), rtol=2e-2, atol=0.0)
    scale = max(float(g.abs().max()) for g in grads_ref)
    for mine, exact in zip(grads_bf16, grads_ref):
        torch.testing.assert_close(mine.double(), exact, rtol=2e-2, atol=2e-2 * scale)
