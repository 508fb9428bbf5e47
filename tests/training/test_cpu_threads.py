"""CPU threads: the command line's default for a CPU run, its evidence, and the start summary's line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trl_diffusion_sdpo.cli.online import OnlinePromptArguments
from trl_diffusion_sdpo.cli.train import DiffusionScriptArguments, parse_args
from trl_diffusion_sdpo.io.cpu_threads import CPU_THREADS, CPU_THREADS_EVIDENCE, THREADS_HELP, apply_threads
from trl_diffusion_sdpo.io.run_summary import start_summary

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("arguments", [DiffusionScriptArguments, OnlinePromptArguments])
def test_a_cpu_run_of_the_command_line_computes_with_the_default_threads(torch_threads, arguments):
    arguments().apply_to_process(SimpleNamespace(use_cpu=True))
    assert torch.get_num_threads() == CPU_THREADS


def test_threads_option_sets_the_count_and_zero_keeps_torchs(torch_threads):
    _, training_args, _, diffusion_args = parse_args(["--output_dir", "x", "--use_cpu", "true", "--threads", "2"])
    diffusion_args.apply_to_process(training_args)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(3)
    apply_threads(0, on_cpu=True)
    assert torch.get_num_threads() == 3


def test_a_gpu_run_leaves_torchs_threads_alone(torch_threads):
    apply_threads(None, on_cpu=False)
    assert torch.get_num_threads() == 3


def test_negative_threads_are_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--threads -1"):
        apply_threads(-1, on_cpu=True)


def test_the_default_is_the_fastest_setting_beside_other_work_in_its_evidence():
    """The measured file the default cites: with other work on the machine, the default trained fastest, for the
    command and for the README's Python example; and the help states the default and the file."""
    result = json.loads((ROOT / CPU_THREADS_EVIDENCE).read_text())
    for kind in ("train", "python"):
        loaded = result["summary"]["loaded"][kind]
        fastest = min(loaded, key=lambda name: loaded[name]["median_train_runtime_s"])
        assert fastest == str(CPU_THREADS), (kind, loaded)
    assert f"default {CPU_THREADS}" in THREADS_HELP and CPU_THREADS_EVIDENCE in THREADS_HELP


def _summary(device: str) -> str:
    effective = SimpleNamespace(
        get_warmup_steps=lambda steps: 0,
        lr_scheduler_type="constant",
        learning_rate=1e-4,
        beta=5000.0,
        loss_type="sigmoid",
        safeguard_space="none",
        device=torch.device(device),
        bf16=False,
        fp16=False,
    )
    given = SimpleNamespace(
        scale_lr=False,
        learning_rate=1e-4,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        world_size=1,
        bf16=False,
        fp16=False,
        loss_type="sigmoid",
        safeguard_space="none",
    )
    return start_summary(given, effective, "stable-diffusion", True, "PlainEngine()", 2)


def test_the_start_summary_states_the_threads_of_a_cpu_run_and_how_to_set_them(torch_threads):
    text = _summary("cpu")
    assert "CPU threads 3" in text and f"--threads {CPU_THREADS}" in text
    assert f"torch.set_num_threads({CPU_THREADS})" in text
    torch.set_num_threads(CPU_THREADS)
    assert f"CPU threads {CPU_THREADS} (torch.get_num_threads())" in _summary("cpu")
    assert "CPU threads" not in _summary("cuda")


def test_the_quickstarts_thread_timings_are_the_evidence_files():
    summary = json.loads((ROOT / CPU_THREADS_EVIDENCE).read_text())["summary"]

    def seconds(condition: str, setting: str) -> str:
        value = summary[condition]["train"][setting]["median_train_runtime_s"]
        return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"

    quickstart = " ".join((ROOT / "docs" / "quickstart.md").read_text().split())  # the README links there
    assert (
        f"trained in {seconds('idle', '1')} with one thread and {seconds('idle', 'default')} with torch's default "
        f"when nothing else ran, and in {seconds('loaded', '1')} against {seconds('loaded', 'default')} beside two "
        "busy processes"
    ) in quickstart
    assert "docs/quickstart.md#cpu-threads" in (ROOT / "README.md").read_text()
    assert "torch.set_num_threads(1)" in (ROOT / "README.md").read_text() and CPU_THREADS == 1
