"""The safeguards' aten operations and step times on the tiny SD UNet, now and at ``--before``, side by side in one
process.

Not part of the test suite. CPU, one thread. One trainer run per tuning (full: 208 trained tensors; LoRA r4: 128;
4 pairs, the same four rows every step) alternates, step by step, Diffusion-DPO and each safeguard as it is now and
as it was at ``--before`` (its ``safeguards/gradients/layer_taps.py``, ``safeguards/gradients/one_pass.py``,
``safeguards/update_space.py`` and ``safeguards/parameter.py`` read with ``git show`` and imported beside the
package's, the store of the one pass swapped in): per safeguard, the top-level aten operations of one profiled
non-logging whole optimizer step (from the previous step's ``on_step_end`` to its own), in all and outside the
backward pass (:mod:`trl_diffusion_sdpo.testing.operations`), and the median wall time of ``--rounds`` unprofiled
steps (warmup round excluded).

    python benchmarks/speed/safeguard_op_counts.py --before 0291633 \\
        --json benchmarks/results/step-time/cpu-safeguard-op-counts-tiny.json

The profiled step also records, at every nesting level (an autocast cast runs inside the operation it feeds), the
operations that read a value back to the host (:data:`HOST_SYNCS`: on an accelerator each makes the host wait for
the device) and the dtype casts (``aten::_to_copy``, with the elements they copy), each split into the backward
pass, the optimizer's step and the rest of the step (the forward among it), and the most bytes the step held
allocated beyond its start
(``torch.profiler``'s memory events). Each timed step records its wall time and the main thread's CPU time (with one
thread, the host's Python and the kernels together; at the tiny size the Python dominates). ``--bf16`` runs the
trainer in bf16 mixed precision (CPU autocast), as a GPU run does:

    python benchmarks/speed/safeguard_op_counts.py --before 0291633 --bf16 --rounds 30 --tunings full \\
        --pass-rounds 100 --json benchmarks/results/one-pass/cpu-taps-autocast-host-tiny.json

``--pass-rounds`` adds the tapped pass alone, its parts timed apart (:func:`pass_host_times`).
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the package, benchmarks.harness, tests' helpers
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks import harness  # noqa: E402

# module -> the sibling name its "before" copy is imported under, and the imports rewritten to the other copies: the
# per-layer taps and the one pass's store of ``--before``, run by today's safeguards (their store class swapped)
BEFORE = {
    "trl_diffusion_sdpo/safeguards/gradients/layer_taps.py": (
        "trl_diffusion_sdpo.safeguards.gradients.layer_taps_before",
        {},
    ),
    "trl_diffusion_sdpo/safeguards/gradients/one_pass.py": (
        "trl_diffusion_sdpo.safeguards.gradients.one_pass_before",
        {"from .layer_taps import": "from .layer_taps_before import"},
    ),
}


def load_before(commit: str) -> dict[str, object]:
    """The modules of :data:`BEFORE` at ``commit``, imported as siblings of the package's own."""
    modules = {}
    folder = tempfile.mkdtemp(prefix="op-counts-before-")
    for path, (name, rewrites) in BEFORE.items():
        source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True).stdout
        text = source.decode()
        for old, new in rewrites.items():
            text = text.replace(old, new)
        file = Path(folder) / (name.rsplit(".", 1)[1] + ".py")
        file.write_text(text)
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules[path] = module
    return modules


SAFEGUARDS = {
    "parameter": {"safeguard_space": "parameter", "safeguard_passes": "one"},
    "update": {"safeguard_space": "update"},
}
PAIRS = 4
# Operations that read a tensor's value back to the host (``.item()``, ``bool()``, ``float()`` and ``.tolist()`` of
# a device tensor end in ``_local_scalar_dense``; ``equal`` and ``is_nonzero`` return host values): on an
# accelerator each waits for the device.
HOST_SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal")
CASTS = "aten::_to_copy"
_BACKWARD = "autograd::engine::evaluate_function"


