"""One process of a two-process (gloo, CPU) run with ``on_pathology="rewind"`` whose alarm fires at every probe;
each process writes its trained weights' fingerprint and its rewinds to ``<out>/rank-<i>.json``.

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml --num_processes 2 \
        --mixed_precision no tests/rewind_worker.py <out>
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests.helpers
torch.set_num_threads(1)

from datasets import Dataset  # noqa: E402

from tests.helpers.common import fast_config_values, lora_config, pickapic_rows  # noqa: E402
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer  # noqa: E402
from trl_diffusion_sdpo.callbacks.rewind import ProbeAlarmRule  # noqa: E402
from trl_diffusion_sdpo.engines.base import trainable_parameters  # noqa: E402
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline  # noqa: E402


def fingerprint(parameters: list[torch.nn.Parameter]) -> str:
    digest = hashlib.sha256()
    for parameter in parameters:
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(out: str) -> None:
    pipe = build_tiny_sd_pipeline(seed=0, tokenizer_dir=os.path.join(out, "tokenizer"))
    values = {**fast_config_values(os.path.join(out, "model")), "per_device_train_batch_size": 1}
    args = DiffusionSDPOConfig(
        **values,
        safeguard_space="none",
        probe_steps=1,
        probe_pairs=2,  # one held-out pair per process: each process's own figures differ until reduced
        on_pathology="rewind",
        rewind_max_times=1,  # one rung of the ladder: the second alarm stops the run
    )
    trainer = DiffusionSDPOTrainer(
        pipe, args=args, train_dataset=Dataset.from_list(pickapic_rows(8)), peft_config=lora_config()
    )
    # Every probe unhealthy, one probe enough: the alarm fires at steps 1 and 2, both back to step 0 (then the stop).
    trainer.probe_alarm.signal.rule = ProbeAlarmRule(patience=1, threshold=float("-inf"))
    parameters = list(trainable_parameters(trainer.family.denoiser))
    initial = fingerprint(parameters)
    trainer.train()
    report = {
        "initial": initial,
        "trained": fingerprint(parameters),
        "rewinds": [list(pair) for pair in trainer.probe_alarm.action.rewinds],
        "steps": trainer.state.global_step,
    }
    with open(os.path.join(out, f"rank-{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
