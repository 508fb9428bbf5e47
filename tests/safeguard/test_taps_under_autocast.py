"""The per-layer taps under autocast (bf16 mixed precision, as a GPU run trains): each tap splits the gradients as
autograd does on each group's rows alone under the same autocast, and the tapped step adds no host read and no cast
in the forward beyond Diffusion-DPO's.

A tapped layer's own forward runs under autocast (the layer casts its input and weights); the tap hands autograd
that output, keeps the input the layer computed with (cast once, by the pre-hook, where autocast would cast it) and
the weights as the layer holds them, and casts a weight to the output's dtype in the backward only. So the forward
makes the casts Diffusion-DPO's makes and keeps no second copy of any weight, and the backward casts one weight per
linear or convolution layer (the launch a kept copy would save, at the memory of a copy of every tapped weight).

The step counts (:func:`step_counts`) come from ``torch.profiler`` on the tiny SD UNet, full tuning (every linear,
convolution and norm tapped), Diffusion-DPO, the one pass and a planted one pass alternating in one bf16 run, as the
operation-count test counts them: the operations that read a value back to the host (at every nesting level; on an
accelerator each makes the host wait for the device) and the dtype casts (``aten::_to_copy``) outside the backward
pass and the optimizer's step.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch

from trl_diffusion_sdpo.safeguards import safeguard_for
from trl_diffusion_sdpo.safeguards.gradients import layer_taps
from trl_diffusion_sdpo.safeguards.gradients.layer_taps import LayerTaps
from trl_diffusion_sdpo.testing.operations import event_tree

# Operations that read a tensor's value back to the host (``.item()``, ``bool()``, ``float()``, ``.tolist()`` of a
# device tensor end in ``_local_scalar_dense``).
HOST_SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal")
CAST = "aten::_to_copy"
PAIRS = 4


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.Linear(5, 6),
        lambda: torch.nn.Conv2d(8, 6, 3, padding=1),
        lambda: torch.nn.GroupNorm(4, 8),
        lambda: torch.nn.LayerNorm(5),
    ],
    ids=["linear", "conv", "groupnorm", "layernorm"],
)
@pytest.mark.parametrize("source", ["float32", "bfloat16"], ids=["float32-input", "bf16-input"])
def test_each_tap_under_autocast_splits_like_autograd_per_group(make, source):
    """Under CPU bf16 autocast, a tapped layer's output, input gradient and per-group weight gradients (float32, the
    weights' dtype) equal autograd's through the untapped layer on each group's rows alone, whether its input comes
    in float32 (autocast casts it) or in bf16 (a previous layer's output)."""
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    params = list(layer.parameters())
    base = torch.randn(4, 8, 5, 5).to(getattr(torch, source))
    groups = 2
    got = {i: torch.full((groups, *p.shape), float("nan")) for i, p in enumerate(params)}
    taps = LayerTaps(layer, params)
    x = base.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), taps.tapping(groups, destination=got.__getitem__):
        out = layer(x)
    assert not taps.failures
    grad = torch.randn_like(out)
    out.backward(grad)
    assert all(p.grad is None for p in params)  # autograd handed the weights nothing
    plain = base.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_out = layer(plain)
    expected_out.backward(grad)
    assert out.dtype == expected_out.dtype and torch.equal(out, expected_out)
    assert x.grad.dtype == plain.grad.dtype
    torch.testing.assert_close(x.grad, plain.grad, rtol=0, atol=0)
    size = base.shape[0] // groups
    for k in range(groups):
        rows = slice(k * size, (k + 1) * size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            part = layer(base[rows])
        expected = torch.autograd.grad(part, params, grad[rows])
        for i, e in enumerate(expected):
            assert got[i].dtype == e.dtype == torch.float32
            # bf16 products summed in another order (one batched call against one call per group)
            torch.testing.assert_close(got[i][k], e, rtol=1.6e-2, atol=1e-2 * e.abs().max().item())


def _count(profile: torch.profiler.profile) -> dict[str, int]:
    """``host_syncs``: the host reads of ``profile`` at every nesting level outside the optimizer's step (a CPU's
    fused AdamW reads its step counter per tensor; an accelerator's reads nothing back); ``forward_casts``: the casts
    inside the policy's forward (:data:`FORWARD`). The events are walked down the profiler's own tree of nested calls
    (:func:`~trl_diffusion_sdpo.testing.operations.event_tree`, each event's ancestors the path from its root)."""
    counts = collections.Counter()
    stack = [(root, False, False) for root in event_tree(profile)]
    while stack:
        event, in_forward, in_optimizer = stack.pop()
        if event.name == CAST:
            counts["forward_casts"] += in_forward
        elif event.name in HOST_SYNCS and not in_optimizer:
            counts["host_syncs"] += 1
        in_forward = in_forward or event.name == FORWARD
        in_optimizer = in_optimizer or event.name.startswith("Optimizer.step")
        stack.extend((child, in_forward, in_optimizer) for child in event.children)
    return dict(counts)


FORWARD = "policy forward"


def _mark_forward(module: torch.nn.Module) -> None:
    """A ``torch.profiler`` range named :data:`FORWARD` around each call of ``module`` (through its hooks)."""
    ranges = []

    def enter(_module, _args):
        ranges.append(torch.profiler.record_function(FORWARD))
        ranges[-1].__enter__()

    def leave(_module, _args, _output):
        ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


class _CastInTheForward:
    """The linear layers' tap handed a cast of the weight in the forward (kept for the backward, a second copy beside
    the one the layer's own forward cast under autocast): what the test must catch."""

    @staticmethod
    def apply(x, weight, *rest):
        return layer_taps._LinearTap.apply(x, weight.to(x.dtype), *rest)


def step_counts(make_trainer, make_pickapic) -> dict[str, dict[str, int]]:
    """``{"dpo": ..., "parameter": ..., "parameter-cast": ...}``: :func:`_count` of one whole non-logging bf16
    optimizer step each (from the previous step's ``on_step_end`` to its own), full tuning, alternating in one run
    (each one's second step); ``"parameter-cast"`` is a second one pass whose taps are installed, in its first step,
    with the linear layers' tap :class:`_CastInTheForward`."""
    from transformers import TrainerCallback

    order = ["dpo", "parameter", "parameter-cast"]
    trainer = make_trainer(
        lora=False,
        bf16=True,
        max_steps=2 * len(order),
        logging_steps=1000,
        per_device_train_batch_size=PAIRS,
        train_dataset=make_pickapic(PAIRS),
    )
    _mark_forward(trainer.family.denoiser)
    trainable = sum(p.numel() for p in trainer.family.denoiser.parameters() if p.requires_grad)
    args = copy.copy(trainer.args)
    args.safeguard_space = "parameter"
    safeguards = {"dpo": trainer.safeguard}
    for name in order[1:]:
        safeguards[name] = safeguard_for(args, trainer.engine, lora=False, trainable_elements=trainable)
    linear = layer_taps._FUNCTIONS["linear"]
    counts: dict[str, dict[str, int]] = {}

    class Profiled(TrainerCallback):
        profile: torch.profiler.profile | None = None

        def begin(self, step: int) -> None:
            name = order[step % len(order)]
            trainer.safeguard = safeguards[name]
            layer_taps._FUNCTIONS["linear"] = _CastInTheForward if name == "parameter-cast" else linear
            if step >= len(order):
                self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profile.__enter__()

        def on_train_begin(self, args_, state, control, **kwargs):
            self.begin(state.global_step)

        def on_step_end(self, args_, state, control, **kwargs):
            if self.profile is not None:
                self.profile.__exit__(None, None, None)
                counts[order[(state.global_step - 1) % len(order)]] = _count(self.profile)
                self.profile = None
            if state.global_step < state.max_steps:
                self.begin(state.global_step)

    trainer.add_callback(Profiled())
    try:
        trainer.train()
    finally:
        layer_taps._FUNCTIONS["linear"] = linear
    for name in order[1:]:
        assert safeguards[name].backward_stage.two_pass_reason is None  # the one pass ran
    return counts


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, dict[str, int]]]:
    """The counts of one run (:func:`step_counts`), made once per module by the first test that asks (:func:`counts`):
    the planted test below checks the clean one pass and the planted one against the same Diffusion-DPO step."""
    return {}


