"""The trainer's own per-step overhead on the tiny SD pipeline, counted with ``torch.profiler`` over one whole
optimizer step (``on_step_begin`` to ``on_step_end``): host syncs (``aten::item``, ``aten::_local_scalar_dense``,
``aten::is_nonzero``), top-level aten operations, against the floor step (:func:`benchmarks.harness.floor_step`: policy
forward + backward, reference forward, ``optimizer.step``, ``zero_grad``) on the trainer's own first micro-batch.

Not part of the test suite. CPU, one thread. Counts, not timings, are the figures: they do not depend on load.
A non-logging step and a logging step (``logging_steps=1``) each, with cached latents and without.

    python benchmarks/speed/step_overhead.py --json benchmarks/results/step-time/cpu-step-overhead-tiny.json
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks import harness  # noqa: E402

SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select")


def sync_counts(profile: torch.profiler.profile) -> dict[str, int]:
    """Per sync proxy, how often it was called anywhere in ``profile`` (nested calls included: ``item`` calls
    ``_local_scalar_dense``, which is the one that reads the device)."""
    counts = collections.Counter(e.name for e in profile.events() if e.name in SYNCS)
    return {name: counts.get(name, 0) for name in SYNCS}


def run(cache_latents: bool, logging: bool, workdir: str) -> dict:
    from datasets import Dataset
    from helpers.common import fast_config_values, pickapic_rows

    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline
    from trl_diffusion_sdpo.testing.operations import count_operations, host_reads

    tag = f"{int(cache_latents)}{int(logging)}"
    pipeline = build_tiny_sd_pipeline(seed=0, tokenizer_dir=f"{workdir}/tok-{tag}")
    values = {**fast_config_values(f"{workdir}/out-{tag}"), "max_steps": 3, "cache_latents": cache_latents}
    values["logging_steps"] = 1 if logging else 10**6
    trainer = DiffusionSDPOTrainer(
        pipeline, args=DiffusionSDPOConfig(**values), train_dataset=Dataset.from_list(pickapic_rows(6))
    )
    captured: list = []
    call = trainer.family.call_denoiser

    def capture(model, latents, timesteps, conditioning):
        if not captured:
            captured.append((latents.detach(), timesteps.detach(), {k: v.detach() for k, v in conditioning.items()}))
        return call(model, latents, timesteps, conditioning)

    trainer.family.call_denoiser = capture
    profiles: dict[int, torch.profiler.profile] = {}
    python = cProfile.Profile()
    from transformers import TrainerCallback

    class Profiled(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # from the first step's end to the second's: the first step's logging (if any), the second step whole
            if state.global_step == 1:
                profiles[1] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                profiles[1].__enter__()
                python.enable()
            elif state.global_step == 2:
                python.disable()
                profiles[1].__exit__(None, None, None)

    trainer.add_callback(Profiled())
    trainer.train()
    trainer.family.call_denoiser = call
    step = profiles[1]
    ops = count_operations(step)
    record = {
        "syncs": sync_counts(step),
        "host_reads_outside_optimizer": host_reads(step),
        "aten_top_level": sum(ops["all"].values()),
    }
    record["aten_outside_backward"] = sum(ops["outside_backward"].values())
    record["sync_sites"] = sync_sites(step)
    record["python_calls_by_module"] = python_calls(python)

    latents, timesteps, conditioning = captured[0]
    inputs = (latents, timesteps, conditioning, torch.zeros_like(latents))
    policy = trainer.family.denoiser
    floor = harness.floor_step(trainer, trainer.optimizer, policy, inputs, bf16=False)
    floor()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        floor()
    fops = count_operations(profile)
    record["floor"] = {
        "syncs": sync_counts(profile),
        "host_reads_outside_optimizer": host_reads(profile),
        "aten_top_level": sum(fops["all"].values()),
    }
    record["floor"]["aten_outside_backward"] = sum(fops["outside_backward"].values())
    return record


def python_calls(python: cProfile.Profile) -> dict[str, int]:
    """Python function calls in the profiled step, per top-level package (the package's own per module): a count,
    robust under load, of the Python-side work (a loop over the weights shows as a count in the hundreds)."""
    calls = collections.Counter()
    for (file, _, _), (_, ncalls, *_rest) in pstats.Stats(python).stats.items():
        path = Path(file)
        parts = path.parts
        if "trl_diffusion_sdpo" in parts:
            key = "/".join(parts[parts.index("trl_diffusion_sdpo") :])
        elif "site-packages" in parts:
            key = parts[parts.index("site-packages") + 1]
        else:
            key = "other"
        calls[key] += ncalls
    return dict(calls.most_common())


def sync_sites(profile: torch.profiler.profile) -> dict[str, int]:
    """``aten::_local_scalar_dense`` and ``aten::nonzero`` per chain of their first parents (names), to attribute
    them."""
    sites = collections.Counter()
    for event in profile.events():
        if event.name not in ("aten::_local_scalar_dense", "aten::nonzero"):
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        sites[" < ".join(chain[:4]) or "(top)"] += 1
    return dict(sites)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for cache in (True, False):
            for logging in (False, True):
                key = f"{'cached' if cache else 'encoded'}-{'logging' if logging else 'non-logging'}"
                results[key] = run(cache, logging, workdir)
                print(key, json.dumps(results[key]), flush=True)
    if opts.json:
        opts.json.write_text(json.dumps({"command": " ".join(sys.argv), "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
