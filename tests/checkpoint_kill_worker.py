"""Train a tiny LoRA run that SIGKILLs itself at a named stage of one checkpoint save (run as a subprocess).

    python tests/checkpoint_kill_worker.py OUTPUT_DIR --kill-step 3 --kill-stage trainer_state [--resume]

Stages, in the order a save reaches them: ``weights`` (after the weights file), ``weights_partial`` (the weights
file cut to half its length, as a kill during its write leaves it), ``optimizer`` (after the optimizer's state),
``optimizer_partial`` (``optimizer.pt`` cut, after the scheduler, scaler and RNG states), ``rng`` (after the RNG
state), ``trainer_state`` (after ``trainer_state.json``), ``rotation`` (while transformers' rotation, inside its save,
deletes the previous checkpoint, the run's only complete one with ``--save-total-limit 1``: part of its files gone),
``rewind_snapshot`` (in a run with the held-out probe and ``on_pathology="rewind"``, :func:`build_rewind_trainer`:
after the weights and transformers' files, before the rewind's snapshot), ``before_rename`` (the manifest written,
not yet renamed into place) and ``after_rename`` (marked complete, before what was set aside for the save is
deleted). :func:`build_trainer` is shared with the test, so the resumed run in the test is the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: tests.helpers

from datasets import Dataset  # noqa: E402
from transformers.trainer_callback import TrainerState  # noqa: E402

from tests.helpers.common import lora_config, pickapic_rows  # noqa: E402
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer  # noqa: E402
from trl_diffusion_sdpo.io import checkpoint_writing  # noqa: E402
from trl_diffusion_sdpo.io.run_folder import is_checkpoint_folder  # noqa: E402
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline  # noqa: E402

STAGES = [
    "weights",
    "weights_partial",
    "optimizer",
    "optimizer_partial",
    "rng",
    "trainer_state",
    "rotation",
    "rewind_snapshot",
    "before_rename",
    "after_rename",
]
MAX_STEPS = 4


def build_trainer(
    output_dir: str, tokenizer_dir: str, max_steps: int = MAX_STEPS, peft_config=None, callbacks=None, **overrides
) -> DiffusionSDPOTrainer:
    """The run; ``overrides`` replace config fields, ``peft_config`` the LoRA config (``lora_config()``),
    ``callbacks`` the trainer's ``callbacks=``."""
    settings = dict(
        output_dir=output_dir,
        resolution=32,
        per_device_train_batch_size=2,
        max_steps=max_steps,
        learning_rate=1e-3,
        scale_lr=False,
        warmup_steps=0,
        logging_steps=1,
        use_cpu=True,
        report_to="none",
        save_strategy="steps",
        save_steps=1,
        save_total_limit=2,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        random_flip=True,
        proportion_empty_prompts=0.5,
    )
    args = DiffusionSDPOConfig(**(settings | overrides))
    pipeline = build_tiny_sd_pipeline(seed=0, tokenizer_dir=tokenizer_dir)
    return DiffusionSDPOTrainer(
        pipeline,
        args=args,
        train_dataset=Dataset.from_list(pickapic_rows(6)),
        peft_config=peft_config if peft_config is not None else lora_config(),
        callbacks=callbacks,
    )


# The rewind's run: a held-out probe at every step, an alarm scripted to find steps 3 and 4 unhealthy (patience 2), so
# it fires at step 4 and puts step 2's snapshot back; a resume from checkpoint-2 or -3 must do the same.
REWIND_SETTINGS = dict(probe_steps=1, probe_pairs=2, on_pathology="rewind", safeguard_space="none")
REWIND_UNHEALTHY = {3, 4}


