"""docs/memory.md's table: the smallest GPU each family trains on, per tuning, from ``estimate-memory`` on the shipped
configs (or an H100 measurement where one exists).

    python benchmarks/tools/memory_table.py --write docs/memory.md   # rewrite the table between its markers

Each row is a family's shipped LoRA config (its resolution, batch, prompt length and activation checkpointing); the
full-tuning column reads the family's ``*_full.yaml`` where one is shipped, else the LoRA config with ``--use_peft
false``. One process (``--engine ddp``), the config's safeguard and optimizer.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from pathlib import Path

__all__ = ["COLUMNS", "FAMILY_CONFIGS", "GPUS_GB", "MEASURED", "fits_on", "table_markdown"]

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"
# row title -> (LoRA config, full-tuning config or None)
FAMILY_CONFIGS: dict[str, tuple[str, str | None]] = {
    "SD 1.5": ("sd15_lora.yaml", "sd15_full.yaml"),
    "SDXL": ("sdxl_lora.yaml", "sdxl_full.yaml"),
    "SD3.5 Medium": ("sd3_lora.yaml", "sd3_full.yaml"),
    "FLUX.1 [dev]": ("flux_lora.yaml", None),
    "FLUX.1 Kontext [dev]": ("flux_kontext_lora.yaml", None),
    "FLUX.2 [dev]": ("flux2_lora.yaml", None),
    "FLUX.2 [klein] 4B": ("flux2_klein_lora.yaml", None),
    "Qwen-Image": ("qwen_image_lora.yaml", None),
    "Qwen-Image 2.1": ("qwen_image21_lora.yaml", None),
    "Qwen-Image-Edit": ("qwen_image_edit_lora.yaml", None),
    "Qwen-Image-Edit Plus": ("qwen_image_edit_plus_lora.yaml", None),
    "Z-Image Turbo": ("z_image_lora.yaml", None),
    "Wan 2.1 1.3B": ("wan_lora.yaml", None),
    "HunyuanVideo 1.5": ("hunyuan_video15_lora.yaml", None),
}
# column -> the flags added to the row's config
COLUMNS: dict[str, tuple[str, ...]] = {
    "LoRA, bf16 base": (),
    "LoRA, 8-bit base": ("--base_quantization", "quanto-int8"),
    "LoRA, 4-bit base": ("--base_quantization", "quanto-int4"),
    "full": ("--use_peft", "false"),
}
GPUS_GB = (24, 48, 80, 141)
# A card fits a run whose peak is at most this share of its memory (the rest: the CUDA context, allocator slack).
USABLE_SHARE = 0.9
# (row, column) -> (peak GiB, the measured run, its result file): H100 runs, torch.cuda.max_memory_allocated
MEASURED: dict[tuple[str, str], tuple[float, str, str]] = {
    ("SD 1.5", "full"): (
        24.91, "4 pairs at 512 px, no checkpointing, DPO", "cuda-h100-gpu-matrix-real.json"
    ),
    ("SDXL", "full"): (
        52.64, "2 pairs at 1024 px, checkpointing, DPO", "cuda-h100-gpu-matrix-real.json"
    ),
    ("FLUX.2 [klein] 4B", "LoRA, bf16 base"): (
        45.59, "1 pair at 1024 px, no checkpointing, rank 8", "cuda-h100-gpu-matrix-real.json"
    ),
    ("FLUX.2 [klein] 4B", "LoRA, 8-bit base"): (
        50.22, "quanto int8, 1 pair at 1024 px, no checkpointing", "cuda-h100-gpu-matrix-real-lora-quantized-base.json"
    ),
    ("SD 1.5", "LoRA, bf16 base"): (
        11.33, "4 pairs at 512 px, rank 8", "cuda-h100-gpu-matrix-real-lora-quantized-base.json"
    ),
    ("SD 1.5", "LoRA, 8-bit base"): (
        13.93, "torchao int8, 4 pairs at 512 px", "cuda-h100-gpu-matrix-real-lora-quantized-base.json"
    ),
}  # fmt: skip
BEGIN = "<!-- fits-on table: python benchmarks/tools/memory_table.py --write docs/memory.md -->"
END = "<!-- end of fits-on table -->"


def fits_on(gib: float) -> str:
    """The smallest of :data:`GPUS_GB` whose usable share holds ``gib``, or ``> 141 GB``."""
    for gb in GPUS_GB:
        if gib * 2**30 <= USABLE_SHARE * gb * 1e9:
            return f"{gb} GB"
    return f"> {GPUS_GB[-1]} GB"


def estimate_gib(config: str, *flags: str) -> float:
    """``estimate-memory --json``'s ``total_gib`` for a shipped config and flags."""
    from trl_diffusion_sdpo.cli.memory import run_estimate_memory

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_estimate_memory(["--config", str(CONFIGS / config), *flags, "--json"])
    return json.loads(out.getvalue().strip().splitlines()[-1])["total_gib"]


def table_markdown(rows: list[str] | None = None) -> str:
    """The table, one row per family of :data:`FAMILY_CONFIGS` (or of ``rows``, their titles), a cell per column of
    :data:`COLUMNS`."""
    lines = [
        "| family (shipped config) | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for title in rows or FAMILY_CONFIGS:
        lora, full = FAMILY_CONFIGS[title]
        cells = []
        for column, flags in COLUMNS.items():
            measured = MEASURED.get((title, column))
            if measured is not None:
                gib, what, _ = measured
                cells.append(f"{fits_on(gib)} ({gib:.1f} GiB measured: {what})")
                continue
            config, extra = (full, ()) if column == "full" and full else (lora, flags)
            gib = estimate_gib(config, *extra)
            cells.append(f"{fits_on(gib)} ({gib:.1f} GiB computed)")
        lines.append(f"| {title} (`{lora}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(path: Path) -> None:
    """Rewrite the table between :data:`BEGIN` and :data:`END` in ``path``."""
    text = path.read_text()
    block = f"{BEGIN}\n{table_markdown()}\n{END}"
    new, count = re.subn(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    if count != 1:
        raise SystemExit(f"{path}: no table markers ({BEGIN} ... {END})")
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print, or --write into a Markdown file, the fits-on table.")
    parser.add_argument("--write", type=Path, default=None, metavar="FILE.md")
    opts = parser.parse_args(argv)
    if opts.write:
        write(opts.write)
    else:
        print(table_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
