"""What a training run writes and reads, beside transformers' own saves: the trainer's helper ``trainer.files``.

The trainer overrides transformers' file hooks (``save_model``, ``_save_checkpoint``, ``_load_from_checkpoint``,
``_load_best_model``, ``create_model_card``, ``init_hf_repo``, ``push_to_hub``) and ``train`` in its own class, each
calling ``super()`` where transformers' version does part of the work; each reads what it does there and calls the
helpers of :class:`RunFiles`, which keeps the state they share:

* weights in diffusers' formats (:mod:`.saving`): LoRA adapters (``pytorch_lora_weights.safetensors``) or the
  denoiser's subfolder, never pickles, gathered first where the engine shards them
  (:meth:`~trl_diffusion_sdpo.engines.Engine.gather_state_dict`) and loaded into its shards
  (:meth:`~trl_diffusion_sdpo.engines.Engine.loading`);
* checkpoints the resume can trust: before transformers' ``_save_checkpoint`` writes ``checkpoint-N`` in place (and
  pushes and rotates, as it does), a leftover of a killed save of that step is removed, the newest complete
  checkpoint hard-linked aside until the new one is complete, and ``run_identity.json`` written into it; after it,
  the parts that are ours (:class:`CheckpointPart`, :class:`CheckpointPartCallback`: the EMA, the rewind's snapshot,
  the online generations; :class:`StatesPart`: the auto-beta's and the safeguard's states), and, once every process is
  done, a checksummed manifest written last marks it complete (:mod:`.checkpoints`, loaded where a run resumes, finds a
  checkpoint or a save's leftover in its folder, or saves one; written by :mod:`.checkpoint_writing`, which the run's
  first checkpoint save imports); the files callbacks write in ``on_save`` are added to it by :meth:`RunFiles.on_save`,
  which runs after theirs;
* around ``train``: the output folder's lock (:mod:`.run_lock`) and a refusal to replace another run's weights and
  checkpoints (unless resumed), recovery of interrupted saves, the checkpoint to resume from, checked, its config
  compared with the new one (:mod:`.resume_check`), resuming on another number of processes (:mod:`.resume_world`,
  through the engine), and, where the caller passed a
  :class:`~trl_diffusion_sdpo.callbacks.preemption.PreemptionCallback`, its signals while it runs
  (:meth:`RunFiles.training`);
* the model card and Hub pushes (:attr:`RunFiles.hub`, :mod:`.hub`): transformers pushes each checkpoint itself,
  and copies only files named as its own weights into the output folder, so :meth:`RunFiles.on_push_begin` puts the
  checkpoint's weights and a model card there first; the final ``push_to_hub`` is the package's (transformers' copies
  its own weights' names and uploads a pickled ``training_args.bin``).

:class:`RunFiles` is also a callback: it applies a learning rate changed at resume in ``on_train_begin``, completes
each checkpoint's record in ``on_save``, after every other callback's, and readies the output folder in
``on_push_begin``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import io as run_io  # the Hub's and the resume checks' modules are imported when first used
from . import saving
from .run_folder import check_new_run_folder, checkpoint_entries, earlier_run_refusal, is_checkpoint_folder
from .run_lock import RunLock, RunLockedError

if TYPE_CHECKING:
    from ..callbacks.state_files import Stateful
    from .checkpoint_writing import CheckpointSave
    from .hub import RunHub

__all__ = [
    "CheckpointPart",
    "CheckpointPartCallback",
    "RunFiles",
    "StatesPart",
    "check_new_run_folder",
    "earlier_run_refusal",
]

logger = logging.getLogger(__name__)


class CheckpointPart(Protocol):
    """State a trainer keeps beside transformers' in every checkpoint (the online trainer's generation within a
    ``num_iterations`` window): each process writes and reads its own files, safetensors or JSON, never pickles."""

    def save(self, checkpoint: str) -> None:
        """Write this process's files into the checkpoint folder being written (every process calls it)."""

    def load(self, checkpoint: str) -> None:
        """Read them back before a resumed training starts (every process calls it)."""


