"""The exact safeguard's host time per whole optimizer step, lock-step against Diffusion-DPO, on a UNet with SD1.5's
block structure at small widths; one checkout at ``--before`` and one at ``--after``, each in its own process.

Not part of the test suite. CPU, one thread, bf16 mixed precision (CPU autocast, as a GPU run trains), cached latents,
4 pairs at 64 px (8x8 latents). The UNet has SD1.5's down and up block types, two layers per block and its
cross-attention, at widths (32, 64, 64, 64) with an 8-wide head and 32-wide prompts, so the Python and dispatch work
per layer (a GPU step at SD1.5's size is bound by it) weighs as it does there. Per tuning (full, LoRA r4) one trainer
run alternates, step by step, Diffusion-DPO, the one pass (``safeguard_space="parameter"``) and the update space
(:func:`benchmarks.speed.safeguard_op_counts.run`: only the running safeguard's taps on the model); the measure is
each safeguard's main-thread CPU time (``time.thread_time``) per whole step over the Diffusion-DPO step of its own
round, the median of ``--rounds`` rounds, with the profiled step's operation counts, host syncs and casts beside it.

    python benchmarks/speed/host_time_lockstep.py --before 5d519bc --after HEAD --rounds 15 \\
        --json benchmarks/results/one-pass/cpu-host-time-lockstep-sd15-structure.json

Each checkout is a git worktree made for the run and removed after it; the two processes run side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SD15_STRUCTURE = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 64, 64),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
RESOLUTION = 64  # 8x8 latents: SD1.5's three downsamplings leave 1x1
# The limits on the ratio to Diffusion-DPO's host time per step, per tuning and safeguard
LIMITS = {"full": {"parameter": 1.05, "update": 1.10}, "lora_r4": {"parameter": 1.03, "update": 1.05}}


def result_head(script: str, doc: str, paragraphs: int, argv: list[str] | None) -> dict:
    """A result file's head for a measure on this model: what it measures (the first ``paragraphs`` of ``doc``), the
    command that wrote it, the machine, the load, and the model's settings (the caller adds its own)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import harness

    return {
        "what": " ".join(doc.split("\n\n")[:paragraphs]).replace("\n", " "),
        "command": "python " + " ".join([str(Path(script).relative_to(ROOT)), *(argv or sys.argv[1:])]),
        "machine": harness.machine_description("cpu", 1),
        "load": f"load average {os.getloadavg()[0]:.1f} at the end (2 CPU cores shared with other work)",
        "settings": {
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in SD15_STRUCTURE.items()},
            "resolution": RESOLUTION,
            "precision": "bf16 mixed precision (CPU autocast)",
            "threads": 1,
        },
    }


def build_pipeline(tokenizer_dir: str):
    """The tiny SD pipeline (tokenizer, text encoder, VAE, scheduler) around a UNet of :data:`SD15_STRUCTURE`."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    tiny = build_tiny_sd_pipeline(seed=0, tokenizer_dir=tokenizer_dir, cross_attention_dim=32)
    torch.manual_seed(0)
    return StableDiffusionPipeline(**{**tiny.components, "unet": UNet2DConditionModel(**SD15_STRUCTURE)})


def measure(checkout: str, rounds: int, tunings: list[str]) -> dict:
    """This process's run of ``checkout``'s package: per tuning, the rows of
    :func:`~benchmarks.speed.safeguard_op_counts.run`."""
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.speed import safeguard_op_counts  # this checkout's benchmark code

    # the package and the tests' helpers of ``checkout``, imported from here on (nothing of them is imported yet)
    assert "trl_diffusion_sdpo" not in sys.modules
    sys.path[:0] = [checkout, str(Path(checkout) / "tests")]
    torch.set_num_threads(1)
    config = {"resolution": RESOLUTION, "cache_latents": True}
    with tempfile.TemporaryDirectory(prefix="lockstep-") as workdir:
        return {
            tuning: safeguard_op_counts.run(
                tuning == "lora_r4", {}, rounds, workdir, bf16=True, build_pipeline=build_pipeline, config=config
            )
            for tuning in tunings
        }


def _in_worktrees(commits: dict[str, str], rounds: int, tunings: list[str]) -> dict[str, dict]:
    """:func:`measure` of each of ``commits`` (label -> commit), each in a fresh process on a git worktree of it, the
    processes side by side (each ratio is paired within its own process)."""
    with tempfile.TemporaryDirectory(prefix="lockstep-checkout-") as folder:
        trees, processes = {}, {}
        try:
            for label, commit in commits.items():
                tree = trees[label] = str(Path(folder) / label)
                subprocess.run(["git", "worktree", "add", "--detach", "-q", tree, commit], cwd=ROOT, check=True)
                command = [sys.executable, __file__, "--measure", tree, "--rounds", str(rounds), "--tunings"]
                out = str(Path(folder) / f"{label}.json")
                processes[label] = subprocess.Popen([*command, ",".join(tunings), "--json", out], env={**os.environ})
            for label, process in processes.items():
                if process.wait():
                    raise RuntimeError(f"the {label} checkout's run failed")
            return {label: json.loads((Path(folder) / f"{label}.json").read_text()) for label in commits}
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, check=True)


def summary(rows: dict) -> dict:
    """Per tuning and safeguard: the paired host-time ratio to Diffusion-DPO, the operation ratio, and the limit."""
    table = {}
    for tuning, result in rows.items():
        for name in ("parameter", "update"):
            row = result["rows"][name]
            ratio = row["median_paired_thread_cpu_ratio_to_dpo"]
            table[f"{tuning}/{name}"] = {
                "host_time_ratio_to_dpo": round(ratio, 4),
                "operations_ratio_to_dpo": round(row["operations_ratio_to_dpo"], 4),
                "limit": LIMITS[tuning][name],
                "within_limit": ratio <= LIMITS[tuning][name],
            }
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=None, help="the commit measured as 'before' (none: no before rows)")
    parser.add_argument("--after", default="HEAD", help="the commit measured as 'after'")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per tuning")
    parser.add_argument("--tunings", default="full,lora_r4", help="of full, lora_r4")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one checkout, in this process
    parser.add_argument("--json", default=None)
    opts = parser.parse_args(argv)
    tunings = opts.tunings.split(",")
    if opts.measure:
        rows = measure(opts.measure, opts.rounds, tunings)
        if opts.json:
            Path(opts.json).write_text(json.dumps(rows) + "\n")
        return rows

    def commit(ref: str) -> str:
        return subprocess.run(["git", "rev-parse", ref], cwd=ROOT, check=True, capture_output=True, text=True).stdout

    refs = {"after": opts.after, **({"before": opts.before} if opts.before else {})}
    commits = {label: commit(ref).strip() for label, ref in refs.items()}
    runs = {}
    for label, rows in _in_worktrees(commits, opts.rounds, tunings).items():
        runs[label] = {"commit": commits[label], "summary": summary(rows), "rows": rows}
        for key, line in runs[label]["summary"].items():
            print(f"{label:6s} {key:18s} {line}")
    result = result_head(__file__, __doc__, 2, argv)
    result["settings"].update(pairs=4, latents="cached (cache_latents=True)", rounds=opts.rounds, limits=LIMITS)
    result["runs"] = runs
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
