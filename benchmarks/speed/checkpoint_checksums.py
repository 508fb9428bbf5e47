"""The cost of the SHA-256 checksums in the checkpoint manifest, at save and at resume.

    python benchmarks/speed/checkpoint_checksums.py \
        --out benchmarks/results/reliability/cpu-checkpoint-checksums-tiny-100mb.json

Two checkpoints are written with the files a real one holds: ``tiny`` (~150 kB: 12,600 float32 weights in
safetensors and their AdamW moments in ``optimizer.pt``, the size of the test suite's LoRA run) and ``100mb``
(8.3 M float32 weights, 33 MB, plus 67 MB of AdamW moments: 100 MB, the size class of an SDXL LoRA of rank 32 with
its optimizer state).
For each, measured over ``--repeats`` runs (the median is reported):

* ``write_s``: writing the files (safetensors ``save_file`` and ``torch.save``), what every save costs anyway;
* ``publish_s``: :func:`~trl_diffusion_sdpo.io.checkpoint_writing.publish_checkpoint` (fsync, SHA-256 of every file
  from the page cache, manifest, rename) and ``publish_without_checksums_s`` (the same with hashing replaced by
  nothing);
* ``verify_s``: :func:`~trl_diffusion_sdpo.io.checkpoints.checkpoint_problem` at resume, with and without checksums
  (files in the page cache; a cold read is bounded by the disk's read speed instead);
* ``sha256_mb_per_s``: hashing throughput on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from unittest import mock

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from trl_diffusion_sdpo.io import checkpoint_writing, checkpoints  # noqa: E402

SIZES = {"tiny": 12_600, "100mb": 8_333_333}  # float32 parameters (weights + AdamW state: 12 bytes each)


def write_checkpoint(folder: str, parameters: int) -> None:
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(parameters, generator=generator)
    os.makedirs(folder)
    save_file({"lora.weight": weights}, os.path.join(folder, "pytorch_lora_weights.safetensors"))
    torch.save(
        {"state": {0: {"exp_avg": weights * 0.1, "exp_avg_sq": weights.abs()}}}, os.path.join(folder, "optimizer.pt")
    )
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump({"global_step": 1}, f)


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def measure(root: str, name: str, parameters: int, repeats: int) -> dict:
    runs: dict[str, list[float]] = {k: [] for k in ("write_s", "publish_s", "publish_without_checksums_s")}
    runs |= {"verify_s": [], "verify_without_checksums_s": [], "sha256_mb_per_s": []}
    size = 0
    for i in range(repeats):
        for checksums in (True, False):
            staging, final = os.path.join(root, f".tmp-checkpoint-{i}"), os.path.join(root, f"checkpoint-{i}")
            write_s = timed(write_checkpoint, staging, parameters)
            if checksums:
                runs["write_s"].append(write_s)
                runs["publish_s"].append(timed(checkpoint_writing.publish_checkpoint, staging, final))
                size = sum(os.path.getsize(os.path.join(final, n)) for n in os.listdir(final))
                runs["verify_s"].append(timed(checkpoints.checkpoint_problem, final))
                runs["verify_without_checksums_s"].append(
                    timed(checkpoints.checkpoint_problem, final, verify_checksums=False)
                )
                hash_s = sum(timed(checkpoints.file_sha256, os.path.join(final, n)) for n in os.listdir(final))
                runs["sha256_mb_per_s"].append(size / 1e6 / hash_s)
            else:
                with mock.patch.object(checkpoint_writing, "file_sha256", lambda path: ""):
                    runs["publish_without_checksums_s"].append(
                        timed(checkpoint_writing.publish_checkpoint, staging, final)
                    )
            shutil.rmtree(final)
    median = {k: statistics.median(v) for k, v in runs.items()}
    median["checkpoint_bytes"] = size
    median["checksum_cost_at_save_s"] = median["publish_s"] - median["publish_without_checksums_s"]
    median["checksum_cost_at_save_vs_write"] = median["checksum_cost_at_save_s"] / median["write_s"]
    median["checksum_cost_at_resume_s"] = median["verify_s"] - median["verify_without_checksums_s"]
    return median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    options = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name, parameters in SIZES.items():
        with tempfile.TemporaryDirectory(dir=options.dir) as root:
            results[name] = measure(root, name, parameters, options.repeats)
            print(name, json.dumps(results[name], indent=1))
    report = {
        "machine": {
            "date": time.strftime("%Y-%m-%d"),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_cores": os.cpu_count(),
            "note": "files in the page cache",
        },
        "measured": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(options.out)), exist_ok=True)
    with open(options.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
