"""Writing a checkpoint whole or not at all, loaded by a run's first checkpoint save (or a failed save).

A checkpoint is written by transformers' own save into a hidden staging run folder beside its final name,
``.tmp-checkpoint-N/checkpoint-N`` (:func:`staging_folder`); when every process has written its files, the main
process lists them with their sizes and SHA-256 checksums in ``checkpoint_manifest.json``, flushes them to disk and
renames the folder to ``checkpoint-N`` (:func:`publish_checkpoint`: one ``rename``, atomic on a POSIX filesystem),
then removes the empty staging run folder. Rotation (``save_total_limit``, :func:`rotate_checkpoints`) runs only
after that rename, renames a folder out of the way before deleting it, and never deletes the checkpoint just written.
A save failing with an ``OSError`` (a full disk) removes its staging folder and raises
:class:`~.checkpoints.CheckpointSaveError` naming the folder and the bytes needed (:func:`save_failure`); the
previous checkpoints are untouched. What a kill leaves, and the checks made on resume, are in :mod:`.checkpoints`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil

from ..config.file_modes import follow_umask
from ..config.messages import advice
from .checkpoints import (
    MANIFEST_NAME,
    STAGING_PREFIX,
    TRASH_PREFIX,
    CheckpointSaveError,
    checkpoint_folders,
    checkpoint_problem,
    complete_checkpoints,
    file_sha256,
    folder_files,
)

__all__ = [
    "folder_bytes",
    "free_bytes",
    "is_save_failure",
    "publish_checkpoint",
    "rotate_checkpoints",
    "save_failure",
    "staging_folder",
]

logger = logging.getLogger(__name__)


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_folder(final: str) -> str:
    """Where the checkpoint ``<run>/checkpoint-N`` is written before it is published:
    ``<run>/.tmp-checkpoint-N/checkpoint-N``, so that transformers' own save, pointed at the staging run folder
    ``.tmp-checkpoint-N``, writes it under its own name."""
    head, name = os.path.split(os.path.normpath(final))
    return os.path.join(head, STAGING_PREFIX + name, name)


def _trash_folder(final: str) -> str:
    head, name = os.path.split(os.path.normpath(final))
    return os.path.join(head, TRASH_PREFIX + name)


def _remove(folder: str) -> None:
    """Rename out of sight first, then delete: a kill midway never leaves a partial ``checkpoint-N``."""
    trash = _trash_folder(folder)
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def publish_checkpoint(staging: str, final: str) -> None:
    """Write the manifest of ``staging`` (sizes and SHA-256 of every file), flush everything to disk, and rename it
    to ``final`` (replacing it), every file with the mode the umask gives (whichever library wrote it: safetensors
    writes owner-only). The files were just written, so hashing reads them from the page cache."""
    follow_umask(staging)
    files = folder_files(staging)
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
    parent = os.path.dirname(os.path.normpath(staging))
    if os.path.basename(parent).startswith(STAGING_PREFIX):  # the staging run folder, empty now
        shutil.rmtree(parent, ignore_errors=True)


def rotate_checkpoints(run_dir: str, save_total_limit: int | None, keep: list[str]) -> None:
    """Delete the oldest ``checkpoint-N`` folders beyond ``save_total_limit``; never one in ``keep`` (the one just
    written, the best), nor the newest complete one."""
    if not save_total_limit or save_total_limit <= 0:
        return
    folders = checkpoint_folders(run_dir)
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


def folder_bytes(folder: str) -> int:
    return sum(folder_files(folder).values()) if os.path.isdir(folder) else 0


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
        f"save was removed. {kept}Free space (or lower {advice('--save_total_limit', 'save_total_limit')}) and "
        f"resume with {advice('--resume_from_checkpoint true', 'resume_from_checkpoint=True')}.",
    )
