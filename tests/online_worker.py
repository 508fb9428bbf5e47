"""Train :class:`OnlineDiffusionSDPOTrainer` in this process (one of several under ``accelerate launch``) and report.

    accelerate launch --config_file <yaml> --num_processes 2 tests/online_worker.py --jobs jobs.json
    python tests/online_worker.py --jobs jobs.json                                  # one plain process

``jobs.json`` lists trainings run one after the other in the same processes (as ``distributed_worker.py --jobs``,
whose engine machinery this reuses): each names its ``result`` file, the saved ``pipeline`` and prompt ``data``
folders, the ``output_dir``, the ``config`` (``OnlineDiffusionSDPOConfig`` keyword arguments), the ``reward`` (a
function of this module, :data:`REWARDS`) and optionally ``env`` (another accelerate config's ``ACCELERATE_*`` and
``FSDP_*`` variables) and ``edit_area_scale`` (:func:`_scaled_edit_areas`). Every job trains LoRA adapters (r = 4)
and saves them. A job of ``rewind_out`` alone is ``online_rewind_worker.py``'s run instead (the held-out probe and a
rewind on every process), writing its reports into that folder.

The main process writes the report: every process's generations (prompts, global rows, rewards, pairs, and whether
the denoiser was sharded while it sampled), each process's part of the trainable weights before training and after
each optimizer step (and whether it was all of them), the collectives each process entered, and the logged losses
and lambdas.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: tests.helpers
from tests.distributed_worker import (  # noqa: E402  (the shared engine machinery; sets one thread per process)
    _counting_collectives,
    _first_mismatch,
    _skip_deepspeed_shm_op,
    _use_environment,
    _uses,
    freeze_survivors,
    lift_fsdp_cpu_gate,
)

#: Rows whose prompt starts with this get a reward that depends on the prompt only: its samples tie.
FLAT = "flat"


def redness(prompts: list[str], images: list[Image.Image], **columns: Any) -> list[float]:
    """Mean red minus mean blue, in [-1, 1]: deterministic and no download. It tells the tiny model's samples apart:
    a prompt's two samples differ by 8e-4 at least, 200 times one pixel level (4e-6 at 32 x 32)."""
    out = []
    for image in images:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
        out.append(float(pixels[..., 0].mean() - pixels[..., 2].mean()))
    return out


def redness_unless_flat(prompts: list[str], images: list[Image.Image], **columns: Any) -> list[float]:
    """:func:`redness`, except that a prompt starting with :data:`FLAT` scores a constant of the prompt (its length):
    all its samples tie, so with ``reward_margin > 0`` it gives no pair, whatever the policy samples."""
    scores = redness(prompts, images)
    return [len(p) / 100.0 if p.startswith(FLAT) else s for p, s in zip(prompts, scores)]


REWARDS = {"redness": redness, "redness_unless_flat": redness_unless_flat}


def _is_shard(parameter: torch.Tensor) -> bool:
    """Whether this process holds only part of ``parameter`` (a ZeRO-3 partition at rest, or an FSDP2 DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(parameter, DTensor):
        return True
    return hasattr(parameter, "ds_id") and parameter.numel() < parameter.ds_numel


@contextlib.contextmanager
def _recording_generations(records: list[dict[str, Any]], collectives: list[str]):
    """Inside the block, every generation of the stage (started, then finished) appends what it sampled, scored and
    paired, how many of the denoiser's weights were shards on this process when it started, and how many collectives
    it entered."""
    from trl_diffusion_sdpo.online.generation import GenerationStage

    start, finish = GenerationStage.start, GenerationStage.finish

    def recording_start(self, inputs, generation, first_row):
        sharded = sum(_is_shard(p) for p in self.family.denoiser.parameters())
        before = len(collectives)
        pending = start(self, inputs, generation, first_row)
        pending.record = {
            "generation": generation,
            "first_row": first_row,
            "prompts": list(inputs["prompt"]),
            "sharded_weights": sharded,
            "collectives": len(collectives) - before,
        }
        return pending

    def recording_finish(self, pending):
        before = len(collectives)
        out = finish(self, pending)
        record = pending.record
        latents = out.batch.get("latent_mean")
        record["collectives"] += len(collectives) - before
        record["rewards"] = out.rewards.tolist()
        record["pairs"] = [[record["first_row"] + r, i, j] for r, i, j in out.pairs]
        # the trained latents, per pair (chosen, rejected): what the offline step receives
        record["pair_latent_sums"] = [] if latents is None else latents.double().flatten(2).sum(-1).tolist()
        records.append(record)
        return out

    GenerationStage.start, GenerationStage.finish = recording_start, recording_finish
    try:
        yield
    finally:
        GenerationStage.start, GenerationStage.finish = start, finish


@contextlib.contextmanager
def _scaled_edit_areas(scale: float | None):
    """Inside the block, the Qwen-Image-Edit pipelines (and their family, which sizes sources by the same function)
    resize each source to ``scale`` times the pixel area they otherwise do (1024^2 for the VAE, Plus's 384^2 for the
    vision encoder): on CPU the tiny VAE takes over a minute to encode a 1024^2 source, the transformer as long to
    attend over its 16384 tokens. Nothing is scaled for ``None``."""
    if scale is None:
        yield
        return
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    modules = (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus)
    originals = [module.calculate_dimensions for module in modules]
    for module, original in zip(modules, originals):
        module.calculate_dimensions = lambda area, ratio, original=original: original(area * scale, ratio)
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.calculate_dimensions = original


def _trainable(trainer) -> list[torch.Tensor]:
    return [p for p in trainer.accelerator.unwrap_model(trainer.model).parameters() if p.requires_grad]


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """What this process holds of ``parameter``: an FSDP2 shard, a ZeRO-3 partition, or the whole tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(parameter, DTensor):
        return parameter.to_local()
    if hasattr(parameter, "ds_id") and parameter.numel() < parameter.ds_numel:
        return parameter.ds_tensor
    return parameter