@runtime_checkable
class CheckpointPartCallback(Protocol):
    """A trainer callback whose state every checkpoint holds beside transformers' (the rewind's healthy snapshot):
    the trainer finds it among its callbacks (``callbacks=`` or ``add_callback``), has it write its files into each
    checkpoint before the checkpoint is marked complete, so the manifest lists and checks them, and hands it the
    checkpoint a run resumes from before training begins. Every process calls both."""

    def save_checkpoint_part(self, checkpoint: str, args: Any, state: Any) -> None:
        """Write this process's files into ``checkpoint``, the folder being written (``args``, ``state``: the
        trainer's)."""

    def load_checkpoint_part(self, checkpoint: str, args: Any, state: Any) -> None:
        """Read them back from ``checkpoint``, the one a run resumes from, before its training begins."""


class StatesPart:
    """A checkpoint part holding ``states()`` (name -> :class:`~..callbacks.state_files.Stateful`, asked at each save
    and load: the objects in force then) as :data:`~..callbacks.state_files.STATES_FILE`. The states are equal on every
    process (each reduced over the processes before it moved): ``main()`` says whether this process writes them; every
    process reads them back at resume. A state the checkpoint does not hold is left as it is. Their files are written
    and read by :mod:`~..callbacks.state_files`, which the first checkpoint save or resume imports.

    Args:
        states: the states by name, as they are now.
        main: whether this process writes the checkpoint's shared files (``args.should_save``).
    """

    def __init__(self, states: Callable[[], Mapping[str, Stateful]], main: Callable[[], bool]) -> None:
        self.states, self.main = states, main

    def save(self, checkpoint: str) -> None:
        states = self.states()
        if states and self.main():
            from ..callbacks.state_files import write_states  # loaded by a checkpoint save only

            write_states(checkpoint, states)

    def load(self, checkpoint: str) -> None:
        from ..callbacks.state_files import read_states  # loaded by a resume only

        read_states(checkpoint, self.states())


