"""A frozen quantized linear layer's backward through registered hooks: its forward stays its class's own, its input
gradient is ``dy W`` with ``W`` dequantized, and autograd keeps no full-precision copy of ``W`` for the backward."""

from __future__ import annotations

import pytest
import torch

from trl_diffusion_sdpo.families.quantization import BaseQuantization, cast_unquantized, quantize_linear_layers


@pytest.mark.parametrize("backend", ["torchao-int8", "quanto-int8"])
def test_a_frozen_quantized_layer_backpropagates_dy_w_without_keeping_w_or_replacing_its_forward(backend):
    pytest.importorskip({"torchao-int8": "torchao", "quanto-int8": "optimum.quanto"}[backend])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Linear(64, 40))
    quantize_linear_layers(model, BaseQuantization(backend))
    model.requires_grad_(False)
    cast_unquantized(model, torch.float32, "cpu")
    cast_unquantized(model, torch.float32, "cpu")  # placed twice: the hooks are registered once
    layers = list(model)
    assert all("forward" not in vars(layer) for layer in model.modules())  # the classes' own forward

    x = torch.randn(5, 48, requires_grad=True)
    shapes: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = model(x)
    assert (64, 48) not in shapes and (40, 64) not in shapes  # no weight kept for the backward
    dy = torch.randn_like(y)
    y.backward(dy)

    # the independent computation: each layer's dequantized weight, through plain autograd-free matmuls
    weights = [layer.weight.dequantize().float() for layer in layers]
    expected = (dy @ weights[1]) @ weights[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and the forward is the layers' own
        hidden = torch.nn.functional.linear(x, weights[0], layers[0].bias)
        torch.testing.assert_close(
            y, torch.nn.functional.linear(hidden, weights[1], layers[1].bias), rtol=2e-2, atol=2e-2
        )
