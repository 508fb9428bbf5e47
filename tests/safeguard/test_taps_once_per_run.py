"""The per-layer taps are installed once per run, not per pass, and do nothing outside a pass.

A store's passes only switch the current pass on and off: the hooks are registered on the first pass (two per tapped
layer) and kept, removed by ``close`` or when the taps are collected. A forward with no pass on, under ``no_grad`` in
a pass, or in evaluation computes and records exactly what the model without taps does (compared with an untapped
copy of the same model, bit for bit), and hands the taps nothing."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from trl_diffusion_sdpo.safeguards.gradients.layer_taps import LayerTaps
from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients


def tiny_unet_and_inputs() -> tuple[nn.Module, tuple]:
    """A two-block SD-style UNet (float64: sums in a fixed order) and one batch of 4 rows (two pairs)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    ).double()
    unet.train()
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    context = torch.randn(4, 3, 8, generator=gen, dtype=torch.float64)
    return unet, (sample, torch.tensor([10, 500, 10, 500]), context)


def _counting(monkeypatch) -> dict[str, int]:
    """Count every forward pre-hook and forward hook registered on any module from now on."""
    counts = {"pre": 0, "post": 0}
    register_pre, register_post = nn.Module.register_forward_pre_hook, nn.Module.register_forward_hook

    def pre(self, *args, **kwargs):
        counts["pre"] += 1
        return register_pre(self, *args, **kwargs)

    def post(self, *args, **kwargs):
        counts["post"] += 1
        return register_post(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "register_forward_pre_hook", pre)
    monkeypatch.setattr(nn.Module, "register_forward_hook", post)
    return counts


def _pass(store: OnePassBranchGradients, unet: nn.Module, inputs: tuple) -> None:
    with store.split(2):
        unet(*inputs, return_dict=False)[0].square().sum().backward()


def test_three_passes_of_one_store_register_each_layers_two_hooks_once(monkeypatch):
    """Three passes of one store: two hooks per tapped layer registered in all (on the first pass), the gradients of
    every pass split as the first's (the same inputs, the same per-group gradients)."""
    unet, inputs = tiny_unet_and_inputs()
    params = [p for p in unet.parameters() if p.requires_grad]
    store = OnePassBranchGradients(unet, params)
    layers = len(store.taps.layers)
    assert layers > 50
    counts = _counting(monkeypatch)
    rows = []
    for _ in range(3):
        _pass(store, unet, inputs)
        rows.append([piece.clone() for piece in store.pieces])
    assert counts == {"pre": layers, "post": layers}
    for later in rows[1:]:
        assert all(torch.equal(a, b) for a, b in zip(rows[0], later))


def _untapped_like(model: nn.Module, copy_: nn.Module, inputs: tuple) -> None:
    """``model`` and ``copy_`` (no taps) give the same output and the same ``.grad``, bit for bit."""
    out, reference = model(*inputs, return_dict=False)[0], copy_(*inputs, return_dict=False)[0]
    assert torch.equal(out, reference)
    out.square().sum().backward()
    reference.square().sum().backward()
    for p, q in zip(model.parameters(), copy_.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))
    model.zero_grad(set_to_none=True)
    copy_.zero_grad(set_to_none=True)


def test_forwards_outside_a_pass_and_under_no_grad_compute_as_without_taps():
    """After a pass (hooks kept): a training forward and backward with no pass on, an evaluation forward and a
    ``no_grad`` forward inside a pass give what an untapped copy gives, bit for bit; the sink hears nothing, and the
    ``no_grad`` forward records no graph."""
    unet, inputs = tiny_unet_and_inputs()
    untapped = copy.deepcopy(unet)
    taps = LayerTaps(unet, list(unet.parameters()))
    heard: list[int] = []
    with taps.tapping(2, lambda i, g: heard.append(i)):
        unet(*inputs, return_dict=False)[0].sum().backward()
    assert heard and taps.installed
    unet.zero_grad(set_to_none=True)
    heard.clear()
    _untapped_like(unet, untapped, inputs)  # no pass on
    unet.eval()
    untapped.eval()
    with torch.no_grad():
        assert torch.equal(unet(*inputs, return_dict=False)[0], untapped(*inputs, return_dict=False)[0])
    unet.train()
    with taps.tapping(2, lambda i, g: heard.append(i)), torch.no_grad():
        out = unet(*inputs, return_dict=False)[0]
    assert out.grad_fn is None and torch.equal(out, untapped(*inputs, return_dict=False)[0])
    assert heard == [] and taps.written() == [] and torch.is_grad_enabled()


@pytest.mark.parametrize("how", ["close", "collected"])
def test_the_hooks_go_when_the_taps_are_closed_or_collected(how):
    """``close`` removes every hook the taps registered, and so does collecting the taps (the store dropped); a later
    pass of closed taps installs them again."""
    layer = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    taps = LayerTaps(layer, list(layer.parameters()))

    def hooks() -> int:
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in layer.modules())

    assert hooks() == 0
    with taps.tapping(2, lambda i, g: None):
        layer(torch.randn(4, 3)).sum().backward()
    assert hooks() == 6
    if how == "close":
        taps.close()
        assert hooks() == 0
        with taps.tapping(2, lambda i, g: None):
            pass
        assert hooks() == 6
        taps.close()
    else:
        del taps
        gc.collect()
    assert hooks() == 0
