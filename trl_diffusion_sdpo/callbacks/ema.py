"""The EMA weights (``ema_decay``): diffusers' ``EMAModel`` over the trained weights, as a ``TrainerCallback``
(:class:`EMAWeights`): ``theta_ema <- decay * theta_ema + (1 - decay) * theta`` after every optimizer step (diffusers'
warm-up of the decay included) from the weights training starts from, saved beside the trained weights (``ema/`` in
each checkpoint and in the output folder, in the same format), and the weights the validation grids sample from. Each
checkpoint also keeps the average's state (``ema/ema_state``: diffusers' ``EMAModel.state_dict()``, its step count
included), written before the checkpoint is marked complete and read back when a run resumes from it, so a resumed
average goes on as the uninterrupted run's does.

Imported when a run sets ``ema_decay`` (the callbacks package's lazy names).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from ..engines.base import trainable_parameters
from .state_files import read_state, write_state

__all__ = ["EMA_FOLDER", "EMA_STATE", "EMAWeights"]

logger = logging.getLogger(__name__)

#: the folder, inside a checkpoint and the output folder, holding the EMA weights
EMA_FOLDER = "ema"
#: the name of the average's state in a checkpoint's :data:`EMA_FOLDER` (``.json`` and ``.safetensors``)
EMA_STATE = "ema_state"


class EMAWeights(TrainerCallback):
    """An exponential moving average of ``parameters`` (diffusers' ``EMAModel``), stepped after every optimizer step.

    The trainer builds one from ``ema_decay``; a Python user may build one instead (``ema_decay`` left unset) as TRL's
    ``LogCompletionsCallback(trainer, ...)`` is built, and add it to the trainer, which then takes it as its
    :attr:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.ema`: validation grids sample its weights, a rewind restores it::

        trainer = DiffusionSDPOTrainer(pipe, args=config, train_dataset=pairs, peft_config=lora)
        trainer.add_callback(EMAWeights(decay=0.999, trainer=trainer))

    Args:
        parameters: the trained weights (LoRA adapters, or the whole denoiser); ``None``: the trainable weights of
            ``trainer``'s :attr:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.policy`.
        decay: the EMA's decay, in (0, 1).
        save: ``save(folder)`` writes the trained weights to ``folder`` in the run's format; it is called with the
            EMA weights swapped in. ``None``: ``trainer``'s
            :meth:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.save_weights`.
        trainer: the trainer it is added to, whose weights and save function are taken where ``parameters`` and
            ``save`` are unset; without it both must be given.
    """

    def __init__(
        self,
        parameters: Sequence[torch.nn.Parameter] | None = None,
        decay: float | None = None,
        save: Callable[[str], Any] | None = None,
        *,
        trainer: Any | None = None,
    ) -> None:
        if decay is None or not 0.0 < decay < 1.0:
            raise ValueError(f"EMAWeights needs a decay in (0, 1), got {decay!r}")
        if trainer is not None:
            parameters = parameters if parameters is not None else trainable_parameters(trainer.policy)
            save = save if save is not None else trainer.save_weights
        if parameters is None or save is None:
            raise ValueError(
                "EMAWeights averages the trainer's weights and saves them with it: build it once the trainer is, "
                "EMAWeights(decay=..., trainer=trainer), and add it with trainer.add_callback(ema)"
            )
        self.parameters = list(parameters)
        self.decay, self.save = decay, save
        self.ema = None  # started with training, from the weights it starts from, or a resumed checkpoint's state
        self._resumed_state: dict[str, Any] | None = None  # read from the checkpoint a run resumes from

    def on_train_begin(self, args, state, control, **kwargs):
        from diffusers.training_utils import EMAModel  # diffusers' training utilities: imported when used

        self.ema = EMAModel(self.parameters, decay=self.decay)
        resumed, self._resumed_state = self._resumed_state, None
        if resumed is not None:
            self.load_state_dict(resumed)

    def save_checkpoint_part(self, checkpoint: str, args: Any, state: Any) -> None:
        """Into each checkpoint, before it is marked complete: the EMA weights in the run's format and the average's
        state (:data:`EMA_STATE`), in :data:`EMA_FOLDER` (the main process)."""
        if self.ema is None or not args.should_save:
            return
        folder = os.path.join(checkpoint, EMA_FOLDER)
        self._save_to(folder)
        write_state(folder, EMA_STATE, self.ema.state_dict())

    def load_checkpoint_part(self, checkpoint: str, args: Any, state: Any) -> None:
        """The average's state of the checkpoint a run resumes from, taken up when training begins; a checkpoint
        without one (written before it was kept) restarts the average from the resumed weights, with a warning."""
        folder = os.path.join(checkpoint, EMA_FOLDER)
        if os.path.isfile(os.path.join(folder, f"{EMA_STATE}.json")):
            self._resumed_state = read_state(folder, EMA_STATE)
            return
        self._resumed_state = None
        logger.warning(
            "%s holds no EMA state (%s): the average starts again from the resumed weights",
            checkpoint,
            os.path.join(EMA_FOLDER, f"{EMA_STATE}.json"),
        )

    def state_dict(self) -> dict[str, Any]:
        """The average's state (diffusers' ``EMAModel.state_dict``: its shadow weights and the optimizer steps it has
        taken, which its decay's warm-up counts); ``{}`` before training starts."""
        return {} if self.ema is None else self.ema.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The average's state as :meth:`state_dict` gave it (diffusers' ``EMAModel.load_state_dict``, which copies
        it), its shadow weights put on the trained weights' device (a state read from disk holds them on the CPU)."""
        if not state:
            return
        if self.ema is None:
            raise RuntimeError("the EMA starts when training begins: there is no average to load a state into yet")
        self.ema.load_state_dict(state)
        self.ema.to(device=self.parameters[0].device)

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

    def on_train_end(self, args, state, control, **kwargs):
        if args.should_save:
            self._save_to(os.path.join(args.output_dir, EMA_FOLDER))

    def _save_to(self, folder: str) -> None:
        with self.swapped_in():
            self.save(folder)
