"""What a reference-free objective saves: MaPO (no reference model built or run) against Diffusion-DPO with its
frozen reference copy (full tuning), each in its own process, same model, data and steps.

Runs ``step_time.py`` twice (``--loss-type dpo`` and ``--loss-type mapo``, no safeguard, no paired floor) and reports
the median step time and the peak memory of each, and their ratios.

    python benchmarks/speed/reference_free.py --threads 1                   # CPU, small UNet
    python benchmarks/speed/reference_free.py --device cuda --unet sd15
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--unet", default="small")
    parser.add_argument("--run", default="cached-full")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    rows = {}
    for loss_type in ("dpo", "mapo"):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            command = [
                sys.executable,
                os.path.join(HERE, "step_time.py"),
                "--device",
                args.device,
                "--unet",
                args.unet,
                "--runs",
                args.run,
                "--losses",
                "dpo",
                "--no-paired-floor",
                "--loss-type",
                loss_type,
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
                "--output",
                out,
            ]
            subprocess.run(command, check=True, capture_output=True, text=True)
            row = json.load(open(out))["rows"][f"dpo-{args.run}"]
        rows[loss_type] = {"median_step_s": row["median_step_s"], "peak_memory_bytes": row["peak_memory_bytes"]}
        peak_mib = row["peak_memory_bytes"] / 2**20
        print(f"{loss_type}: {1000 * row['median_step_s']:.1f} ms/step, peak {peak_mib:.0f} MiB")
    result = {
        "settings": vars(args),
        "rows": rows,
        "mapo_step_ratio": rows["mapo"]["median_step_s"] / rows["dpo"]["median_step_s"],
        "memory_saved_bytes": rows["dpo"]["peak_memory_bytes"] - rows["mapo"]["peak_memory_bytes"],
    }
    print(
        f"MaPO step / DPO step: {result['mapo_step_ratio']:.3f}; memory saved: "
        f"{result['memory_saved_bytes'] / 2**20:.0f} MiB"
    )
    # benchmarks/results/objectives/<device>-reference-free-<unet>.json (harness.result_path; not imported: this
    # script only launches step_time.py)
    output = args.output or os.path.join(
        os.path.dirname(HERE), "results", "objectives", f"{args.device}-reference-free-{args.unet}.json"
    )
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
