"""One process, or several under DDP: whole weights and gradients everywhere; every default of :class:`Engine`."""

from __future__ import annotations

from .base import Engine

__all__ = ["PlainEngine"]


class PlainEngine(Engine):
    """A single process or DDP: whole weights, gradients and optimizer state on every process."""

    name = "ddp"

    def resume_on_other_count(self, checkpoint: str, saved_processes: int, work_dir: str) -> str:
        """The checkpoint itself: weights and optimizer state are whole, the same on every process."""
        return checkpoint
