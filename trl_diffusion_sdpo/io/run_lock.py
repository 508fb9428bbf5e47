"""One run per output folder: a lock that a second run is refused by, and that a crashed run does not leave held.

``train()`` takes an exclusive ``fcntl.flock`` on ``output_dir/.trl-diffusion-sdpo.lock`` and writes the holder's
pid, host and start time into it; the file is deleted when training ends. The kernel releases a ``flock`` when its
process dies (even by ``SIGKILL``), so a crash never leaves the folder locked: the file it leaves behind is only a
record, and the next run takes the lock on it. A second run (on this machine, or on
another one where the filesystem supports ``flock`` across machines: local disks, Lustre, GPFS, NFSv4) is refused
with :class:`RunLockedError` naming the holder.

Not ``filelock.FileLock``, though it takes the same ``flock``: it never deletes its lock file (deleting a locked
file is the race the inode check in :meth:`RunLock.acquire` closes), so every finished run would leave the file in
its output folder; and its 3.x releases open the file with ``O_TRUNC``, so a refused run would erase the record that
names the live one.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from types import TracebackType

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

LOCK_NAME = ".trl-diffusion-sdpo.lock"


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
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.output_dir} is in use by another training run ({holder}); two runs writing into one "
                    "folder would overwrite each other's checkpoints. Wait for it to end, stop it, or choose another "
                    "output_dir."
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder deletes the file before unlocking it: a lock won on a deleted file is no lock. Retry.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.unlink(self.path)  # while still locked: see the inode check in acquire
            except FileNotFoundError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        record = {}
    if not record:
        return "a process whose record is not yet written"
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"
