"""Reward servers for the tests: ``trl-diffusion-sdpo reward-server`` in a subprocess on a free port, and a
misbehaving FastAPI app (answers chosen per test) served by uvicorn in a thread of the test's process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import urllib3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``trl-diffusion-sdpo reward-server --scorer NAME`` as a subprocess, on a fixed port so it can be restarted."""

    def __init__(self, scorer: str, port: int | None = None) -> None:
        self.scorer, self.port = scorer, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/score"
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> ServerProcess:
        command = [sys.executable, "-m", "trl_diffusion_sdpo", "reward-server", "--scorer", self.scorer]
        command += ["--port", str(self.port), "--log-level", "warning"]
        self.process = subprocess.Popen(command, env=dict(os.environ), stdout=subprocess.DEVNULL)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, "the reward server exited"
            try:
                answer = urllib3.request("GET", f"http://127.0.0.1:{self.port}/ready", timeout=2.0, retries=False)
                if answer.status == 200:
                    return
            except urllib3.exceptions.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the reward server on port {self.port} was not ready in {timeout} s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


@contextmanager
def reward_server(
    scorer: str = "colour", wait: bool = True, kind: type[ServerProcess] | None = None
) -> Iterator[ServerProcess]:
    """The server, killed on exit; ``wait=False``: started but not waited for (call ``wait_ready`` before scoring),
    so the caller's own set-up runs while the server's process imports. ``kind``: how its process starts (a fresh
    interpreter by default, :class:`ServerProcess`)."""
    server = (kind or ServerProcess)(scorer).start(wait=wait)
    try:
        yield server
    finally:
        server.kill()


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free port in a daemon thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