def build_rewind_trainer(output_dir: str, tokenizer_dir: str) -> DiffusionSDPOTrainer:
    """The run of :func:`build_trainer` with the held-out probe and a rewind whose alarm fires at step 4."""
    from tests.helpers.rewind import ScriptedAlarm

    trainer = build_trainer(output_dir, tokenizer_dir, **REWIND_SETTINGS)
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps=REWIND_UNHEALTHY)
    return trainer


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _truncate_and_die(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    _die()


def install_kill(trainer: DiffusionSDPOTrainer, step: int, stage: str) -> None:
    """Make the save at optimizer step ``step`` kill this process at ``stage``."""

    def at_step() -> bool:
        return trainer.state.global_step == step

    def after(owner, method_name: str, then, folder_at: int = 0):
        """``owner.method_name`` runs ``then(folder)`` after writing into the checkpoint folder being written (its
        argument ``folder_at``)."""
        original = getattr(owner, method_name)

        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            output_dir = args[folder_at] if len(args) > folder_at else None
            if at_step() and output_dir is not None and is_checkpoint_folder(str(output_dir)):
                then(str(output_dir))
            return result

        setattr(owner, method_name, wrapped)

    if stage == "weights":
        after(trainer, "save_model", lambda d: _die())
    elif stage == "weights_partial":
        after(trainer, "save_model", lambda d: _truncate_and_die(os.path.join(d, "pytorch_lora_weights.safetensors")))
    # transformers' own steps of its _save_checkpoint, wrapped on this trainer only
    elif stage == "optimizer":
        after(trainer, "_save_optimizer_and_scheduler", lambda d: _die())
    elif stage == "optimizer_partial":
        after(trainer, "_save_rng_state", lambda d: _truncate_and_die(os.path.join(d, "optimizer.pt")))
    elif stage == "rng":
        after(trainer, "_save_rng_state", lambda d: _die())
    elif stage == "rewind_snapshot":
        probe = trainer.probe_alarm  # the rewind's snapshot is its action's checkpoint part
        original_part = probe.save_checkpoint_part

        def save_checkpoint_part(checkpoint, *args, **kwargs):
            if at_step():
                _die()  # the weights and transformers' files written, the snapshot not yet
            original_part(checkpoint, *args, **kwargs)

        probe.save_checkpoint_part = save_checkpoint_part
    elif stage == "trainer_state":
        original = TrainerState.save_to_json

        def save_to_json(self, json_path):
            original(self, json_path)
            if at_step():
                _die()

        TrainerState.save_to_json = save_to_json
    elif stage == "rotation":
        original_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):  # transformers' rotation deletes a checkpoint-N in place
            if at_step() and re.fullmatch(r"checkpoint-\d+", os.path.basename(os.path.normpath(str(path)))):
                os.remove(os.path.join(path, "pytorch_lora_weights.safetensors"))
                _die()  # part of it deleted
            original_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    elif stage == "before_rename":
        original_rename = os.rename

        def rename(src, dst, *args, **kwargs):
            if at_step() and ".tmp-" in str(src):
                _die()
            original_rename(src, dst, *args, **kwargs)

        checkpoint_writing.os.rename = rename
    elif stage == "after_rename":
        original_drop = checkpoint_writing.drop_replaced

        def drop_replaced(*args, **kwargs):
            if at_step():
                _die()  # marked complete, what was set aside for the save still there
            original_drop(*args, **kwargs)

        checkpoint_writing.drop_replaced = drop_replaced
    else:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")


def train_until_killed(
    output_dir: str, tokenizer_dir: str, step: int, stage: str, save_total_limit: int = 2, resume: bool = False
) -> None:
    """Build the run (:func:`build_rewind_trainer`'s for ``rewind_snapshot``), make its save at ``step`` kill this
    process at ``stage`` and train; returns only if the kill never came."""
    if stage == "rewind_snapshot":
        trainer = build_rewind_trainer(output_dir, tokenizer_dir)
    else:
        trainer = build_trainer(output_dir, tokenizer_dir, save_total_limit=save_total_limit)
    install_kill(trainer, step, stage)
    trainer.train(resume_from_checkpoint=True if resume else None)
    print("finished without being killed")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--kill-step", type=int, required=True)
    parser.add_argument("--kill-stage", choices=STAGES, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--save-total-limit", type=int, default=2)
    options = parser.parse_args()
    train_until_killed(
        options.output_dir,
        options.tokenizer_dir,
        options.kill_step,
        options.kill_stage,
        save_total_limit=options.save_total_limit,
        resume=options.resume,
    )


if __name__ == "__main__":
    main()
