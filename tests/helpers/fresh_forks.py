"""Commands that need a process of their own (``python -c CODE``, ``python -m MODULE`` or ``python SCRIPT``), each
run in a child forked from one fresh interpreter per test process once that interpreter has imported the libraries
every such command imports first: torch, transformers, diffusers, datasets, accelerate and huggingface_hub, about two
thirds of a fresh interpreter's 12 s of imports on a 2-core machine, paid once instead of once per command.

A child is the process a fresh interpreter running the command would be, but for those imports having been made. The
interpreter checks that they printed nothing, loaded nothing of the package and not DeepSpeed (whose import prints a
notice a test reads): what a command prints, loads or refuses is still its own. A library that prints at import (peft,
through torchao) is imported by the commands that use it, as in a fresh process. The interpreter's environment is
``worker_environment()``'s with ``HF_HUB_OFFLINE=1`` and no GPU visible (``CUDA_VISIBLE_DEVICES=""``); a command's
environment may differ from it only in variables read after the imports (:data:`READ_AT_IMPORT` are refused). POSIX
only.

    job = start(["-c", CODE, *args], stdout=fd, ...)   # a running command: pid, poll(), wait(), kill()
    job = start_piped([SCRIPT, *args])                 # the same, its stdin, stdout and stderr on pipes
    done = run(["-m", MODULE, *args])                  # a subprocess.CompletedProcess, its output as text
"""

from __future__ import annotations

import atexit
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: what the interpreter imports before it forks a command
SHARED_IMPORTS = ("torch", "transformers", "diffusers", "datasets", "accelerate", "huggingface_hub")
#: variables the shared imports read when they are made (or the interpreter when it starts): a command's must be the
#: interpreter's
READ_AT_IMPORT = (
    "PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
    "HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_VERBOSITY",
    "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "CUDA_VISIBLE_DEVICES",
)  # fmt: skip
_MESSAGE = 1 << 16


# ------------------------------------------------------------------------------------------------ the interpreter


def _serve(control: socket.socket) -> None:
    """Import :data:`SHARED_IMPORTS` (their output kept), report, then fork a child per request."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as printed:
        os.dup2(printed.fileno(), 1)
        os.dup2(printed.fileno(), 2)
        for name in SHARED_IMPORTS:
            __import__(name)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        printed.seek(0)
        output = printed.read().decode(errors="replace")
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {"trl_diffusion_sdpo", "deepspeed", "peft", "torchao"})
    control.send(json.dumps({"printed": output, "loaded": loaded}).encode())
    while True:
        message, fds, _, _ = socket.recv_fds(control, _MESSAGE, 16)
        if not message:
            return
        request = json.loads(message)
        if "start" in request:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                control.close()
                _child(request["start"], fds)  # never returns
            for fd in fds:
                os.close(fd)
            control.send(json.dumps({"pid": pid}).encode())
        else:
            deadline = time.monotonic() + request["timeout"]
            while True:
                done, status = os.waitpid(request["pid"], os.WNOHANG)
                if done or time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
            control.send(json.dumps({"status": os.waitstatus_to_exitcode(status) if done else None}).encode())


def _child(job: dict, fds: list[int]) -> None:
    """Become ``python *job["args"]``: detached by ``os.setsid`` where asked, its standard streams, folder,
    environment, argv and path; run it and end as the interpreter would (its exit functions run, the exit status of
    its ``SystemExit``, 1 after a traceback)."""
    status = 1
    try:
        if job["new_session"]:
            os.setsid()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        # the caller's other descriptors under the caller's numbers (as subprocess's pass_fds keeps them)
        for number, fd in zip(job["pass_fds"], fds[3:], strict=True):
            if number != fd:
                try:
                    os.fstat(number)
                except OSError:
                    os.dup2(fd, number)
                else:
                    raise RuntimeError(f"descriptor {number} is taken in the child")
        for fd in set(fds) - set(job["pass_fds"]):
            if fd > 2:
                os.close(fd)
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        sys.stdin = sys.__stdin__ = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)  # noqa: SIM115 (line-buffered on a terminal)
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(
            open(2, "wb", buffering=0, closefd=False), line_buffering=True, errors="backslashreplace"
        )  # noqa: SIM115
        args = job["args"]
        try:
            if args[0] == "-c":
                sys.argv, sys.path[0] = ["-c", *args[2:]], ""
                main = types.ModuleType("__main__")
                sys.modules["__main__"] = main
                exec(compile(args[1], "<string>", "exec"), main.__dict__)
            elif args[0] == "-m":
                import runpy

                sys.argv, sys.path[0] = [args[1], *args[2:]], job["cwd"]
                runpy.run_module(args[1], run_name="__main__", alter_sys=True)
            else:
                import runpy

                script = os.path.abspath(args[0])
                sys.argv, sys.path[0] = [args[0], *args[1:]], os.path.dirname(script)
                runpy.run_path(script, run_name="__main__")
            status = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                status = (stop.code or 0) & 0xFF
            else:
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)


# ---------------------------------------------------------------------------------------------------- the caller


class _Interpreter:
    def __init__(self) -> None:
        from tests.helpers.common import worker_environment

        self.env = {**worker_environment(), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.fresh_forks", str(theirs.fileno())], cwd=ROOT, env=self.env,
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, pass_fds=(theirs.fileno(),),
        )  # fmt: skip
        theirs.close()
        self.control, self.lock = ours, threading.Lock()
        self.control.settimeout(600)
        try:
            report = json.loads(self.control.recv(_MESSAGE) or b"null")
        except OSError:
            report = None
        if report is None:
            self.log.seek(0)
            raise AssertionError(f"the interpreter to fork from did not start:\n{self.log.read()[-4000:]!r}")
        # What makes a child the process a fresh interpreter would be: the shared imports said and loaded nothing of
        # what a command's own output or modules are checked for.
        assert report == {"printed": "", "loaded": []}, report
        self.control.settimeout(None)

    def ask(self, request: dict, fds: Sequence[int] = ()) -> dict:
        with self.lock:
            socket.send_fds(self.control, [json.dumps(request).encode()], list(fds))
            return json.loads(self.control.recv(_MESSAGE))

    def close(self) -> None:
        self.control.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_INTERPRETER: _Interpreter | None = None


def _interpreter() -> _Interpreter:
    global _INTERPRETER
    if _INTERPRETER is None or _INTERPRETER.process.poll() is not None:
        _INTERPRETER = _Interpreter()
        atexit.register(_INTERPRETER.close)
    return _INTERPRETER


def environment(**changes: str | None) -> dict[str, str]:
    """The interpreter's environment with ``changes`` (``None``: the variable removed)."""
    env = dict(_interpreter().env)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


