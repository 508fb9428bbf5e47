"""``datasets``' progress bars follow the trainer's ``disable_tqdm``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import datasets

__all__ = ["datasets_progress_bars"]


@contextmanager
def datasets_progress_bars(enabled: bool) -> Iterator[None]:
    """Show (``enabled``) or hide ``datasets``' progress bars (``map``, ``filter``, ...) inside the block, then restore
    the global setting, so one trainer's ``disable_tqdm`` does not leak into the rest of the program."""
    was_enabled = datasets.is_progress_bar_enabled()
    if enabled == was_enabled:
        yield
        return
    datasets.enable_progress_bars() if enabled else datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars() if was_enabled else datasets.disable_progress_bars()