def _part(event) -> str:
    """Where ``event`` ran: ``"backward"`` (under the backward pass), ``"optimizer"`` (under ``Optimizer.step``: a
    CPU's fused AdamW reads its step counter per tensor, where an accelerator's kernel reads nothing back) or
    ``"rest"`` (the batch, the forward, the safeguard's work around the backward, the logging)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(_BACKWARD):
            return "backward"
        if parent.name.startswith("Optimizer.step"):
            return "optimizer"
        parent = parent.cpu_parent
    return "rest"


def step_record(profile: torch.profiler.profile) -> dict:
    """One profiled step: the top-level operations (:func:`count_operations`), the host syncs and casts at every
    nesting level by where they ran (:func:`_part`), the elements the casts copied, and the most bytes held allocated
    beyond the step's start."""
    from trl_diffusion_sdpo.testing.operations import count_operations

    counts = count_operations(profile)
    parts = ("rest", "backward", "optimizer")
    syncs = {part: collections.Counter() for part in parts}
    casts = dict.fromkeys(parts, 0)
    cast_elements = dict.fromkeys(parts, 0)
    memory = []
    for event in profile.events():
        if event.self_cpu_memory_usage:
            memory.append((event.time_range.start, event.self_cpu_memory_usage))
        if event.name not in HOST_SYNCS and event.name != CASTS:
            continue
        part = _part(event)
        if event.name == CASTS:
            casts[part] += 1
            shape = event.input_shapes[0] if event.input_shapes else []
            cast_elements[part] += math.prod(shape) if shape else 0
        else:
            syncs[part][event.name] += 1
    held = peak = 0
    for _, change in sorted(memory):
        held += change
        peak = max(peak, held)
    return {
        "operations": sum(counts["all"].values()),
        "operations_outside_backward": sum(counts["outside_backward"].values()),
        "host_syncs": {part: dict(counter) for part, counter in syncs.items()},
        "casts": casts,
        "cast_elements": cast_elements,
        "peak_bytes_above_start": peak,
    }


def _switch_taps(safeguards: dict, current: str) -> None:
    """Only the current safeguard's per-layer taps on the model (outside the timed window): taps kept across passes
    (``LayerTaps.install``/``close``) would otherwise stay on the shared model through the other rows' steps, where a
    run with one safeguard has none; taps of a checkout that installs them per pass have no such methods."""
    for name, safeguard in safeguards.items():
        store = getattr(getattr(safeguard, "backward_stage", None), "one_pass", None)
        taps = getattr(store, "taps", None)
        if taps is not None and hasattr(taps, "close") and name != current:
            taps.close()
    store = getattr(getattr(safeguards[current], "backward_stage", None), "one_pass", None)
    if store is not None and hasattr(store.taps, "install"):
        store.taps.install()