class Job:
    """A started command: its ``pid`` (signals go to it directly) and, once it ended, ``returncode`` (``-N``: ended by
    signal ``N``), as ``subprocess.Popen`` has them."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None
        self.stdin = self.stdout = self.stderr = None  # the pipes' ends of :func:`start_piped`

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """What is left on the stdout and stderr pipes once the command ended (``stdin`` closed first), as
        ``Popen.communicate`` gives it; past ``timeout`` seconds ``subprocess.TimeoutExpired``."""
        if self.stdin is not None and not self.stdin.closed:
            self.stdin.close()
        texts = ["", ""]

        def drain(index: int, pipe) -> None:
            texts[index] = pipe.read()

        readers = [threading.Thread(target=drain, args=pair, daemon=True) for pair in enumerate(self.pipes())]
        for reader in readers:
            reader.start()
        self.wait(timeout)
        for reader in readers:
            reader.join(60)
        return texts[0], texts[1]

    def pipes(self) -> list:
        return [pipe for pipe in (self.stdout, self.stderr) if pipe is not None]

    def _ask(self, timeout: float) -> int | None:
        if self.returncode is None:
            self.returncode = _interpreter().ask({"pid": self.pid, "timeout": timeout})["status"]
        return self.returncode

    def poll(self) -> int | None:
        return self._ask(0)

    def wait(self, timeout: float | None = None) -> int:
        if self._ask(1e9 if timeout is None else timeout) is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | Path = ROOT,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    start_new_session: bool = False,
    pass_fds: Sequence[int] = (),
) -> Job:
    """``python *args`` in a forked child, in ``cwd`` with ``env`` (default: the interpreter's), its standard streams
    on the file descriptors given (``None``: ``/dev/null``) and ``pass_fds`` open under their numbers here; the caller
    keeps its own copies."""
    env = environment() if env is None else dict(env)
    server = _interpreter()
    differing = [name for name in READ_AT_IMPORT if env.get(name) != server.env.get(name)]
    if differing:
        raise ValueError(f"read when the shared imports were made, so the interpreter's own: {differing}")
    null = os.open(os.devnull, os.O_RDWR)
    try:
        fds = [null if fd is None else fd for fd in (stdin, stdout, stderr)] + list(pass_fds)
        job = {
            "args": list(args),
            "env": env,
            "cwd": str(cwd),
            "new_session": start_new_session,
            "pass_fds": list(pass_fds),
        }
        return Job(server.ask({"start": job}, fds)["pid"])
    finally:
        os.close(null)


def start_piped(args: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | Path = ROOT) -> Job:
    """:func:`start` ``args`` with its stdin, stdout and stderr on pipes, their ends here as the job's ``stdin``,
    ``stdout`` and ``stderr`` text files (as ``subprocess.Popen(..., stdin=PIPE, stdout=PIPE, stderr=PIPE,
    text=True)`` has them)."""
    pairs = [os.pipe() for _ in range(3)]
    theirs = [pairs[0][0], pairs[1][1], pairs[2][1]]
    try:
        job = start(args, env=env, cwd=cwd, stdin=theirs[0], stdout=theirs[1], stderr=theirs[2])
    finally:
        for fd in theirs:
            os.close(fd)
    job.stdin = open(pairs[0][1], "w")  # noqa: SIM115
    job.stdout, job.stderr = open(pairs[1][0]), open(pairs[2][0])  # noqa: SIM115
    return job


def run(
    args: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | Path = ROOT, timeout: float = 600
) -> subprocess.CompletedProcess:
    """:func:`start` ``args`` and wait for it (killed and ``subprocess.TimeoutExpired`` past ``timeout`` seconds): its
    exit status and output, as ``subprocess.run(..., capture_output=True, text=True)`` gives them."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        job = start(args, env=env, cwd=cwd, stdout=out.fileno(), stderr=err.fileno())
        try:
            job.wait(timeout)
        finally:
            if job.returncode is None:
                job.kill()
                job.wait()
        texts = []
        for file in (out, err):
            file.seek(0)
            texts.append(file.read().decode(errors="replace"))
    return subprocess.CompletedProcess([sys.executable, *args], job.returncode, texts[0], texts[1])


if __name__ == "__main__":
    _serve(socket.socket(fileno=int(sys.argv[1])))
