"""How ``evaluate`` and ``pairs`` report what they are doing: a tqdm bar where bars are on (a terminal), else one INFO
line of the package's logger per step, with counts and seconds, for a log file.

Off a terminal the command line turns bars off (:func:`~trl_diffusion_sdpo.cli.sample.command_sampling_keywords`) and
shows the package's INFO messages on stderr (:func:`~trl_diffusion_sdpo.cli.console.log_to_console`), as ``train``
does: a log file then gets one line per model and per batch, never a bar redrawn with carriage returns. From Python
the lines go to the ``trl_diffusion_sdpo.evaluation.progress`` logger, shown where logging is configured.
"""

from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

__all__ = ["Progress"]

logger = logging.getLogger(__name__)


class Progress:
    """``done`` of ``total`` ``unit`` of one stage (``description``), advanced one batch at a time: a tqdm bar when
    ``bar``, else a log line per batch (``description: 4/18 images, batch 2/9, 3.1 s, about 10.9 s left``)."""

    def __init__(self, description: str, total: int, unit: str, bar: bool, batches: int | None = None) -> None:
        self.description, self.total, self.unit, self.batches = description, total, unit, batches
        self.done = self.batch = 0
        self.started = time.perf_counter()
        self.lines = not bar
        self.bar = tqdm(total=total, desc=description, unit=unit) if bar and total else None

    def update(self, count: int) -> None:
        """One batch of ``count`` more done."""
        self.done += count
        self.batch += 1
        if self.bar is not None:
            self.bar.update(count)
        if not self.lines:
            return
        seconds = time.perf_counter() - self.started
        batch = f"batch {self.batch}/{self.batches}" if self.batches else f"batch {self.batch}"
        left = seconds / self.done * (self.total - self.done) if self.done else 0.0
        logger.info(
            "%s: %d/%d %s, %s, %.1f s%s",
            self.description,
            self.done,
            self.total,
            self.unit,
            batch,
            seconds,
            f", about {left:.0f} s left" if self.done < self.total else "",
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def note(text: str, bar: bool) -> None:
    """A step between batches (a model loading, a stage done) as a log line, where no bar shows the run advancing."""
    if not bar:
        logger.info("%s", text)