class RunFiles(TrainerCallback):
    """The helpers and state of the trainer's file hooks: saving, loading, checkpoints, resume checks and the Hub.

    Reads the trainer's ``args``, ``args_as_given`` (the config as given, which ``training_config.json`` stores),
    ``state``, ``accelerator``, ``model``, ``model_wrapped``, ``optimizer``, ``lr_scheduler``, ``engine``,
    ``family``, ``pipeline``, ``is_lora`` and ``base_model_name``; keeps transformers' own ``hub_model_id`` and
    ``push_in_progress`` on the trainer, where transformers reads them. Built before ``transformers.Trainer.__init__``,
    which may call the trainer's ``init_hf_repo``: it reads nothing at construction. The trainer adds it as a callback,
    and :meth:`training` moves it after every other callback when ``train()`` starts, so that its ``on_save`` records
    the files theirs wrote.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.parts: list[CheckpointPart] = []  # saved into every checkpoint, loaded at resume
        #: what a resumed run multiplies the restored learning rates by when training begins (a changed learning_rate)
        self.learning_rate_factor = 1.0

    # ------------------------------------------------------------------ training, resumed from a complete checkpoint

    @contextlib.contextmanager
    def training(
        self, resume_from_checkpoint: str | bool | None = None, overwrite: bool = False
    ) -> Iterator[str | None]:
        """Around the trainer's ``super().train(...)``: yields the checkpoint to hand it (``None`` for a new run).

        Before it: the output folder's lock (refused where the folder holds another run's weights or checkpoints and
        neither ``resume_from_checkpoint`` nor ``overwrite`` is given: with ``overwrite`` that run's checkpoints are
        removed and its weights replaced by this run's saves); what an interrupted save left finished or removed
        (:func:`.checkpoints.recover_interrupted_saves`); ``resume_from_checkpoint`` resolved to a complete checkpoint
        and checked (:func:`.checkpoints.resolve_resume_checkpoint`, :func:`.resume_check.check_resume_config`), its
        parts read, and, on another number of processes, the folder the engine resumes from
        (:mod:`.resume_world`); this callback moved after every other one (its ``on_save`` records what theirs
        wrote). While it runs: a given preemption callback's signals. After it: the lock released."""
        trainer = self.trainer
        resumed = resume_from_checkpoint not in (None, False)
        lock = self._claim_output_dir(resumed, overwrite)
        view = None
        try:
            # a folder holding no checkpoint and no save's leftover has nothing to recover: the checks stay unloaded
            if trainer.args.should_save and checkpoint_entries(trainer.args.output_dir):
                checkpoints().recover_interrupted_saves(trainer.args.output_dir)
            trainer.accelerator.wait_for_everyone()
            if resume_from_checkpoint is None or resume_from_checkpoint is False:  # a new run: the checks unloaded
                resume_from_checkpoint = None
            else:
                resume_from_checkpoint = checkpoints().resolve_resume_checkpoint(
                    resume_from_checkpoint, trainer.args.output_dir
                )
            self.learning_rate_factor = 1.0
            if resume_from_checkpoint is not None:
                view, saved_processes = checkpoints().prepare_resume(self, resume_from_checkpoint)
                if view is not None:  # another number of processes (resume_world): the engine says what to load from
                    resume_from_checkpoint = trainer.engine.resume_on_other_count(
                        resume_from_checkpoint, saved_processes, view
                    )
            # signals handled only where the caller passed a PreemptionCallback (the command line does): a run
            # without one has not loaded its module, and the lookup by name finds nothing
            preemption = trainer.callbacks_of("trl_diffusion_sdpo.callbacks.preemption:PreemptionCallback")
            trainer.remove_callback(self)  # after those added since the trainer was built, before the reporting ones
            trainer.add_callback(self)
            if not preemption:
                yield resume_from_checkpoint
            else:
                from ..callbacks.preemption import preemption_signal_handlers  # loaded with its callback

                with preemption_signal_handlers(preemption[0]):
                    yield resume_from_checkpoint
        finally:
            if view is not None:  # every process is done reading it
                trainer.accelerator.wait_for_everyone()
                if trainer.args.should_save:
                    shutil.rmtree(view, ignore_errors=True)  # links and the converted state, never the checkpoint
            if lock is not None:
                lock.release()

    def on_train_begin(self, args, state, control, **kwargs):
        """A learning rate changed at resume is applied here, once transformers has restored the checkpoint's
        optimizer and scheduler (:func:`.resume_check.learning_rate_factor`)."""
        if self.learning_rate_factor != 1.0:
            from ..callbacks.learning_rate import scale_learning_rate  # a resume that changed learning_rate only

            rates = scale_learning_rate(kwargs["optimizer"], kwargs.get("lr_scheduler"), self.learning_rate_factor)
            logger.warning(
                "Step %d: the learning rate changed at resume applied: the restored rates times %.6g, the next "
                "step's %s (the optimizer's parameter groups and the scheduler's base_lrs).",
                state.global_step,
                self.learning_rate_factor,
                ", ".join(f"{rate:.6g}" for rate in rates),
            )
            self.learning_rate_factor = 1.0

    def _claim_output_dir(self, resumed: bool, overwrite: bool = False) -> RunLock | None:
        """Process 0 locks ``output_dir`` and refuses it where a new run would replace another run's files (before
        any of them is touched; :func:`check_new_run_folder`, which the commands ask before anything loads), or
        with ``overwrite`` removes that run's checkpoints; every process learns whether it was refused (one scalar
        all-reduce), so none waits at a barrier for a process that stopped."""
        args, accelerator = self.trainer.args, self.trainer.accelerator
        lock, error = None, None
        if args.process_index == 0:
            lock = RunLock(args.output_dir)
            try:
                lock.acquire()  # first: a live run in the folder is named as such
            except RunLockedError as err:
                lock, error = None, err
            else:
                try:
                    earlier = check_new_run_folder(args.output_dir, resumed, overwrite)
                    if earlier:
                        checkpoints().remove_earlier_checkpoints(args.output_dir, earlier)
                except Exception as err:  # raised below, after the other processes learn of it
                    lock.release()
                    lock, error = None, err
        if accelerator.num_processes > 1:
            flag = torch.full((), float(error is not None), device=accelerator.device)
            if accelerator.reduce(flag, reduction="sum").item() > 0 and error is None:
                error = RunLockedError(f"{args.output_dir} cannot be trained into (see process 0's error)")
        if error is not None:
            raise error
        return lock

    # ------------------------------------------------------------------ weights

    def save_gathered_weights(self, output_dir: str | None = None, internal: bool = False) -> None:
        """The trainer's ``save_model``: the LoRA adapters or the denoiser, in diffusers' format, to ``output_dir``
        (``internal``: inside a checkpoint save, which reports a failure itself).

        Where the engine shards the weights (DeepSpeed ZeRO-3, FSDP) they are first gathered (every process must
        call this), so the files are the same as on one process whatever the engine's own save settings say. A
        direct call failing on the filesystem (a full disk) raises :class:`.checkpoints.CheckpointSaveError`.
        """
        trainer = self.trainer
        try:
            if not trainer.engine.gathers_for_save():
                self.save_weights(output_dir)
            else:
                state_dict = trainer.engine.gather_state_dict(trainer.model_wrapped, trainable_only=trainer.is_lora)
                self.save_weights(output_dir, state_dict=state_dict)
                trainer.accelerator.wait_for_everyone()
        except Exception as err:
            if isinstance(err, checkpoints().CheckpointSaveError):
                raise
            folder = output_dir if output_dir is not None else trainer.args.output_dir
            writing = checkpoint_writing()
            free = writing.free_bytes(folder if os.path.isdir(folder) else trainer.args.output_dir)
            if internal or not writing.is_save_failure(err, free):  # inside a checkpoint save, which reports it
                raise
            raise writing.save_failure(err, folder, trainer.args.output_dir, 0, free) from err

    def save_weights(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The weights (``state_dict`` if given, gathered by the engine) and ``training_config.json``; the whole
        pipeline beside them in an output folder, the denoiser alone in a checkpoint. Writes on the main process only
        (the EMA callback calls it there with its weights swapped in)."""
        trainer = self.trainer
        output_dir = output_dir if output_dir is not None else trainer.args.output_dir
        if not trainer.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        denoiser = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        name = trainer.family.denoiser_name
        if trainer.is_lora:
            pipeline_class = type(trainer.pipeline)
            saving.save_lora_adapters(denoiser, output_dir, pipeline_class, state_dict=state_dict or None, prefix=name)
        else:
            saving.save_full_denoiser(denoiser, output_dir, state_dict=state_dict or None, subfolder=name)
            # The whole pipeline in the output folder, only the denoiser in checkpoints (all that resuming reads).
            # The other components are frozen: written once.
            if not is_checkpoint_folder(output_dir) and not saving.has_pipeline_components(output_dir):
                saving.save_pipeline_components(trainer.pipeline, output_dir, name)
        # Plain JSON instead of transformers' pickled training_args.bin; the config as given (learning_rate before
        # scale_lr), so that training again from the file does not scale it twice.
        saving.write_training_config(trainer.args_as_given, output_dir)

    def load_weights(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """The trainer's ``_load_from_checkpoint``: the LoRA adapters or the denoiser from a checkpoint, into the
        engine's shards where it shards them (DeepSpeed loads its own engine state beside: transformers does not call
        this under it; :func:`.checkpoints.load_weights`)."""
        checkpoints().load_weights(self.trainer, resume_from_checkpoint, model)

    def load_best_model(self) -> None:
        """The trainer's ``_load_best_model``: the weights of the best checkpoint (``load_best_model_at_end``)."""
        best = self.trainer.state.best_model_checkpoint
        logger.info("Loading the best model from %s (score: %s)", best, self.trainer.state.best_metric)
        self.trainer._load_from_checkpoint(best)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_folder(self) -> str:
        """``<output_dir>/checkpoint-<global step>``: where transformers' ``_save_checkpoint`` writes this step's
        checkpoint (``trial`` is always ``None``: a hyperparameter search needs ``model_init``, which this trainer
        does not take)."""
        return os.path.join(self.trainer.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.trainer.state.global_step}")

    def checkpoint_save(self) -> CheckpointSave:
        """This step's checkpoint save (:class:`.checkpoint_writing.CheckpointSave`, whose module the run's first save
        loads): what the trainer's ``_save_checkpoint`` runs before, after and on the failure of transformers' save."""
        return checkpoint_writing().CheckpointSave(self, self.checkpoint_folder())

    def on_save(self, args, state, control, **kwargs):
        """After transformers' save and every other callback's ``on_save`` (this callback runs last): the files they
        wrote into the checkpoint added to its manifest (:func:`.checkpoint_writing.amend_manifest`), once every
        process has written them. A callback that raises in ``on_save`` ends the event before this one: the
        checkpoint stays complete, without the files written in ``on_save`` in its record."""
        self.trainer.accelerator.wait_for_everyone()
        folder = self.checkpoint_folder()
        if args.should_save and checkpoints().is_marked_complete(folder):
            checkpoint_writing().amend_manifest(folder)
        return control

    def on_push_begin(self, args, state, control, **kwargs):
        """transformers' checkpoint push (``push_to_hub``, inside its save; the main process) is about to upload the
        output folder, into which it copies only files named as its own weights: the checkpoint's weights (with the
        rest of the pipeline for full tuning) and a model card put there first
        (:meth:`.hub.RunHub.ready_output_dir`)."""
        self.hub.ready_output_dir(self.checkpoint_folder())
        return control

    def save_checkpoint(self) -> None:
        """A checkpoint of the trainer's state now (the last good step, before a run stops on an error): the
        trainer's ``_save_checkpoint``, through its classes."""
        self.trainer._save_checkpoint(self.trainer.model_wrapped, None)

    def checkpoint_parts(self) -> list[CheckpointPart]:
        """What every checkpoint holds beside transformers' files: the parts the trainer added (:attr:`parts`), then
        each of the trainer's callbacks that is a :class:`CheckpointPart` (it has ``save_checkpoint_part`` and
        ``load_checkpoint_part``), in the order the callbacks run."""
        found = self.trainer.callbacks_of(CheckpointPartCallback)
        return list(self.parts) + [checkpoints().CallbackPart(c, self.trainer) for c in found]

    # ------------------------------------------------------------------ the model card and the Hub

    @functools.cached_property
    def hub(self) -> RunHub:
        """The run's model card and Hub pushes (:class:`~.hub.RunHub`): :mod:`.hub` is imported when the run first
        writes a card or reaches the Hub."""
        return run_io.RunHub(self.trainer)


def checkpoints() -> ModuleType:
    """:mod:`.checkpoints`, imported where a run resumes, finds a checkpoint or a save's leftover in its folder, or
    saves a checkpoint (or fails to save its weights): a run that does none of these never loads the checks."""
    return importlib.import_module(".checkpoints", __package__)


def checkpoint_writing() -> ModuleType:
    """:mod:`.checkpoint_writing`, imported by the run's first checkpoint save (or a failed save): a run that writes
    no checkpoint never loads it. Asked for at each call, so that a test can stop a run inside one of its functions."""
    return importlib.import_module(".checkpoint_writing", __package__)
