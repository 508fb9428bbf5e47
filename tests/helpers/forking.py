"""A job run in a child forked from the calling process: it starts with the caller's imports and settings instead of
a fresh interpreter's (about 12 s of imports on a 2-core machine), and a kill or crash ends the child alone. POSIX
only; on a machine with a GPU, autograd's device threads leave a forked child unable to run a backward."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable


def run_forked(job: Callable[[], object], timeout: float | None = None) -> int:
    """``job()`` in a forked child, which never returns into the caller (a traceback printed and exit status 2 if
    ``job`` raises, 0 if it returns); the child's wait status. A child still running after ``timeout`` seconds is
    killed and the call raises."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 2
        try:
            job()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    if timeout is None:
        return os.waitpid(pid, 0)[1]
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the forked job was still running after {timeout} s")
        time.sleep(0.05)
