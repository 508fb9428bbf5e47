"""The exact rule eager and under ``torch.compile``, side by side with Diffusion-DPO, on the tests' tiny SD UNet with
LoRA (r4 on the attention projections): host time, graph breaks, host reads and extra gradient bytes per step.

Not part of the test suite. CPU, one thread, float32, 2 pairs at 32 px. In one process, for each of Diffusion-DPO
(``safeguard_space="none"``), the one pass (taps, ``safeguard_passes="one"``) and the per-branch passes
(``safeguard_passes="two"``), eager and with ``torch_compile=True`` (``--backend``, ``aot_eager`` by default: on a CPU
inductor's C++ build would dominate), a trainer runs ``--steps`` optimizer steps; the first ``--warmup`` (compilation,
the one pass's probe) are left out. Per variant: the median main-thread CPU time per step (``time.thread_time``, from
``on_step_begin`` to ``on_step_end``) and its ratio to Diffusion-DPO's of the same mode; the graph breaks dynamo
counted over the run (``torch._dynamo.utils.counters``); the host reads of the last step (:mod:`tests.helpers.
host_reads`); and the bytes of the unique storages of the weights' ``.grad`` and the stage's store at the optimizer
step, less Diffusion-DPO's ``.grad``. Under ``torch_compile`` the exact rule runs the per-branch passes whatever
``safeguard_passes`` says (the one pass's taps would break the graph), so "one" there is the per-branch passes too.

    python benchmarks/speed/compiled_exact_rule.py \\
        --json benchmarks/results/safeguard-exactness/cpu-compiled-exact-rule.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from datasets import Dataset  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from tests.helpers.common import fast_config_values, lora_config, pickapic_rows  # noqa: E402
from tests.helpers.host_reads import HostReadCounter  # noqa: E402
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer  # noqa: E402
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline  # noqa: E402

VARIANTS = {
    "diffusion_dpo": {"safeguard_space": "none"},
    "one_pass_taps": {"safeguard_space": "parameter", "safeguard_passes": "one"},
    "per_branch_passes": {"safeguard_space": "parameter", "safeguard_passes": "two"},
}


class _Measure(TrainerCallback):
    """Per step: main-thread CPU seconds, host reads (the last step's), and the gradient bytes held at the optimizer
    step (the unique storages of the ``.grad`` and of the exact rule's store)."""

    def __init__(self, trainer) -> None:
        self.trainer, self.seconds, self.reads, self.held = trainer, [], [], []
        self._counter: HostReadCounter | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._counter = HostReadCounter()
        self._counter.__enter__()
        self._start = time.thread_time()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        found: dict[int, int] = {}
        tensors = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        stage = getattr(self.trainer.safeguard, "backward_stage", None)
        store = None if stage is None else (stage.store or stage.one_pass)
        if store is not None:
            tensors += [t for t in _tensors(store) if not isinstance(t, torch.nn.Parameter)]
        for tensor in tensors:
            found[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        self.held.append(sum(found.values()))

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.thread_time() - self._start)
        self._counter.__exit__(None, None, None)
        self.reads.append(len(self._counter.reads))


def _tensors(obj, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth >= 4 or isinstance(obj, (torch.nn.Module, type, str)):
        return []
    items = obj if isinstance(obj, (list, tuple)) else obj.values() if isinstance(obj, dict) else None
    if items is None:
        items = vars(obj).values() if hasattr(obj, "__dict__") else []
    return [t for item in items for t in _tensors(item, depth + 1)]


def run(name: str, compiled: bool, opts: argparse.Namespace, workdir: str) -> dict:
    torch._dynamo.reset()
    counters.clear()
    pipeline = build_tiny_sd_pipeline(seed=0, tokenizer_dir=os.path.join(workdir, "tokenizer"))
    fields = {**fast_config_values(os.path.join(workdir, "out")), "max_steps": opts.steps, "logging_steps": 1000}
    fields |= VARIANTS[name] | ({"torch_compile": True, "torch_compile_backend": opts.backend} if compiled else {})
    trainer = DiffusionSDPOTrainer(
        pipeline,
        args=DiffusionSDPOConfig(**fields),
        train_dataset=Dataset.from_list(pickapic_rows(2 * opts.steps)),
        peft_config=lora_config(),
    )
    measure = _Measure(trainer)
    trainer.add_callback(measure)
    trainer.train()
    stage = getattr(trainer.safeguard, "backward_stage", None)
    gradient_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    steady = measure.seconds[opts.warmup :]
    return {
        "passes_run": None if stage is None else ("one pass (taps)" if stage.one_pass is not None else "per branch"),
        "why_per_branch": None if stage is None else stage.two_pass_reason,
        "host_ms_per_step_median": 1e3 * statistics.median(steady),
        "host_ms_per_step_all": [round(1e3 * s, 2) for s in measure.seconds],
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "host_reads_last_step": measure.reads[-1],
        "gradient_bytes": gradient_bytes,
        "held_bytes_at_optimizer_step": measure.held[-1],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--json", default=None)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for compiled in (False, True):
            mode = "compiled" if compiled else "eager"
            for name in VARIANTS:
                rows[f"{name}/{mode}"] = run(name, compiled, opts, workdir)
                print(f"{name}/{mode}: {json.dumps(rows[f'{name}/{mode}'])}", flush=True)
    for key, row in rows.items():
        mode = key.split("/")[1]
        dpo = rows[f"diffusion_dpo/{mode}"]
        row["host_time_over_diffusion_dpo"] = row["host_ms_per_step_median"] / dpo["host_ms_per_step_median"]
        row["extra_bytes_over_diffusion_dpo"] = (
            row["held_bytes_at_optimizer_step"] - dpo["held_bytes_at_optimizer_step"]
        )
    result = {
        "what": " ".join(__doc__.split("\n\n")[:2]).replace("\n", " "),
        "command": "python " + " ".join(["benchmarks/speed/compiled_exact_rule.py", *(argv or sys.argv[1:])]),
        "torch": torch.__version__,
        "load": f"load average {os.getloadavg()[0]:.1f} at the end (2 CPU cores shared with other work)",
        "settings": {"steps": opts.steps, "warmup": opts.warmup, "backend": opts.backend, "threads": 1},
        "rows": rows,
    }
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
