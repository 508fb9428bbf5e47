"""How many package files one whole optimizer step crosses, traced with ``sys.setprofile``, against the ceilings
docs/design.md states ("Files to read for one step").

The window runs from one ``on_step_end`` to the next on a non-logging step of a tiny SD run with LoRA: the batch's
fetch and collation, every micro-batch's ``training_step``, clipping, the optimizer, the scheduler and the callbacks.
Every file under the package counts, ``families/`` and ``objectives/`` included. A file counts when a function
defined in it runs.

The ceilings are limits, not a snapshot: the test fails only when a traced count exceeds its ceiling. Run with
``TRL_DIFFUSION_SDPO_WRITE_STEP_FILES=1`` to rewrite the traced columns of the table (the ceilings are kept).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import TrainerCallback

import trl_diffusion_sdpo

PACKAGE = Path(trl_diffusion_sdpo.__file__).resolve().parent
DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"
BEGIN, END = "<!-- step-files: begin -->", "<!-- step-files: end -->"
WRITE = os.environ.get("TRL_DIFFUSION_SDPO_WRITE_STEP_FILES") == "1"

# the table's rows: name -> the config that runs it
STEPS = {
    "Diffusion-DPO": {"safeguard_space": "none"},
    "exact rule (one pass)": {"safeguard_space": "parameter", "safeguard_passes": "one"},
}
TRACED_STEP = 2  # the window ends at this optimizer step's on_step_end; the step before it builds lazy state


@dataclass
class Trace:
    files: list[str]  # package files in order of first entry, relative to the package
    functions: int


class StepWindowTracer(TrainerCallback):
    """Profiles the package's calls from optimizer step ``step - 1``'s ``on_step_end`` to step ``step``'s."""

    def __init__(self, step: int = TRACED_STEP) -> None:
        self.step = step
        self.files: list[str] = []
        self.functions: set[tuple[str, str]] = set()
        self.trace: Trace | None = None

    def _profile(self, frame, event, arg) -> None:
        if event != "call":
            return
        path = frame.f_code.co_filename
        if not path.startswith(str(PACKAGE)):
            return
        name = Path(path).resolve().relative_to(PACKAGE).as_posix()
        self.functions.add((name, frame.f_code.co_qualname))
        if name not in self.files:
            self.files.append(name)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            sys.setprofile(self._profile)
        elif state.global_step == self.step:
            sys.setprofile(None)
            self.trace = Trace(list(self.files), len(self.functions))


def trace_step(make_trainer, **config) -> Trace:
    # logging_steps past the run: the traced step is a non-logging one
    trainer = make_trainer(lora=True, max_steps=TRACED_STEP, logging_steps=100, **config)
    tracer = StepWindowTracer()
    trainer.add_callback(tracer)
    try:
        trainer.train()
    finally:
        sys.setprofile(None)
    assert tracer.trace is not None and "trainer.py" in tracer.trace.files, "the trace saw no step"
    return tracer.trace


def read_table() -> dict[str, dict[str, int]]:
    """The marked table of docs/design.md: step -> its traced count and ceiling."""
    text = DESIGN.read_text(encoding="utf-8")
    block = text[text.index(BEGIN) : text.index(END)]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].isdigit():
            step, files, limit, functions = cells
            rows[step] = {"files": int(files), "limit": int(limit), "functions": int(functions)}
    return rows


def write_table(traces: dict[str, Trace], limits: dict[str, int]) -> None:
    lines = [
        BEGIN,
        "| step | package files | at most | functions |",
        "|---|---:|---:|---:|",
    ]
    for step, trace in traces.items():
        lines.append(f"| {step} | {len(trace.files)} | {limits[step]} | {trace.functions} |")
    for step, trace in traces.items():
        lines.append("")
        lines.append(f"{step}: " + ", ".join(f"`{f}`" for f in sorted(trace.files)) + ".")
    lines.append(END)
    text = DESIGN.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    DESIGN.write_text(text[:start] + "\n".join(lines) + text[end:], encoding="utf-8")


