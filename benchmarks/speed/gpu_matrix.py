"""The GPU matrix: the trainer's step time against the compute floor, its ratio to Diffusion-DPO and its peak memory,
for every safeguard on three real-size models, in one command and one result file.

Models (real configs, random weights, bf16 mixed precision; nothing is downloaded):

* ``sd15``: the SD1.5 UNet, full tuning, 4 pairs at 512 px (``benchmarks/harness.py``'s SD1.5 configs);
* ``sdxl``: the SDXL UNet, full tuning with gradient checkpointing (as the earlier H100 record ran it), 2 pairs at
  1024 px (the harness's SDXL configs);
* ``flux2-klein``: the FLUX.2 [klein] 4B transformer with LoRA (rank ``--lora-rank`` on the family's targets), 1 pair
  at 1024 px, its Qwen3-4B text encoder and the FLUX.2 VAE (the configs written below).

Settings per model (each a fresh pipeline and ``DiffusionSDPOTrainer`` with the config's defaults, images encoded
every step unless ``--cache-latents``): ``dpo`` (``safeguard_space="none"``), ``sdpo`` (the output space),
``sdpo_param`` and ``sdpo_param_two`` (the parameter space in one pass and in two), ``sdpo_update`` (the update space)
and ``sdpo_pair`` (the per-pair scope; the package refuses it for full tuning above 4 GiB of per-image gradients, and
the refusal is the cell's record).

Per cell: the median trainer step over ``--steps`` steps after ``--warmup`` (wall clock between step ends, the
device synchronised there), the median of the compute floor run after each trainer step on the same objects (the
harness's floor: policy forward + backward and reference forward over the 2B rows, ``optimizer.step()``,
``zero_grad``, on the trainer's first micro-batch kept fixed), their ratio, the ratio to the same model's ``dpo``
step, and the peak memory of the trainer's steps (CUDA: ``torch.cuda.max_memory_allocated``, reset before each
step). A cell that fails (out of memory, refused by the package) keeps its error text. Each model runs in a process
of its own; a time guard (``--budget-s``, shared out among the models still to run) stops starting cells in time and
records the rest as "not measured". ``--tiny`` runs the same matrix on the package's tiny pipelines (seconds on a
CPU), which is how the tests run it::

    python benchmarks/speed/gpu_matrix.py --device cuda   # writes benchmarks/results/gpu/cuda-gpu-matrix-real.json
    python benchmarks/speed/gpu_matrix.py --device cpu --tiny --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the package, benchmarks.harness

import torch  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    Clock,
    MemorySampler,
    build_pipeline,
    cpu_name,
    floor_step,
    machine_description,
    result_path,
    synthetic_pairs,
)
from benchmarks.real_models import QUANTIZED_BASES, build_flux2_klein, quantize_denoiser  # noqa: E402
from benchmarks.speed.step_time import SAFEGUARD_SETTINGS  # noqa: E402

SETTINGS = ("dpo", "sdpo", "sdpo_param", "sdpo_param_two", "sdpo_update", "sdpo_pair")
STATUSES = ("measured", "error", "not measured")


@dataclass(frozen=True)
class ModelSpec:
    """One row group of the matrix: which denoiser, at which batch and size, tuned how."""

    name: str
    denoiser: str
    source: str
    pairs: int
    resolution: int
    lora: bool
    gradient_checkpointing: bool = False
    max_sequence_length: int | None = None


REAL_MODELS = (
    ModelSpec("sd15", "UNet2DConditionModel", "stable-diffusion-v1-5 configs (benchmarks/harness.py)", 4, 512, False),
    ModelSpec("sdxl", "UNet2DConditionModel", "stable-diffusion-xl-base-1.0 configs (benchmarks/harness.py)", 2, 1024,
              False, gradient_checkpointing=True),
    ModelSpec("flux2-klein", "Flux2Transformer2DModel", "black-forest-labs/FLUX.2-klein-4B configs (this script)", 1,
              1024, True),
)  # fmt: skip
TINY_MODELS = (
    ModelSpec("sd15", "UNet2DConditionModel", "build_tiny_sd_pipeline", 4, 32, False),
    ModelSpec("sdxl", "UNet2DConditionModel", "build_tiny_sdxl_pipeline", 2, 32, False, gradient_checkpointing=True),
    ModelSpec("flux2-klein", "Flux2Transformer2DModel", "build_tiny_flux2_klein_pipeline", 1, 32, True,
              max_sequence_length=32),
)  # fmt: skip


def model_specs(opts: argparse.Namespace) -> list[ModelSpec]:
    specs = {spec.name: spec for spec in (TINY_MODELS if opts.tiny else REAL_MODELS)}
    return [specs[name] for name in opts.models.split(",")]


# --------------------------------------------------------------------------------------------------- the models


def build_model(spec: ModelSpec, opts: argparse.Namespace, workdir: str, base: str = "none"):
    """The model's pipeline (a tiny one built on the CPU, the trainer places it; or the real size on the device), its
    denoiser quantized with ``base``'s backend."""
    if opts.tiny:
        from trl_diffusion_sdpo import testing

        pipeline = getattr(testing, spec.source)(seed=0, tokenizer_dir=workdir)
    elif spec.name == "flux2-klein":
        pipeline = build_flux2_klein(opts.device, workdir)
    else:
        pipeline = build_pipeline(spec.name, opts.device)
    if base != "none":
        quantize_denoiser(pipeline, base, workdir)
    return pipeline


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def cell_plan(opts: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """Each cell's key, safeguard setting, base and compile mode, in order: the setting's name alone with one
    ``--base`` and eager; ``setting+mode`` for a ``--compile-modes`` mode other than ``none`` (Trainer's
    ``torch_compile`` with ``torch_compile_mode=mode``); with several bases, ``...@base`` (bases outer, then modes)."""
    settings, bases = opts.settings.split(","), opts.base.split(",")
    modes = opts.compile_modes.split(",")
    plan = []
    for base in bases:
        for mode in modes:
            for setting in settings:
                key = setting if mode == "none" else f"{setting}+{mode}"
                plan.append((key if len(bases) == 1 else f"{key}@{base}", setting, base, mode))
    return plan


# estimate-memory's safeguard term per setting (the per-pair scope has none: its refusal or its own buffer)
ESTIMATE_SAFEGUARD = {
    "dpo": "none",
    "sdpo": "output",
    "sdpo_param": "one_pass",
    "sdpo_param_two": "two_pass",
    "sdpo_update": "one_pass",
}


def memory_estimate(pipeline, spec: ModelSpec, setting: str, base: str, lora_rank: int | None, opts) -> dict:
    """``estimate-memory``'s total for this cell's pipeline and run shape (computed on the meta device, before the
    cell trains), or why there is none."""
    from trl_diffusion_sdpo.engines.memory import (
        RunShape,
        estimate_memory,
        family_lora_targets,
        model_sizes_of_pipeline,
    )

    if setting not in ESTIMATE_SAFEGUARD:
        return {"estimate_bytes": None, "estimate_note": f"estimate-memory has no term for {setting}"}
    sizes = model_sizes_of_pipeline(pipeline)
    shape = RunShape(
        pairs=spec.pairs, resolution=spec.resolution,
        prompt_tokens=spec.max_sequence_length or (77 if spec.denoiser.startswith("UNet") else 512),
        dtype_bytes=2 if opts.device == "cuda" else 4, lora_rank=lora_rank,
        lora_targets=family_lora_targets(sizes.family), base_quantization=base, optim=opts.optim,
        activation_checkpointing=spec.gradient_checkpointing, latent_cache=opts.cache_latents,
        safeguard=ESTIMATE_SAFEGUARD[setting], update_space=setting == "sdpo_update",
    )  # fmt: skip
    return {"estimate_bytes": estimate_memory(sizes, shape).total_bytes, "estimate_shape": asdict(shape)}


# --------------------------------------------------------------------------------------------------- one cell


SETTING_KEYS = (
    "warmup",
    "steps",
    "optim",
    "lora_rank",
    "lora_all",
    "base",
    "cache_latents",
    "budget_s",
    "grace_s",
    "threads",
    "compile_modes",
    "compile_backend",
    "profile_steps",
)
MEMORY_MEASURES = {"cuda": "torch.cuda.max_memory_allocated, reset before each step", "cpu": "process RSS (CPU)"}


class CellRecorder:
    """Times each trainer step and, after it, one floor step on the trainer's own objects; peak memory per step.

    The floor's inputs are the trainer's first noised micro-batch (latents, timesteps, conditioning, target), kept
    fixed: the harness's floor with the step's own shapes, whatever the family."""

    def __init__(self, trainer, device: str, bf16: bool, profile_from: int | None = None) -> None:
        self.trainer, self.device, self.bf16 = trainer, device, bf16
        self.clock, self.memory = Clock(device), MemorySampler(device)
        self.profile_from = profile_from  # the steps from this one on (1-based) run under torch.profiler
        self.profiler: Any = None
        self.step_began = 0.0
        self.host_s: list[float] = []  # from a step's start to its end on the host, before the device is waited for
        self.busy: list[float] = []  # profiled steps: the device's kernels' busy time over the step's wall time
        self.profiled = 0
        self.steps: list[float] = []
        self.floors: list[float] = []
        self.step_peaks: list[int | None] = []
        self.floor_peaks: list[int | None] = []
        self.first_batch = self.floor = None
        noised_pair = trainer.stages.noised_pair

        def capture(*args, **kwargs):
            batch = noised_pair(*args, **kwargs)
            self.first_batch = self.first_batch or batch
            return batch

        trainer.stages.noised_pair = capture

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class Schedule(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                recorder.memory.start()  # CUDA: the peak reset; CPU: the RSS sampled over the cell
                recorder.clock.reset()

            def on_step_begin(self, args, state, control, **kwargs):
                recorder.step_begins(state.global_step + 1)

            def on_step_end(self, args, state, control, **kwargs):
                recorder.step_ended()

        return Schedule()

    def step_begins(self, step: int) -> None:
        if self.profile_from is not None and step >= self.profile_from and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.clock.reset()  # the profiler's start is not the step's
        self.step_began = time.perf_counter()

    def _peak(self) -> int | None:
        """The CUDA allocator's peak since the last call, which resets it (``None`` on the CPU)."""
        if self.device != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return peak

    def step_ended(self) -> None:
        self.host_s.append(time.perf_counter() - self.step_began)
        wall = self.clock.lap()[0]
        self.steps.append(wall)
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            if self.device == "cuda":  # the CPU runs the kernels on the host: no busy fraction to read
                self.busy.append(device_busy_s(self.profiler) / wall)
            self.profiled += 1
            self.profiler = None
        self.step_peaks.append(self._peak())
        self.floor = self.floor or self._floor_step()
        self.floor()
        self.floors.append(self.clock.lap()[0])
        self.floor_peaks.append(self._peak())

    def _floor_step(self):
        trainer, batch = self.trainer, self.first_batch
        noised = batch.noised
        embeds = batch.prompt_embeds.repeat(2)  # one pass over winners and losers, as the trainer's
        conditioning = trainer.family.denoiser_conditioning(embeds, batch.time_ids)
        conditioning = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in conditioning.items()}
        inputs = (noised.noisy.detach(), noised.timesteps.detach(), conditioning, noised.target.detach())
        return floor_step(trainer, trainer.optimizer, trainer.model_wrapped, inputs, self.bf16)

    def result(self, warmup: int, cpu_peak: int) -> dict[str, Any]:
        end = len(self.steps) - self.profiled  # the profiled steps are not timed
        steps, floors = self.steps[warmup:end], self.floors[warmup:end]
        step_s, floor_s = statistics.median(steps), statistics.median(floors)
        cuda = self.device == "cuda"
        return {
            "step_s": step_s,
            "warmup_step_times_s": self.steps[:warmup],  # the compiling steps, where the cell compiles
            "floor_s": floor_s,
            "ratio_to_floor": step_s / floor_s,
            "step_times_s": steps,
            "floor_times_s": floors,
            "peak_memory_bytes": max(self.step_peaks) if cuda else cpu_peak,
            "floor_peak_memory_bytes": max(self.floor_peaks) if cuda else None,
            "memory_measure": MEMORY_MEASURES[self.device],
            "host_s": statistics.median(self.host_s[warmup:end]),
            "host_to_step": statistics.median(self.host_s[warmup:end]) / step_s,
            "device_busy_fraction": statistics.median(self.busy) if self.busy else None,
        }


def device_busy_s(profiler: Any) -> float:
    """Seconds in which at least one device kernel ran during the profiled step: the union of the CUDA kernels'
    intervals (a copy or a kernel on a second stream overlapping another counts once); 0 on the CPU."""
    intervals = sorted(
        (event.time_range.start, event.time_range.end)
        for event in profiler.events()
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
    )
    busy, reach = 0.0, float("-inf")
    for start, end in intervals:
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / 1e6


def run_cell(
    spec: ModelSpec, setting: str, opts: argparse.Namespace, workdir: str, base: str = "none", mode: str = "none"
) -> dict:
    """A fresh pipeline (its denoiser quantized with ``base``) and trainer with ``setting``'s safeguard and the
    config's defaults otherwise, ``warmup + steps`` steps, each followed by a floor step; the estimate beside."""
    from peft import LoraConfig

    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
    from trl_diffusion_sdpo.families import family_for_pipeline

    num_steps, bf16 = opts.warmup + opts.steps + opts.profile_steps, opts.device == "cuda"
    compiled = {} if mode == "none" else {"torch_compile": True}
    if mode not in ("none", "default"):  # "default": Trainer's own (None), which any backend takes
        compiled["torch_compile_mode"] = mode
    if compiled and opts.compile_backend:
        compiled["torch_compile_backend"] = opts.compile_backend
    pipeline = build_model(spec, opts, workdir, base)
    args = DiffusionSDPOConfig(
        output_dir=os.path.join(workdir, "out"), resolution=spec.resolution,
        per_device_train_batch_size=spec.pairs, max_steps=num_steps, warmup_steps=0,
        logging_steps=num_steps,  # one log, after the last step
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=opts.device == "cpu", bf16=bf16,
        optim=opts.optim, gradient_checkpointing=spec.gradient_checkpointing, cache_latents=opts.cache_latents,
        latent_cache_dir=os.path.join(workdir, "cache"), max_sequence_length=spec.max_sequence_length,
        dataloader_num_workers=opts.dataloader_workers, seed=0, **SAFEGUARD_SETTINGS[setting], **compiled,
    )  # fmt: skip
    peft_config, lora_rank = None, None
    if spec.lora or opts.lora_all or base != "none":  # the family's targets (FLUX.2's include the single blocks)
        targets = list(family_for_pipeline(pipeline).lora_target_modules)
        lora_rank = opts.lora_rank
        peft_config = LoraConfig(
            r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=targets
        )
    estimate = memory_estimate(pipeline, spec, setting, base, lora_rank, opts)
    dataset = synthetic_pairs(spec.pairs * num_steps, spec.resolution)  # one epoch: no epoch boundary in the steps
    start = time.perf_counter()
    trainer = DiffusionSDPOTrainer(pipeline, args=args, train_dataset=dataset, peft_config=peft_config)
    init_s = time.perf_counter() - start
    profile_from = opts.warmup + opts.steps + 1 if opts.profile_steps else None
    recorder = CellRecorder(trainer, opts.device, bf16, profile_from)
    trainer.add_callback(recorder.callback())
    try:
        trainer.train()
    finally:
        cpu_peak = recorder.memory.stop()  # the CPU sampler's thread ends even when the step fails
    backward = getattr(trainer.safeguard, "backward_stage", None)
    model = trainer.family.denoiser
    cell = {
        "status": "measured",
        **recorder.result(opts.warmup, cpu_peak),
        "trainer_init_s": init_s,
        "two_pass_reason": getattr(backward, "two_pass_reason", None),
        "denoiser_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "base": base,
        "compile_mode": mode,
        **estimate,
    }
    if estimate["estimate_bytes"] is not None and opts.device == "cuda":  # the CPU's peak is the process's RSS
        cell["estimate_relative_error"] = estimate["estimate_bytes"] / cell["peak_memory_bytes"] - 1
    return cell


def error_cell(error: BaseException) -> dict[str, Any]:
    """The error's text and kind: out of memory, refused by the package (a ValueError it raised), or failed."""
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
        kind = "out of memory"
    elif isinstance(error, ValueError) and frames and "trl_diffusion_sdpo" in frames[-1].filename:
        kind = "refused"
    else:
        kind = "failed"
    where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:]]
    return {"status": "error", "error_kind": kind, "error": f"{type(error).__name__}: {error}", "error_where": where}


