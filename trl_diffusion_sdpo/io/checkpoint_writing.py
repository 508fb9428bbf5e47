"""Marking a checkpoint complete, keeping a complete one through the save after it, and naming a failed save; loaded
by a run's first checkpoint save (or a failed save).

The trainer's ``_save_checkpoint`` runs transformers' own, which writes ``checkpoint-N`` in place, pushes it and
rotates the older ones (``save_total_limit``, as transformers means it), with the parts that are ours around it.
Before it, :func:`clear_checkpoint` removes a ``checkpoint-N`` a killed earlier save of the same step left (renamed
out of sight first), and sets a complete one of the same step aside until the new one is complete; and
:func:`keep_newest_complete` hard-links the newest complete checkpoint aside, so that transformers' rotation, which
runs inside its save before the new checkpoint can be marked, never leaves the run without a complete checkpoint.
When every process has written its files, the main process marks the folder complete with :func:`mark_complete`:
it lists every file with its size and SHA-256 checksum, flushes them to disk, writes ``checkpoint_manifest.json``
under a temporary name, flushes it and renames it into place (one ``rename``, atomic on a POSIX filesystem). That
manifest, written last, is what resume trusts (:mod:`.checkpoints`); what was set aside is deleted then. Files
callbacks write in ``on_save``, which transformers calls after the save returns, are added to the manifest by
:func:`amend_manifest` (the trainer's own ``on_save``, run after every other callback's).
A save failing with an ``OSError`` (a full disk) removes its partial folder and raises
:class:`~.checkpoints.CheckpointSaveError` naming the folder and the bytes needed (:func:`save_failure`); what was set
aside is put back. :class:`CheckpointSave` runs these around one save of the trainer's run, for its
``_save_checkpoint`` (through :meth:`~.run_files.RunFiles.checkpoint_save`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from typing import Any

from .. import io as run_io  # the run identity's writer (.resume_check) resolved on first use
from ..config.file_modes import follow_umask
from ..config.messages import advice
from .checkpoints import (
    MANIFEST_DRAFT_NAME,
    MANIFEST_NAME,
    CheckpointSaveError,
    checkpoint_problem,
    complete_checkpoints,
    file_sha256,
    folder_files,
)
from .run_folder import REPLACED_PREFIX, STAGING_PREFIX, TRASH_PREFIX

__all__ = [
    "CheckpointSave",
    "amend_manifest",
    "clear_checkpoint",
    "drop_replaced",
    "folder_bytes",
    "free_bytes",
    "is_save_failure",
    "keep_newest_complete",
    "mark_complete",
    "publish_checkpoint",
    "restore_replaced",
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
    """Once the save under way is marked complete: the copy of ``folder`` set aside for it (:func:`clear_checkpoint`,
    :func:`keep_newest_complete`) deleted."""
    shutil.rmtree(_beside(folder, REPLACED_PREFIX), ignore_errors=True)


def restore_replaced(folder: str) -> None:
    """After a failed save: the complete checkpoint set aside as ``folder``'s copy put back where ``folder`` is gone
    (the failed save removed what it wrote, or transformers' rotation deleted it), else deleted."""
    aside = _beside(folder, REPLACED_PREFIX)
    if os.path.isdir(aside) and not os.path.lexists(folder):
        os.rename(aside, folder)
    drop_replaced(folder)


def keep_newest_complete(run_dir: str, before_step: int) -> str | None:
    """The newest complete checkpoint of ``run_dir`` below ``before_step`` (structural checks: it was checked when it
    was written or resumed from), hard-linked aside as ``.replaced-checkpoint-M`` (no byte copied) until the save of
    ``before_step`` is marked complete: transformers' rotation, which may delete it before that mark, then leaves
    the run a complete checkpoint that a kill's recovery puts back (:func:`.checkpoints.recover_interrupted_saves`).
    Returns the checkpoint kept, ``None`` where there is none or the filesystem has no hard links (a warning says
    so: a kill between the rotation and the mark may then leave no complete checkpoint)."""
    newest = next(iter(complete_checkpoints(run_dir, before_step=before_step, verify_checksums=False)), None)
    if newest is None:
        return None
    aside = _beside(newest, REPLACED_PREFIX)
    shutil.rmtree(aside, ignore_errors=True)
    try:
        shutil.copytree(newest, aside, copy_function=os.link)
    except OSError as err:
        shutil.rmtree(aside, ignore_errors=True)
        logger.warning(
            "Could not hard-link %s aside during the save (%s): a kill between transformers' rotation and the new "
            "checkpoint's mark may leave no complete checkpoint",
            newest,
            err,
        )
        return None
    _fsync(run_dir, directory=True)
    return newest


def mark_complete(folder: str) -> None:
    """Mark the checkpoint ``folder`` complete: every file given the mode the umask gives (whichever library wrote
    it: safetensors writes owner-only) and flushed to disk, then ``checkpoint_manifest.json`` (the sizes and SHA-256
    of every file, and their modification times, which :func:`amend_manifest` compares) written to a draft, flushed
    and renamed into place. The files were just written, so hashing reads them from the page cache."""
    _write_manifest(folder, {})


def amend_manifest(folder: str) -> bool:
    """Add to the manifest of the complete checkpoint ``folder`` what was written into it since its mark (files that
    callbacks write in ``on_save``, which transformers calls after its save returns): new files, and files whose size
    or modification time changed, flushed and hashed; files gone dropped. The manifest is replaced as it was written
    (a draft renamed into place), so the checkpoint stays complete throughout. Returns whether anything changed."""
    with open(os.path.join(folder, MANIFEST_NAME), encoding="utf-8") as f:
        manifest = json.load(f)
    recorded = {
        relative: (size, manifest.get("mtime_ns", {}).get(relative), manifest.get("sha256", {}).get(relative))
        for relative, size in manifest["files"].items()
    }
    return _write_manifest(folder, recorded)


def _write_manifest(folder: str, recorded: dict[str, tuple[int, int | None, str | None]]) -> bool:
    """The manifest of ``folder`` written (see :func:`mark_complete`), reusing the checksum of every file whose
    ``(size, mtime_ns, sha256)`` in ``recorded`` still holds; with ``recorded`` given, written only where the files
    differ from it."""
    draft = os.path.join(folder, MANIFEST_DRAFT_NAME)
    if os.path.exists(draft):
        os.remove(draft)
    follow_umask(folder)
    files = folder_files(folder)
    files.pop(MANIFEST_NAME, None)
    checksums, mtimes, changed = {}, {}, set(recorded) - set(files)
    for relative, size in files.items():
        path = os.path.join(folder, relative)
        mtimes[relative] = os.stat(path).st_mtime_ns
        kept = recorded.get(relative)
        if kept is not None and kept[0] == size and kept[1] == mtimes[relative] and kept[2] is not None:
            checksums[relative] = kept[2]
            continue
        changed.add(relative)
        _fsync(path)
        checksums[relative] = file_sha256(path)
    if recorded and not changed:
        return False
    with open(draft, "w", encoding="utf-8") as f:
        record = {"format": 2, "files": files, "sha256": checksums, "mtime_ns": mtimes}
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(draft, os.path.join(folder, MANIFEST_NAME))
    _fsync(folder, directory=True)
    return True


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


class CheckpointSave:
    """One checkpoint save of a trainer's run, around transformers' ``_save_checkpoint``: the trainer's own
    ``_save_checkpoint`` calls :meth:`begin`, transformers' save, then :meth:`finish`, or :meth:`failed` where any of
    them raised. Every process calls each.

    Args:
        files: the trainer's ``trainer.files`` (:class:`~.run_files.RunFiles`), whose trainer and checkpoint parts it
            reads.
        folder: ``<output_dir>/checkpoint-<step>``, where transformers writes this step's checkpoint.
    """

    def __init__(self, files: Any, folder: str) -> None:
        self.files, self.trainer, self.folder = files, files.trainer, folder
        self._kept: str | None = None  # the complete checkpoint hard-linked aside during a save (keep_newest_complete)

    def begin(self) -> None:
        """Before transformers' save writes ``folder``: a ``checkpoint-N`` left there by a killed save of the same step
        removed (a complete one set aside), the newest complete checkpoint hard-linked aside where transformers'
        rotation may delete it before ``folder`` is marked complete (``save_total_limit``), and ``run_identity.json``
        written into ``folder`` first (a folder holding it and no manifest is a save never finished:
        :mod:`.checkpoints`). Every process calls it."""
        trainer, folder = self.trainer, self.folder
        if trainer.args.should_save:
            clear_checkpoint(folder)
            if trainer.args.save_total_limit is not None and trainer.args.save_total_limit > 0:
                self._kept = keep_newest_complete(trainer.args.output_dir, trainer.state.global_step)
            os.makedirs(folder)
            run_io.write_run_identity(trainer, folder)
        trainer.accelerator.wait_for_everyone()  # no process writes into a folder being cleared
        trainer.engine.prepare_checkpoint(trainer.optimizer)

    def finish(self) -> None:
        """After transformers' save: the checkpoint parts written into ``folder``; once every process has written its
        files (RNG states, engine shards, parts), the engine's files no resume reads removed and the checkpoint marked
        complete by its manifest, written last (:func:`mark_complete`); what was set aside for
        the save deleted. Every process calls it."""
        trainer, folder = self.trainer, self.folder
        args = trainer.args
        for part in self.files.checkpoint_parts():
            part.save(folder)
        trainer.accelerator.wait_for_everyone()
        if args.should_save:
            for unused in trainer.engine.unused_checkpoint_files(folder):  # FSDP's model copy: never resumed from
                shutil.rmtree(unused) if os.path.isdir(unused) else os.remove(unused)
            mark_complete(folder)
            drop_replaced(folder)  # a complete one of this step, set aside until now
            if self._kept is not None:  # the newest complete one before it, kept through transformers' rotation
                drop_replaced(self._kept)
                self._kept = None
        trainer.accelerator.wait_for_everyone()

    def failed(self, err: Exception) -> CheckpointSaveError | None:
        """A save of ``folder`` raised ``err``: the partial folder removed, and what was set aside for the save put
        back where it is gone (the complete checkpoint of this step it was replacing; the newest complete one, where
        transformers' rotation deleted it before the failure); a :class:`.checkpoints.CheckpointSaveError` naming the
        folder and the bytes needed to raise where the filesystem failed (a full disk), else ``None`` (``err`` is
        raised as it is). Under several processes the others are left at a barrier; the job fails on this error."""
        folder, run_dir = self.folder, self.trainer.args.output_dir
        written, free = folder_bytes(folder), free_bytes(run_dir)
        if self.trainer.args.should_save:
            shutil.rmtree(folder, ignore_errors=True)
            restore_replaced(folder)  # a complete checkpoint of this step the save was replacing
            if self._kept is not None:  # put back where transformers' rotation had deleted it
                restore_replaced(self._kept)
                self._kept = None
        if not is_save_failure(err, free):
            return None
        return save_failure(err, folder, run_dir, written, free)
