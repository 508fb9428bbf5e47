"""Train the tiny LoRA run of ``checkpoint_kill_worker.py`` and wait, during one optimizer step, for the test to
send it a real signal (run as a subprocess).

    python tests/preemption_worker.py OUTPUT_DIR --tokenizer-dir DIR --pause-step 3 [--signals SIGTERM ...]

At the beginning of optimizer step ``--pause-step`` the worker prints ``PAUSED`` and blocks reading a line from
stdin; the test sends the signal, then writes the line, so the signal lands inside that step. Periodic saves are off
(``save_steps`` beyond the run), so any checkpoint is the preemption's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from checkpoint_kill_worker import build_trainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class PauseAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            print("PAUSED", flush=True)
            sys.stdin.readline()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--pause-step", type=int, required=True)
    parser.add_argument("--signals", nargs="*", default=None)
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trainer = build_trainer(options.output_dir, options.tokenizer_dir)
    trainer.args.save_steps = 1000  # the run's own saves off: the only checkpoint is the preemption's
    if options.signals is not None:
        trainer.args.preemption_signals = options.signals
    trainer.add_callback(PauseAtStep(options.pause_step))
    trainer.train()
    print("finished without being preempted", flush=True)


if __name__ == "__main__":
    main()
