"""Checkpoints the resume can trust: complete ones only, marked so by a manifest written last, and undamaged.

transformers' own ``_save_checkpoint`` writes a checkpoint's files straight into ``checkpoint-N`` (weights,
optimizer, scheduler, RNG state, ``trainer_state.json`` last), so a process killed during a save leaves a partial
folder that transformers' ``get_last_checkpoint`` would pick. The trainer writes ``run_identity.json`` first, lets
transformers' save write in place (and rotate, as it does), adds the parts that are ours (the EMA, the rewind's
snapshot, the online generations), then, once every process is done, writes ``checkpoint_manifest.json`` last: the
sizes and SHA-256 checksums of every file, written to a temporary name, flushed and renamed
(:mod:`.checkpoint_writing`, loaded by a run's first checkpoint save). That manifest marks the checkpoint complete;
the resume trusts nothing else.

On resume a checkpoint is checked before use: every file of the manifest is present with its size, JSON files
parse, safetensors headers parse and agree with the file size, torch files open as zip archives, and every file's
SHA-256 matches the manifest (a flipped bit inside tensor data). A folder holding ``run_identity.json`` (written
first by every save of this package) and no manifest is a save that never finished: never resumed from, and removed
when training starts again (:func:`recover_interrupted_saves`, which also finishes a manifest killed between its
write and its rename, and removes what a kill left of earlier versions' staging folders, ``.tmp-checkpoint-N``). A
checkpoint without either file, as plain transformers or versions of this package before manifests wrote them, is
accepted if its ``trainer_state.json`` and weights are present and pass the structural checks; a checkpoint written
before checksums were recorded gets the structural checks only. A new run refuses a folder holding another run's
checkpoints or weights (:func:`earlier_run_files`). A resumed run's weights are read back here too
(:func:`load_weights`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import struct
import zipfile
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers.trainer_utils import sort_checkpoints

from . import saving
from .run_folder import CHECKPOINT_RE as _CHECKPOINT_RE
from .run_folder import (
    LEFTOVER_PREFIXES,
    REPLACED_PREFIX,
    RESUME_PREFIX,
    RUN_IDENTITY_NAME,
    STAGING_PREFIX,
    EarlierRunError,
    checkpoint_entries,
    earlier_run_files,
)
from .saving import LORA_WEIGHTS_NAME, TRANSFORMER_SUBFOLDER, UNET_SUBFOLDER, has_saved_weights

if TYPE_CHECKING:
    from transformers import Trainer

__all__ = [
    "CallbackPart",
    "CheckpointError",
    "CheckpointSaveError",
    "EarlierRunError",
    "checkpoint_problem",
    "earlier_run_files",
    "is_marked_complete",
    "load_lora_adapters",
    "load_weights",
    "prepare_resume",
    "recover_interrupted_saves",
    "remove_earlier_checkpoints",
    "resolve_resume_checkpoint",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoint_manifest.json"
# The manifest while it is written: renamed to MANIFEST_NAME once flushed to disk.
MANIFEST_DRAFT_NAME = STAGING_PREFIX + MANIFEST_NAME
TRAINER_STATE_NAME = "trainer_state.json"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint named for resuming is incomplete or damaged."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (a full disk, a quota, a lost mount); the partial checkpoint was removed."""


UNFINISHED = (
    f"{MANIFEST_NAME} is missing: the save was interrupted before the checkpoint was marked complete (its "
    f"{RUN_IDENTITY_NAME} shows this package began it)"
)


def _step(path: str) -> int:
    return int(_CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path))).group(1))


def checkpoint_folders(run_dir: str) -> list[str]:
    """``checkpoint-N`` folders in ``run_dir``, newest step first.

    transformers' ``sort_checkpoints`` lists and orders them; not its ``get_last_checkpoint``, which names only the
    newest, where resuming wants the newest complete one (the manifest's check). Its pattern also takes
    ``checkpoint-5-old``; the strict one here keeps only the trainer's names."""
    folders = sort_checkpoints(run_dir) if os.path.isdir(run_dir) else []
    return [f for f in reversed(folders) if _CHECKPOINT_RE.match(os.path.basename(f))]


def folder_files(folder: str) -> dict[str, int]:
    """Every file under ``folder`` (relative path -> size in bytes)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = os.path.getsize(path)
    return found


def file_sha256(path: str) -> str:
    """SHA-256 of the file at ``path`` (hex), read in 1 MiB blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------------- checking