# --------------------------------------------------------------------------------------------------- worker: one model


def versions(device: str) -> dict[str, Any]:
    import importlib

    found: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
    }
    for name in ("diffusers", "transformers", "peft", "accelerate", "trl_diffusion_sdpo"):
        found[name] = getattr(importlib.import_module(name), "__version__", None)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        found["git_commit"] = git.stdout.strip() or None
        git = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        found["git_uncommitted_changes"] = bool(git.stdout.strip())  # the measured tree may differ from the commit
    return found


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def emit(kind: str, payload: dict[str, Any]) -> None:
    print(f"{kind} {json.dumps(payload)}", flush=True)


def worker(opts: argparse.Namespace) -> None:
    """Runs one model's cells in order, each line printed as it ends; stops starting cells that would not end before
    ``--deadline`` (a cell is expected to take as long as the longest one so far, the first ``--first-cell-s``)."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    spec = {s.name: s for s in model_specs(opts)}[opts.worker]
    machine = machine_description(opts.device)
    emit("DEVICE", {"device": device_name(opts.device), "machine": machine, "versions": versions(opts.device)})
    longest, stopped = None, None
    for key, setting, base, mode in cell_plan(opts):
        expected = opts.first_cell_s if longest is None else longest
        left = opts.deadline - time.time()
        if stopped is None and left < expected:  # from here on no cell starts
            stopped = f"time guard: {max(left, 0):.0f} s left for this model, a cell expected to take {expected:.0f} s"
        if stopped is not None:
            emit("CELL", {"setting": key, "status": "not measured", "reason": stopped})
            continue
        emit("START", {"setting": key})
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gpu-matrix-") as workdir:
            try:
                cell = run_cell(spec, setting, opts, workdir, base, mode)
            except Exception as error:  # out of memory, refused by the package, ...: the cell's record
                cell = error_cell(error)
        gc.collect()
        if opts.device == "cuda":
            torch.cuda.empty_cache()
        cell["cell_wall_s"] = time.perf_counter() - start
        longest = max(longest or 0.0, cell["cell_wall_s"])
        emit("CELL", {"setting": key, **cell})


# --------------------------------------------------------------------------------------------------- driver


def run_worker(spec: ModelSpec, opts: argparse.Namespace, argv: list[str], deadline: float) -> dict[str, Any]:
    """One model's process, stopped ``--grace-s`` after its deadline: what it printed, read by :func:`read_worker`."""
    command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", spec.name, "--deadline", str(deadline)]
    with tempfile.TemporaryDirectory(prefix="gpu-matrix-worker-") as folder:
        out_path, err_path = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        with open(out_path, "w") as out, open(err_path, "w") as err:
            process = subprocess.Popen(command, stdout=out, stderr=err, cwd=ROOT)
            try:
                code: int | None = process.wait(timeout=max(1.0, deadline - time.time() + opts.grace_s))
            except subprocess.TimeoutExpired:
                process.kill()  # this script's own child, by its id
                process.wait()
                code = None
        lines = Path(out_path).read_text().splitlines()
        stderr_tail = Path(err_path).read_text()[-3000:]
    return read_worker(lines, [key for key, *_ in cell_plan(opts)], code, stderr_tail)


