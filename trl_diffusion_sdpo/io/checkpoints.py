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
import re
import shutil
import struct
import zipfile
from typing import TYPE_CHECKING, Any

import torch
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

from .preemption import PreemptionCallback, parse_signals, preemption_signal_handlers
from .resume_check import apply_new_learning_rates, check_resume_config, read_run_identity, write_run_identity
from .run_lock import RunLock, RunLockedError
from .saving import has_saved_weights

if TYPE_CHECKING:
    from transformers import Trainer

__all__ = [
    "MANIFEST_NAME",
    "AtomicCheckpoints",
    "CheckpointError",
    "CheckpointSaveError",
    "checkpoint_problem",
    "complete_checkpoints",
    "is_checkpoint_folder",
    "publish_checkpoint",
    "recover_interrupted_saves",
    "resolve_resume_checkpoint",
    "rotate_checkpoints",
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


def _step(path: str) -> int:
    return int(_CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path))).group(1))


def _checkpoint_folders(run_dir: str) -> list[str]:
    """``checkpoint-N`` folders in ``run_dir``, newest step first."""
    if not os.path.isdir(run_dir):
        return []
    names = [n for n in os.listdir(run_dir) if _CHECKPOINT_RE.match(n) and os.path.isdir(os.path.join(run_dir, n))]
    return sorted((os.path.join(run_dir, n) for n in names), key=_step, reverse=True)


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
                logger.warning("Resuming from %s, the newest complete checkpoint in %s", folder, output_dir)
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


def _folder_bytes(folder: str) -> int:
    return sum(_files(folder).values()) if os.path.isdir(folder) else 0


def _free_bytes(folder: str) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _is_save_failure(err: BaseException, free: int | None) -> bool:
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
        f"about {_folder_bytes(previous)} bytes (the size of {previous})"
        if previous
        else f"more than the {written} bytes written before the failure"
    )
    number = getattr(err, "errno", None)
    if not isinstance(err, OSError):  # diagnosed by the free space left (see _is_save_failure)
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


