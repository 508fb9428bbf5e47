"""Checkpoints that appear whole or not at all, and resuming only from complete, undamaged ones.

transformers writes a checkpoint's files straight into ``checkpoint-N`` (weights, optimizer, scheduler, RNG state,
``trainer_state.json`` last), so a process killed during a save leaves a partial folder that
``resume_from_checkpoint=True`` then picks. Here a checkpoint is written to a hidden staging folder
``.tmp-checkpoint-N`` beside it; when every process has written its files, the main process lists them with their
sizes and SHA-256 checksums in ``checkpoint_manifest.json``, flushes them to disk and renames the folder to
``checkpoint-N`` (one ``rename``: atomic on a POSIX filesystem). Rotation (``save_total_limit``) runs only after that
rename, renames a folder out of the way before deleting it, and never deletes the checkpoint just written. Folders
left by a kill (``.tmp-*``, ``.trash-*``) are finished or removed when training starts again
(:func:`recover_interrupted_saves`). A save failing with an ``OSError`` (a full disk) removes its staging folder and
raises :class:`CheckpointSaveError` naming the folder and the bytes needed; the previous checkpoints are untouched.
The trainer's saves and resumes go through :class:`~trl_diffusion_sdpo.io.run_files.RunFiles`, which uses these.

On resume a checkpoint is checked before use: every file of the manifest is present with its size, JSON files
parse, safetensors headers parse and agree with the file size, torch files open as zip archives, and every file's
SHA-256 matches the manifest (a flipped bit inside tensor data). A checkpoint written before checksums were recorded
gets the structural checks only; one written before manifests existed is accepted if its ``trainer_state.json`` and
weights are present and pass them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import struct
import zipfile

import numpy as np
import torch
from transformers.trainer import SCALER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints
from transformers.training_args import ParallelMode

from .saving import LORA_WEIGHTS_NAME, TRAINING_CONFIG_NAME, TRANSFORMER_SUBFOLDER, UNET_SUBFOLDER, has_saved_weights

__all__ = [
    "SCALER_NAME",
    "SCHEDULER_NAME",
    "CheckpointError",
    "CheckpointSaveError",
    "EarlierRunError",
    "checkpoint_problem",
    "publish_checkpoint",
    "resolve_resume_checkpoint",
    "save_random_states",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoint_manifest.json"
TRAINER_STATE_NAME = "trainer_state.json"
_STAGING_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_RESUME_PREFIX = ".resume-"  # what an engine writes to resume on another number of processes
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint named for resuming is incomplete or damaged."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (a full disk, a quota, a lost mount); the partial checkpoint was removed."""


class EarlierRunError(FileExistsError):
    """A new run (not resumed, not told to overwrite) was pointed at a folder holding another run's weights or
    checkpoints, which it would replace."""


def _step(path: str) -> int:
    return int(_CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path))).group(1))


def _checkpoint_folders(run_dir: str) -> list[str]:
    """``checkpoint-N`` folders in ``run_dir``, newest step first.

    transformers' ``sort_checkpoints`` lists and orders them; not its ``get_last_checkpoint``, which names only the
    newest, where resuming wants the newest complete one (the manifest's check), nor its ``rotate_checkpoints``, which
    deletes in place where :func:`rotate_checkpoints` renames out of sight first. Its pattern also takes
    ``checkpoint-5-old``; the strict one here keeps only the trainer's names."""
    folders = sort_checkpoints(run_dir) if os.path.isdir(run_dir) else []
    return [f for f in reversed(folders) if _CHECKPOINT_RE.match(os.path.basename(f))]


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: str) -> dict[str, int]:
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


def checkpoint_problem(path: str, verify_checksums: bool = True) -> str:
    """Why the checkpoint folder ``path`` cannot be resumed from (naming the file), or ``""`` if it is complete.

    ``verify_checksums=False`` skips reading every byte (the structural checks only)."""
    if not os.path.isdir(path):
        return f"{path} is not a folder"
    manifest_path = os.path.join(path, MANIFEST_NAME)
    checksums: dict[str, str] = {}
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            expected: dict[str, int] = manifest["files"]
            checksums = manifest.get("sha256", {}) if verify_checksums else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"{MANIFEST_NAME} cannot be read ({type(err).__name__}: {err})"
    else:  # written before manifests existed, or by plain transformers: the essentials must be there
        if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            return f"{TRAINER_STATE_NAME} is missing (the save was interrupted)"
        if not has_saved_weights(path):
            return "the weights (pytorch_lora_weights.safetensors or unet/) are missing"
        expected = _files(path)
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
    folders = _checkpoint_folders(run_dir)
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
        for folder in _checkpoint_folders(output_dir):
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


