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
        --json benchmarks/results/cpu-safeguard-op-counts-tiny.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: the package, benchmarks.harness, tests' helpers
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks import harness  # noqa: E402

# module -> the sibling name its "before" copy is imported under, and the imports rewritten to the other copies
BEFORE = {
    "trl_diffusion_sdpo/safeguards/gradients/layer_taps.py": (
        "trl_diffusion_sdpo.safeguards.gradients.layer_taps_before",
        {},
    ),
    "trl_diffusion_sdpo/safeguards/gradients/one_pass.py": (
        "trl_diffusion_sdpo.safeguards.gradients.one_pass_before",
        {"from .layer_taps import": "from .layer_taps_before import"},
    ),
    "trl_diffusion_sdpo/safeguards/update_space.py": ("trl_diffusion_sdpo.safeguards.update_space_before", {}),
    "trl_diffusion_sdpo/safeguards/parameter.py": (
        "trl_diffusion_sdpo.safeguards.parameter_before",
        {
            "from .update_space import": "from .update_space_before import",
            # where the package keeps it now
            "from ..step.optimizer import trainable_parameters": "from ..engines.base import trainable_parameters",
        },
    ),
}


# config fields an earlier checkout's safeguard modules read, at the values that keep them off
OLD_FIELDS = {"safeguard_log_output_lambda": False}


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


SAFEGUARDS = {"parameter": {"safeguard_space": "parameter"}, "update": {"safeguard_space": "update"}}
PAIRS = 4


def run(lora: bool, before: dict, rounds: int, workdir: str) -> dict:
    from conftest import fast_config_values, lora_config, pickapic_rows
    from datasets import Dataset

    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
    from trl_diffusion_sdpo.safeguards import safeguard_for
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline
    from trl_diffusion_sdpo.testing.operations import StepOperations

    names = ["dpo", "parameter", "parameter_before", "update", "update_before"]
    steps = (rounds + 2) * len(names)  # a warmup round, the timed rounds, the profiled round
    pipeline = build_tiny_sd_pipeline(seed=0, tokenizer_dir=f"{workdir}/tok-{lora}")
    args = DiffusionSDPOConfig(
        **{
            **fast_config_values(f"{workdir}/out"),
            "max_steps": steps,
            "logging_steps": 10**6,
            "per_device_train_batch_size": PAIRS,
        }
    )
    dataset = Dataset.from_list(pickapic_rows(PAIRS))  # one batch per epoch: every step reads the same rows
    trainer = DiffusionSDPOTrainer(
        pipeline, args=args, train_dataset=dataset, peft_config=lora_config() if lora else None
    )
    trainable = sum(p.numel() for p in trainer.family.denoiser.parameters() if p.requires_grad)
    old_parameter = before["trl_diffusion_sdpo/safeguards/parameter.py"]
    old_store = before["trl_diffusion_sdpo/safeguards/gradients/one_pass.py"].OnePassBranchGradients
    safeguards = {"dpo": trainer.safeguard}
    for name in names[1:]:
        space = name.split("_")[0]
        config = copy.copy(trainer.args)
        for field, value in {"safeguard_space": "output", **SAFEGUARDS[space]}.items():
            setattr(config, field, value)
        if name.endswith("before"):
            cls = old_parameter.UpdateSpace if space == "update" else old_parameter.ParameterSpace
            for field, value in OLD_FIELDS.items():  # fields the earlier modules read that the config has dropped
                if not hasattr(config, field):
                    setattr(config, field, value)
            safeguard = cls(config, trainer.engine, lora=lora, trainable_elements=trainable)
            safeguard.backward_stage.collectives.one_pass_store_class = old_store
        else:
            safeguard = safeguard_for(config, trainer.engine, lora=lora, trainable_elements=trainable)
        safeguards[name] = safeguard
    times: dict[str, list[float]] = {name: [] for name in names}
    clock = {"start": 0.0}

    def before_step(step: int) -> None:
        trainer.safeguard = safeguards[names[step % len(names)]]
        clock["start"] = time.perf_counter()

    profiled = len(names) * (rounds + 1)
    counter = StepOperations(lambda step: step >= profiled, before_step, whole_step=True)

    class Timer(counter.__class__.__bases__[0]):
        def on_step_end(self, args_, state, control, **kwargs):
            step = state.global_step - 1
            if len(names) <= step < profiled:
                times[names[step % len(names)]].append(time.perf_counter() - clock["start"])

    trainer.add_callback(Timer())
    trainer.add_callback(counter)
    trainer.train()
    counts = {names[step % len(names)]: record for step, record in counter.records.items()}
    rows = {}
    for name in names:
        every, outside = sum(counts[name]["all"].values()), sum(counts[name]["outside_backward"].values())
        rows[name] = {
            "operations": every,
            "operations_outside_backward": outside,
            "median_step_s": statistics.median(times[name]),
            "step_times_s": times[name],
            "two_pass_reason": getattr(getattr(safeguards[name], "backward_stage", None), "two_pass_reason", None),
        }
    dpo = rows["dpo"]
    for row in rows.values():
        row["operations_ratio_to_dpo"] = row["operations"] / dpo["operations"]
        row["outside_backward_ratio_to_dpo"] = row["operations_outside_backward"] / dpo["operations_outside_backward"]
        row["step_ratio_to_dpo"] = row["median_step_s"] / dpo["median_step_s"]
    return {"trained_tensors": sum(1 for p in trainer.family.denoiser.parameters() if p.requires_grad), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="main", help="the commit whose safeguard modules are 'before'")
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per safeguard")
    parser.add_argument("--json", default=None)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", opts.before], cwd=ROOT, check=True, capture_output=True, text=True)
    before = load_before(opts.before)
    with tempfile.TemporaryDirectory(prefix="op-counts-") as workdir:
        result = {
            "machine": harness.machine_description("cpu", 1),
            "settings": {
                "before": commit.stdout.strip(),
                "rounds": opts.rounds,
                "pairs": PAIRS,
                "resolution": 32,
                "window": "a whole optimizer step: from the previous step's on_step_end to its own",
            },
            "full": run(False, before, opts.rounds, workdir),
            "lora_r4": run(True, before, opts.rounds, workdir),
        }
    for tuning in ("full", "lora_r4"):
        for name, row in result[tuning]["rows"].items():
            print(
                f"{tuning:8s} {name:17s} ops {row['operations']:6d} x{row['operations_ratio_to_dpo']:.3f}  outside "
                f"backward {row['operations_outside_backward']:5d} x{row['outside_backward_ratio_to_dpo']:.3f}  "
                f"step {row['median_step_s']:.3f} s x{row['step_ratio_to_dpo']:.3f}"
            )
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