def read_worker(lines: list[str], settings: list[str], code: int | None, stderr_tail: str) -> dict[str, Any]:
    """A model process's cells from its output lines, every setting present: a cell it did not end is an error where
    the process died in it (exit ``code``), else not measured (``code`` None: stopped by the time guard)."""
    found: dict[str, Any] = {"cells": {}, "device": None, "exit_code": code}
    started = None
    for line in lines:
        kind, _, payload = line.partition(" ")
        if kind in ("DEVICE", "START", "CELL") and payload.startswith("{"):
            data = json.loads(payload)
            if kind == "DEVICE":
                found["device"] = data
            elif kind == "START":
                started = data["setting"]
            else:
                found["cells"][data.pop("setting")] = data
    for setting in settings:
        if setting in found["cells"]:
            continue
        if code is None:
            during = " during this cell" if setting == started else ""
            cell = {"status": "not measured", "reason": f"time guard: the model's process was stopped{during}"}
        elif setting == started:
            error = f"the model's process ended with exit code {code} during this cell: {stderr_tail}"
            cell = {"status": "error", "error_kind": "failed", "error": error}
        else:
            cell = {"status": "not measured", "reason": f"the model's process ended (exit code {code}) before it"}
        found["cells"][setting] = cell
    found["cells"] = {setting: found["cells"][setting] for setting in settings}
    return found