def _file_problem(path: str) -> str:
    """Why the file at ``path`` is structurally damaged, or ``""``. Reads headers only, never tensor data."""
    size = os.path.getsize(path)
    name = os.path.basename(path)
    try:
        if name.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                json.load(f)
        elif name.endswith(".safetensors"):
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return f"has {size} bytes, too short for a safetensors header"
                (header_len,) = struct.unpack("<Q", head)
                if 8 + header_len > size:
                    return f"is damaged or truncated: its header length reads {header_len} bytes, the file has {size}"
                header = json.loads(f.read(header_len))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            expected = 8 + header_len + max(ends, default=0)
            if expected != size:
                return f"is truncated or padded: its header describes {expected} bytes, the file has {size}"
        elif name.endswith(_TORCH_SUFFIXES) and size > 0:
            with zipfile.ZipFile(path) as archive:  # the central directory sits at the end: truncation shows
                archive.namelist()
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        AttributeError,
        zipfile.BadZipFile,
        struct.error,
    ) as err:
        return f"cannot be read ({type(err).__name__}: {err})"
    return ""


def is_marked_complete(folder: str) -> bool:
    """Whether the checkpoint ``folder`` holds its completion mark, the manifest written last (not checked here:
    :func:`checkpoint_problem` checks the files against it)."""
    return os.path.isfile(os.path.join(folder, MANIFEST_NAME))


def checkpoint_problem(path: str, verify_checksums: bool = True, manifest_name: str = MANIFEST_NAME) -> str:
    """Why the checkpoint folder ``path`` cannot be resumed from (naming the file), or ``""`` if it is complete.

    ``verify_checksums=False`` skips reading every byte (the structural checks only); ``manifest_name``: the
    manifest to check the files against (the draft, :data:`MANIFEST_DRAFT_NAME`, before it is finished)."""
    if not os.path.isdir(path):
        return f"{path} is not a folder"
    manifest_path = os.path.join(path, manifest_name)
    checksums: dict[str, str] = {}
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            expected: dict[str, int] = manifest["files"]
            checksums = manifest.get("sha256", {}) if verify_checksums else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"{MANIFEST_NAME} cannot be read ({type(err).__name__}: {err})"
    elif os.path.isfile(os.path.join(path, RUN_IDENTITY_NAME)):  # this package's save, never marked complete
        return UNFINISHED
    else:  # written before manifests existed, or by plain transformers: the essentials must be there
        if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            return f"{TRAINER_STATE_NAME} is missing (the save was interrupted)"
        if not has_saved_weights(path):
            return "the weights (pytorch_lora_weights.safetensors or unet/) are missing"
        expected = folder_files(path)
    for relative, size in sorted(expected.items()):
        file = os.path.join(path, relative)
        if not os.path.isfile(file):
            return f"{relative} is missing"
        actual = os.path.getsize(file)
        if actual != size:
            return f"{relative} has {actual} bytes, {size} were written"
        problem = _file_problem(file)
        if problem:
            return f"{relative} {problem}"
        if relative in checksums and file_sha256(file) != checksums[relative]:
            return (
                f"{relative} is damaged: its SHA-256 differs from the one recorded when it was written (bytes changed "
                "on disk after the save)"
            )
    return ""


def complete_checkpoints(run_dir: str, before_step: int | None = None, verify_checksums: bool = True) -> list[str]:
    """Complete ``checkpoint-N`` folders of ``run_dir`` (steps below ``before_step`` if given), newest first."""
    folders = checkpoint_folders(run_dir)
    if before_step is not None:
        folders = [f for f in folders if _step(f) < before_step]
    return [f for f in folders if not checkpoint_problem(f, verify_checksums)]


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint to resume from, checked.

    ``True``: the newest complete checkpoint in ``output_dir`` (logged; damaged newer ones are named in a warning).
    A path: that checkpoint, or :class:`CheckpointError` naming the damaged file and the previous complete
    checkpoint. ``None`` / ``False``: ``None``.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        skipped = []
        for folder in checkpoint_folders(output_dir):
            problem = checkpoint_problem(folder)
            if not problem:
                if skipped:
                    logger.warning("Skipped incomplete checkpoint(s): %s", "; ".join(skipped))
                logger.info("Resuming from %s, the newest complete checkpoint in %s", folder, output_dir)
                return folder
            skipped.append(f"{folder}: {problem}")
        found = f" (incomplete: {'; '.join(skipped)})" if skipped else ""
        raise ValueError(f"No complete checkpoint found in output directory ({output_dir}){found}")
    path = str(resume_from_checkpoint)
    problem = checkpoint_problem(path)
    if not problem:
        return path
    previous: list[str] = []
    if _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path))):
        previous = complete_checkpoints(os.path.dirname(os.path.normpath(path)), before_step=_step(path))
    hint = (
        f"The previous complete checkpoint is {previous[0]}: resume from it "
        f"(resume_from_checkpoint={previous[0]!r}, or True for the newest complete one)."
        if previous
        else "There is no earlier complete checkpoint beside it."
    )
    raise CheckpointError(f"Cannot resume from checkpoint {path}: {problem}. {hint}")