def run(
    lora: bool,
    before: dict,
    rounds: int,
    workdir: str,
    bf16: bool = False,
    build_pipeline: Callable[[str], object] | None = None,
    config: dict | None = None,
    safeguards: tuple[str, ...] = ("parameter", "update"),
    pairs: int = PAIRS,
    between_rounds: Callable[[int], None] | None = None,
) -> dict:
    """One trainer run per tuning, the safeguards alternating step by step (see the module docstring);
    ``build_pipeline(tokenizer_dir)`` (the tiny SD pipeline by default) and ``config`` (more config fields) set the
    model and the run, ``safeguards`` the rows beside Diffusion-DPO's (of :data:`SAFEGUARDS`), ``pairs`` the pairs per
    step; ``between_rounds(round)``, when given, runs before each round's first step, outside every clock."""
    try:  # the shared test helpers; a checkout older than tests/helpers/common.py kept them in tests/conftest.py
        from tests.helpers.common import fast_config_values, lora_config, pickapic_rows
    except ModuleNotFoundError:
        from conftest import fast_config_values, lora_config, pickapic_rows
    from datasets import Dataset
    from transformers import TrainerCallback

    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
    from trl_diffusion_sdpo.safeguards import safeguard_for
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    names = ["dpo", *(f"{name}{suffix}" for name in safeguards for suffix in ("", "_before"))]
    names = names if before else [name for name in names if not name.endswith("before")]
    steps = (rounds + 2) * len(names)  # a warmup round, the timed rounds, the profiled round
    build_pipeline = build_pipeline or (
        lambda tokenizer_dir: build_tiny_sd_pipeline(seed=0, tokenizer_dir=tokenizer_dir)
    )
    pipeline = build_pipeline(f"{workdir}/tok-{lora}")
    args = DiffusionSDPOConfig(
        **{
            **fast_config_values(f"{workdir}/out"),
            "max_steps": steps,
            "logging_steps": 10**6,
            "per_device_train_batch_size": pairs,
            "bf16": bf16,
            "safeguard_space": "none",  # the "dpo" row: plain Diffusion-DPO, not the offline default's output space
            **(config or {}),
        }
    )
    dataset = Dataset.from_list(pickapic_rows(pairs))  # one batch per epoch: every step reads the same rows
    trainer = DiffusionSDPOTrainer(
        pipeline, args=args, train_dataset=dataset, peft_config=lora_config() if lora else None
    )
    trainable = sum(p.numel() for p in trainer.family.denoiser.parameters() if p.requires_grad)
    old_one_pass = before.get("trl_diffusion_sdpo/safeguards/gradients/one_pass.py")
    safeguards = {"dpo": trainer.safeguard}
    for name in names[1:]:
        config = copy.copy(trainer.args)
        for field, value in {"safeguard_space": "output", **SAFEGUARDS[name.split("_")[0]]}.items():
            setattr(config, field, value)
        safeguard = safeguard_for(config, trainer.engine, lora=lora, trainable_elements=trainable)
        if name.endswith("before"):
            safeguard.backward_stage.collectives.one_pass_store_class = old_one_pass.OnePassBranchGradients
        safeguards[name] = safeguard
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    records: dict[str, dict] = {}
    profiled = len(names) * (rounds + 1)

    class Steps(TrainerCallback):
        """Each whole step (from the previous step's ``on_step_end`` to its own) runs the next safeguard in turn;
        the timed rounds are clocked, the final one profiled."""

        def __init__(self) -> None:
            self.profile: torch.profiler.profile | None = None
            self.clock = (0.0, 0.0)

        def begin(self, step: int) -> None:
            if between_rounds is not None and step % len(names) == 0:
                between_rounds(step // len(names))
            trainer.safeguard = safeguards[names[step % len(names)]]
            _switch_taps(safeguards, names[step % len(names)])
            if step >= profiled:
                self.profile = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=True
                )
                self.profile.__enter__()
            self.clock = (time.perf_counter(), time.thread_time())

        def on_train_begin(self, args_, state, control, **kwargs):
            self.begin(state.global_step)

        def on_step_end(self, args_, state, control, **kwargs):
            wall, cpu = time.perf_counter() - self.clock[0], time.thread_time() - self.clock[1]
            step = state.global_step - 1
            name = names[step % len(names)]
            if self.profile is not None:
                self.profile.__exit__(None, None, None)
                records[name] = step_record(self.profile)
                self.profile = None
            elif step >= len(names):
                times[name].append(wall)
                cpu_times[name].append(cpu)
            if state.global_step < state.max_steps:
                self.begin(state.global_step)

    trainer.add_callback(Steps())
    trainer.train()
    rows = {}
    for name in names:
        rows[name] = {
            **records[name],
            "median_step_s": statistics.median(times[name]),
            "median_step_thread_cpu_s": statistics.median(cpu_times[name]),
            "step_times_s": times[name],
            "step_thread_cpu_s": cpu_times[name],
            "two_pass_reason": getattr(getattr(safeguards[name], "backward_stage", None), "two_pass_reason", None),
        }
    dpo = rows["dpo"]
    for name, row in rows.items():
        row["operations_ratio_to_dpo"] = row["operations"] / dpo["operations"]
        row["outside_backward_ratio_to_dpo"] = row["operations_outside_backward"] / dpo["operations_outside_backward"]
        row["step_ratio_to_dpo"] = row["median_step_s"] / dpo["median_step_s"]
        row["thread_cpu_ratio_to_dpo"] = row["median_step_thread_cpu_s"] / dpo["median_step_thread_cpu_s"]
        # paired by round: each safeguard's step against the Diffusion-DPO step of its own round
        row["median_paired_thread_cpu_ratio_to_dpo"] = statistics.median(
            mine / base for mine, base in zip(cpu_times[name], cpu_times["dpo"])
        )
    return {"trained_tensors": sum(1 for p in trainer.family.denoiser.parameters() if p.requires_grad), "rows": rows}


