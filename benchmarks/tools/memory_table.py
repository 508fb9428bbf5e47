"""docs/memory.md's table: the smallest GPU each family trains on, per tuning, encoding live and from a latent cache,
from ``estimate-memory --json`` on the shipped configs (its ``gpu_gb`` and ``fits``, the verdict the command prints).

    python benchmarks/tools/memory_table.py --write docs/memory.md   # rewrite the table between its markers

Each row is a family's shipped LoRA config (its resolution, batch, prompt length and activation checkpointing); the
full-tuning column reads the family's ``*_full.yaml`` where one is shipped, else the LoRA config with ``--use_peft
false``. One process (``--engine ddp``), the config's safeguard and optimizer. Each cell gives the run encoding every
step (``--cache_latents false``: the VAE and text encoders on the GPU) and reading a latent cache (``--cache_latents
true``: they stay on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the package of this checkout

from trl_diffusion_sdpo.cli.memory import run_estimate_memory  # noqa: E402
from trl_diffusion_sdpo.engines.memory import GPUS_GB  # noqa: E402

__all__ = ["BEGIN", "CACHES", "COLUMNS", "END", "FAMILY_CONFIGS", "cell", "estimate", "table_markdown"]

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
# what each cell shows, in order: encoding live, then reading a latent cache
CACHES: dict[str, tuple[str, ...]] = {"live": ("--cache_latents", "false"), "cached": ("--cache_latents", "true")}
BEGIN = "<!-- fits-on table: python benchmarks/tools/memory_table.py --write docs/memory.md -->"
END = "<!-- end of fits-on table -->"


def estimate(config: str, *flags: str) -> dict:
    """``estimate-memory --json`` for a shipped config and flags."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_estimate_memory(["--config", str(CONFIGS / config), *flags, "--json"])
    return json.loads(out.getvalue().strip().splitlines()[-1])


def card(report: dict) -> str:
    """The smallest card ``estimate-memory`` names for a report, or more than the largest."""
    return f"{report['gpu_gb']:g} GB" if report["fits"] else f"> {GPUS_GB[-1]} GB"


def cell(config: str, *flags: str) -> str:
    """One cell: the card and peak encoding live, then reading a latent cache."""
    live, cached = (estimate(config, *flags, *extra) for extra in CACHES.values())
    return f"{card(live)} ({live['total_gib']:.1f} GiB); cached: {card(cached)} ({cached['total_gib']:.1f} GiB)"


def table_markdown(rows: list[str] | None = None) -> str:
    """The table, one row per family of :data:`FAMILY_CONFIGS` (or of ``rows``, their titles), a cell per column of
    :data:`COLUMNS`."""
    lines = ["| family (shipped config) | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for title in rows or FAMILY_CONFIGS:
        lora, full = FAMILY_CONFIGS[title]
        cells = [cell(full) if column == "full" and full else cell(lora, *flags) for column, flags in COLUMNS.items()]
        lines.append(f"| {title} (`{lora}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(path: Path) -> None:
    """Rewrite the table between :data:`BEGIN` and :data:`END` in ``path``."""
    text = path.read_text()
    block = f"{BEGIN}\n{table_markdown()}\n{END}"
    pattern = r"<!-- fits-on table:[^\n]*-->.*?" + re.escape(END)
    new, count = re.subn(pattern, lambda _: block, text, flags=re.S)
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
