"""The command line's thread choice on a machine without CUDA: a run there computes on the CPU whether or not
``--use_cpu`` says so, and takes the command line's CPU default; with CUDA available and no ``--use_cpu`` it leaves
torch's threads alone. Through the parse and the call ``train`` and ``online`` make, CUDA's presence mocked."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.common import THREADS_BEFORE
from trl_diffusion_sdpo.cli import online, train
from trl_diffusion_sdpo.io.cpu_threads import CPU_THREADS

BEFORE = THREADS_BEFORE  # torch's count before the command sets it (the torch_threads fixture)


def _parsed(command: str):
    """(the options that set the process, the training arguments) as the command parses them, without --use_cpu."""
    if command == "train":
        _, training_args, _, diffusion_args = train.parse_args(["--output_dir", "x"])
        return diffusion_args, training_args
    prompt_args, training_args, _ = online.parse_args(["--output_dir", "x", "--prompts", "partiprompts"])
    return prompt_args, training_args


@pytest.mark.parametrize("command", ["train", "online"])
@pytest.mark.parametrize("cuda", [False, True], ids=["no-cuda", "cuda"])
def test_the_thread_default_follows_the_device_the_run_will_use(command, cuda, torch_threads, monkeypatch):
    options, training_args = _parsed(command)
    assert not training_args.use_cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    options.apply_to_process(training_args)
    assert torch.get_num_threads() == (BEFORE if cuda else CPU_THREADS)