def counts(runs: dict, make_trainer, make_pickapic) -> dict[str, dict[str, int]]:
    if "bf16" not in runs:
        runs["bf16"] = step_counts(make_trainer, make_pickapic)
    return runs["bf16"]


def test_the_tapped_bf16_step_adds_no_host_read_and_no_cast_in_the_forward(make_trainer, make_pickapic, runs):
    """The one pass's whole bf16 step reads nothing more back to the host than Diffusion-DPO's, and its forward
    casts what Diffusion-DPO's does: autocast's casts inside each layer, the input's made by the pre-hook instead."""
    step = counts(runs, make_trainer, make_pickapic)
    dpo, one_pass = step["dpo"], step["parameter"]
    assert dpo["forward_casts"] > 0  # the counter sees autocast's casts
    assert one_pass.get("host_syncs", 0) <= dpo.get("host_syncs", 0), step
    assert one_pass["forward_casts"] <= dpo["forward_casts"], step


def test_a_weight_cast_in_the_forward_of_the_taps_is_caught(make_trainer, make_pickapic, runs):
    """Planted: the linear layers' tap handed a cast of the weight in the forward (:class:`_CastInTheForward`). The
    clean one pass in the same run casts no more than Diffusion-DPO; the planted one casts more."""
    step = counts(runs, make_trainer, make_pickapic)
    assert step["parameter"]["forward_casts"] <= step["dpo"]["forward_casts"], step
    assert step["parameter-cast"]["forward_casts"] > step["dpo"]["forward_casts"], step
