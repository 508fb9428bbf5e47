"""The EMA weights (``ema_decay``): diffusers' ``EMAModel`` over the trained weights, as a ``TrainerCallback``
(:class:`EMAWeights`): ``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after every optimizer step (diffusers'
warm-up of the decay included) from the weights training starts from, saved beside the trained weights (``ema/`` in
each checkpoint and in the output folder, in the same format), and the weights the validation grids sample from.

Imported when a run sets ``ema_decay`` (the callbacks package's lazy names).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = ["EMA_FOLDER", "EMAWeights"]

#: the folder, inside a checkpoint and the output folder, holding the EMA weights
EMA_FOLDER = "ema"


class EMAWeights(TrainerCallback):
    """An exponential moving average of ``parameters`` (diffusers' ``EMAModel``), stepped after every optimizer step.

    Args:
        parameters: the trained weights (LoRA adapters, or the whole denoiser).
        decay: the EMA's decay.
        save: ``save(folder)`` writes the trained weights to ``folder`` in the run's format (the trainer's
            ``_save``); it is called with the EMA weights swapped in.
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter], decay: float, save: Callable[[str], Any]) -> None:
        self.parameters, self.decay, self.save = list(parameters), decay, save
        self.ema = None  # started with training, from the weights it starts from (a resumed checkpoint's too)

    def on_train_begin(self, args, state, control, **kwargs):
        from diffusers.training_utils import EMAModel  # diffusers' training utilities: imported when used

        self.ema = EMAModel(self.parameters, decay=self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in the model for the block, the trained ones restored after (diffusers' store/restore);
        before training starts, the trained weights as they are."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        try:
            yield
        finally:
            self.ema.restore(self.parameters)

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.step(self.parameters)

    def on_save(self, args, state, control, **kwargs):
        self._save_to(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", EMA_FOLDER), state)

    def on_train_end(self, args, state, control, **kwargs):
        self._save_to(os.path.join(args.output_dir, EMA_FOLDER), state)

    def _save_to(self, folder: str, state) -> None:
        if not state.is_world_process_zero:
            return
        with self.swapped_in():
            self.save(folder)
