"""Whether the package's output goes to a terminal: the trainer's own progress bar and the command line's
(:mod:`trl_diffusion_sdpo.cli.console`) decide from it.

Nothing here changes a setting of another library. The command line decides for the trainer's progress bar only: off
a terminal, with ``disable_tqdm`` left unset, each log is a line of its own (transformers' ``PrinterCallback``;
``config.machine.machine_choices``); a run built from Python keeps the config's ``disable_tqdm``.
"""

from __future__ import annotations

import sys

__all__: list[str] = []  # nothing here is imported by users; the package imports its names directly


def on_terminal() -> bool:
    """Whether stderr, where progress bars and logs go, is a terminal, or a notebook's output (which draws bars as
    widgets)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules
