"""The package is a guest in its host process: importing any of its modules, building a trainer and training change
no setting of another library (progress bars, verbosity, loggers, diffusers' pipeline class) and no field of the
caller's config. The trainer decides for its own progress bar only: on a terminal transformers' bar with its rate and
time left, written to a file a line per log and no carriage-return redraws."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import fresh_forks
from tests.helpers.common import worker_environment

ROOT = Path(__file__).resolve().parents[2]
# The trainer's bar (transformers' ProgressCallback: no description, unlike the loading bars) once the run is over,
# redrawn in place: "\r100%|██████████| 3/3 [00:04<00:00,  1.52s/it]" (elapsed<left, rate)
FINISHED_BAR = r"\r100%\|[^|\r\n]*\| {steps}/{steps} \[\d\d:\d\d<00:00, +\d+(\.\d+)?(it/s|s/it)\]"


def open_terminal() -> tuple[int, int]:
    """A pseudo-terminal of 120 columns: its leader and follower file descriptors."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    return leader, follower


def read_terminal(leader: int, process: subprocess.Popen | fresh_forks.Job, timeout: float) -> str:
    """What ``process`` (or any process holding the follower) writes to the terminal of ``leader`` until the last
    follower closes or ``process`` ends; ``leader`` is closed then."""
    output, deadline = bytearray(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if not ready:
            if process.poll() is not None:
                break
            continue
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    return output.decode(errors="replace")


def run_in_terminal(args: list[str], cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """``args`` with stdin, stdout and stderr on a pseudo-terminal of 120 columns; its exit status and output."""
    leader, follower = open_terminal()
    process = subprocess.Popen(
        args, stdin=follower, stdout=follower, stderr=follower, cwd=cwd, env=worker_environment(), close_fds=True
    )
    os.close(follower)
    output = read_terminal(leader, process, timeout)
    return process.wait(timeout=60), output


@pytest.fixture(scope="module")
def settings_run(tmp_path_factory) -> tuple[int, str, dict, str]:
    """One fresh process for the three tests below (forked once the libraries were imported, before anything of the
    package: tests.helpers.fresh_forks): the libraries imported, their settings read, every module of the package
    imported, a tiny trainer trained 3 steps in a process forked from it with its stdin, stdout and stderr on a
    terminal of 120 columns (that process ended), a tiny trainer built and trained 3 steps here, the settings read
    again; its own output written to a file. Its exit status, its output, the report and what the forked run wrote to
    the terminal."""
    folder = tmp_path_factory.mktemp("settings")
    out = folder / "settings.json"
    leader, follower = open_terminal()
    command = ["-m", "tests.helpers.host_settings", "settings", str(out), "3", str(follower)]
    with open(folder / "settings.log", "w") as log:
        process = fresh_forks.start(command, stdout=log.fileno(), stderr=log.fileno(), pass_fds=(follower,))
    os.close(follower)
    terminal = read_terminal(leader, process, timeout=600)
    status = process.wait(timeout=600)
    text = (folder / "settings.log").read_text()
    report = json.loads(out.read_text()) if out.exists() else {}
    return status, text, report, terminal


def test_importing_every_module_and_training_change_no_setting_of_another_library(settings_run):
    """In a fresh interpreter: the libraries' switches, verbosities and loggers (levels, filters, handlers) before,
    then every module of the package imported, a tiny trainer built and trained, and the same after."""
    status, text, report, _ = settings_run
    assert status == 0, text[-4000:]
    assert report["changed"] == [], report["changed"]
    # only modules of optional extras that are not installed are left out of the walk
    assert all("(trl_diffusion_sdpo" not in skipped for skipped in report["skipped"]), report["skipped"]
    before, after = report["caller"]
    assert before == after == {"disable_tqdm": False, "dataloader_num_workers": 0, "learning_rate": 1e-3}


def test_the_trainers_bar_shows_its_rate_and_time_left_on_a_terminal(settings_run):
    """The run forked once the libraries and the package's modules are imported, as a fresh interpreter's is after a
    user's script imports them, its stdin, stdout and stderr on the terminal."""
    status, text, report, terminal = settings_run
    assert status == 0, text[-4000:]
    assert report["terminal_status"] == 0, terminal[-4000:]
    assert re.search(FINISHED_BAR.format(steps=3), terminal), terminal[-4000:]


def test_written_to_a_file_each_log_is_a_line_and_nothing_is_redrawn(settings_run):
    status, text, _, _ = settings_run  # the 3-step run above, its output written to a file
    assert status == 0, text[-4000:]
    assert "\r" not in text and "\x1b[A" not in text, text[-4000:]
    assert len([line for line in text.splitlines() if line.startswith("{'loss':")]) == 3, text[-4000:]
    assert len([line for line in text.splitlines() if line.startswith("{'train_runtime':")]) == 1, text[-4000:]


@pytest.mark.slow  # by default: test_the_trainers_bar_shows_its_rate_and_time_left_on_a_terminal
def test_the_train_command_shows_the_bar_on_a_terminal(tmp_path):
    """The command line quiets the libraries only off a terminal; on one, train draws transformers' bar (its output
    to a file: tests/io/test_log_files.py)."""
    data = tmp_path / "pairs.jsonl"
    rows = []
    for i, (asked, other) in enumerate([("red", "blue"), ("blue", "red")] * 2):
        Image.new("RGB", (32, 32), asked).save(tmp_path / f"{i}-chosen.png")
        Image.new("RGB", (32, 32), other).save(tmp_path / f"{i}-rejected.png")
        rows.append({"prompt": f"{asked} square", "chosen": f"{i}-chosen.png", "rejected": f"{i}-rejected.png"})
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = str(ROOT / "examples" / "configs" / "tiny_cpu.yaml")
    command = [sys.executable, "-m", "trl_diffusion_sdpo", "train", "--config", config, "--dataset_name", str(data)]
    command += ["--output_dir", str(tmp_path / "tuned"), "--max_steps", "2", "--logging_steps", "1"]
    status, text = run_in_terminal(command, tmp_path)
    assert status == 0, text[-4000:]
    assert re.search(FINISHED_BAR.format(steps=2), text), text[-4000:]


@pytest.mark.slow  # sampling and scoring before each step
def test_the_online_command_shows_the_bar_on_a_terminal(tmp_path):
    config = str(ROOT / "examples" / "configs" / "online_tiny_cpu.yaml")
    command = [sys.executable, "-m", "trl_diffusion_sdpo", "online", "--config", config]
    command += ["--output_dir", str(tmp_path / "tuned"), "--max_steps", "2", "--logging_steps", "1"]
    command += ["--per_device_train_batch_size", "2", "--num_generations", "2", "--sample_steps", "2"]
    status, text = run_in_terminal(command, tmp_path)
    assert status == 0, text[-4000:]
    assert re.search(FINISHED_BAR.format(steps=2), text), text[-4000:]