def over_ceiling(traces: dict[str, Trace], table: dict[str, dict[str, int]]) -> list[str]:
    """The steps whose traced file count exceeds the ceiling the table states."""
    return [
        f"{step} crosses {len(trace.files)} package files, more than the {table[step]['limit']} docs/design.md "
        f"allows: {sorted(trace.files)}"
        for step, trace in traces.items()
        if len(trace.files) > table[step]["limit"]
    ]


def test_the_window_is_a_whole_optimizer_step(make_trainer):
    """The trace covers the collation, the step, clipping and the callbacks: a window that only saw training_step
    would miss the collator and the optimizer's wrapper."""
    trace = trace_step(make_trainer, **STEPS["Diffusion-DPO"])
    assert {"trainer.py", "step/stages.py", "families/base.py", "data/collators.py", "engines/base.py"} <= set(
        trace.files
    ), trace.files


def test_a_diffusion_dpo_step_enters_no_safeguard_module(make_trainer):
    """Plain Diffusion-DPO has no safeguard: a whole optimizer step runs the trainer's step and its stages, and no
    function of a file under ``safeguards/``."""
    trace = trace_step(make_trainer, **STEPS["Diffusion-DPO"])
    assert "step/predictions.py" in trace.files  # the objective ran in the traced step
    assert [f for f in trace.files if f.startswith("safeguards/")] == []


# A plain Diffusion-DPO run in a fresh process: the safeguard registry may load, no safeguard space's module.
_LOADED_SAFEGUARDS = """
import sys
from datasets import Dataset
from tests.helpers.common import fast_config_values, lora_config, pickapic_rows
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

folder = sys.argv[1]
pipe = build_tiny_sd_pipeline(seed=0, tokenizer_dir=folder + "/tokenizer")
args = DiffusionSDPOConfig(**{**fast_config_values(folder + "/run"), "safeguard_space": "none", "max_steps": 1})
dataset = Dataset.from_list(pickapic_rows(6))
DiffusionSDPOTrainer(pipe, args=args, train_dataset=dataset, peft_config=lora_config()).train()
print(sorted(name for name in sys.modules if name.startswith("trl_diffusion_sdpo.safeguards.")))
"""


@pytest.mark.slow  # a fresh interpreter; by default: test_a_diffusion_dpo_step_enters_no_safeguard_module
def test_a_diffusion_dpo_run_loads_no_safeguard_module(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _LOADED_SAFEGUARDS, str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_step_crosses_no_more_files_than_the_design_document_allows(make_trainer):
    stated = read_table()
    assert set(stated) == set(STEPS), f"docs/design.md's table lists {sorted(stated)}, the test traces {list(STEPS)}"
    traces = {step: trace_step(make_trainer, **config) for step, config in STEPS.items()}
    exact = {"safeguards/parameter.py", "safeguards/gradients/one_pass.py", "safeguards/gradients/layer_taps.py"}
    for step, trace in traces.items():
        assert exact <= set(trace.files) if step.startswith("exact") else not exact & set(trace.files)
    if WRITE:
        write_table(traces, {step: row["limit"] for step, row in stated.items()})
        stated = read_table()
    assert not over_ceiling(traces, stated), over_ceiling(traces, stated)
    for step in traces:
        listed = re.search(rf"^{re.escape(step)}: (.*)\.$", DESIGN.read_text(encoding="utf-8"), re.M)
        assert listed, f"docs/design.md lists no files for {step}"


def test_a_count_over_its_ceiling_fails_and_one_under_passes():
    """The ceiling is a limit: a count under it passes whatever it was before, a count over it fails."""
    table = {"Diffusion-DPO": {"files": 12, "limit": 14, "functions": 0}}
    under = {"Diffusion-DPO": Trace([f"f{i}.py" for i in range(9)], 50)}
    over = {"Diffusion-DPO": Trace([f"f{i}.py" for i in range(15)], 50)}
    assert over_ceiling(under, table) == []
    assert len(over_ceiling(over, table)) == 1
