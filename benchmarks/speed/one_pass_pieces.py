"""What the one pass adds to Diffusion-DPO's peak memory, and to its operations, with its buffer in pieces.

Not part of the test suite. CPU, one thread. Peaks are the bytes a call allocates beyond what it starts with
(``torch.profiler``'s memory events, :func:`~trl_diffusion_sdpo.testing.operations.peak_allocated_bytes`), over two
micro-batches through one stage (``.grad`` emptied before each, as ``zero_grad`` does), so what the pass keeps from
one micro-batch to the next counts. The pieces are set by ``PIECE_ELEMENTS`` (as many pieces as ``MAX_PIECES``
allows: ``--pieces``). Two models:

* ``linear``: four 256 x 256 linear layers (the memory test's), on 4 rows (weights set the peak) and on 512 and 1024
  rows (activations twice and four times a float32 gradient);
* ``unet``: the shipped tiny SD UNet, full tuning, 2 pairs at ``--latent`` x ``--latent`` latents (activations set
  the peak), with the top-level aten operations outside the backward of one micro-batch
  (:func:`~trl_diffusion_sdpo.testing.operations.count_operations`).

    python benchmarks/speed/one_pass_pieces.py --json benchmarks/results/one-pass/cpu-one-pass-pieces.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from trl_diffusion_sdpo.engines import PlainEngine  # noqa: E402
from trl_diffusion_sdpo.engines.memory import pieces as memory_model  # noqa: E402
from trl_diffusion_sdpo.safeguards.parameter import ParameterSpaceBackward  # noqa: E402
from trl_diffusion_sdpo.testing.operations import count_operations, peak_allocated_bytes  # noqa: E402


@dataclasses.dataclass
class Branches:
    policy_winner: torch.Tensor
    policy_loser: torch.Tensor


def _loss(branches: Branches) -> torch.Tensor:
    """A DPO-like objective on the two branches' outputs (the winner's error down, the loser's up)."""
    winner, loser = branches.policy_winner.float(), branches.policy_loser.float()
    return -torch.nn.functional.logsigmoid(loser.square().mean() - winner.square().mean())


def _linear(rows: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(2))
    return model, (lambda: model(x)), rows // 2


def _unet(latent: int):
    from diffusers import UNet2DConditionModel

    from trl_diffusion_sdpo.families.loading import resolve_model_name

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(resolve_model_name("trl-diffusion-sdpo:tiny"), subfolder="unet")
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(4, unet.config.in_channels, latent, latent, generator=g)
    text = torch.randn(4, 8, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500, 10, 500])
    return unet, (lambda: unet(sample, t, encoder_hidden_states=text).sample), 2


def _dpo(model, forward, pairs) -> None:
    for p in model.parameters():
        p.grad = None
    out = forward()
    _loss(Branches(out[:pairs], out[pairs:])).backward()


def _one_pass(model, forward, pairs, stage) -> None:
    for p in model.parameters():
        p.grad = None

    def predict(separate_branches: bool) -> Branches:
        out = forward()
        return Branches(out[:pairs], out[pairs:])

    stage(model, predict, _loss, torch.tensor(1.0), pairs=pairs)


def _stage() -> ParameterSpaceBackward:
    return ParameterSpaceBackward(PlainEngine(SimpleNamespace(num_processes=1)), 0.5, 1.0, False, passes="one")


def _outside_backward(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return sum(count_operations(profile)["outside_backward"].values())


def measure(name: str, build, pieces: int) -> dict:
    memory_model.PIECE_ELEMENTS, memory_model.MAX_PIECES = 1, pieces
    model, forward, pairs = build()
    gradient = 4 * sum(p.numel() for p in model.parameters())
    dpo = peak_allocated_bytes(lambda: [_dpo(model, forward, pairs) for _ in range(2)])
    for p in model.parameters():  # each peak from empty gradients
        p.grad = None
    stage = _stage()
    one = peak_allocated_bytes(lambda: [_one_pass(model, forward, pairs, stage) for _ in range(2)])
    row = {
        "model": name,
        "pieces": len(stage.one_pass.pieces),
        "float32_gradient_bytes": gradient,
        "dpo_peak_bytes": dpo,
        "one_pass_peak_bytes": one,
        "extra_over_dpo_in_float32_gradients": (one - dpo) / gradient,
    }
    if name.startswith("unet"):
        row["ops_outside_backward"] = {
            "dpo": _outside_backward(lambda: _dpo(model, forward, pairs)),
            "one_pass": _outside_backward(lambda: _one_pass(model, forward, pairs, stage)),
        }
    print(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pieces", default="1,2,4,16")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = [int(k) for k in args.pieces.split(",")]
    rows = []
    for rows_in in (4, 512, 1024):
        for k in counts[:3]:
            rows.append(measure(f"linear-{rows_in}rows", lambda r=rows_in: _linear(r), k))
    for k in counts:
        rows.append(measure(f"unet-tiny-full-{args.latent}px-latent", lambda: _unet(args.latent), k))
    settings = vars(args) | {"json": str(args.json)}
    result = {"machine": harness.machine_description("cpu", 1), "settings": settings, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
