"""Marking a checkpoint complete, rotating complete checkpoints, and naming a failed save; loaded by a run's first
checkpoint save (or a failed save).

The trainer's ``_save_checkpoint`` runs transformers' own, which writes ``checkpoint-N`` in place, with the parts that
are ours beside it. Before it, :func:`clear_checkpoint` removes a ``checkpoint-N`` a killed earlier save of the same
step left (renamed out of sight first), and sets a complete one of the same step aside until the new one is complete.
When every process has written its files, the main process marks the folder
complete with :func:`mark_complete`: it lists every file with its size and SHA-256 checksum, flushes them to disk,
writes ``checkpoint_manifest.json`` under a temporary name, flushes it and renames it into place (one ``rename``,
atomic on a POSIX filesystem). That manifest, written last, is what resume and rotation trust
(:mod:`.checkpoints`). Rotation (``save_total_limit``, :func:`rotate_checkpoints`) runs only after it, renames a
folder out of the way before deleting it, and never deletes the checkpoint just written nor the newest complete one.
A save failing with an ``OSError`` (a full disk) removes its partial folder and raises
:class:`~.checkpoints.CheckpointSaveError` naming the folder and the bytes needed (:func:`save_failure`); the
previous checkpoints are untouched.
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
    MANIFEST_DRAFT_NAME,
    MANIFEST_NAME,
    REPLACED_PREFIX,
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
    "clear_checkpoint",
    "drop_replaced",
    "folder_bytes",
    "free_bytes",
    "is_save_failure",
    "mark_complete",
    "publish_checkpoint",
    "restore_replaced",
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
    """Where a checkpoint written aside before :func:`publish_checkpoint` lies: for ``<run>/checkpoint-N``,
    ``<run>/.tmp-checkpoint-N/checkpoint-N`` (the layout earlier versions wrote, which
    :func:`.checkpoints.recover_interrupted_saves` still finishes or removes)."""
    head, name = os.path.split(os.path.normpath(final))
    return os.path.join(head, STAGING_PREFIX + name, name)


def _beside(folder: str, prefix: str) -> str:
    """``<run>/<prefix>checkpoint-N`` for ``folder`` ``<run>/checkpoint-N``: where it is renamed out of sight."""
    head, name = os.path.split(os.path.normpath(folder))
    return os.path.join(head, prefix + name)


def _remove(folder: str) -> None:
    """Rename out of sight first, then delete: a kill midway never leaves a partial ``checkpoint-N``."""
    trash = _beside(folder, TRASH_PREFIX)
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clear_checkpoint(folder: str) -> None:
    """Clear ``folder`` (``checkpoint-N``) before a save of step N writes it again. What a killed earlier save of
    that step left is removed. A complete checkpoint of the same step saved again (the last good step saved before
    ``on_nonfinite_loss="raise"`` stops the run, right after a save) is set aside instead, as
    ``.replaced-checkpoint-N``: with ``save_total_limit=1`` it is the run's only complete checkpoint until the new
    save is marked complete (:func:`drop_replaced`); a failed save puts it back (:func:`restore_replaced`), and so
    does the resume after a kill (:func:`.checkpoints.recover_interrupted_saves`)."""
    if not os.path.lexists(folder):
        return
    if checkpoint_problem(folder, verify_checksums=False):
        _remove(folder)
        return
    aside = _beside(folder, REPLACED_PREFIX)
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(folder, aside)
    _fsync(os.path.dirname(os.path.abspath(folder)), directory=True)


def drop_replaced(folder: str) -> None:
    """Once the save of ``folder`` is marked complete: the one it replaced (:func:`clear_checkpoint`) deleted."""
    shutil.rmtree(_beside(folder, REPLACED_PREFIX), ignore_errors=True)


def restore_replaced(folder: str) -> None:
    """After a failed save of ``folder`` removed what it wrote: the complete checkpoint it replaced, put back."""
    aside = _beside(folder, REPLACED_PREFIX)
    if os.path.isdir(aside) and not os.path.lexists(folder):
        os.rename(aside, folder)


def mark_complete(folder: str) -> None:
    """Mark the checkpoint ``folder`` complete: every file given the mode the umask gives (whichever library wrote
    it: safetensors writes owner-only) and flushed to disk, then ``checkpoint_manifest.json`` (the sizes and SHA-256
    of every file) written to a draft, flushed and renamed into place. The files were just written, so hashing reads
    them from the page cache."""
    draft = os.path.join(folder, MANIFEST_DRAFT_NAME)
    if os.path.exists(draft):
        os.remove(draft)
    follow_umask(folder)
    files = folder_files(folder)
    checksums = {}
    for relative in files:
        _fsync(os.path.join(folder, relative))
        checksums[relative] = file_sha256(os.path.join(folder, relative))
    with open(draft, "w", encoding="utf-8") as f:
        json.dump({"format": 2, "files": files, "sha256": checksums}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(draft, os.path.join(folder, MANIFEST_NAME))
    _fsync(folder, directory=True)


def publish_checkpoint(staging: str, final: str) -> None:
    """A checkpoint written aside in ``staging`` marked complete (:func:`mark_complete`) and renamed to ``final``
    (replacing it), then its emptied staging run folder removed."""
    mark_complete(staging)
    if os.path.exists(final):
        _remove(final)
    os.rename(staging, final)
    _fsync(os.path.dirname(os.path.abspath(final)), directory=True)
    parent = os.path.dirname(os.path.normpath(staging))
    if os.path.basename(parent).startswith(STAGING_PREFIX):  # the staging run folder, empty now
        shutil.rmtree(parent, ignore_errors=True)


def rotate_checkpoints(run_dir: str, save_total_limit: int | None, keep: list[str], keep_newest: bool = True) -> None:
    """Delete the oldest ``checkpoint-N`` folders beyond ``save_total_limit``; never one in ``keep`` (the one just
    written, the best), nor, with ``keep_newest``, the newest complete one (``keep_newest=False``: once training has
    ended, ``save_total_limit=1`` keeps the best checkpoint alone, as transformers does)."""
    if not save_total_limit or save_total_limit <= 0:
        return
    folders = checkpoint_folders(run_dir)
    if len(folders) <= save_total_limit:
        return
    protected = {os.path.normpath(k) for k in keep if k}
    # Structural checks only: the newest is the checkpoint just written, whose bytes were hashed a moment ago.
    newest_complete = next((f for f in folders if not checkpoint_problem(f, verify_checksums=False)), None)
    if newest_complete is not None and keep_newest:
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