def _trainable_snapshot(trainer) -> dict[str, Any]:
    """This process's part of the trainable weights, flattened, and whether it is all of them (ZeRO-3 partitions
    even LoRA's small tensors until their first use, then keeps those below its persistence threshold whole)."""
    params = _trainable(trainer)
    snapshot = {
        "whole": not any(_is_shard(p) for p in params),
        "values": torch.cat([_local(p).detach().float().reshape(-1).cpu() for p in params]).tolist(),
    }
    if any(hasattr(p, "ds_tensor") for p in params):
        # ZeRO-3: this process's partition of every weight, the same layout whether a small weight is gathered (after
        # an applied step) or not (after a skipped one, as DeepSpeed leaves it)
        snapshot["partition"] = torch.cat([p.ds_tensor.detach().float().reshape(-1).cpu() for p in params]).tolist()
    return snapshot


def _snapshots_callback(trainer, snapshots: list[dict[str, Any]]):
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        """The trainable weights before training and after every optimizer step, on this process."""

        def on_train_begin(self, args, state, control, **kwargs):
            snapshots.append(_trainable_snapshot(trainer))

        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append(_trainable_snapshot(trainer))

    return Snapshots()


def train(job: dict[str, Any]):
    """One job's training; returns the trainer and what was recorded while it trained."""
    from datasets import load_from_disk
    from peft import LoraConfig

    import trl_diffusion_sdpo.testing  # noqa: F401  (the tiny Qwen-Image 2.1 names its processor class there)
    from trl_diffusion_sdpo.online import OnlineDiffusionSDPOConfig, OnlineDiffusionSDPOTrainer

    args = OnlineDiffusionSDPOConfig(output_dir=job["output_dir"], **job["config"])
    lora = LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = OnlineDiffusionSDPOTrainer(
        job["pipeline"],
        None,
        args,
        load_from_disk(job["data"]),
        reward_funcs=[REWARDS[job["reward"]]],
        peft_config=lora,
    )
    generations: list[dict[str, Any]] = []
    collectives: list[str] = []
    snapshots: list[dict[str, Any]] = []
    trainer.add_callback(_snapshots_callback(trainer, snapshots))
    with _counting_collectives(collectives), _recording_generations(generations, collectives):
        trainer.train()
    trainer.save_model()
    return trainer, {"generations": generations, "collectives": collectives, "snapshots": snapshots}


def report(trainer, recorded: dict[str, Any], result_path: str) -> None:
    """Every process hands over what it recorded; the main process writes the report."""
    from accelerate.utils import gather_object

    from trl_diffusion_sdpo.engines.collectives import zero_stage

    accelerator = trainer.accelerator
    several = accelerator.num_processes > 1
    per_process = gather_object([recorded]) if several else [recorded]
    if accelerator.is_main_process:
        sequences = [r["collectives"] for r in per_process]
        history = trainer.state.log_history
        result = {
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "zero_stage": zero_stage(accelerator),
            "global_step": trainer.state.global_step,
            "losses": [h["loss"] for h in history if "loss" in h],
            "lambdas": [h["safeguard/lambda_mean"] for h in history if "safeguard/lambda_mean" in h],
            "log_history": history,
            "generations": [r["generations"] for r in per_process],
            "snapshots": [r["snapshots"] for r in per_process],
            "collective_counts": [len(s) for s in sequences],
            "collectives_match": all(s == sequences[0] for s in sequences),
            "first_collective_mismatch": _first_mismatch(sequences),
            "saved_files": sorted(os.listdir(trainer.args.output_dir)),
        }
        with open(result_path, "w") as f:
            json.dump(result, f, indent=1)
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", required=True, help="A JSON file listing the trainings to run in turn.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with open(args.jobs) as f:
        jobs = json.load(f)
    environments = [dict(os.environ), *(job["env"] for job in jobs if "env" in job)]
    if any(_uses(env, "ACCELERATE_USE_FSDP") for env in environments) and not torch.cuda.is_available():
        lift_fsdp_cpu_gate()
    if any(_uses(env, "ACCELERATE_USE_DEEPSPEED") for env in environments) and not torch.cuda.is_available():
        _skip_deepspeed_shm_op()
    launch_environment = {n: v for n, v in os.environ.items() if n.startswith(("ACCELERATE_", "FSDP_"))}
    for job in jobs:
        freeze_survivors()  # the imports' and earlier trainings' objects: each train() collects garbage
        _use_environment(job.get("env", launch_environment))
        if "rewind_out" in job:
            from tests.online_rewind_worker import main as rewind_run

            rewind_run(job["rewind_out"])
            continue
        with _scaled_edit_areas(job.get("edit_area_scale")):
            trainer, recorded = train(job)
        report(trainer, recorded, job["result"])
        del trainer
        if "deepspeed" in sys.modules:  # ZeRO-3 registers its config with transformers; a new process has none
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()


if __name__ == "__main__":
    sys.exit(main())
