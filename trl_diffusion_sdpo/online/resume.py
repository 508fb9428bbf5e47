"""The generation a ``num_iterations`` window trains on, kept in every checkpoint saved inside the window, so that a
resume there trains on the pairs it had instead of sampling that generation again (sampling is most of an online
step: ``online/generation_time_share``).

Each process writes its own micro-batches' generations into ``online_generation-<process>.safetensors`` beside the
trainer state: per micro-batch index ``m``, the pair batch's tensors (``m/batch/<key>``), the rewards
(``m/rewards``, ``m/reward/<function>``), the pairs (``m/pairs``, ``[P, 3]`` int64) and the diversity, with the
window's index, the number of processes and the generation's seconds in the file's metadata. A checkpoint at the end
of a window has none: the next step samples a new generation. The sampled images are not kept (nothing after
pairing reads them).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .generation import GeneratedPairs

__all__ = ["GENERATION_FILE", "WindowGenerations", "load_generations", "save_generations"]

logger = logging.getLogger(__name__)

GENERATION_FILE = "online_generation-{process}.safetensors"


def save_generations(path: str, window: int, generated: dict[int, GeneratedPairs], processes: int) -> None:
    """Write a window's generations (by micro-batch index) to the safetensors file ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    seconds = {}
    for micro, pairs in generated.items():
        for key, value in pairs.batch.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{micro}/batch/{key}"] = value.detach().cpu().contiguous()
        tensors[f"{micro}/rewards"] = pairs.rewards.contiguous()
        for name, scores in pairs.per_function.items():
            tensors[f"{micro}/reward/{name}"] = scores.contiguous()
        tensors[f"{micro}/pairs"] = torch.tensor(pairs.pairs, dtype=torch.int64).reshape(-1, 3)
        tensors[f"{micro}/diversity"] = pairs.diversity.contiguous()
        seconds[micro] = pairs.seconds
    metadata = {"window": str(window), "processes": str(processes), "seconds": json.dumps(seconds)}
    save_file(tensors, path, metadata=metadata)


def load_generations(path: str, device: torch.device | str) -> tuple[int, int, dict[int, GeneratedPairs]]:
    """``(window, processes, generations by micro-batch index)`` of a file :func:`save_generations` wrote; the pair
    batches on ``device``."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    seconds = {int(m): s for m, s in json.loads(metadata["seconds"]).items()}
    generated = {}
    for micro in sorted(seconds):
        prefix = f"{micro}/"
        batch: dict[str, Any] = {
            key[len(prefix) + len("batch/") :]: value.to(device)
            for key, value in tensors.items()
            if key.startswith(prefix + "batch/")
        }
        batch["skip_reasons"] = []
        per_function = {
            key[len(prefix) + len("reward/") :]: value
            for key, value in tensors.items()
            if key.startswith(prefix + "reward/")
        }
        generated[micro] = GeneratedPairs(
            batch=batch,
            rewards=tensors[prefix + "rewards"],
            per_function=per_function,
            pairs=[tuple(row) for row in tensors[prefix + "pairs"].tolist()],
            diversity=tensors[prefix + "diversity"],
            seconds=seconds[micro],
        )
    return int(metadata["window"]), int(metadata["processes"]), generated


class WindowGenerations:
    """The online trainer's :class:`~trl_diffusion_sdpo.io.run_files.CheckpointPart`: the window's generations,
    saved by every process into a checkpoint written inside a ``num_iterations`` window and read back at resume."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer  # the OnlineDiffusionSDPOTrainer (its module imports this one)

    def _path(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, GENERATION_FILE.format(process=self.trainer.accelerator.process_index))

    def save(self, checkpoint: str) -> None:
        trainer = self.trainer
        if trainer.state.global_step % trainer.args.num_iterations == 0 or not trainer._generated:
            return  # at a window's end the next step samples anew
        save_generations(
            self._path(checkpoint), trainer._window, trainer._generated, trainer.accelerator.num_processes
        )

    def load(self, checkpoint: str) -> None:
        trainer = self.trainer
        path = self._path(checkpoint)
        if not os.path.exists(path):
            return
        window, processes, generated = load_generations(path, trainer.args.device)
        if processes != trainer.accelerator.num_processes:
            # Another process count splits the prompts otherwise: the window's generation is sampled again.
            logger.warning(
                "%s holds the generation of %d process(es); resumed on %d, the window's generation is sampled again.",
                path,
                processes,
                trainer.accelerator.num_processes,
            )
            return
        trainer._window, trainer._generated = window, generated
        logger.info("Resumed inside window %d: its generation is read from %s, not sampled again.", window, path)
