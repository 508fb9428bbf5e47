"""Train the tiny LoRA run of ``checkpoint_kill_worker.py`` and wait, during one optimizer step, for the test to
send it a real signal (run as a subprocess), as the command line runs: the preemption callback passed, a stop
turned into its exit status.

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
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: tests.helpers

from transformers import TrainerCallback  # noqa: E402

from tests.checkpoint_kill_worker import build_trainer  # noqa: E402
from trl_diffusion_sdpo.callbacks.preemption import PREEMPTION_SIGNALS, PreemptionCallback  # noqa: E402
from trl_diffusion_sdpo.cli.train import stopped_or  # noqa: E402


class PauseAtStep(TrainerCallback):
    """One process: print ``PAUSED``, read a line from stdin. Several (``rank`` given): only that process pauses,
    writing its pid to ``folder/paused`` and waiting for ``folder/go`` (the launcher does not forward stdin); the
    others wait for it in the step's gradient all-reduce."""

    def __init__(self, step: int, rank: int | None = None, folder: str | None = None) -> None:
        self.step, self.rank, self.folder = step, rank, folder

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 != self.step:
            return
        if self.rank is None:
            print("PAUSED", flush=True)
            sys.stdin.readline()
        elif args.process_index == self.rank:
            with open(os.path.join(self.folder, "paused.tmp"), "w") as f:
                f.write(str(os.getpid()))
            os.rename(os.path.join(self.folder, "paused.tmp"), os.path.join(self.folder, "paused"))
            while not os.path.exists(os.path.join(self.folder, "go")):
                time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--pause-step", type=int, required=True)
    parser.add_argument("--signals", nargs="*", default=None)
    parser.add_argument("--pause-rank", type=int, default=None, help="several processes: the one that pauses")
    parser.add_argument("--pause-dir", default=None, help="several processes: where the pause files go")
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trainer = build_trainer(options.output_dir, options.tokenizer_dir)
    trainer.args.save_steps = 1000  # the run's own saves off: the only checkpoint is the preemption's
    # As the command line: the preemption callback passed, a stop turned into its exit status.
    signals = PREEMPTION_SIGNALS if options.signals is None else options.signals
    trainer.add_callback(PreemptionCallback(signals=signals))
    trainer.add_callback(PauseAtStep(options.pause_step, options.pause_rank, options.pause_dir))

    def train() -> int:
        trainer.train()
        return 0

    status = stopped_or(train)
    if status:
        sys.exit(status)
    print("finished without being preempted", flush=True)


if __name__ == "__main__":
    main()