def add_ratios(cells: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Each measured cell's step over the same model's Diffusion-DPO step on the same base and compile mode
    (``None`` where either is missing), and (``ratio_to_best_dpo``) over the fastest Diffusion-DPO step of that base
    in any mode: what a user who compiles Diffusion-DPO compares with."""
    for row in cells.values():
        for key, cell in row.items():
            setting = key.split("@")[0].split("+")[0]
            base_suffix = key[len(key.split("@")[0]) :]
            dpo = row.get("dpo" + key[len(setting) :], {})
            base = dpo.get("step_s") if dpo.get("status") == "measured" else None
            measured = cell.get("status") == "measured"
            cell["ratio_to_dpo"] = cell["step_s"] / base if measured and base else None
            dpos = [
                c["step_s"]
                for k, c in row.items()
                if k.split("@")[0].split("+")[0] == "dpo" and k.endswith(base_suffix) and c.get("status") == "measured"
            ]
            cell["ratio_to_best_dpo"] = cell["step_s"] / min(dpos) if measured and dpos else None


def print_table(report: dict[str, Any]) -> None:
    unit, scale = ("GiB", 2**30) if report["device_type"] == "cuda" else ("MiB", 2**20)
    print(f"\n{report['device']}: median of {report['settings']['steps']} steps after {report['settings']['warmup']}")
    columns = ["model", "setting", "step ms", "floor ms", "x floor", "x DPO", "x best DPO", f"peak {unit}",
               "host ms", "busy", "note"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|---|---|" + "---:|" * 8 + "---|")
    for model, row in report["cells"].items():
        for setting, cell in row.items():
            if cell["status"] != "measured":
                note = cell.get("error") or cell.get("reason") or ""
                print(f"| {model} | {setting} | | | | | | | | | {cell['status']}: {note[:100]} |")
                continue
            ratio, best, busy = cell["ratio_to_dpo"], cell.get("ratio_to_best_dpo"), cell.get("device_busy_fraction")
            values = [
                f"{1000 * cell['step_s']:.1f}",
                f"{1000 * cell['floor_s']:.1f}",
                f"{cell['ratio_to_floor']:.3f}",
                "" if ratio is None else f"{ratio:.3f}",
                "" if best is None else f"{best:.3f}",
                f"{cell['peak_memory_bytes'] / scale:.2f}",
                f"{1000 * cell['host_s']:.1f}",
                "" if busy is None else f"{busy:.2f}",
                cell.get("two_pass_reason") or "",
            ]
            print(f"| {model} | {setting} | " + " | ".join(values) + " |")


def driver(opts: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    start = time.time()
    deadline = start + opts.budget_s
    specs = model_specs(opts)
    report: dict[str, Any] = {
        "what": "trainer step time against the compute floor, ratio to Diffusion-DPO and peak memory, per model and "
        "safeguard setting",
        "command": shlex.join(["python", "benchmarks/speed/gpu_matrix.py", *argv]),
        "device_type": opts.device,
        "device": None,
        "tiny": opts.tiny,
        "settings": {key: getattr(opts, key) for key in SETTING_KEYS},
        "precision": "bf16 mixed precision" if opts.device == "cuda" else "fp32",
        "setting_definitions": {s: SAFEGUARD_SETTINGS[s] for s in opts.settings.split(",")},
        "floor": "policy forward + MSE backward over the 2B rows, reference forward over them without autograd, "
        "optimizer.step(), zero_grad, on the trainer's own denoiser, reference and optimizer, on its first "
        "micro-batch kept fixed on the device (benchmarks/harness.py floor_step), one after each trainer step",
        "timing": "wall clock between step ends, the device synchronised there; median after the warm-up steps",
        "host_time": "host_s: from a step's start (on_step_begin) to its end on the host (on_step_end, before the "
        "device is waited for): the host's own work when the device keeps up, else also the time the host waits on a "
        "full launch queue or a read; host_to_step its share of the step",
        "device_busy": "device_busy_fraction: the union of the CUDA kernels' intervals over the step's wall time, on "
        "the --profile-steps steps after the measured ones (under torch.profiler, not timed)",
        "models": {spec.name: asdict(spec) for spec in specs},
        "cells": {},
    }
    for index, spec in enumerate(specs):
        left = deadline - time.time()
        if left <= 0:
            reason = f"time guard: the {opts.budget_s:.0f} s budget was spent before this model"
            report["cells"][spec.name] = {
                key: {"status": "not measured", "reason": reason} for key, *_ in cell_plan(opts)
            }
            continue
        began = time.time()
        found = run_worker(spec, opts, argv, time.time() + left / (len(specs) - index))
        report["cells"][spec.name] = found["cells"]
        report["models"][spec.name]["process_exit_code"] = found["exit_code"]
        report["models"][spec.name]["wall_s"] = time.time() - began
        if found["device"] and report["device"] is None:
            report.update(device=found["device"]["device"], machine=found["device"]["machine"])
            report["versions"] = found["device"]["versions"]
        print(f"{spec.name}: " + ", ".join(f"{s} {c['status']}" for s, c in found["cells"].items()), flush=True)
    if report["device"] is None:  # no model process ran
        report.update(device=device_name(opts.device), machine=machine_description(opts.device))
        report["versions"] = versions(opts.device)
    add_ratios(report["cells"])
    report["not_measured"] = [
        f"{model}/{setting}"
        for model, row in report["cells"].items()
        for setting, cell in row.items()
        if cell["status"] == "not measured"
    ]
    report["wall_time_s"] = time.time() - start
    return report


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the package's tiny pipelines (seconds on a CPU)")
    names = ",".join(spec.name for spec in REAL_MODELS)
    parser.add_argument("--models", default=names, help=f"comma-separated subset of {names}")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of the settings")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per cell (at least 3)")
    parser.add_argument("--warmup", type=int, default=3, help="steps per cell discarded before measuring")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-all", action="store_true", help="LoRA on every model (a quantized --base implies it)")
    parser.add_argument(
        "--base",
        default="none",
        help=f"comma-separated bases among {','.join(QUANTIZED_BASES)}: the frozen denoiser quantized with each "
        "backend in turn, LoRA trained on every model (several: cells keyed setting@base)",
    )
    parser.add_argument("--optim", default="adamw_torch_fused", help="transformers optimizer name")
    parser.add_argument("--cache-latents", action="store_true", help="cache latents and prompts (default: encode)")
    parser.add_argument(
        "--dataloader-workers", type=int, default=0, help="data-loading worker processes (0: in the training process)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=1080, help="no cell starts after this many seconds (shared out by model)"
    )
    parser.add_argument("--grace-s", type=float, default=30, help="a model's process is stopped this long after")
    parser.add_argument(
        "--first-cell-s", type=float, default=None, help="time a model's first cell is expected to take"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--compile-modes",
        default="none",
        help=f"comma-separated among {','.join(COMPILE_MODES)}: each setting eager (none) and under Trainer's "
        "torch_compile with that torch_compile_mode (cells keyed setting+mode)",
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="Trainer's torch_compile_backend for the compiled cells (default: Trainer's, inductor)",
    )
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=1,
        help="steps after the measured ones run under torch.profiler for the device's busy fraction (not timed)",
    )
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/gpu/<device>-gpu-matrix-*.json)"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.steps < 3:
        parser.error("--steps must be at least 3 (a median of at least 3 steps)")
    unknown = [s for s in opts.settings.split(",") if s not in SETTINGS]
    unknown += [b for b in opts.base.split(",") if b not in QUANTIZED_BASES]
    unknown += [m for m in opts.models.split(",") if m not in names.split(",")]
    unknown += [m for m in opts.compile_modes.split(",") if m not in COMPILE_MODES]
    if unknown:
        parser.error(f"unknown models or settings: {unknown}")
    if opts.first_cell_s is None:
        opts.first_cell_s = 5.0 if opts.tiny else 60.0
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.worker:
        worker(opts)
        return 0
    report = driver(opts, argv)
    print_table(report)
    size = "tiny" if opts.tiny else "real"
    if opts.base != "none" or opts.lora_all:
        size += f"-lora-{opts.base.replace(',', '-')}-base" if opts.base != "none" else "-lora"
    output = opts.output or result_path(opts.device, "gpu-matrix", size, study="gpu")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {output} ({report['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