def pass_host_times(before: dict, rounds: int, bf16: bool, model: str = "tiny") -> dict:
    """The tapped pass alone on the tiny UNet (``model="tiny"``, :mod:`one_pass_model`) or on the lock-step measure's
    UNet of SD1.5's block structure (``"sd15-structure"``: :data:`~benchmarks.speed.host_time_lockstep.SD15_STRUCTURE`,
    77 prompt tokens), full tuning, 4 pairs, now and with the taps of ``--before``, beside Diffusion-DPO's forward and
    backward: per route the median main-thread CPU time (one thread: the host's Python and the kernels) of ``rounds``
    rounds, the routes alternating within each round (the first three rounds left out), and the median of the rounds'
    ratios of the pass now to the pass before. ``install``: entering and leaving the taps' block with nothing inside
    (the hooks registered and removed, or the forwards replaced and put back); ``forward``: the tapped forward;
    ``pass``: forward, backward."""
    from benchmarks.speed.one_pass_model import build, cotangents
    from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients

    if model == "sd15-structure":
        from diffusers import UNet2DConditionModel

        from benchmarks.speed.host_time_lockstep import SD15_STRUCTURE

        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_STRUCTURE).train()
        gen = torch.Generator().manual_seed(1)
        side, rows = SD15_STRUCTURE["sample_size"], 2 * PAIRS
        context = torch.randn(PAIRS, 77, SD15_STRUCTURE["cross_attention_dim"], generator=gen).repeat(2, 1, 1)
        timesteps = torch.randint(0, 1000, (PAIRS,), generator=gen).repeat(2)
        inputs = (torch.randn(rows, 4, side, side, generator=gen), timesteps, context)
        target = torch.randn(rows, 4, side, side, generator=gen)
    else:
        unet, inputs, target = build("tiny", False, PAIRS)
    params = [p for p in unet.parameters() if p.requires_grad]
    stores = {"now": OnePassBranchGradients(unet, params)}
    if before:
        old = before["trl_diffusion_sdpo/safeguards/gradients/one_pass.py"]
        stores["before"] = old.OnePassBranchGradients(unet, params)

    def precision() -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def forward() -> torch.Tensor:
        with precision():
            return unet(*inputs, return_dict=False)[0].float()

    def backward(out: torch.Tensor) -> None:
        out.backward(cotangents(out, target))
        for p in params:
            p.grad = None

    routes = {"dpo forward": forward, "dpo pass": lambda: backward(forward())}
    for name, store in stores.items():

        def install(store=store) -> None:
            with store.taps.tapping(2, destination=store._destination):
                pass

        def tapped_forward(store=store) -> None:
            with store.split(2):
                forward()

        def tapped_pass(store=store) -> None:
            with store.split(2):
                backward(forward())

        routes.update({f"{name} install": install, f"{name} forward": tapped_forward, f"{name} pass": tapped_pass})
    times: dict[str, list[float]] = {route: [] for route in routes}
    for _ in range(rounds + 3):
        for route, run_route in routes.items():
            start = time.thread_time()
            run_route()
            times[route].append(time.thread_time() - start)
    result = {
        "model": model,
        "tapped_layers": len(stores["now"].taps.layers),
        "median_thread_cpu_ms": {route: 1e3 * statistics.median(t[3:]) for route, t in times.items()},
    }
    if before:
        pairs = zip(times["now pass"][3:], times["before pass"][3:])
        result["median_paired_pass_ratio_now_to_before"] = statistics.median(now / then for now, then in pairs)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="main", help="the commit whose safeguard modules are 'before'")
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per safeguard")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (CPU autocast)")
    parser.add_argument("--tunings", default="full,lora_r4", help="of full, lora_r4")
    parser.add_argument(
        "--checkout",
        default=None,
        help="run the package (and tests' helpers) of this checkout instead, with no 'before' rows: a whole checkout "
        "against this one, one process each",
    )
    parser.add_argument(
        "--pass-rounds", type=int, default=0, help="also time the tapped pass alone this many rounds (pass_host_times)"
    )
    parser.add_argument(
        "--pass-model", default="tiny", choices=["tiny", "sd15-structure"], help="the UNet of --pass-rounds"
    )
    parser.add_argument("--json", default=None)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    if opts.checkout:
        sys.path[:0] = [opts.checkout, str(Path(opts.checkout) / "tests")]
    commit = subprocess.run(["git", "rev-parse", opts.before], cwd=ROOT, check=True, capture_output=True, text=True)
    here = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True, text=True)
    before = {} if opts.checkout else load_before(opts.before)
    tunings = [tuning for tuning in opts.tunings.split(",") if tuning]  # none: --pass-rounds alone
    with tempfile.TemporaryDirectory(prefix="op-counts-") as workdir:
        result = {
            "what": __doc__.split("\n\n")[0].replace("\n", " "),
            "command": "python " + shlex.join([str(Path(__file__).relative_to(ROOT)), *(argv or sys.argv[1:])]),
            "machine": harness.machine_description("cpu", 1),
            "settings": {
                "before": None if opts.checkout else commit.stdout.strip(),
                "after": here.stdout.strip(),
                "checkout": opts.checkout,
                "rounds": opts.rounds,
                "pairs": PAIRS,
                "resolution": 32,
                "precision": "bf16 mixed precision (CPU autocast)" if opts.bf16 else "float32",
                "window": "a whole optimizer step: from the previous step's on_step_end to its own",
            },
            **{tuning: run(tuning == "lora_r4", before, opts.rounds, workdir, opts.bf16) for tuning in tunings},
        }
        if opts.pass_rounds:
            result["passes"] = pass_host_times(before, opts.pass_rounds, opts.bf16, opts.pass_model)
            for route, ms in result["passes"]["median_thread_cpu_ms"].items():
                print(f"pass {route:16s} {ms:8.2f} ms")
        result["load"] = f"load average {os.getloadavg()[0]:.1f} at the end (2 CPU cores shared with other work)"
    for tuning in tunings:
        for name, row in result[tuning]["rows"].items():
            print(
                f"{tuning:8s} {name:17s} ops {row['operations']:6d} x{row['operations_ratio_to_dpo']:.3f}  outside "
                f"backward {row['operations_outside_backward']:5d} x{row['outside_backward_ratio_to_dpo']:.3f}  "
                f"step {row['median_step_s']:.3f} s x{row['step_ratio_to_dpo']:.3f}  thread cpu "
                f"{row['median_step_thread_cpu_s']:.3f} s x{row['median_paired_thread_cpu_ratio_to_dpo']:.3f}  "
                f"syncs {row['host_syncs']}  casts {row['casts']} ({row['cast_elements']} elements)  peak "
                f"{row['peak_bytes_above_start'] / 2**20:.2f} MiB"
            )
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
