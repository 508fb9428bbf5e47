"""One process of a two-process (gloo, CPU) online run with the held-out probe and ``on_pathology="rewind"``, whose
alarm fires at the first probe; each process writes its probe's readings, its share of the held-out pairs, its
trained weights' fingerprint and its rewinds to ``<out>/rank-<i>.json``.

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml --num_processes 2 \
        --mixed_precision no tests/online_rewind_worker.py <out>
"""

from __future__ import annotations

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests.helpers
torch.set_num_threads(1)

from datasets import Dataset  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402

from tests.helpers.online import LORA, PROMPTS, online_config, red_minus_blue  # noqa: E402
from tests.rewind_worker import fingerprint  # noqa: E402
from trl_diffusion_sdpo.callbacks.rewind import ProbeAlarmRule  # noqa: E402
from trl_diffusion_sdpo.demo.pretrain import SHIPPED_BASE_DIR  # noqa: E402
from trl_diffusion_sdpo.demo.shapes import all_captions  # noqa: E402
from trl_diffusion_sdpo.engines.base import trainable_parameters  # noqa: E402
from trl_diffusion_sdpo.online import OnlineDiffusionSDPOTrainer  # noqa: E402


def main(out: str) -> None:
    from pathlib import Path

    pipe = StableDiffusionPipeline.from_pretrained(str(SHIPPED_BASE_DIR))
    args = online_config(
        Path(out), per_device_train_batch_size=2, max_steps=3, safeguard_space="none", probe_steps=1,
        probe_pairs=2,  # one held-out pair per process: each process's own figures differ until reduced
        on_pathology="rewind", rewind_max_times=0,  # no rung of the ladder: the first alarm stops the run
    )  # fmt: skip
    held = Dataset.from_dict({"prompt": [c.text for c in all_captions()[8:10]]})
    trainer = OnlineDiffusionSDPOTrainer(
        pipe, None, args, Dataset.from_dict({"prompt": PROMPTS}), held, reward_funcs=[red_minus_blue],
        peft_config=LoraConfig(**LORA),
    )  # fmt: skip
    # Every probe unhealthy, one probe enough: the alarm fires at step 1, back to step 0, and the run stops.
    trainer.probe_alarm.signal.rule = ProbeAlarmRule(patience=1, threshold=float("-inf"))
    parameters = list(trainable_parameters(trainer.family.denoiser))
    initial = fingerprint(parameters)
    share = trainer.probe.probe.batch
    trainer.train()
    report = {
        "initial": initial,
        "trained": fingerprint(parameters),
        "rewinds": [list(pair) for pair in trainer.probe_alarm.action.rewinds],
        "steps": trainer.state.global_step,
        "readings": trainer.probe.readings,
        "share": share["latent_mean"].tolist(),
    }
    with open(os.path.join(out, f"rank-{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