# ----------------------------------------------------------------------------------------------- writing


def is_checkpoint_folder(path: str) -> bool:
    """Whether ``path`` is a training checkpoint (``checkpoint-N``, or its staging folder while being written)."""
    name = os.path.basename(os.path.normpath(path)).removeprefix(_STAGING_PREFIX)
    return name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")


def staging_folder(final: str) -> str:
    head, name = os.path.split(os.path.normpath(final))
    return os.path.join(head, _STAGING_PREFIX + name)


def resume_view_folder(checkpoint: str) -> str:
    """Where an engine may write what resuming from ``checkpoint`` on another number of processes needs (beside it;
    removed when training ends, or by :func:`recover_interrupted_saves` after a kill)."""
    head, name = os.path.split(os.path.normpath(checkpoint))
    return os.path.join(head, _RESUME_PREFIX + name)


def _trash_folder(final: str) -> str:
    head, name = os.path.split(os.path.normpath(final))
    return os.path.join(head, _TRASH_PREFIX + name)


def _remove(folder: str) -> None:
    """Rename out of sight first, then delete: a kill midway never leaves a partial ``checkpoint-N``."""
    trash = _trash_folder(folder)
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_random_states(folder: str, args) -> None:
    """This process's random states (Python, NumPy, torch's CPU and CUDA generators) in the file transformers'
    ``train()`` restores them from when it resumes: ``rng_state.pth`` on one process, ``rng_state_<rank>.pth`` on
    several (the CUDA states of every device where the run is distributed, the current device's otherwise)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        distributed = args.parallel_mode == ParallelMode.DISTRIBUTED
        states["cuda"] = torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
    os.makedirs(folder, exist_ok=True)  # a process may get here before the main one made the folder
    name = "rng_state.pth" if args.world_size <= 1 else f"rng_state_{args.process_index}.pth"
    torch.save(states, os.path.join(folder, name))


def publish_checkpoint(staging: str, final: str) -> None:
    """Write the manifest of ``staging`` (sizes and SHA-256 of every file), flush everything to disk, and rename it
    to ``final`` (replacing it). The files were just written, so hashing reads them from the page cache."""
    files = _files(staging)
    checksums = {}
    for relative in files:
        _fsync(os.path.join(staging, relative))
        checksums[relative] = file_sha256(os.path.join(staging, relative))
    with open(os.path.join(staging, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump({"format": 2, "files": files, "sha256": checksums}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync(staging, directory=True)
    if os.path.exists(final):  # a second save at the same step (e.g. on_nonfinite_loss="raise")
        _remove(final)
    os.rename(staging, final)
    _fsync(os.path.dirname(os.path.abspath(final)), directory=True)


def rotate_checkpoints(run_dir: str, save_total_limit: int | None, keep: list[str]) -> None:
    """Delete the oldest ``checkpoint-N`` folders beyond ``save_total_limit``; never one in ``keep`` (the one just
    written, the best), nor the newest complete one."""
    if not save_total_limit or save_total_limit <= 0:
        return
    folders = _checkpoint_folders(run_dir)
    if len(folders) <= save_total_limit:
        return
    protected = {os.path.normpath(k) for k in keep if k}
    # Structural checks only: the newest is the checkpoint just written, whose bytes were hashed a moment ago.
    newest_complete = next((f for f in folders if not checkpoint_problem(f, verify_checksums=False)), None)
    if newest_complete is not None:
        protected.add(os.path.normpath(newest_complete))
    remaining = len(folders)
    for folder in reversed(folders):  # oldest first
        if remaining <= max(save_total_limit, len(protected)):
            break
        if os.path.normpath(folder) not in protected:
            logger.info("Deleting older checkpoint %s (save_total_limit=%d)", folder, save_total_limit)
            _remove(folder)
            remaining -= 1


def earlier_run_files(run_dir: str) -> list[str]:
    """What an earlier run left in ``run_dir`` that a new run would replace: its checkpoints (complete, staged or
    half-deleted), its weights and its ``training_config.json``; names relative to ``run_dir``, sorted."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in sorted(os.listdir(run_dir)):
        stripped = next((name[len(p) :] for p in (_STAGING_PREFIX, _TRASH_PREFIX) if name.startswith(p)), name)
        weights = name == LORA_WEIGHTS_NAME or (
            name in (UNET_SUBFOLDER, TRANSFORMER_SUBFOLDER) and os.path.isdir(os.path.join(run_dir, name))
        )
        if _CHECKPOINT_RE.match(stripped) or name == TRAINING_CONFIG_NAME or weights:
            found.append(name)
    return found


