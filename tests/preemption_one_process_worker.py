"""Train the tiny LoRA run of ``checkpoint_kill_worker.py`` on one of several processes (``accelerate launch``'s, or
started with the environment it gives them); process ``--signal-rank`` sends itself ``SIGTERM`` at the start of
optimizer step ``--signal-step`` (run as a subprocess by ``tests/io/test_preemption_on_one_process.py``).

    accelerate launch ... tests/preemption_one_process_worker.py OUTPUT_DIR --tokenizer-dir DIR --results DIR

Each process writes ``<results>/<rank>.json``: how its ``train()`` ended (``exit_code``: the status the command
line ends a preempted run with, ``None`` when it returned) and the optimizer step it had reached. The run's own
saves are off, so any checkpoint is the preemption's. A process whose run hangs (processes that stopped after
different steps wait on each other) ends itself after ``--give-up`` seconds with its threads' tracebacks, so none
outlives the test.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: tests.helpers

from transformers import TrainerCallback  # noqa: E402

from tests.checkpoint_kill_worker import build_trainer  # noqa: E402
from trl_diffusion_sdpo.callbacks.preemption import PreemptionCallback, TrainingPreempted  # noqa: E402


class SignalAtStep(TrainerCallback):
    """On process ``rank`` only: ``SIGTERM`` to this process as optimizer step ``step`` begins."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and args.process_index == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--signal-step", type=int, default=2)
    parser.add_argument("--signal-rank", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--give-up", type=float, default=240.0)
    options = parser.parse_args()
    faulthandler.dump_traceback_later(options.give_up, exit=True)
    trainer = build_trainer(options.output_dir, options.tokenizer_dir, max_steps=options.max_steps, save_steps=1000)
    trainer.add_callback(PreemptionCallback())  # as the command line passes it
    trainer.add_callback(SignalAtStep(options.signal_step, options.signal_rank))
    exit_code = None
    try:
        trainer.train()
    except TrainingPreempted as stopped:
        exit_code = stopped.exit_code
    rank = trainer.args.process_index
    report = {"exit_code": exit_code, "global_step": trainer.state.global_step}
    with open(os.path.join(options.results, f"{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
