"""What a run leaves in its ``output_dir``, and whether a new run may start there: read from the folder's names alone,
importing nothing heavy, so that ``train`` and ``online`` refuse a folder holding another run before torch,
transformers or diffusers load (the trainer asks again, under the folder's lock: :mod:`.run_files`). The names are
the ones :mod:`.saving` writes and transformers names its checkpoints with (``tests/io/test_run_folder.py`` holds
them to the libraries' own).
"""

from __future__ import annotations

import os
import re

from ..config.messages import OutputExistsError, advice, overwrite_advice, replacing_refusal

__all__ = [
    "CHECKPOINT_PREFIX",
    "LEFTOVER_PREFIXES",
    "LORA_WEIGHTS_NAME",
    "REPLACED_PREFIX",
    "RESUME_PREFIX",
    "RUN_IDENTITY_NAME",
    "STAGING_PREFIX",
    "TRAINING_CONFIG_NAME",
    "TRANSFORMER_SUBFOLDER",
    "TRASH_PREFIX",
    "UNET_SUBFOLDER",
    "EarlierRunError",
    "check_new_run_folder",
    "checkpoint_entries",
    "earlier_run_files",
    "earlier_run_refusal",
    "is_checkpoint_folder",
]

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
UNET_SUBFOLDER = "unet"
TRANSFORMER_SUBFOLDER = "transformer"
TRAINING_CONFIG_NAME = "training_config.json"
# what the weights in a checkpoint are (base model, denoiser, LoRA settings): written first by every save, compared on
# resume (.resume_check)
RUN_IDENTITY_NAME = "run_identity.json"
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR: checkpoint-<step>
STAGING_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
REPLACED_PREFIX = ".replaced-"  # a complete checkpoint set aside while a save of the same step writes its name again
RESUME_PREFIX = ".resume-"  # what an engine writes to resume on another number of processes
#: what saves and resumes leave beside ``checkpoint-N`` under a prefix of its name (staged, renamed away, set aside or
#: written to resume), which the recovery of interrupted saves finishes or removes (:mod:`.checkpoints`)
LEFTOVER_PREFIXES = (STAGING_PREFIX, TRASH_PREFIX, RESUME_PREFIX, REPLACED_PREFIX)
CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


class EarlierRunError(OutputExistsError):
    """A new run (not resumed, not told to overwrite) was pointed at a folder holding another run's weights or
    checkpoints, which it would replace."""


def earlier_run_files(run_dir: str) -> list[str]:
    """What an earlier run left in ``run_dir`` that a new run would replace: its checkpoints (complete, staged or
    half-deleted), its weights and its ``training_config.json``; names relative to ``run_dir``, sorted."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in sorted(os.listdir(run_dir)):
        prefixes = (STAGING_PREFIX, TRASH_PREFIX, REPLACED_PREFIX)
        stripped = next((name[len(p) :] for p in prefixes if name.startswith(p)), name)
        weights = name == LORA_WEIGHTS_NAME or (
            name in (UNET_SUBFOLDER, TRANSFORMER_SUBFOLDER) and os.path.isdir(os.path.join(run_dir, name))
        )
        if CHECKPOINT_RE.match(stripped) or name == TRAINING_CONFIG_NAME or weights:
            found.append(name)
    return found


def checkpoint_entries(run_dir: str) -> list[str]:
    """The names in ``run_dir`` of its checkpoints (``checkpoint-N``) and of what saves and resumes left beside them
    (a checkpoint's name under one of :data:`LEFTOVER_PREFIXES`), sorted; ``[]`` where there is no such folder. What
    :func:`~.checkpoints.recover_interrupted_saves` reads: where there is none, there is nothing to recover."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in sorted(os.listdir(run_dir)):
        prefix = next((p for p in LEFTOVER_PREFIXES if name.startswith(p)), "")
        if CHECKPOINT_RE.match(name[len(prefix) :]):
            found.append(name)
    return found


def is_checkpoint_folder(path: str) -> bool:
    """Whether ``path`` is a training checkpoint (``checkpoint-N``, or an earlier version's staging folder)."""
    name = os.path.basename(os.path.normpath(path)).removeprefix(STAGING_PREFIX)
    return name.startswith(f"{CHECKPOINT_PREFIX}-")


def earlier_run_refusal(output_dir: str, earlier: list[str]) -> EarlierRunError:
    """The refusal of a new run into ``output_dir``, which holds ``earlier`` (another run's files): the ways out
    named as the user gives them (flags on the command line, ``train()``'s keywords from Python)."""
    resume = advice("--resume_from_checkpoint true", "train(resume_from_checkpoint=True)")
    ways = [
        f"continue that run with {resume}",
        f"pass {overwrite_advice('train')} to replace it",
        f"write this one into a new {advice('--output_dir', 'output_dir')}",
    ]
    return EarlierRunError(replacing_refusal(output_dir, "a new run", ways, "another run's files", earlier))


def check_new_run_folder(output_dir: str, resumed: bool = False, overwrite: bool = False) -> list[str]:
    """Whether a run may start in ``output_dir``: refused (:func:`earlier_run_refusal`) where the folder holds another
    run's files (:func:`earlier_run_files`) and the run neither resumes nor overwrites; ``resumed`` and ``overwrite``
    together are refused as contradictory. Returns the earlier run's files that ``overwrite`` replaces. Reads only:
    the commands ask it before anything loads, the trainer again under the folder's lock."""
    if resumed and overwrite:
        resume = advice("--resume_from_checkpoint", "train(resume_from_checkpoint=...)")
        replace = overwrite_advice("train")
        raise ValueError(f"{resume} continues the run in {output_dir} and {replace} replaces it: give one of them.")
    earlier = [] if resumed else earlier_run_files(output_dir)
    if earlier and not overwrite:
        raise earlier_run_refusal(output_dir, earlier)
    return earlier
