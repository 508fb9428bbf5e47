"""A LoRA step's peak on a bf16, quanto int8 and torchao int8 base, measured on the CPU, beside ``estimate-memory``.

    python benchmarks/speed/quantized_base_memory.py --out benchmarks/results/memory/cpu-quantized-base-memory.json
    python benchmarks/speed/quantized_base_memory.py --table benchmarks/results/memory/cpu-quantized-base-memory.json \
        --write docs/quantization.md   # the docs' table from the result file

The UNet is SD1.5's block layout (two cross-attention levels at 320 and 640 channels, two transformer layers each,
1024-wide prompt embeddings) with random weights, one pair at an 8 x 8 latent: its weights are most of the step's
memory, as a large denoiser's are on a GPU. The base is cast to bf16 and quantized with
``trl_diffusion_sdpo.families.quantization.quantize_linear_layers`` (linear layers only), then prepared for LoRA
rank 8 on the attention projections as training prepares it; one step runs under a bf16 autocast with AdamW.
Measured (``trl_diffusion_sdpo.engines.memory.measure``): the model's storages plus the step's highest allocation
above them (torch's profiler memory events). ``autograd_default`` runs the quantized bases once more with the
quantized layers' backward left to autograd (each layer then saves what its forward computed with), for comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from trl_diffusion_sdpo.engines.memory import ModelSizes, RunShape, estimate_memory  # noqa: E402
from trl_diffusion_sdpo.engines.memory.measure import lora_step_memory  # noqa: E402
from trl_diffusion_sdpo.families import quantization  # noqa: E402

UNET = {
    "block_out_channels": (320, 640),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 1024,
    "attention_head_dim": 8,
    "transformer_layers_per_block": 2,
    "sample_size": 8,
}
LATENT = 8
BASES = ("none", "quanto-int8", "torchao-int8")
MIB = 2**20
NAMES = {"none": "bf16", "quanto-int8": "quanto int8", "torchao-int8": "torchao int8"}
BEGIN = "<!-- quantized-base memory table: python benchmarks/speed/quantized_base_memory.py --table ... --write -->"
END = "<!-- end of quantized-base memory table -->"


def table_markdown(report: dict) -> str:
    """The docs' table of a result file: per base, the measured peak, the estimate and, for the int8 bases, the peak
    with the quantized layers' backward left to autograd."""
    runs, default = report["runs"], report["autograd_default"]
    bf16 = runs["none"]["measured_peak_mib"]
    lines = [
        "| base | weights | measured peak | estimate | left to autograd |",
        "|---|---:|---:|---:|---:|",
    ]
    for base, name in NAMES.items():
        run = runs[base]
        resident = run["measured_bytes"]["resident"] / MIB
        peak = run["measured_peak_mib"]
        delta = "" if base == "none" else f" ({peak - bf16:+.1f})"
        autograd = (
            ""
            if base == "none"
            else f"{default[base]['measured_peak_mib']:.1f} MiB ({default[base]['measured_peak_mib'] - bf16:+.1f})"
        )
        lines.append(
            f"| {name} | {resident:.1f} MiB | {peak:.1f} MiB{delta} | {run['estimate_mib']:.1f} MiB "
            f"({run['estimate_error']:+.1%}) | {autograd} |"
        )
    return "\n".join(lines)


def write_table(report_path: Path, docs: Path) -> None:
    """Rewrite the table between :data:`BEGIN` and :data:`END` in ``docs`` from the result file at ``report_path``."""
    import re

    block = f"{BEGIN}\n{table_markdown(json.loads(report_path.read_text()))}\n{END}"
    text = docs.read_text()
    new, count = re.subn(
        r"<!-- quantized-base memory table:[^\n]*-->.*?" + re.escape(END), lambda _: block, text, flags=re.S
    )
    if count != 1:
        raise SystemExit(f"{docs}: no table markers ({BEGIN} ... {END})")
    docs.write_text(new)


def build_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET)


def estimate(base: str) -> dict[str, int]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights(include_buffers=True):
        meta = UNet2DConditionModel(**UNET)
    sizes = ModelSizes("stable-diffusion", meta, {}, False, False, 8, 4, "the benchmark's UNet")
    shape = RunShape(pairs=1, resolution=8 * LATENT, dtype_bytes=2, lora_rank=8, base_quantization=base,
                     optim="adamw_torch", latent_cache=True, safeguard="none")  # fmt: skip
    return estimate_memory(sizes, shape).components


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", type=Path, default=None, help="a result file: print (or --write) its docs table")
    parser.add_argument("--write", type=Path, default=None, metavar="FILE.md")
    opts = parser.parse_args()
    if opts.table is not None:
        if opts.write is not None:
            write_table(opts.table, opts.write)
        else:
            print(table_markdown(json.loads(opts.table.read_text())))
        return 0
    if opts.out is None:
        parser.error("--out is required to run the measurement")
    torch.set_num_threads(1)
    runs: dict[str, dict] = {}
    for base in BASES:
        measured = lora_step_memory(build_unet, base, latent=LATENT)
        components = estimate(base)
        total = sum(components.values())
        runs[base] = {
            "measured_bytes": measured,
            "measured_peak_mib": round(measured["peak"] / MIB, 1),
            "estimate_mib": round(total / MIB, 1),
            "estimate_components_mib": {k: round(v / MIB, 1) for k, v in components.items() if v},
            "estimate_error": round(total / measured["peak"] - 1, 4),
        }
        print(base, runs[base], flush=True)
    autograd_default: dict[str, dict] = {}
    frozen = quantization._is_quantized_linear
    quantization._is_quantized_linear = lambda module: False
    try:
        for base in BASES[1:]:
            measured = lora_step_memory(build_unet, base, latent=LATENT)
            autograd_default[base] = {
                "measured_bytes": measured,
                "measured_peak_mib": round(measured["peak"] / MIB, 1),
            }
            print(base, "autograd default", autograd_default[base], flush=True)
    finally:
        quantization._is_quantized_linear = frozen
    bf16 = runs["none"]["measured_bytes"]
    for base in BASES[1:]:
        saved = bf16["resident"] - runs[base]["measured_bytes"]["resident"]
        runs[base]["weights_saved_mib"] = round(saved / MIB, 1)
        runs[base]["peak_below_bf16_mib"] = round((bf16["peak"] - runs[base]["measured_bytes"]["peak"]) / MIB, 1)
        autograd_default[base]["peak_below_bf16_mib"] = round(
            (bf16["peak"] - autograd_default[base]["measured_bytes"]["peak"]) / MIB, 1
        )
    report = {
        "what": "a LoRA step's CPU peak on a bf16 and an int8 base, and estimate-memory's estimate",
        "command": "python benchmarks/speed/quantized_base_memory.py --out " + str(opts.out),
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()},
        "shape": {"pairs": 1, "latent": LATENT, "lora_rank": 8, "dtype": "bf16 autocast", "optimizer": "AdamW"},
        "torch": torch.__version__,
        "machine": platform.machine(),
        "runs": runs,
        "autograd_default": autograd_default,
    }
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
