"""How many package files one steady-state training step crosses, traced with ``sys.setprofile``, against the counts
and limits docs/design.md states ("Files to read for one step").

The trace is the second micro-batch of a tiny SD run with LoRA (the first builds lazily made state: the one pass's
buffers, the empty prompt's embeddings), from ``training_step``'s entry to its return. A file counts when a function
defined in it runs. The files of the step are those a reader follows; they stop at the model family's calls
(encoders, noiser, denoiser: ``families/``) and the objective's formula (``objectives/``), which are read on their
own, as the design document says; the table gives the count with them too.

Run with ``TRL_DIFFUSION_SDPO_WRITE_STEP_FILES=1`` to rewrite the marked table in docs/design.md from the trace (the
limits, its "at most" column, are kept); otherwise the table's counts must equal the traced ones.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

import trl_diffusion_sdpo

PACKAGE = Path(trl_diffusion_sdpo.__file__).resolve().parent
DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"
BEGIN, END = "<!-- step-files: begin -->", "<!-- step-files: end -->"
READ_ON_THEIR_OWN = ("families/", "objectives/")
WRITE = os.environ.get("TRL_DIFFUSION_SDPO_WRITE_STEP_FILES") == "1"

# the table's rows: name -> the config that runs it
STEPS = {
    "Diffusion-DPO": {"safeguard": False},
    "exact rule (one pass)": {"safeguard": True, "safeguard_space": "parameter", "safeguard_passes": "one"},
}


@dataclass
class Trace:
    files: list[str]  # package files in order of first entry, relative to the package
    functions: int
    hops: int  # calls that enter another package file than the caller's

    @property
    def step_files(self) -> list[str]:
        return [f for f in self.files if not f.startswith(READ_ON_THEIR_OWN)]


class _Tracer(TrainerCallback):
    """Profiles the ``training_step`` of the second micro-batch."""

    def __init__(self, trainer) -> None:
        self.trace: Trace | None = None
        step = trainer.training_step
        calls = []

        def training_step(model, inputs, num_items_in_batch=None):
            calls.append(None)
            if len(calls) != 2:
                return step(model, inputs, num_items_in_batch)
            files: list[str] = []
            functions: set[tuple[str, str]] = set()
            hops, last = 0, None

            def profile(frame, event, arg):
                nonlocal hops, last
                if event != "call":
                    return
                path = frame.f_code.co_filename
                if not path.startswith(str(PACKAGE)):
                    return
                name = Path(path).resolve().relative_to(PACKAGE).as_posix()
                functions.add((name, frame.f_code.co_qualname))
                if name not in files:
                    files.append(name)
                if last is not None and name != last:
                    hops += 1
                last = name

            sys.setprofile(profile)
            try:
                return step(model, inputs, num_items_in_batch)
            finally:
                sys.setprofile(None)
                self.trace = Trace(files, len(functions), hops)

        trainer.training_step = training_step


def trace_step(make_trainer, **config) -> Trace:
    trainer = make_trainer(lora=True, max_steps=2, **config)
    tracer = _Tracer(trainer)
    trainer.train()
    assert tracer.trace is not None and "trainer.py" in tracer.trace.files, "the trace saw no step"
    return tracer.trace


def read_table() -> dict[str, dict[str, int]]:
    """The marked table of docs/design.md: step -> its counts and limit."""
    text = DESIGN.read_text(encoding="utf-8")
    block = text[text.index(BEGIN) : text.index(END)]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[1].isdigit():
            step, files, limit, total, functions, hops = cells
            rows[step] = {
                "files": int(files),
                "limit": int(limit),
                "total": int(total),
                "functions": int(functions),
                "hops": int(hops),
            }
    return rows


def write_table(traces: dict[str, Trace], limits: dict[str, int]) -> None:
    lines = [
        BEGIN,
        "| step | files of the step | at most | with `families/` and `objectives/` | functions | file-to-file hops |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for step, trace in traces.items():
        lines.append(
            f"| {step} | {len(trace.step_files)} | {limits[step]} | {len(trace.files)} | {trace.functions} | "
            f"{trace.hops} |"
        )
    for step, trace in traces.items():
        lines.append("")
        lines.append(f"{step}: " + ", ".join(f"`{f}`" for f in trace.step_files) + ".")
    lines.append(END)
    text = DESIGN.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    DESIGN.write_text(text[:start] + "\n".join(lines) + text[end:], encoding="utf-8")


def test_the_step_crosses_no_more_files_than_the_design_document_states(make_trainer):
    stated = read_table()
    assert set(stated) == set(STEPS), f"docs/design.md's table lists {sorted(stated)}, the test traces {list(STEPS)}"
    traces = {step: trace_step(make_trainer, **config) for step, config in STEPS.items()}
    for step, trace in traces.items():  # the trace sees what the step runs, including what the count leaves out
        assert {"trainer.py", "step/stages.py", "safeguards/base.py", "families/base.py"} <= set(trace.files)
        exact = {"safeguards/parameter.py", "gradients/one_pass.py", "gradients/layer_taps.py"}
        assert exact <= set(trace.files) if step.startswith("exact") else not exact & set(trace.files)
    if WRITE:
        write_table(traces, {step: row["limit"] for step, row in stated.items()})
        stated = read_table()
    for step, trace in traces.items():
        row = stated[step]
        assert len(trace.step_files) <= row["limit"], (
            f"{step} crosses {len(trace.step_files)} files of the step, more than the {row['limit']} docs/design.md "
            f"allows: {trace.step_files}"
        )
        traced = {
            "files": len(trace.step_files),
            "total": len(trace.files),
            "functions": trace.functions,
            "hops": trace.hops,
        }
        assert {k: row[k] for k in traced} == traced, (
            f"docs/design.md's counts for {step} are not the traced ones; rerun this test with "
            "TRL_DIFFUSION_SDPO_WRITE_STEP_FILES=1 to write them"
        )
        listed = re.search(rf"^{re.escape(step)}: (.*)\.$", DESIGN.read_text(encoding="utf-8"), re.M)
        assert listed and listed.group(1) == ", ".join(f"`{f}`" for f in trace.step_files)
