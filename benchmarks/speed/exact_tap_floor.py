"""The floor under the exact rule's host time on the lock-step benchmark's model: what an exact tap's native calls and
its per-layer Python cost beyond Diffusion-DPO's backward, summed over the UNet's tapped layers, against
Diffusion-DPO's whole step in the same process.

Not part of the test suite. CPU, one thread, bf16 mixed precision (CPU autocast), cached latents, 4 pairs at 64 px,
the UNet of ``host_time_lockstep.py`` (SD1.5's block structure at small widths). The one pass must give each branch's
weight gradients bit for bit as that branch's own backward does, so per trainable layer it makes at least the native
calls that the per-branch passes make for the weights (one per group of rows) where Diffusion-DPO's backward makes one
for all rows:

* linear: ``mm`` for the input gradient, one ``bmm`` for every group's weight gradient, one ``sum`` for their biases
  (Diffusion-DPO: ``mm``, ``mm``, ``sum``);
* convolution: one ``convolution_backward`` for the input gradient, one per group for its weight and bias
  (Diffusion-DPO: one call for all three);
* GroupNorm, LayerNorm: one native forward for the statistics (Diffusion-DPO's backward reads those its forward
  saved), one native backward per group, the input gradients joined (Diffusion-DPO: one backward).

Each layer's inputs are recorded from a Diffusion-DPO step of the trainer (the policy's forward, under autocast), and
both sets of calls are timed on them, main-thread CPU time, in lock-step rounds. The Python a tap runs per layer at
the least, module hooks and an autograd function whose backward hands the gradient on, is timed the same way on the
whole UNet's forward and backward (with and without them). Diffusion-DPO's whole step is timed in the same rounds (one
trainer step per round), so the floor is stated as a ratio to it:
``floor = 1 + (calls' extra + hooks' extra) / Diffusion-DPO's step``.

    python benchmarks/speed/exact_tap_floor.py --rounds 20 \\
        --json benchmarks/results/one-pass/cpu-exact-tap-floor-sd15-structure.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.speed.host_time_lockstep import LIMITS, RESOLUTION, build_pipeline, result_head  # noqa: E402

GROUPS = 2  # the branches
PAIRS = 4
_CONV_BACKWARD = torch.ops.aten.convolution_backward.default
_GN, _GN_BACKWARD = torch.ops.aten.native_group_norm.default, torch.ops.aten.native_group_norm_backward.default
_LN, _LN_BACKWARD = torch.ops.aten.native_layer_norm.default, torch.ops.aten.native_layer_norm_backward.default


def _kind(module: nn.Module) -> str | None:
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is nn.Conv2d:
        return "conv"
    if type(module) in (nn.GroupNorm, nn.LayerNorm) and module.weight is not None:
        return "norm"
    return None


class _Layer:
    """One trainable layer's recorded input and a random output gradient, and the two sets of calls on them."""

    def __init__(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        self.module, self.kind = module, _kind(module)
        low = out.dtype  # under autocast: bf16 for linear and convolution layers
        self.x = x.detach().to(low) if self.kind != "norm" else x.detach()
        self.grad = torch.randn_like(out)
        self.weight = module.weight.detach().to(low) if self.kind != "norm" else module.weight.detach()
        self.bias = None if module.bias is None else module.bias.detach()
        if self.kind == "norm":  # the statistics Diffusion-DPO's forward saved
            self.stats = self._statistics(self.x)

    def _statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.module
        if isinstance(m, nn.GroupNorm):
            n, c = x.shape[:2]
            return _GN(x, self.weight, self.bias, n, c, x.numel() // (n * c), m.num_groups, m.eps)[1:]
        return _LN(x, m.normalized_shape, self.weight, self.bias, m.eps)[1:]

    def _norm_backward(self, g, x, mean, rstd):
        m, mask = self.module, (True, True, self.bias is not None)
        if isinstance(m, nn.GroupNorm):
            n, c = x.shape[:2]
            hw = x.numel() // (n * c)
            return _GN_BACKWARD(g, x, mean, rstd, self.weight, n, c, hw, m.num_groups, mask)
        return _LN_BACKWARD(g, x, m.normalized_shape, mean, rstd, self.weight, self.bias, mask)

    def native(self) -> None:
        """Diffusion-DPO's backward for this layer: its weight gradients summed over all rows."""
        g, x, w = self.grad, self.x, self.weight
        if self.kind == "linear":
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            g2.mm(w), g2.t().mm(x2)
            if self.bias is not None:
                g2.sum(0)
        elif self.kind == "conv":
            m = self.module
            args = (m.stride, m.padding, m.dilation, False, (0, 0), m.groups)
            _CONV_BACKWARD(g, x, w, [w.shape[0]] if self.bias is not None else None, *args, (True, True, True))
        else:
            self._norm_backward(g, x, *self.stats)

    def exact(self) -> None:
        """The fewest native calls that give each group's weight gradients as its own pass does."""
        g, x, w = self.grad, self.x, self.weight
        if self.kind == "linear":
            out = g.shape[-1]
            g.reshape(-1, out).mm(w)
            per_group = g.reshape(GROUPS, -1, out).mT
            torch.bmm(per_group, x.reshape(GROUPS, -1, x.shape[-1]))
            if self.bias is not None:
                per_group.sum(2)
        elif self.kind == "conv":
            m = self.module
            args = (m.stride, m.padding, m.dilation, False, (0, 0), m.groups)
            _CONV_BACKWARD(g, x, w, None, *args, (True, False, False))
            sizes = [w.shape[0]] if self.bias is not None else None
            for gs, xs in zip(g.chunk(GROUPS), x.chunk(GROUPS)):
                _CONV_BACKWARD(gs, xs, w, sizes, *args, (False, True, self.bias is not None))
        else:
            mean, rstd = self._statistics(x)
            parts = [
                self._norm_backward(gs, xs, ms, rs)
                for gs, xs, ms, rs in zip(g.chunk(GROUPS), x.chunk(GROUPS), mean.chunk(GROUPS), rstd.chunk(GROUPS))
            ]
            torch.cat([p[0] for p in parts])


def _record(denoiser: nn.Module) -> tuple[list[_Layer], list[tuple[list, dict]], Callable[[], None]]:
    """Forward hooks that record, the first time each runs with autograd on (the policy's forward; the reference's
    runs without), every trainable layer's input and output and the denoiser call's own arguments (detached); and the
    function that removes them."""
    layers: list[_Layer] = []
    calls: list[tuple[list, dict]] = []
    seen: set[int] = set()

    def layer_hook(module, args, output):
        if torch.is_grad_enabled() and id(module) not in seen and isinstance(args[0], torch.Tensor):
            seen.add(id(module))
            layers.append(_Layer(module, args[0], output))

    def call_hook(module, args, kwargs, output):
        if torch.is_grad_enabled() and not calls:
            detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
            calls.append(([detach(a) for a in args], {k: detach(v) for k, v in kwargs.items()}))

    trainable = [m for m in denoiser.modules() if _kind(m) and any(p.requires_grad for p in m.parameters())]
    handles = [m.register_forward_hook(layer_hook) for m in trainable]
    handles.append(denoiser.register_forward_hook(call_hook, with_kwargs=True))
    return layers, calls, lambda: [h.remove() for h in handles]


class _Pass(torch.autograd.Function):
    """The least a tap's autograd function does: the output as computed, the gradient handed on."""

    @staticmethod
    def forward(ctx, output):
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _hooks(denoiser: nn.Module) -> Callable[[], None]:
    """A pre-hook that returns at once and a hook that routes the output through :class:`_Pass`, on every trainable
    layer: a tap's per-layer Python at the least. Returns the function that removes them."""
    handles = []
    for m in denoiser.modules():
        if _kind(m) and any(p.requires_grad for p in m.parameters()):
            handles.append(m.register_forward_pre_hook(lambda module, args, kwargs: None, with_kwargs=True))
            handles.append(m.register_forward_hook(lambda module, args, output: _Pass.apply(output), prepend=True))
    return lambda: [h.remove() for h in handles]


def _cpu(fn: Callable[[], None]) -> float:
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed repetitions, after one that warms up")
    parser.add_argument("--json", default=None)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)

    from datasets import Dataset
    from transformers import TrainerCallback

    from tests.helpers.common import fast_config_values, pickapic_rows
    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer

    with tempfile.TemporaryDirectory(prefix="tap-floor-") as workdir:
        pipeline = build_pipeline(f"{workdir}/tok")
        args = DiffusionSDPOConfig(
            **{
                **fast_config_values(f"{workdir}/out"),
                "max_steps": opts.rounds + 2,
                "logging_steps": 10**6,
                "per_device_train_batch_size": PAIRS,
                "bf16": True,
                "resolution": RESOLUTION,
                "cache_latents": True,
                "safeguard_space": "none",  # Diffusion-DPO, not the offline default's output space
            }
        )
        dataset = Dataset.from_list(pickapic_rows(PAIRS))
        trainer = DiffusionSDPOTrainer(pipeline, args=args, train_dataset=dataset)
        denoiser = trainer.family.denoiser
        layers, calls, stop_recording = _record(denoiser)
        step_cpu: list[float] = []
        parts: dict[str, list[float]] = collections.defaultdict(list)

        def whole_pass(hooked: bool) -> float:
            """The UNet's forward and backward on the recorded step's inputs, with or without the least hooks."""
            remove = _hooks(denoiser) if hooked else (lambda: None)
            try:
                args_, kwargs = calls[0]

                def run() -> None:
                    out = denoiser(*args_, **kwargs)
                    (out[0] if isinstance(out, tuple) else out.sample).float().sum().backward()

                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return _cpu(run)
            finally:
                remove()
                denoiser.zero_grad(set_to_none=True)

        def floor_round() -> None:
            """One round, each measure alternating with its counterpart: per layer kind the native and the exact
            calls, then the whole UNet pass without and with the least hooks."""
            totals = collections.Counter()
            for layer in layers:
                totals[f"{layer.kind}/native"] += _cpu(layer.native)
                totals[f"{layer.kind}/exact"] += _cpu(layer.exact)
            for name, value in totals.items():
                parts[name].append(value)
            parts["pass/plain"].append(whole_pass(False))
            parts["pass/hooked"].append(whole_pass(True))

        class Clock(TrainerCallback):
            def on_step_begin(self, args_, state, control, **kwargs):
                self.start = time.thread_time()

            def on_step_end(self, args_, state, control, **kwargs):
                step_cpu.append(time.thread_time() - self.start)
                if state.global_step == 1:  # the first step recorded the layers and the UNet's inputs
                    stop_recording()
                if calls:
                    floor_round()

        trainer.add_callback(Clock())
        trainer.train()

    def median(name: str) -> float:
        return statistics.median(parts[name][1:])  # the first round warms up

    dpo_step = statistics.median(step_cpu[2:])  # the steps after the first floor round
    counts = collections.Counter(layer.kind for layer in layers)
    kinds = {}
    for kind in sorted(counts):
        native, exact = median(f"{kind}/native"), median(f"{kind}/exact")
        kinds[kind] = {
            "layers": counts[kind],
            "native_ms": round(native * 1e3, 3),
            "exact_ms": round(exact * 1e3, 3),
            "extra_ms": round((exact - native) * 1e3, 3),
        }
    calls_extra = sum(median(f"{k}/exact") - median(f"{k}/native") for k in counts)
    hooks_extra = median("pass/hooked") - median("pass/plain")
    result = result_head(__file__, __doc__, 3, argv)
    result["settings"].update(pairs=PAIRS, groups=GROUPS, rounds=opts.rounds)
    result.update(
        {
            "dpo_step_ms": round(dpo_step * 1e3, 3),
            "layers": kinds,
            "calls_extra_ms": round(calls_extra * 1e3, 3),
            "unet_pass_ms": {name: round(median(f"pass/{name}") * 1e3, 3) for name in ("plain", "hooked")},
            "hooks_extra_ms": round(hooks_extra * 1e3, 3),
            "floor_ratio_to_dpo": round(1 + (calls_extra + hooks_extra) / dpo_step, 4),
            "calls_floor_ratio_to_dpo": round(1 + calls_extra / dpo_step, 4),
            "limit_one_pass_full": LIMITS["full"]["parameter"],
        }
    )
    print(json.dumps({k: v for k, v in result.items() if k not in ("what", "machine", "settings")}, indent=1))
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
