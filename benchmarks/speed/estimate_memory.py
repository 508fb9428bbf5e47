"""``estimate-memory`` against measured peaks on the CPU: the shipped tiny model, the small preset and SD1.5's UNet.

    python benchmarks/speed/estimate_memory.py --cases tiny-lora,tiny-full,small-lora,small-full,sd15-lora \
        --out benchmarks/results/memory/cpu-estimate-memory-tiny-small-sd15.json

Each case trains a few steps in a fresh process (float32, the ``output`` safeguard, AdamW, live encoding: the VAE and
text encoder resident). Measured: the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``)
minus its resident set once torch, diffusers, transformers and the package are imported and before any model is
built; on a CPU the device is the host, so this is what a GPU's allocator peak counts plus what the host process holds
besides (the pipeline object, the dataset, allocator slack). Estimated:
``trl_diffusion_sdpo.engines.memory.estimate_memory``
of the same pipeline (:func:`~trl_diffusion_sdpo.engines.memory.model_sizes_of_pipeline`) and run shape. The models
are built
from their configs with random weights (``benchmarks/harness.py``; ``tiny`` is ``trl-diffusion-sdpo:tiny``).

Beside them (``h100``), the estimate at the settings of the H100 runs of ``benchmarks/speed/gpu_matrix.py`` against
their measured peaks (``torch.cuda.max_memory_allocated``), read from their result files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness

# case -> (model, pairs per step, resolution, LoRA)
CASES: dict[str, tuple[str, int, int, bool]] = {
    "tiny-lora": ("tiny", 4, 32, True),
    "tiny-full": ("tiny", 4, 32, False),
    "small-lora": ("small", 2, 128, True),
    "small-full": ("small", 2, 128, False),
    "sd15-lora": ("sd15", 2, 256, True),
    "sd15-full": ("sd15", 2, 256, False),
}
LORA_RANK = 8
STEPS = 3


def status_bytes(key: str) -> int:
    """A ``/proc/self/status`` memory line (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def worker(case: str) -> dict[str, Any]:
    import torch
    from peft import LoraConfig

    from benchmarks.harness import LORA_TARGETS, build_pipeline, synthetic_pairs
    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
    from trl_diffusion_sdpo.engines.collectives import load_pipeline
    from trl_diffusion_sdpo.engines.memory import RunShape, estimate_memory, model_sizes_of_pipeline

    model, pairs, resolution, lora = CASES[case]
    baseline = status_bytes("VmRSS")
    torch.manual_seed(0)
    pipeline = load_pipeline("trl-diffusion-sdpo:tiny") if model == "tiny" else build_pipeline(model, "cpu")
    workdir = tempfile.mkdtemp(prefix="estimate-memory-")
    args = DiffusionSDPOConfig(
        output_dir=os.path.join(workdir, "out"),
        resolution=resolution,
        per_device_train_batch_size=pairs,
        max_steps=STEPS,
        logging_steps=STEPS,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGETS) if lora else None
    trainer = DiffusionSDPOTrainer(
        pipeline, args=args, train_dataset=synthetic_pairs(pairs * STEPS, resolution), peft_config=peft_config
    )
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    shape = RunShape(
        pairs=pairs,
        resolution=resolution,
        prompt_tokens=77,
        dtype_bytes=4,
        lora_rank=LORA_RANK if lora else None,
        lora_targets=tuple(LORA_TARGETS),
        optim=str(getattr(args.optim, "value", args.optim)),
        safeguard="output",
    )
    estimate = estimate_memory(model_sizes_of_pipeline(pipeline), shape)
    measured = peak - baseline
    return {
        "model": model,
        "pairs": pairs,
        "resolution": resolution,
        "lora": lora,
        "steps": STEPS,
        "train_s": round(train_s, 1),
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "measured_bytes": measured,
        "measured_gib": round(measured / 2**30, 4),
        "estimate_gib": round(estimate.total_gib, 4),
        "error_gib": round(estimate.total_gib - measured / 2**30, 4),
        "relative_error": round(estimate.total_bytes / measured - 1, 4),
        "estimate": estimate.as_dict(),
    }


# H100 runs (benchmarks/speed/gpu_matrix.py, torch.cuda.max_memory_allocated) the estimate is compared with, at their
# own settings: (result file, run or None, model, setting) -> (model id, RunShape keywords)
H100_RUNS: dict[tuple[str, str | None, str, str], tuple[str, dict[str, Any]]] = {
    ("cuda-h100-gpu-matrix-real.json", None, "sd15", "dpo"): (
        "stable-diffusion-v1-5/stable-diffusion-v1-5", {"pairs": 4, "resolution": 512, "safeguard": "none"}),
    ("cuda-h100-gpu-matrix-real.json", None, "sd15", "sdpo_param"): (
        "stable-diffusion-v1-5/stable-diffusion-v1-5", {"pairs": 4, "resolution": 512, "safeguard": "one_pass"}),
    ("cuda-h100-gpu-matrix-real.json", None, "sd15", "sdpo_param_two"): (
        "stable-diffusion-v1-5/stable-diffusion-v1-5", {"pairs": 4, "resolution": 512, "safeguard": "two_pass"}),
    ("cuda-h100-gpu-matrix-real.json", None, "sdxl", "dpo"): (
        "stabilityai/stable-diffusion-xl-base-1.0",
        {"pairs": 2, "resolution": 1024, "activation_checkpointing": True, "safeguard": "none"}),
    ("cuda-h100-gpu-matrix-real.json", None, "sdxl", "sdpo_param"): (
        "stabilityai/stable-diffusion-xl-base-1.0",
        {"pairs": 2, "resolution": 1024, "activation_checkpointing": True, "safeguard": "one_pass"}),
    ("cuda-h100-gpu-matrix-real.json", None, "flux2-klein", "dpo"): (
        "black-forest-labs/FLUX.2-klein-4B",
        {"pairs": 1, "resolution": 1024, "prompt_tokens": 512, "lora_rank": 8, "safeguard": "none"}),
    ("cuda-h100-gpu-matrix-real-lora-quantized-base.json", "lora-quanto-int8-base", "flux2-klein", "dpo"): (
        "black-forest-labs/FLUX.2-klein-4B",
        {"pairs": 1, "resolution": 1024, "prompt_tokens": 512, "lora_rank": 8, "safeguard": "none",
         "base_quantization": "quanto-int8"}),
    ("cuda-h100-gpu-matrix-real-lora-quantized-base.json", "lora-none-base-sd15", "sd15", "dpo"): (
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        {"pairs": 4, "resolution": 512, "lora_rank": 8, "safeguard": "none"}),
}  # fmt: skip


def h100_rows() -> dict[str, Any]:
    """The estimate at each :data:`H100_RUNS` run's settings (bf16, AdamW, one process, live encoding) against its
    measured peak."""
    from benchmarks.harness import RESULTS
    from trl_diffusion_sdpo.engines.memory import RunShape, estimate_memory, family_lora_targets, model_sizes

    rows = {}
    for (file, run, model, setting), (model_id, keywords) in H100_RUNS.items():
        report = json.loads((RESULTS / "gpu" / file).read_text())
        cell = (report["runs"][run] if run else report)["cells"][model][setting]
        sizes = model_sizes(model_id)
        shape = RunShape(dtype_bytes=2, lora_targets=family_lora_targets(sizes.family), **keywords)
        estimate = estimate_memory(sizes, shape)
        measured = cell["peak_memory_bytes"]
        rows[f"{file}:{run or ''}:{model}:{setting}"] = {
            "measured_gib": round(measured / 2**30, 3),
            "estimate_gib": round(estimate.total_gib, 3),
            "relative_error": round(estimate.total_bytes / measured - 1, 4),
            "measured_trainable_params": cell.get("trainable_params"),
            "estimate": estimate.as_dict(),
        }
        print(model, setting, run, rows[f"{file}:{run or ''}:{model}:{setting}"]["relative_error"], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="tiny-lora,tiny-full,small-lora,small-full,sd15-lora")
    parser.add_argument("--out", default=None, help="result JSON (default: print only)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--h100-only", action="store_true", help="only (re)compute the H100 comparison into --out's existing file"
    )
    opts = parser.parse_args(argv)
    if opts.worker:
        print("RESULT " + json.dumps(worker(opts.worker)), flush=True)
        return 0
    from benchmarks.harness import machine_description

    if opts.h100_only:
        report = json.loads(Path(opts.out).read_text())
        report["h100"] = h100_rows()
        report["h100_command"] = "python benchmarks/speed/estimate_memory.py " + " ".join(argv or sys.argv[1:])
        Path(opts.out).write_text(json.dumps(report, indent=1) + "\n")
        return 0
    rows: dict[str, Any] = {}
    for case in opts.cases.split(","):
        done = subprocess.run(
            [sys.executable, __file__, "--worker", case], capture_output=True, text=True, check=False
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            rows[case] = {"status": "error", "stderr_tail": done.stderr[-2000:]}
        else:
            rows[case] = {"status": "measured", **json.loads(lines[-1][len("RESULT ") :])}
        row = rows[case]
        print(case, row.get("estimate_gib"), row.get("measured_gib"), row.get("relative_error"), flush=True)
    report = {
        "what": "estimate-memory's per-process peak against the measured peak of a few training steps, on the CPU",
        "command": "python benchmarks/speed/estimate_memory.py " + " ".join(argv or sys.argv[1:]),
        "measure": "VmHWM (resident-set high-water mark) of a fresh process minus its VmRSS after the imports, "
        "before any model is built",
        "settings": {"dtype": "float32", "safeguard_space": "output", "optim": "adamw_torch_fused",
                     "lora_rank": LORA_RANK, "steps": STEPS, "cache_latents": False},
        "machine": machine_description("cpu"),
        "rows": rows,
        "h100": h100_rows(),
    }  # fmt: skip
    if opts.out:
        Path(opts.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