def recover_interrupted_saves(run_dir: str) -> None:
    """Finish or remove what a kill left in ``run_dir``.

    A staging folder with a manifest whose ``checkpoint-N`` is absent was killed after it was complete (between the
    removal of an older ``checkpoint-N`` of the same step and its rename): it is published. Any other staging folder,
    every renamed-away folder (``.trash-*``: rotation or replacement had begun deleting it) and every resume folder
    (``.resume-*``: :func:`resume_view_folder`) is deleted.
    """
    if not os.path.isdir(run_dir):
        return
    for name in sorted(os.listdir(run_dir)):
        prefix = next((p for p in (_STAGING_PREFIX, _TRASH_PREFIX, _RESUME_PREFIX) if name.startswith(p)), None)
        if prefix is None or not _CHECKPOINT_RE.match(name[len(prefix) :]):
            continue
        leftover, final = os.path.join(run_dir, name), os.path.join(run_dir, name[len(prefix) :])
        complete = os.path.isfile(os.path.join(leftover, MANIFEST_NAME)) and not checkpoint_problem(leftover)
        if prefix == _STAGING_PREFIX and complete and not os.path.exists(final):
            logger.warning("Publishing %s as %s: its save was interrupted after it was complete", leftover, final)
            os.rename(leftover, final)
        else:
            logger.warning("Removing %s, left by an interrupted save", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def folder_bytes(folder: str) -> int:
    return sum(_files(folder).values()) if os.path.isdir(folder) else 0


def free_bytes(folder: str) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_save_failure(err: BaseException, free: int | None) -> bool:
    """Whether ``err`` raised while writing files is the filesystem's doing. An ``OSError`` is; other errors count when
    less than 1 MiB is left, as a full disk reaches torch (``RuntimeError: ... iostream error``) and safetensors
    (``SafetensorError``) as their own error types."""
    return isinstance(err, OSError) or (free is not None and free < _LOW_SPACE)


_LOW_SPACE = 1 << 20


def save_failure(err: BaseException, folder: str, run_dir: str, written: int, free: int | None) -> CheckpointSaveError:
    """A :class:`CheckpointSaveError` for ``err`` naming ``folder``, the bytes a save needs and the bytes free.

    The need is the size of the newest complete checkpoint in ``run_dir`` (a checkpoint's size does not change from
    one save to the next), else at least the ``written`` bytes that fit before the failure."""
    previous = next(iter(complete_checkpoints(run_dir, verify_checksums=False)), None) if run_dir else None
    need = (
        f"about {folder_bytes(previous)} bytes (the size of {previous})"
        if previous
        else f"more than the {written} bytes written before the failure"
    )
    number = getattr(err, "errno", None)
    if not isinstance(err, OSError):  # diagnosed by the free space left (see is_save_failure)
        number = errno.ENOSPC
    full = number in (errno.ENOSPC, errno.EDQUOT)
    cause = "the disk is full" if full else "an I/O error"
    where = f"{free} bytes were free there" if free is not None else "the free space could not be read"
    kept = f"The previous complete checkpoint {previous} is intact. " if previous else ""
    return CheckpointSaveError(
        number,
        f"Saving {folder} failed ({cause}; {type(err).__name__}: {err}). A save needs {need}; {where}. The partial "
        f"save was removed. {kept}Free space (or lower save_total_limit) and resume with "
        "resume_from_checkpoint=True.",
    )
