"""The FSDP2 reference copy: sharded like the policy, or replicated whole on every process? Memory and time.

    torchrun --nproc_per_node 2 benchmarks/speed/fsdp_reference.py \\
        --out benchmarks/results/memory/cpu-fsdp-reference-small.json

Each process holds two frozen copies of the same UNet (``--preset``'s, random weights, float32 on CPU, bf16 on CUDA):
one whole, one sharded with ``fully_shard`` the way
:func:`trl_diffusion_sdpo.engines.collectives.shard_reference_fsdp2`
shards it (one unit per block class the UNet lists in ``_no_split_modules``, then the root; weights freed after
every forward). Both predict the same noised batch under ``torch.no_grad``, alternating, ``--steps`` times:

* ``bytes held``: parameter bytes a process keeps between forwards (its shards, or the whole copy);
* ``largest unit``: the parameters of the largest FSDP unit, gathered whole during the forward on top of the shards
  (the root unit, the stem and head that no block owns, included);
* ``forward seconds``: median time of one reference forward, and the sharded/replicated ratio;
* the two predictions agree (the sharded copy computes the same function).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness
from benchmarks.harness import PRESETS, machine_description  # noqa: E402


def shard(module: torch.nn.Module, mesh) -> list[int]:
    """``fully_shard`` each block named in ``_no_split_modules`` and then the root; returns the units' parameter
    counts (each unit's own parameters, those not in a nested unit)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    names = set(getattr(module, "_no_split_modules", None) or [])
    units = []
    for sub in reversed(list(module.modules())):  # children before parents
        if sub is not module and type(sub).__name__ in names and not isinstance(sub, FSDPModule):
            own = sum(p.numel() for p in sub.parameters() if not isinstance(p, torch.distributed.tensor.DTensor))
            fully_shard(sub, mesh=mesh, reshard_after_forward=True)
            units.append(own)
    own = sum(p.numel() for p in module.parameters() if not isinstance(p, torch.distributed.tensor.DTensor))
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    units.append(own)
    return units


def unit_sizes(module: torch.nn.Module) -> list[int]:
    """The parameter counts of the units :func:`shard` would make (no sharding: usable on meta tensors)."""
    names = set(getattr(module, "_no_split_modules", None) or [])
    claimed: set[int] = set()
    units = []
    for sub in [*reversed(list(module.modules()))]:
        if sub is module or type(sub).__name__ in names:
            own = [p for p in sub.parameters() if id(p) not in claimed]
            claimed.update(id(p) for p in own)
            units.append(sum(p.numel() for p in own))
    return units


def real_size_units() -> dict[str, dict[str, int]]:
    """Units of the real SD1.5 and SDXL UNets (built on the meta device: nothing allocated)."""
    from diffusers import UNet2DConditionModel

    out = {}
    for name in ("sd15", "sdxl"):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(PRESETS[name]["unet"])
        units = unit_sizes(unet)
        out[name] = {"parameters": sum(units), "units": len(units), "largest_unit": max(units), "root": units[-1]}
    return out


def main() -> None:
    from diffusers import UNet2DConditionModel
    from torch.distributed.device_mesh import init_device_mesh

    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--pairs", type=int, default=2, help="pairs per process (the reference sees 2x images)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    mesh = init_device_mesh(device.type, (world,))
    spec = PRESETS[opts.preset]
    torch.manual_seed(0)
    whole = UNet2DConditionModel.from_config(spec["unet"]).to(device=device, dtype=dtype).requires_grad_(False).eval()
    sharded = copy.deepcopy(whole)
    units = shard(sharded, mesh)
    sharded.eval()

    config = whole.config
    size = spec["resolution"] // 8
    generator = torch.Generator().manual_seed(rank)
    batch = 2 * opts.pairs
    sample = torch.randn(batch, config.in_channels, size, size, generator=generator).to(device, dtype)
    timestep = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    context = torch.randn(batch, 77, config.cross_attention_dim, generator=generator).to(device, dtype)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator).to(device, dtype),
            "time_ids": torch.tensor(
                [[spec["resolution"]] * 2 + [0, 0] + [spec["resolution"]] * 2] * batch, dtype=dtype, device=device
            ),
        }

    def forward(model) -> tuple[float, torch.Tensor]:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        with torch.no_grad():
            out = model(sample, timestep, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    times: dict[str, list[float]] = {"replicated": [], "sharded": []}
    forward(whole), forward(sharded)  # warm-up
    for _ in range(opts.steps):  # alternate, so a change in machine load hits both
        seconds, expected = forward(whole)
        times["replicated"].append(seconds)
        seconds, got = forward(sharded)
        times["sharded"].append(seconds)
    difference = (got.float() - expected.float()).abs().max().item()
    element = torch.finfo(dtype).bits // 8

    def local_bytes(model) -> int:
        local = [p.to_local() if isinstance(p, torch.distributed.tensor.DTensor) else p for p in model.parameters()]
        return sum(p.numel() for p in local) * element

    report = {
        "rank": rank,
        "bytes_held": {"replicated": local_bytes(whole), "sharded": local_bytes(sharded)},
        "largest_unit_bytes": max(units) * element,
        "root_unit_bytes": units[-1] * element,
        "units": len(units),
        "forward_median_s": {k: float(np.median(v)) for k, v in times.items()},
        "max_abs_difference": difference,
    }
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        median = reports[0]["forward_median_s"]
        result = {
            "machine": machine_description(device.type, torch.get_num_threads()),
            "settings": {
                "preset": opts.preset,
                "processes": world,
                "pairs_per_process": opts.pairs,
                "steps": opts.steps,
                "dtype": str(dtype),
            },
            "unet_parameters": sum(p.numel() for p in whole.parameters()),
            "per_process": reports,
            "sharded_over_replicated_forward_time": median["sharded"] / median["replicated"],
            "real_size_units": real_size_units(),
        }
        text = json.dumps(result, indent=1)
        print(text)
        if opts.out:
            with open(opts.out, "w") as f:
                f.write(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
