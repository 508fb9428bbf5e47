"""Keyed random draws: every random choice of a training micro-batch comes from a generator seeded by
``(seed, optimizer step, micro-batch index)``, and is drawn for the global micro-batch.

A resumed run then draws exactly what the uninterrupted one did (the draws depend on no global RNG state), and a
pair gets the same flip, prompt dropout, timestep, noise and posterior sample whatever the number of processes, as
long as the global batch is the same.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["MicroBatchDraws", "keyed_generator"]


def keyed_generator(seed: int, step: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by a hash of ``(seed, step, index)`` (independent streams for neighbouring keys)."""
    key = f"{seed}/{step}/{index}".encode()
    derived = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    return torch.Generator(device=device).manual_seed(derived)


class MicroBatchDraws:
    """Where a micro-batch's random draws come from, and which of them this process keeps.

    Training: a generator keyed by ``(seed, optimizer step, micro-batch within the step)``; evaluation: one CPU
    generator seeded with ``eval_seed`` for a whole ``evaluate()`` (:meth:`start_evaluation`). Every draw is made for
    the global micro-batch (``num_processes`` times the per-device batch) and each process keeps its own rows.
    """

    def __init__(
        self,
        seed: int,
        train_rows: int,
        eval_rows: int,
        process_index: int,
        num_processes: int,
        device: torch.device | str,
    ) -> None:
        self.seed, self.device = seed, device
        self.rows_per_process = {"train": train_rows, "eval": eval_rows}
        self.process_index, self.num_processes = process_index, num_processes
        self._step, self._index = -1, 0  # which micro-batch of which step the training draws are for
        self._eval_generator: torch.Generator | None = None

    def generator(self, mode: str, step: int) -> torch.Generator:
        """The generator of the next micro-batch of optimizer step ``step`` (or of the running evaluation)."""
        if mode == "eval" and self._eval_generator is not None:
            return self._eval_generator
        if step != self._step:
            self._step, self._index = step, 0
        self._index += 1
        return keyed_generator(self.seed, step, self._index - 1, self.device)

    def start_evaluation(self, eval_seed: int) -> None:
        self._eval_generator = torch.Generator().manual_seed(eval_seed)

    def end_evaluation(self) -> None:
        self._eval_generator = None

    def span(self, mode: str, local_rows: int) -> tuple[int, slice]:
        """``(n, rows)``: every process draws ``n`` rows, for the global micro-batch (same generator state), and
        keeps ``rows``, its own (``process_index * rows_per_process`` onwards)."""
        rows_per_process = max(self.rows_per_process[mode], local_rows)
        start = self.process_index * rows_per_process
        return self.num_processes * rows_per_process, slice(start, start + local_rows)

    def local(self, tensors: tuple[torch.Tensor, ...], rows: slice) -> tuple[torch.Tensor, ...]:
        """This process's ``rows`` of each of ``tensors`` (drawn for the global micro-batch), on the training
        device."""
        return tuple(t[rows].to(self.device) for t in tensors)

    def augmentation(
        self, generator: torch.Generator, mode: str, batch: int, independent: bool, cropping: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``flip`` booleans (``[B]``, or ``[B, 2]`` when each image of a pair is augmented on its own), ``drop``
        uniforms ``[B]`` (prompt dropout) and, when ``cropping``, crop fractions (``[B, 2]`` top and left per pair, or
        ``[B, 4]`` per image).

        The winner's flip and the dropout are the first two rows of the draw whatever the options (a generator fills
        rows in order), so the options add rows without changing the others."""
        rows = (3 if independent else 2) + (2 * (2 if independent else 1) if cropping else 0)
        n, local = self.span(mode, batch)
        draws = self.local(tuple(torch.rand((rows, n), generator=generator, device=generator.device)), local)
        flip = torch.stack([draws[0], draws[2]], dim=1) < 0.5 if independent else draws[0] < 0.5
        crop = None
        if cropping:
            first = 3 if independent else 2
            crop = torch.stack(draws[first:], dim=1)  # [B, 2] or [B, 4]: (top, left) per pair or per image
        return flip, draws[1], crop
