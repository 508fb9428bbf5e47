"""One run per output folder: a lock that a second run is refused by, and that a crashed run does not leave held.

``train()`` takes ``filelock.FileLock`` on ``output_dir/.trl-diffusion-sdpo.lock`` (an OS lock: ``flock`` on Linux
and macOS, ``msvcrt.locking`` on Windows) without waiting, and writes the holder's pid, host and start time into a
record file beside it, ``.trl-diffusion-sdpo.lock.json``; both files are deleted when training ends. The operating
system releases the lock when its process dies (even by ``SIGKILL``), so a crash never leaves the folder locked: the
files it leaves behind are only a record, and the next run takes the lock and rewrites the record. A second run (on
this machine, or on another one where the filesystem supports ``flock`` across machines: local disks, Lustre, GPFS,
NFSv4) is refused with :class:`RunLockedError` naming the holder.

filelock's soft (marker-file) fallback is turned off: a marker left by a crashed run would lock the folder for good.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from types import TracebackType

from filelock import FileLock, Timeout

__all__ = ["LOCK_NAME", "RECORD_NAME", "RunLock", "RunLockedError"]

LOCK_NAME = ".trl-diffusion-sdpo.lock"
RECORD_NAME = LOCK_NAME + ".json"  # who holds the lock: pid, host, start time


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
        self.record_path = os.path.join(output_dir, RECORD_NAME)
        # Not a singleton, not per thread: a second RunLock on the folder, even in this process, is refused.
        self._lock = FileLock(self.path, timeout=0, thread_local=False, fallback_to_soft=False)

    def acquire(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise RunLockedError(
                f"{self.output_dir} is in use by another training run ({_read_holder(self.record_path)}); two runs "
                "writing into one folder would overwrite each other's checkpoints. Wait for it to end, stop it, or "
                "choose another output_dir."
            ) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        partial = f"{self.record_path}.{os.getpid()}.tmp"
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(partial, self.record_path)  # a refused run reads a whole record or none

    def release(self) -> None:
        if not self._lock.is_locked:
            return
        try:
            os.unlink(self.record_path)
        except FileNotFoundError:
            pass
        if sys.platform != "win32":
            # Deleted while still locked: a run that opened the old file before gets a lock on an unlinked file,
            # which filelock detects and retries on the new path. (On Windows filelock deletes it after unlocking.)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._lock.release(force=True)

    @property
    def is_locked(self) -> bool:
        return self._lock.is_locked

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_holder(record_path: str) -> str:
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict) or not record:
        return "a process whose record is not yet written"
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"
