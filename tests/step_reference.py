"""Reference training runs of the step: what ``lambda``, ``.grad``, the logged metrics and the trained weights were,
stored in ``tests/data/step_reference.json`` and compared by ``tests/safeguard/test_step_reference.py``.

Each run trains a family's tiny pipeline for three optimizer steps on a fixed dataset with one safeguard setting,
and records at every optimizer step (``.grad`` before it is clipped) eight fixed random projections of the
flattened trainable gradient and its norm, every logged metric, and at the end the same projections of the trainable
weights. Projections keep the file small while any change of a gradient's value moves them.

The runs are float32 on the CPU with deterministic kernels and one thread. That does not make them bit-exact across
machines: the vectorised kernels (``ATEN_CPU_CAPABILITY``) and the BLAS library's code paths sum in another order on
another CPU, so the test compares within a tolerance derived from the measured spread (see its module). AdamW runs
with ``adam_epsilon=1e-4`` here so that rounding noise stays rounding noise (see :func:`train_once`).

    python tests/step_reference.py --record          # rewrite the stored runs from the current code
    ATEN_CPU_CAPABILITY=avx2 python tests/step_reference.py --out avx2.json     # the runs, without storing them
    python tests/step_reference.py --spread default.json,avx2.json   # their spread and the stored runs'

``--spread`` writes ``benchmarks/results/cpu-step-reference-spread-tiny.json`` (``--out`` another name, for another
machine: ``SPREAD_FILES``). Re-record on any machine, then measure the spread under at least two capabilities there
and on another machine, and keep the test's tolerance above every measured spread.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import edit_rows, fast_config_values, pickapic_rows  # noqa: E402

STORED = os.path.join(ROOT, "tests", "data", "step_reference.json")
SPREAD_FILE = "cpu-step-reference-spread-tiny.json"  # on the machine that recorded the runs (AVX-512)
# every machine's spread, in benchmarks/results/: the recording one, and one whose highest capability is AVX2
SPREAD_FILES = (SPREAD_FILE, "cpu-step-reference-spread-tiny-avx2-machine.json")
PROJECTIONS = 8
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class Family:
    builder: str  # a trl_diffusion_sdpo.testing builder
    tokens: int
    lora_targets: tuple[str, ...]
    editing: bool = False
    config: dict[str, Any] = field(default_factory=dict)


FAMILIES = {
    "sd": Family("build_tiny_sd_pipeline", 77, ATTENTION),
    "sdxl": Family("build_tiny_sdxl_pipeline", 77, ATTENTION),
    "sd3": Family("build_tiny_sd3_pipeline", 16, ATTENTION),
    "flux": Family("build_tiny_flux_pipeline", 16, (*ATTENTION, "add_q_proj", "to_add_out")),
    "flux2": Family("build_tiny_flux2_pipeline", 48, (*ATTENTION, "to_qkv_mlp_proj")),
    "qwen-image": Family("build_tiny_qwen_image_pipeline", 24, (*ATTENTION, "add_k_proj", "to_add_out")),
    "z-image": Family("build_tiny_z_image_pipeline", 32, ATTENTION),
    "flux-kontext": Family(
        "build_tiny_flux_kontext_pipeline", 16, (*ATTENTION, "add_q_proj", "to_add_out"), editing=True
    ),
    "qwen-image-edit": Family(
        "build_tiny_qwen_image_edit_pipeline",
        24,
        (*ATTENTION, "add_k_proj", "to_add_out"),
        editing=True,
        config={"random_flip": False, "proportion_empty_prompts": 0.0},
    ),
}

# The safeguard settings run on SD; every family runs the exact rule in its default form.
SETTINGS = {
    "dpo": {"safeguard": False},
    "output": {"safeguard_space": "output", "safeguard_mu": 0.5},
    "output-accumulating": {"safeguard_space": "output", "safeguard_mu": 0.5, "gradient_accumulation_steps": 2},
    "parameter": {"safeguard_space": "parameter", "safeguard_mu": 0.5},
    "parameter-accumulating": {"safeguard_space": "parameter", "safeguard_mu": 0.5, "gradient_accumulation_steps": 2},
    "parameter-two-passes": {"safeguard_space": "parameter", "safeguard_mu": 0.5, "safeguard_passes": "two"},
    "pair": {"safeguard_space": "parameter", "safeguard_scope": "pair", "safeguard_mu": 0.5},
    "update": {"safeguard_space": "update", "safeguard_mu": 0.5},
    "update-two-passes": {"safeguard_space": "update", "safeguard_mu": 0.5, "safeguard_passes": "two"},
}
DDP_SETTINGS = ("dpo", "output", "output-global", "parameter", "parameter-global", "update")
SETTINGS["output-global"] = {"safeguard_space": "output", "safeguard_mu": 0.5, "safeguard_scope": "global"}
SETTINGS["parameter-global"] = {"safeguard_space": "parameter", "safeguard_mu": 0.5, "safeguard_scope": "global"}


def runs() -> list[tuple[str, str, bool, int]]:
    """Every stored run: ``(family, setting, lora, processes)``."""
    out = [(name, "parameter", lora, 1) for name in FAMILIES for lora in (True, False)]
    out += [("sd", s, lora, 1) for s in SETTINGS if s != "parameter" for lora in (True, False)]
    out += [("sd", s, True, 2) for s in DDP_SETTINGS]
    return out


def key(name: str, setting: str, lora: bool, processes: int) -> str:
    return f"{name}/{setting}/{'lora' if lora else 'full'}/{processes}p"


def _projections(tensors: list[torch.Tensor], seed: int = 1234) -> list[float]:
    flat = torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn((PROJECTIONS, flat.numel()), generator=gen, dtype=torch.float64)
    return [*(directions @ flat).tolist(), float(flat.norm())]


class _Recorder(TrainerCallback):
    """``.grad`` at each optimizer step as the step computed it (after any reduction over processes), before the
    trainer clips it, or before the optimizer reads it where nothing clips."""

    def __init__(self, trainer_ref: Callable[[], Any]) -> None:
        self.trainer_ref = trainer_ref
        self.grads: list[list[float]] = []
        self.recorded = False  # this optimizer step's gradients, before clipping

    def watch_clipping(self, trainer) -> None:
        """Record the gradients as ``trainer._clip_grad_norm`` receives them."""
        clip = trainer._clip_grad_norm

        def recording_clip(model):
            self.record(model)
            self.recorded = True
            return clip(model)

        trainer._clip_grad_norm = recording_clip

    def record(self, model) -> None:
        params = [p for p in self.trainer_ref().accelerator.unwrap_model(model).parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self.grads.append(_projections(grads))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.recorded:
            self.record(kwargs["model"])
        self.recorded = False


def _dataset(family: Family) -> Dataset:
    return Dataset.from_list(edit_rows(6) if family.editing else pickapic_rows(6))


def train_once(name: str, setting: str, lora: bool, work_dir: str) -> dict[str, Any]:
    """One run in this process (under DDP: one of its processes); the result as stored."""
    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer, testing

    torch.use_deterministic_algorithms(True)
    family = FAMILIES[name]
    pipe = getattr(testing, family.builder)(
        seed=0, tokenizer_dir=os.path.join(work_dir, "tokenizer"), max_length=family.tokens
    )
    values = {
        **fast_config_values(os.path.join(work_dir, "out")),
        "beta": 100.0,
        # AdamW's epsilon above the default 1e-8: its first, sign-like updates then stay linear in a gradient element
        # at float32 rounding level, instead of moving it by up to the learning rate whichever way the rounding fell
        # (with 1e-8 the full-tuning runs part by up to 1e-2 of their scale between two CPU capabilities)
        "adam_epsilon": 1e-4,
        "max_sequence_length": family.tokens,
        "safeguard_log_output_lambda": True,  # the stored exact-rule runs record the authors' lambda beside theirs
        **family.config,
        **SETTINGS[setting],
    }
    peft = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(family.lora_targets))
    holder: list[Any] = []
    recorder = _Recorder(lambda: holder[0])
    trainer = DiffusionSDPOTrainer(
        pipe,
        args=DiffusionSDPOConfig(**values),
        train_dataset=_dataset(family),
        peft_config=peft if lora else None,
        callbacks=[recorder],
    )
    holder.append(trainer)
    recorder.watch_clipping(trainer)
    trainer.train()
    logs = [
        {k: v for k, v in entry.items() if isinstance(v, (int, float)) and k not in {"epoch", "total_flos"}}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    for entry in logs:  # timings are not behaviour
        for k in [k for k in entry if "runtime" in k or "per_second" in k]:
            del entry[k]
    weights = [p for p in trainer.accelerator.unwrap_model(trainer.model).parameters() if p.requires_grad]
    return {"grads": recorder.grads, "logs": logs, "weights": _projections(weights)}


def _ddp_worker(rank: int, port: int, name: str, setting: str, lora: bool, work_dir: str, queue) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
        | {"MASTER_PORT": str(port), "LOCAL_WORLD_SIZE": "2"}
    )
    torch.set_num_threads(1)
    try:
        result = train_once(name, setting, lora, os.path.join(work_dir, str(rank)))
        queue.put((rank, result))
    except BaseException as err:  # reported to the parent, which fails the run
        queue.put((rank, repr(err)))
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, setting: str, lora: bool, processes: int) -> dict[str, Any]:
    """The run's result (the main process's under DDP, after checking both processes logged the same)."""
    with tempfile.TemporaryDirectory() as work_dir:
        if processes == 1:
            return train_once(name, setting, lora, work_dir)
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = _free_port()
        procs = [
            ctx.Process(target=_ddp_worker, args=(r, port, name, setting, lora, work_dir, queue))
            for r in range(processes)
        ]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        for rank, result in results.items():
            if isinstance(result, str):
                raise RuntimeError(f"process {rank} failed: {result}")
        return results[0]


# A logged delta (policy error minus reference error) within this share of the errors is rounding: float32's epsilon is
# 1.2e-7, and one optimizer step at these learning rates moves a delta by 1e-3 of the errors or more.
ROUNDING = 1e-5


def error_scale(entry: dict[str, float]) -> float:
    """The largest logged mean squared error of a log entry: the scale of its deltas, which are their differences."""
    return max(abs(v) for m, v in entry.items() if m.startswith("mse/"))


def margins_are_rounding(entry: dict[str, float]) -> bool:
    """Whether the policy equals the reference up to rounding (full tuning's first step: two copies of the same
    weights). The margins are then rounding noise, and the implicit accuracy (the share of positive margins) is its
    sign, which another machine does not reproduce."""
    noise = ROUNDING * error_scale(entry)
    return abs(entry["delta/winner"]) <= noise and abs(entry["delta/loser"]) <= noise


def compared_metrics(entry: dict[str, float]) -> dict[str, float]:
    """Each logged metric that is behaviour, with its scale: a delta at its errors' scale, a margin (the mean logit
    ``u`` and its timestep quartiles) at least at the logit's unit, the implicit accuracy left out where the margins
    are rounding, the others at their own magnitude (1 where zero).

    A margin is a difference of differences of errors (``u = -c ((e_w - e_w^ref) - (e_l - e_l^ref))``): near the
    reference, as in these three-step runs, it is 1e-6 to 1e-3 and its own magnitude is mostly cancellation, so another
    CPU's rounding moves it by up to several times itself (measured: ``SPREAD_FILES``). It acts on training only
    through ``sigma(u)``, whose slope is at most 1/4, so a difference small against 1 changes no loss or gradient; the
    loss and ``.grad`` comparisons see any change that does."""
    out = {}
    for metric, value in entry.items():
        if metric == "implicit_acc" and margins_are_rounding(entry):
            continue
        if metric.startswith("delta/"):
            out[metric] = error_scale(entry)
        elif metric == "margin" or metric.startswith("margin/"):
            out[metric] = max(abs(value), 1.0)
        else:
            out[metric] = abs(value) or 1.0
    return out


def _deviation(got: list[float], expected: list[float], scale: float | None = None) -> float:
    """The largest ``|a - b|`` relative to ``scale`` (default: the stored list's largest magnitude), the quantity the
    test's tolerance bounds."""
    scale = scale or max(abs(v) for v in expected) or 1.0
    return max(abs(a - b) for a, b in zip(got, expected)) / scale


def deviations(got: dict[str, Any], expected: dict[str, Any]) -> dict[str, float]:
    """Per kind of quantity, the largest deviation of run ``got`` from run ``expected`` (as :func:`_deviation`)."""
    out = {f"grads/step{i}": _deviation(a, b) for i, (a, b) in enumerate(zip(got["grads"], expected["grads"]))}
    out["metrics"] = max(
        _deviation([a[m]], [b[m]], scale)
        for a, b in zip(got["logs"], expected["logs"])
        for m, scale in compared_metrics(b).items()
    )
    out["weights"] = _deviation(got["weights"], expected["weights"])
    return out


def spread(paths: list[str], out_path: str) -> None:
    """The runs in ``paths`` (each written by ``--out`` under one ``ATEN_CPU_CAPABILITY``, named by its file) compared
    with one another and with the stored runs (recorded on another machine): the largest deviation per kind of
    quantity, per pair of sources and per run, written to ``out_path``."""
    import platform

    with open(STORED, encoding="utf-8") as f:
        results: dict[str, dict[str, Any]] = {"stored": json.load(f)}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            results[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
    names = list(results)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    table: dict[str, dict[str, float]] = {}
    per_run: dict[str, float] = {}
    for a, b in pairs:
        row = table.setdefault(f"{a} vs {b}", {})
        for k in sorted(results[a].keys() & results[b].keys()):
            for kind, value in deviations(results[a][k], results[b][k]).items():
                row[kind] = max(row.get(kind, 0.0), value)
                per_run[k] = max(per_run.get(k, 0.0), value)
    kinds = sorted({kind for row in table.values() for kind in row})
    worst = {kind: max(row.get(kind, 0.0) for row in table.values()) for kind in kinds}
    report = {
        "what": "largest |a - b| / scale (scale: the largest magnitude in the compared list, as the test's tolerance "
        "takes it) between the same reference runs of tests/step_reference.py under different ATEN_CPU_CAPABILITY "
        "values on this machine, and against the stored runs of tests/data/step_reference.json (recorded on another "
        "machine); float32, one thread, deterministic kernels",
        "commands": [
            "ATEN_CPU_CAPABILITY=<c> python tests/step_reference.py --out <c>.json   # per capability",
            f"python tests/step_reference.py --spread {','.join(os.path.basename(p) for p in paths)}",
        ],
        "machine": {
            "cpu": _cpu_name(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "highest_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": 1,
        },
        "sources": {name: len(runs) for name, runs in results.items()},
        "largest_by_pair": table,
        "largest_by_quantity": worst,
        "largest_by_run": per_run,
        "largest": max(worst.values()),
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")
    print(json.dumps({"largest_by_pair": table, "largest": report["largest"]}, indent=2))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="rewrite tests/data/step_reference.json")
    parser.add_argument("--only", default=None, help="a substring of the runs' keys to record")
    parser.add_argument("--out", default=None, help="write the runs here instead of the stored file")
    parser.add_argument("--processes", type=int, default=None, help="only the runs on this many processes")
    parser.add_argument(
        "--spread",
        default=None,
        metavar="FILES",
        help="comma-separated --out files: their spread and the stored runs', written to --out (default "
        "benchmarks/results/" + SPREAD_FILE + ")",
    )
    args = parser.parse_args()
    if args.spread:
        spread(args.spread.split(","), args.out or os.path.join(ROOT, "benchmarks", "results", SPREAD_FILE))
        return
    stored = {}
    if os.path.exists(STORED) and not args.out:
        with open(STORED, encoding="utf-8") as f:
            stored = json.load(f)
    for spec in runs():
        k = key(*spec)
        if (args.only and args.only not in k) or (args.processes and spec[3] != args.processes):
            continue
        print(k, flush=True)
        stored[k] = run(*spec)
    if args.record or args.out:
        path = args.out or STORED
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(stored, f, indent=0, sort_keys=True)


if __name__ == "__main__":
    main()