# ----------------------------------------------------------------------------------------------- folders


def resume_view_folder(checkpoint: str) -> str:
    """Where an engine may write what resuming from ``checkpoint`` on another number of processes needs (beside it;
    removed when training ends, or by :func:`recover_interrupted_saves` after a kill)."""
    head, name = os.path.split(os.path.normpath(checkpoint))
    return os.path.join(head, RESUME_PREFIX + name)


def recover_interrupted_saves(run_dir: str) -> None:
    """Finish or remove what a kill left in ``run_dir``.

    * ``checkpoint-N`` whose manifest draft (:data:`MANIFEST_DRAFT_NAME`) checks out against its files and whose
      manifest is absent was killed between the draft's write and its rename: the draft is renamed (finished).
    * ``checkpoint-N`` begun by this package (``run_identity.json``) and never marked complete (no manifest): removed,
      with a warning naming it. A checkpoint without either file (plain transformers) is left as it is.
    * Earlier versions' staging folders (``.tmp-checkpoint-N/checkpoint-N``, or ``.tmp-checkpoint-N`` itself) with a
      manifest whose ``checkpoint-N`` is absent were killed after they were complete: published by their rename. Any
      other staging folder, every renamed-away folder (``.trash-*``: rotation or replacement had begun deleting it)
      and every resume folder (``.resume-*``: :func:`resume_view_folder`) is deleted.
    * A complete checkpoint set aside while a save ran (``.replaced-*``: renamed by
      :func:`.checkpoint_writing.clear_checkpoint` for a save of its step, hard-linked by
      :func:`.checkpoint_writing.keep_newest_complete` through a later save's rotation) is put back where
      ``checkpoint-N`` is gone or not complete, and deleted where it is complete.
    """
    names = checkpoint_entries(run_dir)  # the checkpoints and their leftovers, by name
    for name in names:  # the checkpoints first: what a leftover becomes depends on whether its checkpoint is complete
        if _CHECKPOINT_RE.match(name):
            _recover_in_place(os.path.join(run_dir, name))
    for name in names:
        prefix = next((p for p in LEFTOVER_PREFIXES if name.startswith(p)), None)
        if prefix is None:  # a checkpoint, recovered above
            continue
        leftover, final = os.path.join(run_dir, name), os.path.join(run_dir, name[len(prefix) :])
        if prefix == REPLACED_PREFIX:
            _recover_replaced(leftover, final)
            continue
        staged = leftover
        if prefix == STAGING_PREFIX and os.path.isdir(os.path.join(leftover, os.path.basename(final))):
            staged = os.path.join(leftover, os.path.basename(final))  # the checkpoint inside its staging run folder
        complete = os.path.isfile(os.path.join(staged, MANIFEST_NAME)) and not checkpoint_problem(staged)
        if prefix == STAGING_PREFIX and complete and not os.path.exists(final):
            logger.warning("Publishing %s as %s: its save was interrupted after it was complete", staged, final)
            os.rename(staged, final)
            shutil.rmtree(leftover, ignore_errors=True)  # the emptied staging run folder (none if staged is it)
        else:
            logger.warning("Removing %s, left by an interrupted save", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _recover_replaced(aside: str, final: str) -> None:
    """A complete checkpoint set aside (``aside``) while a save ran, the save killed (a save of its step writing
    ``final`` again, or a later save whose transformers rotation may have deleted ``final``): deleted where ``final``
    is marked complete and checks out to its checksums (a complete checkpoint is worth
    reading once more before the only copy of its step is deleted), else put back in place of what the save left."""
    if is_marked_complete(final) and not checkpoint_problem(final):
        logger.warning("Removing %s: the save that replaced it was complete", aside)
        shutil.rmtree(aside, ignore_errors=True)
        return
    logger.warning("Restoring %s as %s: the save that was to replace or rotate it away was interrupted", aside, final)
    if os.path.lexists(final):
        shutil.rmtree(final, ignore_errors=True)
    os.rename(aside, final)


def _recover_in_place(folder: str) -> None:
    """A ``checkpoint-N`` a kill interrupted while it was written in place: its manifest finished, or it removed."""
    if is_marked_complete(folder):
        return
    draft = os.path.join(folder, MANIFEST_DRAFT_NAME)
    if os.path.isfile(draft) and not checkpoint_problem(folder, manifest_name=MANIFEST_DRAFT_NAME):
        logger.warning("Marking %s complete: its save was interrupted after its manifest was written", folder)
        os.rename(draft, os.path.join(folder, MANIFEST_NAME))
        return
    if checkpoint_problem(folder, verify_checksums=False) == UNFINISHED:
        logger.warning("Removing %s: its save was interrupted before the checkpoint was marked complete", folder)
        shutil.rmtree(folder, ignore_errors=True)


def remove_earlier_checkpoints(output_dir: str, earlier: list[str]) -> None:
    """Before a run that overwrites starts: remove the earlier run's checkpoints (complete, staged or half-deleted),
    which its resume and checkpoint rotation would otherwise take for its own; its weights, ``training_config.json``
    and model card are replaced when this run saves."""
    weights = (UNET_SUBFOLDER, TRANSFORMER_SUBFOLDER)
    removed = [name for name in earlier if name not in weights and os.path.isdir(os.path.join(output_dir, name))]
    for name in removed:
        shutil.rmtree(os.path.join(output_dir, name))
    logger.warning(
        "Starting a new run in %s over another run's files (overwrite): removed its checkpoints (%s); its weights "
        "and training_config.json are replaced when this run saves",
        output_dir,
        ", ".join(removed) or "none",
    )


def load_weights(trainer: Any, checkpoint: str, model: torch.nn.Module | None = None) -> None:
    """The LoRA adapters or the denoiser of ``checkpoint`` loaded into ``trainer``'s denoiser (``model``'s where
    given), into the engine's shards where it shards them: the trainer's ``_load_from_checkpoint``
    (:meth:`~.run_files.RunFiles.load_weights`)."""
    if not has_saved_weights(checkpoint):
        raise ValueError(f"No trl-diffusion-sdpo weights found in checkpoint {checkpoint}")
    denoiser = trainer.accelerator.unwrap_model(
        model if model is not None else trainer.model, keep_torch_compile=False
    )
    with trainer.engine.loading():
        if trainer.is_lora:
            load_lora_adapters(denoiser, checkpoint, prefix=trainer.family.denoiser_name)
        else:
            saving.load_full_denoiser(denoiser, checkpoint, subfolder=trainer.family.denoiser_name)


def load_lora_adapters(
    denoiser: torch.nn.Module, directory: str, adapter_name: str = "default", prefix: str = UNET_SUBFOLDER
) -> None:
    """Load adapters saved by :func:`~.saving.save_lora_adapters` into a denoiser that already carries the same adapter
    config."""
    state = load_file(os.path.join(directory, LORA_WEIGHTS_NAME))
    denoiser_state = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
    if not denoiser_state:
        raise ValueError(f"{directory} holds no LoRA weights for the {prefix} (no '{prefix}.' keys)")
    if prefix == UNET_SUBFOLDER:
        denoiser_state = convert_unet_state_dict_to_peft(denoiser_state)
    result = set_peft_model_state_dict(denoiser, denoiser_state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA weights in {directory} do not match the model's adapters: {unexpected[:5]}")


def prepare_resume(files: Any, checkpoint: str) -> tuple[str | None, int]:
    """What a run resuming from the complete ``checkpoint`` does before transformers' ``train()``
    (:meth:`~.run_files.RunFiles.training`; ``files``: the trainer's :class:`~.run_files.RunFiles`): the config
    checked against the checkpoint's (:func:`~.resume_check.check_resume_config`), a changed learning rate's factor
    kept for when training begins, the checkpoint's parts read. Returns, where the checkpoint was written by another
    number of processes, the folder the engine resumes from (:mod:`.resume_world`; removed once every process has read
    it) and that number; ``(None, this run's number)`` otherwise."""
    trainer = files.trainer
    resume_check = importlib.import_module(".resume_check", __package__)  # the resume checks: a resume loads them
    resume_check.check_resume_config(checkpoint, trainer)
    files.learning_rate_factor = resume_check.learning_rate_factor(checkpoint, trainer)
    for part in files.checkpoint_parts():
        part.load(checkpoint)
    saved = resume_check.read_run_identity(checkpoint) or {}
    processes = trainer.accelerator.num_processes
    if saved.get("num_processes", processes) == processes:
        return None, processes
    return resume_view_folder(checkpoint), saved["num_processes"]


class CallbackPart:
    """A :class:`~.run_files.CheckpointPartCallback` as a :class:`~.run_files.CheckpointPart`, with the trainer's
    ``args`` and ``state`` (:meth:`~.run_files.RunFiles.checkpoint_parts`)."""

    def __init__(self, callback: Any, trainer: Trainer) -> None:
        self.callback, self.trainer = callback, trainer

    def save(self, checkpoint: str) -> None:
        self.callback.save_checkpoint_part(checkpoint, self.trainer.args, self.trainer.state)

    def load(self, checkpoint: str) -> None:
        self.callback.load_checkpoint_part(checkpoint, self.trainer.args, self.trainer.state)
