"""The held-out probe's cost: its share of the training time, measured side by side in one process (the time spent
inside the probe's measurements over the run's ``train_runtime``).

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/speed/probe_cost.py --modes offline-lora offline-full online \\
        --steps 100 --online-steps 40 --probe-steps 20 --paths kept rerun \\
        --out benchmarks/results/probe/cpu-probe-price-defaults.json
    python benchmarks/speed/probe_cost.py --steps 60 --probe-steps 10 \\
        --out benchmarks/results/probe/cpu-probe-cost-tiny.json
    python benchmarks/speed/probe_cost.py --steps 100 --probe-steps 20 --draws 1 4 8 16 \\
        --out benchmarks/results/probe/cpu-probe-cost-draws-tiny.json  # probe_noise_draws

The runs (``--modes``): ``offline-lora``, the tiny Stable Diffusion pipeline (``trl_diffusion_sdpo.testing``), LoRA,
resolution 32, 2 pairs per step on 24 coloured pairs, Diffusion-DPO, the probe's pairs held back from them;
``offline-full``, the same run tuning the whole UNet (the reference a frozen copy); ``online``, the online trainer on
the shipped tiny base with a pixel reward (mean red minus mean blue) on the demo's captions, LoRA, 4 prompts a step,
3 samples of 3 sampling steps each, the probe's prompts held back from them and paired once when the trainer is built
(that pairing's time is reported apart, as a one-off cost: it is not inside ``train_runtime``). The probe at the
config's defaults (``probe_pairs``, ``probe_noise_draws``) unless ``--draws`` says otherwise, every ``--probe-steps``.

``--paths``: ``kept``, the probe as it runs (the reference's errors on its fixed noised pairs kept from its first
probe); ``rerun``, the same probe running the reference at every probe (its ``reference_key`` unset), whose readings
are the same: each run records its readings' equality with the other path's. One intra-op thread; the machine's cores
may be shared with other work, so the figure is a share, not a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import machine_description  # noqa: E402

MODES = ("offline-lora", "offline-full", "online")
PATHS = ("kept", "rerun")


def timed(function: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    """``function`` with each call's wall time appended to ``spent`` (the benchmark's own wrapper: the figures the
    call returns are unchanged)."""

    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    return call


def offline_trainer(tmp: str, lora: bool, steps: int, probe: dict[str, Any]) -> Any:
    from datasets import Dataset

    from tests.helpers.common import fast_config_values, lora_config, pickapic_rows
    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(seed=0, tokenizer_dir=os.path.join(tmp, "tok"))
    values = {**fast_config_values(os.path.join(tmp, "out")), "max_steps": steps, "logging_steps": 10}
    args = DiffusionSDPOConfig(**values, safeguard_space="none", **probe)
    data = Dataset.from_list(pickapic_rows(24))
    return DiffusionSDPOTrainer(pipe, args=args, train_dataset=data, peft_config=lora_config() if lora else None)


def online_trainer(tmp: str, steps: int, probe: dict[str, Any], pairing: list[float]) -> Any:
    from datasets import Dataset
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    import trl_diffusion_sdpo.online.probe_pairs as probe_pairs
    from tests.helpers.online import LORA, online_config, red_minus_blue
    from trl_diffusion_sdpo.demo.pretrain import SHIPPED_BASE_DIR
    from trl_diffusion_sdpo.demo.shapes import all_captions
    from trl_diffusion_sdpo.online import OnlineDiffusionSDPOTrainer

    pipe = StableDiffusionPipeline.from_pretrained(str(SHIPPED_BASE_DIR))
    prompts = [c.text for c in all_captions()[:16]]
    args = online_config(Path(tmp), max_steps=steps, logging_steps=10, safeguard_space="none", **probe)
    # The trainer imports the pairing when it pairs: the benchmark's wrapper times that one call, its pairs unchanged.
    pair = probe_pairs.held_out_pairs
    probe_pairs.held_out_pairs = timed(pair, pairing)
    try:
        return OnlineDiffusionSDPOTrainer(
            pipe, None, args, Dataset.from_dict({"prompt": prompts}), reward_funcs=[red_minus_blue],
            peft_config=LoraConfig(**LORA),
        )  # fmt: skip
    finally:
        probe_pairs.held_out_pairs = pair


def measure(mode: str, path: str, steps: int, probe_steps: int, draws: int | None = None) -> dict:
    import torch

    torch.set_num_threads(1)
    probe_fields = {"probe_steps": probe_steps, **({} if draws is None else {"probe_noise_draws": draws})}
    pairing: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "online":
            trainer = online_trainer(tmp, steps, probe_fields, pairing)
        else:
            trainer = offline_trainer(tmp, mode == "offline-lora", steps, probe_fields)
        probe = trainer.probe.probe
        if path == "rerun":
            probe.reference_key = None  # the reference at every probe
        spent: list[float] = []
        probe.measure = timed(probe.measure, spent)  # the benchmark's own attribute on the probe object
        reference_calls: list[float] = []
        probe.stages.reference = timed(probe.stages.reference, reference_calls)
        output = trainer.train()
        readings = trainer.probe.readings
    runtime = output.metrics["train_runtime"]
    args = trainer.args
    run = {
        "mode": mode,
        "path": path,
        "steps": steps,
        "probe_steps": probe_steps,
        "probe_pairs": args.probe_pairs,
        "probe_noise_draws": args.probe_noise_draws,
        "probes": len(spent),
        "reference_forwards": len(reference_calls),
        "train_runtime_s": runtime,
        "probe_s": sum(spent),
        "first_probe_s": spent[0],
        "later_probe_mean_s": sum(spent[1:]) / max(len(spent) - 1, 1),
        "probe_share_of_training": sum(spent) / runtime,
        "readings": readings,
    }
    if mode == "online":
        run["pairing_s"] = pairing[0]
        run["pairing_share_of_training"] = pairing[0] / runtime
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["offline-lora"])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=["kept"])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of an offline run")
    parser.add_argument("--online-steps", type=int, default=40, help="optimizer steps of an online run")
    parser.add_argument("--probe-steps", type=int, nargs="+", default=[10])
    parser.add_argument(
        "--draws", type=int, nargs="+", default=[None], help="probe_noise_draws (default: the config's)."
    )
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    load_before = [round(v, 2) for v in os.getloadavg()]
    runs = [
        measure(mode, path, options.online_steps if mode == "online" else options.steps, every, draws)
        for mode in options.modes
        for every in options.probe_steps
        for draws in options.draws
        for path in options.paths
    ]
    for run in runs:  # the paths' readings against each other, then dropped from the record
        same = [
            other
            for other in runs
            if other is not run
            and {k: other[k] for k in ("mode", "probe_steps", "probe_noise_draws")}
            == {k: run[k] for k in ("mode", "probe_steps", "probe_noise_draws")}
        ]
        if same:
            run["readings_equal_other_path"] = all(other["readings"] == run["readings"] for other in same)
    for run in runs:
        run.pop("readings")
    result = {
        "question": "the held-out probe's share of the training time, offline LoRA and full tuning and online",
        "command": "python benchmarks/speed/probe_cost.py " + " ".join(sys.argv[1:]),
        "machine": machine_description("cpu", threads=1),
        "load_average_before": load_before,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "note": "CPU shared with other work while measured; the share, not the times, is the figure",
        "runs": runs,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if options.out is not None:
        options.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