class AtomicCheckpoints:
    """``transformers.Trainer`` mixin: atomic, checksummed checkpoint saves; resuming only from complete ones.

    ``_save_checkpoint`` does what transformers' does (weights, optimizer, scheduler, scaler, RNG state, trainer
    state, Hub push, rotation) but into a staging folder published by :func:`publish_checkpoint`, with
    ``run_identity.json`` beside the weights; a save failing with an ``OSError`` leaves no partial folder and raises
    :class:`CheckpointSaveError`. ``train`` takes the output folder's lock (:mod:`.run_lock`), finishes or removes
    what an interrupted save left, resolves ``resume_from_checkpoint`` with :func:`resolve_resume_checkpoint`,
    compares the checkpoint's config with the new one (:mod:`.resume_check`) and handles preemption signals
    (:mod:`.preemption`) while training runs.
    """

    def train(self: Trainer, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        lock = self._lock_output_dir()
        view = None
        try:
            if self.args.should_save:
                recover_interrupted_saves(self.args.output_dir)
            self.accelerator.wait_for_everyone()
            resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
            if resume_from_checkpoint is not None:
                check_resume_config(resume_from_checkpoint, self)
                saved = read_run_identity(resume_from_checkpoint) or {}
                if saved.get("num_processes", self.accelerator.num_processes) != self.accelerator.num_processes:
                    # another number of processes (resume_world): the engine says what to load from
                    view = resume_view_folder(resume_from_checkpoint)
                    resume_from_checkpoint = self.engine.resume_on_other_count(
                        resume_from_checkpoint, saved["num_processes"], view
                    )
            callback = next((c for c in self.callback_handler.callbacks if isinstance(c, PreemptionCallback)), None)
            if callback is None:
                callback = PreemptionCallback(self)
                self.add_callback(callback)
            signals = parse_signals(getattr(self.args, "preemption_signals", None))
            callback.enabled = bool(signals)
            with preemption_signal_handlers(callback, signals):
                return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if view is not None:  # every process is done reading it
                self.accelerator.wait_for_everyone()
                if self.args.should_save:
                    shutil.rmtree(view, ignore_errors=True)  # links and the converted state, never the checkpoint
            if lock is not None:
                lock.release()

    def _lock_output_dir(self: Trainer) -> RunLock | None:
        """Process 0 locks ``output_dir``; every process learns whether it was refused (one scalar all-reduce), so
        none waits at a barrier for a process that stopped."""
        lock, error = None, None
        if self.args.process_index == 0:
            lock = RunLock(self.args.output_dir)
            try:
                lock.acquire()
            except RunLockedError as err:
                lock, error = None, err
        if self.accelerator.num_processes > 1:
            flag = torch.full((), float(error is not None), device=self.accelerator.device)
            if self.accelerator.reduce(flag, reduction="sum").item() > 0 and error is None:
                error = RunLockedError(f"{self.args.output_dir} is in use by another training run (see process 0)")
        if error is not None:
            raise error
        return lock

    def _load_optimizer_and_scheduler(self: Trainer, checkpoint: str | None) -> None:
        # The restored scheduler state holds the old base learning rates; a rate changed at resume must win.
        fresh = list(getattr(self.lr_scheduler, "base_lrs", []))
        with self.engine.loading_optimizer():
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and fresh and apply_new_learning_rates(self.lr_scheduler, self.optimizer, fresh):
            logger.info("Learning rate(s) %s applied from the resumed step on", fresh)

    def save_model(self: Trainer, output_dir: str | None = None, _internal_call: bool = False) -> None:
        try:
            return super().save_model(output_dir, _internal_call)
        except CheckpointSaveError:
            raise
        except Exception as err:
            folder = output_dir if output_dir is not None else self.args.output_dir
            free = _free_bytes(folder if os.path.isdir(folder) else self.args.output_dir)
            if _internal_call or not _is_save_failure(err, free):  # inside _save_checkpoint, which reports it
                raise
            raise save_failure(err, folder, self.args.output_dir, 0, free) from err

    def _save_checkpoint(self: Trainer, model, trial) -> None:
        args, state = self.args, self.state
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        staging = staging_folder(final)
        if args.should_save and os.path.exists(staging):
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()  # no process writes into a staging folder being cleared
        try:
            self._write_checkpoint(staging, final, run_dir)
        except Exception as err:
            # Only the staging folder is removed: the complete checkpoints are untouched, and rotation (below) never
            # ran. Under several processes the others are left at a barrier; the job fails on this error.
            written, free = _folder_bytes(staging), _free_bytes(run_dir)
            if args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if not _is_save_failure(err, free):
                raise
            raise save_failure(err, final, run_dir, written, free) from err
        self.accelerator.wait_for_everyone()
        if args.push_to_hub:
            self._push_from_checkpoint(final)
        if args.should_save:
            rotate_checkpoints(run_dir, args.save_total_limit, keep=[final, state.best_model_checkpoint])

    def _write_checkpoint(self: Trainer, staging: str, final: str, run_dir: str) -> None:
        """Every file of the checkpoint into ``staging``, then (main process) the manifest and the rename."""
        args, state = self.args, self.state
        self.save_model(staging, _internal_call=True)
        if args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and (
            state.best_global_step
        ):
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
            if state.best_global_step == state.global_step or os.path.exists(best):
                state.best_model_checkpoint = best  # its final name, which the trainer state records
        if not args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        if args.should_save:
            write_run_identity(self, staging)
            for callback in [
                c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)
            ]:
                name, callback_state = callback.__class__.__name__, callback.state()
                if isinstance(state.stateful_callbacks[name], list):
                    state.stateful_callbacks[name].append(callback_state)
                else:
                    state.stateful_callbacks[name] = callback_state
            state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))

        self.accelerator.wait_for_everyone()  # every process's files (RNG states, engine shards) are written
        if args.should_save:
            publish_checkpoint(staging, final)
