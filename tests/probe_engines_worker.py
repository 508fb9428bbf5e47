"""One process of a run with the held-out probe under an engine (one process, DDP, DeepSpeed ZeRO-1/2/3 or FSDP2 on
CPU processes over gloo), full tuning of the tiny SD UNet. It trains in turn, in the same processes:

* ``plain``: without the probe;
* ``quiet``: with the probe every step and ``on_pathology="rewind"``, an alarm that never fires;
* ``alarm``: the same with an alarm that fires at every probe (back to step 0, the safeguard on; again, and stop);
* ``online-plain``, ``online-quiet``, ``online-alarm``: the same online (an online run stops at its first rewind);
* ``lora-alarm``: ``alarm`` with LoRA adapters on the UNet instead of full tuning;
* ``resume-straight``: 4 steps with the probe every step and ``on_pathology="rewind"``, a checkpoint at step 2 (the
  rewind's snapshot inside it); healthy at step 1, unhealthy at 2 and 3 with a patience of 2: the alarm fires at step
  3, back to step 1, and step 4 trains with the safeguard on;
* ``resume-same``, ``resume-other``: the same run resumed from ``resume-straight``'s ``checkpoint-2`` (launched on the
  same number of processes and on another); an engine that refuses the other count reports its error (``refused``).

Each process writes ``<out>/<job>-rank-<i>.json``: the fingerprints of its own part of the trainable weights (ZeRO-3's
partition, FSDP2's local shard, else the whole weights) when training begins and when it ends, of the gathered
weights at the end and of the weights training started from, of its part at the beginning of every step, the probe's
readings and the rewinds; the ``resume-*`` jobs' process 0 also writes ``<out>/<job>-weights.safetensors``, the
gathered weights at the end.

    accelerate launch --config_file <yaml> --num_processes 2 --mixed_precision no tests/probe_engines_worker.py \
        <out> <yaml> [jobs...]
    python tests/probe_engines_worker.py <out> - alarm        (one process)
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests.helpers
torch.set_num_threads(1)

from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from tests.helpers.common import cpu_launch_fields, fast_config_values, lora_config, pickapic_rows  # noqa: E402
from tests.helpers.fsdp_on_cpu import lift_fsdp_cpu_gate  # noqa: E402
from tests.helpers.rewind import ScriptedAlarm  # noqa: E402
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer  # noqa: E402
from trl_diffusion_sdpo.callbacks import hold_back_rows  # noqa: E402
from trl_diffusion_sdpo.engines.base import trainable_parameters  # noqa: E402
from trl_diffusion_sdpo.io.resume_check import ResumeConfigError  # noqa: E402
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline  # noqa: E402

STEPS = 2
GLOBAL_BATCH = 2
#: the ``resume-*`` jobs: their steps, the step of the checkpoint resumed from, and the steps the alarm reads unhealthy
#: (with a patience of 2)
RESUME_STEPS, RESUME_AT, RESUME_UNHEALTHY = 4, 2, {2, 3}


def fingerprint(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def local_part(parameter: torch.Tensor) -> torch.Tensor:
    """This process's own part of a trainable weight: ZeRO-3's partition, FSDP2's local shard, else the weight."""
    if hasattr(parameter, "ds_tensor"):
        return parameter.ds_tensor
    return parameter.to_local() if hasattr(parameter, "to_local") else parameter


class LocalParts(TrainerCallback):
    """The fingerprint of this process's parts of the trainable weights once the engine holds them, and at the
    beginning of every optimizer step (after the rewind of the step before)."""

    def __init__(self, trainer) -> None:
        self.trainer, self.at_begin, self.at_step_begin = trainer, None, []

    def _fingerprint(self) -> str:
        return fingerprint(local_part(p) for p in trainable_parameters(self.trainer.policy))

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_begin = self._fingerprint()

    def on_step_begin(self, args, state, control, **kwargs):
        self.at_step_begin.append(self._fingerprint())


