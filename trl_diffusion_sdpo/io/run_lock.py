"""One run per output folder: a lock that a second run is refused by, and that a crashed run does not leave held.

``train()`` takes ``filelock.FileLock`` (an exclusive ``flock``) on ``output_dir/.trl-diffusion-sdpo.lock.flock`` and
writes the holder's pid, host and start time into ``output_dir/.trl-diffusion-sdpo.lock``; the record is deleted when
training ends. The kernel releases a ``flock`` when its process dies (even by ``SIGKILL``), so a crash never leaves
the folder locked: the record it leaves behind is only a record, and the next run takes the lock and rewrites it. The
lock file itself stays (filelock never deletes a ``flock``'d file: a run that opened it just before would lock a
deleted file). A second run (on this machine, or on another one where the filesystem supports ``flock`` across
machines: local disks, Lustre, GPFS, NFSv4) is refused with :class:`RunLockedError` naming the holder.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from types import TracebackType

from filelock import FileLock, Timeout

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

LOCK_NAME = ".trl-diffusion-sdpo.lock"
"""The holder's record; the ``flock`` is on ``LOCK_NAME + ".flock"`` beside it."""


class RunLockedError(RuntimeError):
    """Another live process holds the output folder's lock."""


class RunLock:
    """Exclusive lock on ``output_dir`` for the duration of a ``with`` block (or :meth:`acquire` / :meth:`release`).

    Raises:
        RunLockedError: another live process holds it; the message names its pid, host and start time.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        # timeout=0: refuse at once rather than wait for the other run to end
        self._lock = FileLock(self.path + ".flock", timeout=0)

    def acquire(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise RunLockedError(
                f"{self.output_dir} is in use by another training run ({_read_holder(self.path)}); two runs writing "
                "into one folder would overwrite each other's checkpoints. Wait for it to end, stop it, or choose "
                "another output_dir."
            ) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            # Written aside and renamed: a refused run reads either the old record or this one, never half of it.
            partial = f"{self.path}.{os.getpid()}.tmp"
            with open(partial, "w") as f:
                f.write(json.dumps(record))
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, self.path)
        except BaseException:
            self._lock.release()
            raise

    def release(self) -> None:
        if self._lock.is_locked:
            try:
                os.unlink(self.path)  # while still locked: the next holder writes its own
            except FileNotFoundError:
                pass
            self._lock.release()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_holder(path: str) -> str:
    try:
        with open(path) as f:
            record = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        record = {}
    if not record:
        return "a process whose record is not yet written"
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"
