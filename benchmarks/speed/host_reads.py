"""Host reads per optimizer step of Diffusion-DPO and each safeguard, at two commits side by side (CPU, tiny SD).

On an accelerator each read of a tensor's value on the host (``.item()``, ``.tolist()``, ``bool()``, ``float()``,
``.cpu()``, ...) makes the host wait for the device. On the CPU the reads are counted as the calls themselves by the
test suite's torch-function mode (``tests/helpers/host_reads.py``, loaded from this checkout, so an older commit is
counted by the same counter), from ``on_step_begin`` to ``on_step_end`` of one steady-state optimizer step of each
safeguard (``training_step`` with the safeguard's hook, clipping, the optimizer step; not the batch's fetch, not the
logging), in one run of the tiny SD pipeline whose safeguard changes every step (each one's second step counted: its
first takes the decisions made once per run). LoRA and full tuning, one pair batch of 2, fused AdamW (the fast test
config).

Each commit is measured in a fresh process on a git worktree of it (its package first on ``sys.path``), removed
after the run; ``--after .`` measures this checkout's working tree as it is (its ``git status`` recorded). Per
commit, tuning and safeguard: the number of reads and where each was made (file and line, paths relative to the
checkout).

    python benchmarks/speed/host_reads.py --before 0178c3c --after HEAD \
        --json benchmarks/results/safeguard/cpu-host-reads.json
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HELPER = ROOT / "tests" / "helpers" / "host_reads.py"
TUNINGS = ("lora", "full")


def _measure(checkout: str, tunings: list[str]) -> dict:
    """In this process: the host reads of each safeguard's step with ``checkout``'s package."""
    sys.path[:0] = [checkout]
    import torch
    from datasets import Dataset

    import trl_diffusion_sdpo
    from tests.helpers.common import fast_config_values, lora_config, pickapic_rows
    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    package = Path(trl_diffusion_sdpo.__file__).resolve().parents[1]
    assert package == Path(checkout).resolve(), (package, checkout)  # the checkout's package is the one measured
    spec = importlib.util.spec_from_file_location("host_reads_helper", HELPER)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    torch.set_num_threads(1)
    work = tempfile.mkdtemp()

    def trainer_of(lora: bool):
        def make(**overrides):
            config = DiffusionSDPOConfig(**{**fast_config_values(f"{work}/out"), **overrides})
            pipeline = build_tiny_sd_pipeline(seed=0, tokenizer_dir=f"{work}/tokenizer")
            return DiffusionSDPOTrainer(
                pipeline,
                args=config,
                train_dataset=Dataset.from_list(pickapic_rows(6)),
                peft_config=lora_config() if lora else None,
            )

        return make

    prefix = str(package) + os.sep
    out = {}
    for tuning in tunings:
        reads = helper.safeguard_host_reads(trainer_of(tuning == "lora"))
        out[tuning] = {
            name: {"reads": len(rows), "where": dict(collections.Counter(r.replace(prefix, "") for r in rows))}
            for name, rows in reads.items()
        }
    return out


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the commit before the change")
    parser.add_argument("--after", default="HEAD", help="the commit after it (default HEAD; '.': the working tree)")
    parser.add_argument("--tunings", default=",".join(TUNINGS))
    parser.add_argument("--json", help="where to write the result")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a checkout to measure in this process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    tunings = opts.tunings.split(",")
    if opts.worker:
        result = _measure(opts.worker, tunings)
        Path(opts.out).write_text(json.dumps(result))
        return result

    sys.path.insert(0, str(ROOT))
    from benchmarks.harness import machine_description

    commits = {
        label: _git("rev-parse", "--short", ref) if ref != "." else "."
        for label, ref in (("before", opts.before), ("after", opts.after))
    }
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, commit in commits.items():
            tree, out = (f"{scratch}/{label}" if commit != "." else str(ROOT)), f"{scratch}/{label}.json"
            if commit != ".":
                subprocess.run(["git", "worktree", "add", "--detach", "-q", tree, commit], cwd=ROOT, check=True)
            try:
                command = [sys.executable, __file__, "--before", opts.before, "--tunings", opts.tunings]
                subprocess.run([*command, "--worker", tree, "--out", out], check=True)
            finally:
                if commit != ".":
                    subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, check=True)
            if commit == ".":  # the working tree: its HEAD and what differs from it
                commit = {
                    "head": _git("rev-parse", "--short", "HEAD"),
                    "changed": _git("status", "--short").splitlines(),
                }
            runs[label] = {"commit": commit, **json.loads(Path(out).read_text())}
    result = {
        "command": "python benchmarks/speed/host_reads.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description("cpu", 1),
        "load": f"load average {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} CPU cores, shared)",
        "settings": {
            "pipeline": "tiny SD (trl_diffusion_sdpo.testing.build_tiny_sd_pipeline), resolution 32, 2 pairs per step",
            "optimizer": "the fast test config's (fused AdamW), lr 1e-3, no logging in the counted steps",
            "counted": "each safeguard's second optimizer step, on_step_begin to on_step_end, in one run that "
            "changes the safeguard every step",
            "reads": "calls of Tensor.item, tolist, __bool__, __float__, __int__, __index__, cpu, numpy "
            "(tests/helpers/host_reads.py)",
        },
        "runs": runs,
    }
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
    for label, run in runs.items():
        for tuning in tunings:
            counts = {name: row["reads"] for name, row in run[tuning].items()}
            commit = run["commit"] if isinstance(run["commit"], str) else f"{run['commit']['head']} + working tree"
            print(f"{label} ({commit}) {tuning}: {counts}")
    return result


if __name__ == "__main__":
    main()