def build_trainer(out: str, job: str, config: str | None, pipe):
    """``job``'s trainer: offline on 6 Pick-a-Pic rows (the probe's 2 held back from 8; LoRA for ``lora-*``), or
    online (``online-*``) on the online tests' prompts, the probe's 2 being the first of 2 held-out captions."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    online = job.startswith("online-")
    values = {
        **fast_config_values(os.path.join(out, job)),
        **(cpu_launch_fields(config) if config else {}),
        "per_device_train_batch_size": (2 * GLOBAL_BATCH if online else GLOBAL_BATCH) // processes,
        "max_steps": STEPS,
        "safeguard_scope": "global",
        "safeguard_space": "none",
    }
    if not job.endswith("plain"):
        # the ladder of one rung offline (switch, then stop at the second alarm), none online (stop at the first)
        values.update(probe_steps=1, probe_pairs=2, on_pathology="rewind", rewind_max_times=0 if online else 1)
    if job.startswith("resume-"):
        values.update(max_steps=RESUME_STEPS, save_strategy="steps", save_steps=RESUME_AT)
    if online:
        from tests.helpers.online import PROMPTS, red_minus_blue
        from trl_diffusion_sdpo.demo.shapes import all_captions
        from trl_diffusion_sdpo.online import OnlineDiffusionSDPOConfig, OnlineDiffusionSDPOTrainer

        args = OnlineDiffusionSDPOConfig(**values, num_generations=3, sample_steps=3)
        held = Dataset.from_dict({"prompt": [c.text for c in all_captions()[8:10]]})
        prompts = Dataset.from_dict({"prompt": PROMPTS})
        held = None if job.endswith("plain") else held  # eval prompts are read by the probe only
        return OnlineDiffusionSDPOTrainer(pipe, None, args, prompts, held, reward_funcs=[red_minus_blue])
    data = Dataset.from_list(pickapic_rows(8))
    if job == "plain":  # the rows the probed runs train on: the probe holds two back, drawn with the run's seed
        data = hold_back_rows(data, 2, seed=values["seed"])[0]
    lora = lora_config() if job.startswith("lora-") else None
    args = DiffusionSDPOConfig(**values)
    return DiffusionSDPOTrainer(pipe, args=args, train_dataset=data, peft_config=lora)


def train(out: str, job: str, config: str | None) -> dict:
    pipe = build_tiny_sd_pipeline(seed=0, unet_channels=(32, 128), tokenizer_dir=os.path.join(out, "tokenizer"))
    initial = fingerprint(trainable_parameters(pipe.unet))
    trainer = build_trainer(out, job, config, pipe)
    if job.startswith("resume-"):
        trainer.probe_alarm.signal.rule = ScriptedAlarm(2, RESUME_UNHEALTHY)
    elif not job.endswith("plain"):
        quiet = job.endswith("quiet")
        trainer.probe_alarm.signal.rule = ScriptedAlarm(1, set() if quiet else set(range(1, STEPS + 1)))
    parts = LocalParts(trainer)
    trainer.add_callback(parts)
    resume = _checkpoint(out) if job in ("resume-same", "resume-other") else None
    try:
        trainer.train(resume_from_checkpoint=resume)
    except ResumeConfigError as error:  # an engine that cannot resume on this number of processes
        return {"refused": str(error), "engine": trainer.engine.variant}
    parameters = trainable_parameters(trainer.policy)
    if job.startswith("resume-"):
        whole = {str(i): trainer.engine.whole_parameter(p).cpu().contiguous() for i, p in enumerate(parameters)}
        if int(os.environ.get("RANK", "0")) == 0:
            save_file(whole, os.path.join(out, f"{job}-weights.safetensors"))
    report = {
        "initial": initial,
        "local_at_begin": parts.at_begin,
        "local_at_end": fingerprint(local_part(p) for p in parameters),
        "local_at_step_begin": parts.at_step_begin,
        "gathered": fingerprint(trainer.engine.whole_parameter(p) for p in parameters),  # every process gathers
        "engine": trainer.engine.variant,
        "steps": trainer.state.global_step,
        "engine_steps": getattr(trainer.model_wrapped, "global_steps", None),
        "readings": [] if trainer.probe is None else [[s, m] for s, m in trainer.probe.readings],
        "rewinds": [] if trainer.probe is None else [list(pair) for pair in trainer.probe_alarm.action.rewinds],
    }
    del trainer, pipe
    gc.collect()
    if "deepspeed" in sys.modules:  # ZeRO-3 registers its config with transformers; the next training has its own
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return report


def _checkpoint(out: str) -> str:
    """The checkpoint the ``resume-*`` jobs resume from: ``resume-straight``'s at step ``RESUME_AT``, as a run killed
    after that step's save would have left it."""
    return os.path.join(out, "resume-straight", f"checkpoint-{RESUME_AT}")


def main(out: str, config: str, jobs: list[str]) -> None:
    config = None if config == "-" else config
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        lift_fsdp_cpu_gate()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available():
        # DeepSpeed's CPU shared-memory all-reduce op is JIT-compiled otherwise (see tests/distributed_worker.py)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    rank = int(os.environ.get("RANK", "0"))
    for job in jobs:
        report = train(out, job, config)
        with open(os.path.join(out, f"{job}-rank-{rank}.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] or ["plain", "quiet", "alarm"])
