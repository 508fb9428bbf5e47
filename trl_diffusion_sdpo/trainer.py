"""``DiffusionSDPOTrainer``: Diffusion-DPO / Diffusion-SDPO on diffusion denoisers with ``transformers.Trainer``.

The trainer builds the parts, then runs Diffusion-DPO's step itself, calling the stages in order. The math lives in
:mod:`.objectives` and :mod:`.safeguards`, the data in :mod:`.data`, model specifics in :mod:`.families`, what
differs between DDP, DeepSpeed and FSDP in :mod:`.engines`, the step's stages in :mod:`.step` and the file formats in
:mod:`.io`. One micro-batch (:meth:`DiffusionSDPOTrainer.training_step`) reads::

    batch -> noised pair                                      (step.stages)
    -> predictions of the policy and the reference            (step.stages, step.predictions)
    -> [safeguard.loser_weight: the output space's lambda]    (safeguards.output)
    -> denoising errors -> objective                          (step.predictions, objectives)
    -> backward: the engine's, or the branches kept apart     (Trainer's; safeguards.passes, safeguards.parameter)
    -> [safeguard.combine: lambda, g_w + lambda * h_l]        (safeguards.parameter)
    -> non-finite guard -> metrics                            (callbacks.interruptions, step.predictions)

Plain Diffusion-DPO (``safeguard_space="none"``) has no safeguard: its step runs no module of :mod:`.safeguards`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import is_compiled_module
from datasets import Dataset, IterableDataset
from diffusers import DiffusionPipeline
from peft import LoraConfig
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import enable_full_determinism, set_seed

from . import callbacks as run_callbacks  # the probe's and the EMA's names resolved on first use: when chosen
from . import families, objectives
from . import io as run_io  # names resolved on first use: the Hub's module when a model card is written
from .callbacks.alarm import AlarmCallback, TrainingLogAlarm, TrainingLogSignal
from .callbacks.guards import PathologyAction
from .callbacks.interruptions import NonFiniteLossGuard, NonFiniteTracker, StreamGuard
from .config import DiffusionSDPOConfig, check_config
from .config._lazy import import_target
from .config.defaults import resolved_config
from .data.columns import prompt_column
from .data.training_data import eval_collator_for, prepare_training_data
from .engines import Engine, engine_for
from .engines.base import (
    check_not_partitioned,
    check_one_device_per_process,
    place_batch,
    trainable_parameters,
    training_pipeline,
)
from .families import ModelFamily, Noiser, family_for_pipeline, is_quantized
from .families.preparation import (
    CallerModules,
    MixedPrecisionForward,
    compute_dtype,
    freeze_frozen_modules,
    place_frozen_modules,
    prepare_denoiser,
    training_arguments,
    wants_gradient_checkpointing,
)
from .io.reporting import REPORTING_CALLBACKS, TRACKER_CALLBACK, console_callbacks, is_tracker, loaded_class
from .io.run_files import RunFiles, StatesPart
from .io.run_summary import StartSummary
from .objectives import PreferenceObjective, PreferencePredictions, objective_from_config
from .safeguards import safeguard_for
from .step.predictions import (
    Evaluation,
    evaluate_objective,
    metric_stores,
    record_metrics,
    record_step_metrics,
    reduce_logged_metrics,
    reference_for,
    step_metric_names,
)
from .step.stages import (
    Augmentation,
    MicroBatchDraws,
    MicroBatchStages,
    UsableBatches,
)

if TYPE_CHECKING:
    from .callbacks.ema import EMAWeights
    from .callbacks.probe import ProbeCallback, ProbePieces
    from .io.hub import CardMethod
    from .io.trackers import TrackerCallback
    from .rewards import RewardFunction
    from .safeguards import Safeguard

__all__ = ["DiffusionSDPOTrainer"]

#: the safeguard an alarm switches on (its module loaded by a run whose ``on_pathology`` may switch one on)
DORMANT_SAFEGUARD = "trl_diffusion_sdpo.callbacks.pathology_acts:dormant_safeguard"

logger = logging.getLogger(__name__)


#: the run control a config field builds: ``(kind, which callbacks of kind it builds, whether the config sets the
#: field, the refusal of one given beside it)``; a run holds one EMA and one probe
_BUILT_BY_CONFIG: tuple[tuple[str | type, Callable[[Any], bool], Callable[[Any], bool], str], ...] = (
    ("trl_diffusion_sdpo.callbacks.ema:EMAWeights", lambda c: True, lambda a: a.ema_decay is not None,
     "an EMAWeights was given and the config sets ema_decay, which builds another: unset ema_decay or give no "
     "EMAWeights"),
    ("trl_diffusion_sdpo.callbacks.probe:ProbeCallback", lambda c: True, lambda a: bool(a.probe_steps),
     "a ProbeCallback was given and the config sets probe_steps, which builds another: unset probe_steps or give "
     "no ProbeCallback"),
    (AlarmCallback, lambda c: getattr(c.action, "action", None) == "rewind", lambda a: a.on_pathology == "rewind",
     "an AlarmCallback with a RewindAction was given and the config sets on_pathology='rewind', which builds "
     "another: set on_pathology to another value or give no RewindAction"),
)  # fmt: skip


def _instances_of(callbacks: Sequence[Any], kind: type | tuple[type, ...] | str) -> list[Any]:
    """The callbacks among ``callbacks`` that are instances of ``kind`` (see
    :meth:`DiffusionSDPOTrainer.callbacks_of`), a tracker registered in a :class:`~.io.trackers.TrackerCallback` as
    itself."""
    if isinstance(kind, str):  # a class whose module a run loads only when it uses it
        kind = loaded_class(kind)
        if not kind:  # an instance of the class would have loaded its module: there is none
            return []
    wrapper = loaded_class(TRACKER_CALLBACK)  # () until a tracker is registered: isinstance(x, ()) is False
    found = []
    for callback in callbacks:
        if isinstance(callback, kind):
            found.append(callback)
        elif isinstance(callback, wrapper) and isinstance(callback.tracker, kind):
            found.append(callback.tracker)
    return found


def _refuse_beside_config(registered: Sequence[Any], added: Sequence[Any], args: DiffusionSDPOConfig) -> None:
    """Refuse, in one line naming the fix, a callback among ``added`` of a kind the config builds where the config
    sets the field that builds it (an :class:`~.callbacks.ema.EMAWeights` beside ``ema_decay``, a
    :class:`~.callbacks.probe.ProbeCallback` beside ``probe_steps``, an alarm whose action rewinds beside
    ``on_pathology="rewind"``), and a second EMA or probe beside one given or ``registered``."""
    for kind, builds, config_sets, refusal in _BUILT_BY_CONFIG:
        found = [c for c in _instances_of(added, kind) if builds(c)]
        if found and config_sets(args):
            raise ValueError(refusal)
        if isinstance(kind, str) and len(found) + len(_instances_of(registered, kind)) > 1:
            raise ValueError(f"two {kind.rpartition(':')[2]} given: a run has one")


def _undone_on_failure(init: Callable[..., None]) -> Callable[..., None]:
    """A trainer's ``__init__`` that puts the caller's pipeline (and ``ref_model``) back as they were when it raises
    (:class:`~.families.preparation.CallerModules`), so the same objects can be given again. The outermost
    ``__init__`` running (a subclass's, which may check more after ``super().__init__``) holds the record and
    restores; the ones it calls add to it."""

    @functools.wraps(init)
    def construct(self: DiffusionSDPOTrainer, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_caller_modules", None) is not None:  # an outer __init__ restores
            init(self, *args, **kwargs)
            return
        self._caller_modules = CallerModules()
        try:
            init(self, *args, **kwargs)
        except BaseException:
            try:
                self._caller_modules.restore()
            except Exception:  # the construction's own error is the one to raise
                logger.exception("The pipeline given could not be put back as it was before the trainer was built")
            raise
        finally:
            self._caller_modules = None  # the original tensors it held are released

    return construct


def _first_prompt(dataset: Any) -> str | None:
    """The first row's prompt of a map-style dataset (TRL's ``prompt`` column, Pick-a-Pic's ``caption``); ``None`` for
    a stream (nothing is read ahead of training), a prebuilt cache (no text) or a row without one."""
    if not isinstance(dataset, Dataset) or len(dataset) == 0:
        return None
    column = prompt_column(dataset.column_names)
    prompt = None if column is None else dataset.select_columns([column])[0][column]
    return prompt if isinstance(prompt, str) and prompt.strip() else None


class DiffusionSDPOTrainer(Trainer):
    """Preference tuning of a Stable Diffusion (1.x, 2.x, XL) UNet, or an SD3 / SD3.5 or FLUX.1 transformer (flow
    matching), with Diffusion-DPO or Diffusion-SDPO.

    Args:
        model: a diffusers pipeline, or a local path / Hub id loaded with ``DiffusionPipeline.from_pretrained``.
            Its UNet (or transformer) is tuned in place (after ``train()``, ``pipe(prompt)`` samples from the tuned
            model); the VAE and text encoder(s) stay frozen.
        ref_model: ``None`` (the adapter-disabled policy with LoRA, else a frozen copy of the initial UNet), or a
            separate UNet or pipeline.
        args: a :class:`DiffusionSDPOConfig`.
        train_dataset: a preference dataset in TRL form (see :mod:`.data`; Pick-a-Pic's label form is mapped to it,
            with a log line), or a cache written by
            ``trl-diffusion-sdpo cache`` (:func:`~trl_diffusion_sdpo.data.sharded_cache.load_sharded_latent_cache`),
            read streamed.
        eval_dataset: an optional preference dataset in the same forms, or a dict of them by name (each evaluated
            and logged under ``eval_<name>_``, as ``transformers.Trainer`` does).
        peft_config: a ``peft.LoraConfig`` to train LoRA adapters on the UNet instead of all its weights.
        callbacks: as for ``transformers.Trainer``.
        optimizers: as for ``transformers.Trainer``.
        reward_funcs: ``loss_type="smpo"`` only, as the online trainer and TRL's trainers take them: a registered
            scorer name (``"pickscore"``, ...) or a callable ``(prompts, images, **columns) -> list[float]`` (one score
            per PIL image), or a list of them (their scores summed). When a dataset lacks the score columns
            (``score_0``, ``score_1``), both images of every row are scored before training
            (``dataset.map``; lazily for a streamed dataset) and the higher-scored image is the winner. An error with
            any other ``loss_type``.
        **trl_arguments: none taken: a ``DPOTrainer`` argument with no counterpart here (``processing_class``,
            ``data_collator``, ...) is refused with a ``TypeError`` saying what takes its place
            (:data:`~trl_diffusion_sdpo.config.trl_refusals.TRL_TRAINER_ARGUMENTS`), any other as Python refuses it.
    """

    _tag_names = ["trl", "diffusion-sdpo"]
    #: the run's datasets and collators: preference pairs, validated and, with ``cache_latents``, encoded (the online
    #: trainer's are prompts)
    prepare_data = staticmethod(prepare_training_data)
    #: the probe's held-out rows are prompts, paired by the trainer once it is built (the online trainer), not pairs
    probe_rows_are_prompts = False
    _name = "Diffusion-SDPO"
    _paper = {
        "title": "Diffusion-SDPO: Safeguarded Direct Preference Optimization for Diffusion Models",
        "id": "2511.03317",
    }

    @property
    def card_method(self) -> CardMethod:
        """The model card's method name, and no hyperparameters beside the shared ones (the online trainer's class
        names its own)."""
        return run_io.CardMethod()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:  # a subclass's checks after super().__init__ are part of the construction
            cls.__init__ = _undone_on_failure(cls.__init__)

    @_undone_on_failure
    def __init__(
        self,
        model: DiffusionPipeline | str,
        ref_model: torch.nn.Module | DiffusionPipeline | None = None,
        args: DiffusionSDPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        *,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        reward_funcs: str | RewardFunction | Sequence[str | RewardFunction] | None = None,
        **trl_arguments: Any,
    ) -> None:
        # DPOTrainer's arguments with no counterpart here, refused saying what takes their place
        if trl_arguments:  # the refusals' tables are loaded only for a keyword the trainer does not take
            import_target(f"{__package__}.config.trl_refusals:refuse_trainer_arguments")(
                list(trl_arguments), type(self).__name__
            )
        if args is None:
            args = DiffusionSDPOConfig(output_dir="diffusion-sdpo")
        if not isinstance(args, DiffusionSDPOConfig):
            raise TypeError(f"args must be a DiffusionSDPOConfig, got {type(args).__name__}")
        # The config's rules again, the objective's own included: a field may have been changed since it was made.
        check_config(args)
        if train_dataset is None:
            raise ValueError("DiffusionSDPOTrainer needs a train_dataset of preference pairs")
        reward_fn = None
        if reward_funcs is not None:
            from .rewards import dataset_scoring_function  # the rewards load only when there are some to score with

            reward_fn = dataset_scoring_function(reward_funcs)
        check_one_device_per_process(args)
        # Run control given in callbacks= beside the config field that builds the same, refused before the pipeline
        # is touched.
        _refuse_beside_config([], list(callbacks or []), args)
        self.args_as_given = args  # what training_config.json stores
        self.files = RunFiles(self)  # saving, checkpoints, resume checks, the Hub: before Trainer calls init_hf_repo
        self._unwrap_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # see _unwrapped
        # Seeded before LoRA adapters are initialised, so their random init is the same on every run.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)

        # The model: its family (which noiser, encoders and denoiser call), the objective and the reference.
        # Loaded whole even under ZeRO-3's zero3_init_flag: the frozen components must not be sharded.
        self.pipeline, self.base_model_name = training_pipeline(model)
        # What the caller gave, as it is now: put back if the construction fails (a pipeline loaded here is ours).
        given_modules = [] if self.pipeline is not model else list(self.pipeline.components.values())
        given_modules += [ref_model] if isinstance(ref_model, torch.nn.Module) else []
        given_modules += list(ref_model.components.values()) if isinstance(ref_model, DiffusionPipeline) else []
        self._caller_modules.keep(m for m in given_modules if isinstance(m, torch.nn.Module))
        self.family: ModelFamily = family_for_pipeline(
            self.pipeline, max_sequence_length=args.max_sequence_length, guidance_scale=args.flux_guidance_scale
        )
        check_not_partitioned({**self.family.frozen_modules(), self.family.denoiser_name: self.family.denoiser})
        # The defaults left unset (learning_rate, beta, safeguard_mu) resolved for this family, objective, tuning and
        # base model, once: on this run's copy, the caller's config stays as given (config.defaults). The start
        # summary prints each with its source. Nothing is chosen for the machine here: the same config is the same run.
        args, self.resolved_defaults = resolved_config(
            args, self.family, self.base_model_name, lora=peft_config is not None
        )
        #: what the command line chose for this machine and output where the config left it unset (data workers,
        #: non-blocking copies, a line per log: ``config.machine.machine_choices``), printed in the start summary;
        #: empty from Python
        self.machine_choices: dict[str, Any] = {}
        #: the KL-regularisation strength the objective uses (TRL's ``DPOTrainer.beta``)
        self.beta: float = args.beta
        # DDPM for the UNet families, flow matching for the transformers; its config fields checked.
        self.noiser: Noiser = self.family.noiser(args)
        denoiser = self.family.denoiser
        self.objective = objective_from_config(args, num_train_timesteps=self.noiser.num_train_timesteps)
        freeze_frozen_modules(self.family)  # in eval mode before a latent cache encodes with them
        # Taken before adapters are added, so a frozen copy holds the base weights only.
        self.reference = reference_for(self.objective, self.family, ref_model, peft_config, get_policy=self._policy)
        # Counts the changes of the reference's weights (online ref_update_steps): the probe keeps the reference's
        # errors while it stays the same.
        self._reference_changes = 0
        self.is_lora = peft_config is not None
        self._dtype = compute_dtype(args)

        # The data, validated before the denoiser is changed; the adapters; then transformers.Trainer with the
        # effective arguments.
        checkpointing = wants_gradient_checkpointing(args)  # training_arguments hands transformers' flag off
        args = training_arguments(args)
        probe_pairs = None  # the probe's held-back pairs, if it runs (its module loads only then)
        if args.probe_steps:
            train_dataset, probe_pairs = self.hold_back_probe_pairs(train_dataset, eval_dataset, args)
        #: a prompt of the run's data (the first training row's), which the model card's usage example samples
        self.example_prompt: str | None = _first_prompt(train_dataset)
        data = self.prepare_data(train_dataset, eval_dataset, args, self.family, reward_fn)
        self.train_data_report, self.eval_data_report = data.report, data.eval_report
        self._eval_collator = data.eval_collator  # one, or one per named eval dataset
        self._eval_collator_in_use = data.eval_collator  # the one of the running evaluation (a placeholder's shape)
        prepare_denoiser(denoiser, peft_config, self._dtype, checkpointing)
        # The EMA the config asks for runs before the callbacks given (a validation given at step k samples the
        # average that includes step k); its alarms and probe are built once the trainer is (they read it).
        ema = []
        if args.ema_decay is not None:
            ema = [run_callbacks.EMAWeights(trainable_parameters(denoiser), args.ema_decay, self.files.save_weights)]
        super().__init__(
            model=denoiser,
            args=args,
            data_collator=data.collator,
            train_dataset=data.train_dataset,
            eval_dataset=data.eval_dataset,
            callbacks=[*ema, *(callbacks or [])],
            optimizers=optimizers,
        )
        self.model_accepts_loss_kwargs = False
        self.add_callback(self.files)  # the logging window opens when training begins
        # report_to's trackers (and those in callbacks=) registered again through add_callback, which hands them the
        # model as they read it; at the end, they receive what every other callback adds to a log.
        for tracker in self.callbacks_of(REPORTING_CALLBACKS):
            super().remove_callback(tracker)
            self._register(tracker)

        # The engine, chosen once: from here on the trainer asks it, never which engine runs.
        self.engine: Engine = engine_for(self.accelerator)
        if is_quantized(denoiser):  # the quantization module is loaded for a quantized base only
            families.check_engine_supports_quantized_base(self.engine.name, denoiser)
        hooks = place_frozen_modules(
            self.family, args.device, self._dtype, on_cpu=data.encoders_idle, offload=args.offload_frozen_modules
        )
        for hook in hooks:
            self._caller_modules.on_restore(hook.remove)
        if self.reference is not None and not self.reference.shares_policy_weights:
            # In the policy's precision and under its autocast: at step 0 the reference computes what the policy does.
            self.reference.place(self.engine, denoiser, args.device, self._dtype)
            self.reference.follow(self._policy, self.accelerator.autocast)
        self.nonfinite = NonFiniteTracker(args.on_nonfinite_loss, self.engine, self.accelerator, self.files)
        self.add_callback(NonFiniteLossGuard(self.nonfinite))
        self.stream_guard = StreamGuard(self)  # an optimizer step without a valid pair is never applied
        self.add_callback(self.stream_guard)
        self.add_callback(StartSummary(self))  # the effective rate, schedule and safeguard; warnings on traps

        # The step's stages and state.
        self.stages = MicroBatchStages(
            self.family,
            self.noiser,
            MicroBatchDraws.for_process(args, self.accelerator),
            self.reference.predict if self.reference is not None else None,
            Augmentation.from_config(args),
            self._dtype,
            self.family.prompt_tokenizer(),
            args.device,
            empty_prompt=data.empty_prompt,
        )
        self.batches = UsableBatches(self._blank_batch)
        # The safeguard, chosen once: none (Diffusion-DPO), the output, parameter or update space (see .safeguards);
        # the parameter spaces bring the backward that keeps the branches apart, the others use the engine's.
        self.safeguard: Safeguard | None = safeguard_for(
            args,
            self.engine,
            lora=self.is_lora,
            trainable_elements=sum(p.numel() for p in trainable_parameters(denoiser)),
        )
        #: the objective's auto-beta (``auto_beta``; ``None``: the configured ``beta`` throughout), adapted in
        #: :meth:`compute_loss` to every training micro-batch's errors
        self.auto_beta = (
            objectives.AutoBeta.from_config(args, self.accelerator.num_processes) if args.auto_beta else None
        )
        # What the objective and the safeguard have learnt, in every checkpoint: a resumed run goes on from it.
        self.files.parts.append(StatesPart(self.training_states, lambda: self.args.should_save))
        self._metrics = metric_stores()
        # accelerate's float32 outputs on the denoiser's forward, only while the trainer runs it (see tuning.py)
        self.mixed_precision_forward = MixedPrecisionForward(self._policy, self._dtype)
        self._dormant_safeguard = None  # on_pathology="safeguard"'s (or a rewind's), built and checked now
        if args.on_pathology in ("safeguard", "rewind"):  # the switch's module, loaded by a run that may switch
            self._dormant_safeguard = import_target(DORMANT_SAFEGUARD)(args, self.engine)
        self._eval_metric_prefix: str | None = None
        self._passes: Any = None  # the exact rule's passes while Trainer's step runs (_training_step_in_passes)
        self._next_log: dict[str, float] = {}  # what callbacks handed log_next since the last training log
        self._add_configured_run_control(args, probe_pairs)
        logger.info("Train data: %s (engine: %r)", self.train_data_report.summary(), self.engine)

    # ------------------------------------------------------------------ what callbacks read and set

    @property
    def policy(self) -> torch.nn.Module:
        """The trained denoiser, unwrapped from DDP or an engine (the module whose trainable parameters are the
        optimizer's)."""
        return self._policy()

    @property
    def ema(self) -> EMAWeights | None:
        """The EMA weights sampling swaps in and a rewind restores: the config's (``ema_decay``), or the
        :class:`~.callbacks.ema.EMAWeights` given in ``callbacks=`` or added with :meth:`add_callback`."""
        return next(iter(self.callbacks_of("trl_diffusion_sdpo.callbacks.ema:EMAWeights")), None)

    @property
    def probe(self) -> ProbeCallback | None:
        """The held-out probe: the config's (``probe_steps``), or the :class:`~.callbacks.probe.ProbeCallback` added
        with :meth:`add_callback`."""
        return next(iter(self.callbacks_of("trl_diffusion_sdpo.callbacks.probe:ProbeCallback")), None)

    @property
    def alarm(self) -> AlarmCallback | None:
        """The alarm on the training logs: the config's (``on_pathology``), or the
        :class:`~.callbacks.alarm.AlarmCallback` reading them given in its place."""
        return next((c for c in self.callbacks_of(AlarmCallback) if c.signal.event == "log"), None)

    @property
    def probe_alarm(self) -> AlarmCallback | None:
        """The alarm on the held-out probe: the config's (with ``probe_steps``: its action is ``on_pathology``'s, or
        the rewind), or the :class:`~.callbacks.alarm.AlarmCallback` reading the probe that was added."""
        return next((c for c in self.callbacks_of(AlarmCallback) if c.signal.event == "step_end"), None)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the denoiser computes in (``bf16`` / ``fp16`` / float32), which the frozen modules and the
        reference are held in."""
        return self._dtype

    @property
    def eval_collator(self) -> Any:
        """The collator of the evaluation data: one, or a dict of them by name for named eval datasets."""
        return self._eval_collator

    @property
    def dormant_safeguard(self) -> Safeguard | None:
        """The safeguard an alarm switches on (``on_pathology="safeguard"``, or ``"rewind"`` in an offline
        Diffusion-DPO run), built and checked against the engine with the trainer; ``None`` where the run has none
        or it is already in force."""
        return self._dormant_safeguard

    def set_safeguard(self, safeguard: Safeguard | None = None, *, space: str | None = None, **fields: Any) -> None:
        """A safeguard in force from the next micro-batch on: ``safeguard`` (``None``: plain Diffusion-DPO), or the
        one named, ``set_safeguard(space="parameter", mu=0.5)``, built by :meth:`safeguard_by_name`. Every process
        must call it at the same step, on a decision reduced over processes; the :attr:`dormant_safeguard` put in
        force is no longer dormant."""
        if space is not None:
            if safeguard is not None:
                raise TypeError("set_safeguard takes a safeguard or a space by name, not both")
            safeguard = self.safeguard_by_name(space, **fields)
        elif fields:
            raise TypeError(f"set_safeguard: {', '.join(sorted(fields))} given without space=")
        if safeguard is not None and safeguard is self._dormant_safeguard:
            self._dormant_safeguard = None
        self.safeguard = safeguard

    def safeguard_by_name(self, space: str, **fields: Any) -> Safeguard | None:
        """The safeguard ``space`` (``safeguard_space``'s values: ``"none"``, ``"output"``, ``"parameter"``,
        ``"update"``) with ``fields`` in place of the config's ``safeguard_<field>`` (``mu=0.5``, ``scope="global"``,
        ...), built as the config's is (:func:`~trl_diffusion_sdpo.safeguards.safeguard_for`): the config's rules
        checked on the changed copy and the safeguard checked against the engine now. Not put in force
        (:meth:`set_safeguard` does)."""
        changed = copy.copy(self.args)
        changed.safeguard_space = space
        for name, value in fields.items():
            field = f"safeguard_{name}"
            if not hasattr(changed, field):
                raise TypeError(f"safeguard_by_name: no config field {field!r} (from {name}=)")
            setattr(changed, field, value)
        check_config(changed)
        changed, _ = resolved_config(changed, self.family, self.base_model_name, lora=self.is_lora)
        return safeguard_for(
            changed,
            self.engine,
            lora=self.is_lora,
            trainable_elements=sum(p.numel() for p in trainable_parameters(self.policy)),
        )

    def save_weights(self, output_dir: str | None = None) -> None:
        """The trained weights written to ``output_dir`` (the output folder by default) in the run's format: the
        diffusers-format LoRA adapters or denoiser that a checkpoint holds (what the EMA saves its weights with)."""
        self.files.save_weights(output_dir)

    def probe_pieces(self) -> ProbePieces:
        """What the held-out probe reads of this trainer, built here in one place
        (:class:`~trl_diffusion_sdpo.callbacks.probe.ProbePieces`; docs/compose.md lists it): the step's stages on the
        probe's draws, its pairs collated and placed as the evaluation's, the sum over processes, the forward's
        context, the engine's forward and the policy."""
        args, accelerator = self.args, self.accelerator

        def stages(draws: MicroBatchDraws) -> MicroBatchStages:
            # the trainer's reference when the probe runs: an online refresh may replace it by a merged copy
            reference = None if self.reference is None else lambda *a, **k: self.reference.predict(*a, **k)
            tokenizer = self.family.prompt_tokenizer()
            augmentation = Augmentation.from_config(args)
            return MicroBatchStages(
                self.family, self.noiser, draws, reference, augmentation, self._dtype, tokenizer, args.device
            )

        def collate(held: Dataset | None) -> tuple[Any, Callable[[list[dict[str, Any]]], dict[str, Any]]]:
            if held is None:  # the eval split's (the first one of named splits)
                dataset, collator = self.eval_dataset, self._eval_collator
                dataset = next(iter(dataset.values())) if isinstance(dataset, dict) else dataset
                return dataset, next(iter(collator.values())) if isinstance(collator, dict) else collator
            live = copy.copy(args)
            live.cache_latents = False  # a few pairs: encoded at the first probe, never cached
            data = self.prepare_data(held, None, live, self.family, None)
            return data.train_dataset, data.eval_collator

        return run_callbacks.ProbePieces(
            stages=stages,
            collate=collate,
            place=self.place_inputs,
            reduce=lambda sums: accelerator.reduce(sums, reduction="sum"),
            forward_context=self.compute_loss_context_manager,
            probing=lambda: self.engine.probing(self.model_wrapped, self.policy),
            policy=lambda: self.policy,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            rows_are_prompts=self.probe_rows_are_prompts,
            has_reference=self.objective.requires_reference,
            engine=self.engine.name,
            publish=self.log_next,
            reference_key=lambda: self._reference_changes,
        )

    def hold_back_probe_pairs(
        self, train_dataset: Any, eval_dataset: Any, args: DiffusionSDPOConfig
    ) -> tuple[Any, Dataset | None]:
        """``(train_dataset, held)``: the probe's pairs (``probe_steps``) held back from the training data where no
        eval split gives them (:func:`~trl_diffusion_sdpo.callbacks.probe.hold_back_pairs`); the start summary
        states how many and from where."""
        return run_callbacks.hold_back_pairs(train_dataset, eval_dataset, args)

    # ------------------------------------------------------------------ setup

    def _policy(self) -> torch.nn.Module:
        """The trained denoiser, unwrapped from DDP or an engine."""
        return self._unwrapped(self.model) if hasattr(self, "accelerator") else self.family.denoiser

    def _unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        """``accelerator.unwrap_model(model)``, looked up once per wrapper: the lookup walks every module for compiled
        regions (milliseconds on a UNet), and the policy is needed every step (the LoRA reference, the exact rule's
        passes). One entry per wrapper, as a step asks with both ``self.model`` and the engine's wrapper (DDP's), each
        held weakly (a discarded DDP wrapper's buckets are not kept alive). A compiled wrapper (``torch_compile``)
        gives the denoiser compiled with the run's settings, so that the exact rule's passes run compiled: taken out
        with ``keep_torch_compile=False``, since accelerate's default re-points the wrapper's module past DDP's."""
        unwrapped = self._unwrap_cache.get(model)
        if unwrapped is None:
            unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
            if is_compiled_module(model):
                from torch.distributed.fsdp import FSDPModule  # a compiled run only: torch's FSDP stays unloaded

                if isinstance(model, FSDPModule):  # accelerate compiles before fully_shard: the root is both
                    unwrapped = model
                else:
                    unwrapped = torch.compile(unwrapped, **self.accelerator.state.dynamo_plugin.to_kwargs())
            self._unwrap_cache[model] = unwrapped
        return unwrapped

    # ------------------------------------------------------------------ files
    # transformers' file hooks, overridden where the run's files differ from transformers' (the state they share, and
    # the helpers, are trainer.files: io/run_files.py). Three are private, each for want of a public hook:
    # - _save_checkpoint: a checkpoint is trusted only once marked complete by a manifest written after every file;
    # - _load_from_checkpoint, _load_best_model: transformers' loaders read its own and peft's file names, or FSDP's
    #   model copy; the checkpoints hold the weights in diffusers' format only (safetensors that load_lora_weights
    #   reads), loaded into the engine's shards.

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the LoRA adapters or the denoiser, in diffusers' format, to ``output_dir`` (the output folder by
        default), with ``training_config.json``; in the output folder of a full tuning, the rest of the pipeline.

        Where the engine shards the weights (DeepSpeed ZeRO-3, FSDP) they are first gathered (every process must call
        this), so the files are the same as on one process whatever the engine's own save settings say. A direct call
        failing on the filesystem (a full disk) raises :class:`.io.checkpoints.CheckpointSaveError`; with
        ``push_to_hub`` it then pushes, as transformers' does."""
        self.files.save_gathered_weights(output_dir, internal=_internal_call)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """transformers' checkpoint (``super()._save_checkpoint``: the weights through :meth:`save_model`, the
        optimizer, scheduler, scaler, random and trainer states, written in place into
        ``<output_dir>/checkpoint-<step>``), with what is ours around it, so that a kill at any point leaves a
        checkpoint the resume can trust:

        1. before it, a ``checkpoint-<step>`` a killed save of this step left removed, and ``run_identity.json``
           written into it (a folder holding it and no manifest is a save that never finished);
        2. inside it, transformers' Hub push and rotation (``save_total_limit``), as transformers does them; the
           newest complete checkpoint is hard-linked aside before it, so a rotation that deletes it before the new
           checkpoint is marked still leaves one to resume from;
        3. after it, the checkpoint parts (the EMA, the rewind's snapshot, the online generations); once every
           process is done, the engine's unused files removed and ``checkpoint_manifest.json`` (every file's size and
           SHA-256) written last: it marks the checkpoint complete, and the resume trusts no other
           (:mod:`.io.checkpoints`); what was set aside is deleted. Files callbacks write in ``on_save`` are added to
           the manifest by the trainer's own ``on_save``, which runs after theirs.

        A save failing on the filesystem (a full disk) removes its partial folder and raises
        :class:`.io.checkpoints.CheckpointSaveError` naming the folder and the bytes needed; the complete
        checkpoints are untouched."""
        save = self.files.checkpoint_save()  # this step's folder, and what its save sets aside
        try:
            save.begin()
            super()._save_checkpoint(model, trial)
            save.finish()
        except Exception as err:
            failure = save.failed(err)
            if failure is None:
                raise
            raise failure from err

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """The LoRA adapters or the denoiser of a checkpoint (diffusers' files), loaded into the engine's shards where
        it shards them; DeepSpeed loads its own engine state beside (transformers does not call this under it)."""
        self.files.load_weights(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the weights of the best checkpoint, through :meth:`_load_from_checkpoint`."""
        self.files.load_best_model()

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
    ) -> None:
        """Write ``README.md`` in ``output_dir``: the base model, the method and its paper, the hyperparameters, the
        validation grid and a usage example that loads the weights with diffusers
        (:meth:`.io.hub.RunHub.create_model_card`; arguments given once are remembered for later pushes' cards)."""
        self.files.hub.create_model_card(model_name, dataset_name, tags, license)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the Hub repo (``hub_model_id``, else the output folder's name); transformers' ``__init__`` calls it
        with ``push_to_hub``."""
        self.files.hub.init_hf_repo(token, private)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ):
        """Save the weights and a model card (``kwargs``: :meth:`create_model_card`'s) to ``output_dir`` and upload
        that folder, once the checkpoint pushes still running are done; transient Hub errors are retried
        (:meth:`.io.hub.RunHub.push_to_hub`)."""
        return self.files.hub.push_to_hub(commit_message, blocking, token, revision, private, **kwargs)

    # ------------------------------------------------------------------ the step

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, overwrite: bool = False, **kwargs: Any
    ):
        """``super().train(...)``, resumed only from a complete checkpoint, under the checks of
        :meth:`.io.run_files.RunFiles.training`: the output folder's lock (a new run into a folder holding another
        run's weights or checkpoints is refused unless ``resume_from_checkpoint`` or ``overwrite`` is given; with
        ``overwrite`` that run's checkpoints are removed), what an interrupted save left finished or removed,
        ``resume_from_checkpoint`` (``True``: the newest complete checkpoint; a path: refused with the reason where it
        is incomplete or damaged) checked against this run's config, its parts loaded, and the preemption signals
        handled while it runs. The losses logged and returned are transformers' (after a resume: over the resumed
        steps)."""
        self.nonfinite.reset()  # what an interrupted train() left in the fused optimizer
        with (
            self.mixed_precision_forward.running(),
            self.files.training(resume_from_checkpoint, overwrite) as checkpoint,
        ):
            return super().train(checkpoint, *args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        self.nonfinite.optimizer = super().create_optimizer(model)  # the guard drops and skips through it
        return self.nonfinite.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """``transformers.Trainer.training_step`` running :meth:`compute_loss`: the placement, the loss's division by
        the accumulation window, the engine's backward and the cache clearing are Trainer's. A safeguard whose rule
        keeps the branches' gradients apart (the parameter and update spaces) brings passes that run inside that step
        (:meth:`_training_step_in_passes`). After it: the logged loss kept finite, on the device."""
        if self.engine.input_dtype() is not None and "pair_scores" in inputs:
            # Trainer casts every floating input to DeepSpeed's dtype; SmPO's scores are data, not model inputs, and
            # bf16 steps of 1e-3 near 0.2 would move a 0.01 score gap by 10%: their float32 bits travel as int32.
            inputs = {**inputs, "pair_scores": inputs["pair_scores"].float().view(torch.int32)}
        stage = getattr(self.safeguard, "backward_stage", None)
        if stage is None:
            loss = super().training_step(model, inputs, num_items_in_batch)
        else:
            loss = self._training_step_in_passes(stage, model, inputs, num_items_in_batch)
        # A non-finite micro-batch never reaches the weights (see NonFiniteLossGuard); keep it out of the logged
        # loss as well, on the device: transformers' logging_nan_inf_filter would make the host wait every step.
        return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))

    def _training_step_in_passes(self, stage: Any, model, inputs, num_items_in_batch) -> torch.Tensor:
        """Trainer's step with the exact rule's passes (built by the safeguard's ``backward_stage``: its module alone
        loads them) entered around it; :meth:`compute_loss` runs their forward and the loss it returns carries their
        backward into Trainer's. Then the safeguard's hook (``lambda``, and ``g_w + lambda * h_l`` written), unless
        the engine's placement ran it already, and ``mu`` adapted on the micro-batch's errors."""
        policy = model if stage.through_engine else self._unwrapped(model)
        steps, sync = self.current_gradient_accumulation_steps, self.accelerator.sync_gradients
        placement = self.engine.passes_placement  # where the engine lets the passes run in Trainer's step
        hook = self._combine if placement == "with_combination" else None  # else after Trainer's step
        with stage.in_step(policy, steps, sync, self.compute_loss_context_manager, placement, hook) as passes:
            self._passes = passes
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._passes = None
        if passes.evaluation is None:  # every row was invalid, one process: no pass ran
            return loss
        lambdas = passes.lambdas if passes.lambdas is not None else self._combine(passes.branches)
        contributes = passes.window.contributes
        self.safeguard.margin.adapt(passes.evaluation.errors, contributes, sync)  # once the hook has read mu
        if not contributes:  # a zero-weighted replay: its loss and metrics are its peers'
            return torch.zeros_like(loss)
        for name, value in lambdas.items():
            if value is not None:
                self._metrics["train"][name].append(value)
        return loss

    def _combine(self, branches: Any) -> dict[str, torch.Tensor | None]:
        """The safeguard's hook after the branches' backward: ``lambda``, and ``g_w + lambda * h_l`` written."""
        return self.safeguard.combine(branches, self.optimizer)

    def objective_in_force(self) -> PreferenceObjective:
        """The objective with the ``beta`` in force (the :attr:`auto_beta`'s, or the configured one)."""
        return self.objective if self.auto_beta is None else self.auto_beta.objective(self.objective)

    def values_in_force(self) -> dict[str, float]:
        """What each training log carries of the objective and the safeguard in force: ``beta`` with the
        :attr:`auto_beta`, and the safeguard's ``safeguard/mu`` (one host read each, at a log)."""
        values = {} if self.auto_beta is None else {"beta": self.auto_beta.current()}
        if self.safeguard is not None:
            values["safeguard/mu"] = self.safeguard.margin.current()
        return values

    def training_states(self) -> dict[str, Any]:
        """What the objective and the safeguard in force have learnt, by name, each with ``state_dict()`` /
        ``load_state_dict()``: the :attr:`auto_beta` and the safeguard's ``mu`` (``safeguard.margin``: adapted with
        ``safeguard_mu="auto"``, raised by ``on_pathology="escalate"``). Every checkpoint keeps them."""
        states: dict[str, Any] = {} if self.auto_beta is None else {"auto_beta": self.auto_beta}
        if self.safeguard is not None:
            states["safeguard_mu"] = self.safeguard.margin
        return states

    @contextlib.contextmanager
    def sampling_weights(self):
        """The weights validation samples from: the EMA's with ``ema_decay``, else the trained ones."""
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            yield

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """A micro-batch's Diffusion-DPO loss: batch -> noised pair -> predictions of the policy and the reference
        -> [the output space's ``lambda`` on the loser error's gradient] -> denoising errors -> objective; its
        metrics kept on the device (reduced at each log). A zero-weighted replay (several processes, a micro-batch
        that lost every row) weighs zero and records nothing. An evaluation micro-batch records the ``lambda`` a
        safeguard would take (nothing is weighted without a backward). Under the exact rule's passes (the parameter
        and update spaces) the forward is theirs to run, once per pass."""
        mode = "train" if model.training else "eval"
        inputs, replay = self._batch(inputs, mode)
        if inputs is None:  # every row was invalid, one process: contribute nothing, keep the graph connected
            loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return (loss, {}) if return_outputs else loss
        passes = self._passes if mode == "train" else None
        policy = model if passes is None else passes.policy
        noised = self.stages.noised_pair(policy, inputs, mode, self.state.global_step)
        objective = self.objective_in_force()  # one beta for every pass of the micro-batch
        scores = inputs.get("pair_scores")
        if scores is not None and scores.dtype == torch.int32:  # float32 bits past Trainer's cast (training_step)
            scores = scores.view(torch.float32)
        safeguard, lambdas = self.safeguard, {}

        def forward(separate_branches: bool) -> tuple[Evaluation, PreferencePredictions]:
            predictions = self.stages.predict_noised(policy, noised, separate_branches)
            weight = None
            if safeguard is not None and mode == "train":
                weight = safeguard.loser_weight(predictions, not replay)
                lambdas.update({} if weight is None else {"safeguard/lambda": weight})
            elif safeguard is not None:
                lambdas.update(safeguard.evaluation_lambdas(predictions, contributes=not replay))
            return evaluate_objective(objective, predictions, scores, loser_weight=weight), predictions

        if passes is None:
            evaluation = forward(False)[0]
            loss = evaluation.loss * 0.0 if replay else evaluation.loss
        else:  # the loss carries the passes' backward into Trainer's (their hook follows it)
            loss = passes.loss(noised.num_pairs, forward, contributes=not replay)
            evaluation = passes.evaluation
        if mode == "train":
            sync = self.accelerator.sync_gradients
            if self.auto_beta is not None:  # the next micro-batches' beta: its window closes with the step's last
                self.auto_beta.adapt(evaluation.errors, not replay, sync)
            if safeguard is not None and passes is None:  # mu with safeguard_mu="auto", once the rule has read it
                safeguard.margin.adapt(evaluation.errors, not replay, sync)
            if not replay:
                self.nonfinite.flag(loss)
                record_step_metrics(self._metrics[mode], evaluation, lambdas, noised, self.noiser.num_train_timesteps)
        elif not replay:
            record_metrics(self._metrics[mode], evaluation.errors, evaluation.output, lambdas)
        return (loss, {"logits": evaluation.output.logits}) if return_outputs else loss

    def _batch(self, inputs: dict[str, torch.Tensor], mode: str) -> tuple[dict[str, torch.Tensor] | None, bool]:
        """The batch stage: count the rows the collator skipped; a micro-batch with none left is left out (one
        process) or replayed with weight zero (several; see :class:`.step.stages.UsableBatches`)."""
        if mode == "train":
            self.stream_guard.observe(inputs)  # valid pairs and skipped rows per optimizer step
        self._metrics[mode]["data/skipped_rows"].append(inputs["num_skipped"].detach().float())
        return self.batches(inputs, mode, self.accelerator.num_processes, self.accelerator.process_index)

    def _blank_batch(self, mode: str) -> dict[str, Any] | None:
        """A placeholder pair on the device, for a process whose first micro-batch lost every row while its peers
        train (:class:`.step.stages.UsableBatches`); ``None`` where the collator makes none (a latent cache's rows
        were all checked when it was built)."""
        collator = self.data_collator if mode == "train" else self._eval_collator_in_use
        blank = getattr(collator, "blank_batch", None)
        return None if blank is None else self.place_inputs(blank())

    def place_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch's tensors on the device, the floating ones in the engine's input dtype where it has one
        (DeepSpeed's bf16/fp16, as transformers casts them), except the pair scores: data for SmPO's weights, not model
        inputs, kept in float32 (bf16 steps of 1e-3 near 0.2 move a 0.01 score gap by 10%)."""
        return place_batch(inputs, self.args.device, self.engine.input_dtype(), keep_float32=("pair_scores",))

    # ------------------------------------------------------------------ logging and evaluation

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        prefix = self._eval_metric_prefix  # set while evaluate() runs
        mode = "train" if prefix is None else "eval"
        reduced = reduce_logged_metrics(self._metrics[mode], self.metric_names(), self.args, self.accelerator)
        if mode == "train":
            reduced["nonfinite_skipped"] = float(self.nonfinite.take_skipped())
            reduced.update(self.values_in_force())  # the beta and mu the next steps train with
            if "loss" in logs or "train_loss" in logs:  # a step's log or the run's last, not the time's alone
                reduced.update(self._next_log)
                self._next_log = {}
        else:
            reduced = {f"{prefix}_{k}": v for k, v in reduced.items()}
        # In place: evaluate() returns this very dict, and on_evaluate callbacks (best-model tracking) read it.
        logs.update(reduced)
        super().log(logs, start_time)

    def callbacks_of(self, kind: type | tuple[type, ...] | str) -> list[TrainerCallback]:
        """The registered callbacks that are instances of ``kind``, in the order transformers runs them: the one way
        the package finds a callback. ``kind`` is a class or a tuple of classes (a tracker, registered in a
        :class:`~.io.trackers.TrackerCallback`, is found by its own class and returned itself), or the
        ``"module:Class"`` name of a class whose module a run loads only when it uses it (the EMA, the probe, the
        validation grids) or whose import would close a cycle: where that module is not loaded, nothing of the class
        is registered."""
        return _instances_of(self.callback_handler.callbacks, kind)

    def add_callback(self, callback: type[TrainerCallback] | TrainerCallback) -> None:
        """As ``Trainer.add_callback``, placed before the reporting callbacks, so that they receive and print what it
        writes into a log: one of transformers' trackers (``TensorBoardCallback``, ...) is registered in a
        :class:`~.io.trackers.TrackerCallback`, which hands it the model with a config it can write, after the other
        trackers; any other callback before every tracker and the console's callback. Run control of a kind the
        config builds is refused beside the field that builds it (an ``EMAWeights`` beside ``ema_decay``, ...), and
        an alarm on the training logs replaces the one ``on_pathology`` builds."""
        callback = callback() if isinstance(callback, type) else callback
        if not is_tracker(callback):
            _refuse_beside_config(self.callbacks_of(TrainerCallback), [callback], self.args)
            if isinstance(callback, AlarmCallback) and callback.signal.event == "log":
                for configured in self.callbacks_of(TrainingLogAlarm):
                    super().remove_callback(configured)
        self._register(callback)

    def _register(self, callback: TrainerCallback) -> None:
        """``callback`` registered before the reporting callbacks (:meth:`add_callback`), without its refusals."""
        if is_tracker(callback):
            from .io.trackers import tracker_callback  # loaded with the first tracker

            callback, moved = tracker_callback(callback), self.callbacks_of(console_callbacks())
        else:
            moved = self.callbacks_of((*loaded_class(TRACKER_CALLBACK), *console_callbacks()))
        for reporting in moved:
            super().remove_callback(reporting)
        super().add_callback(callback)
        for reporting in moved:
            super().add_callback(reporting)

    def pop_callback(self, callback: type[TrainerCallback] | TrainerCallback) -> TrainerCallback | None:
        """As ``Trainer.pop_callback``; a tracker is found by its class or instance and returned itself."""
        registered = self._tracker_named(callback)
        if registered is None:
            return super().pop_callback(callback)
        super().remove_callback(registered)
        return registered.tracker

    def remove_callback(self, callback: type[TrainerCallback] | TrainerCallback) -> None:
        """As ``Trainer.remove_callback``; a tracker is found by its class or instance."""
        super().remove_callback(self._tracker_named(callback) or callback)

    def _tracker_named(self, callback: type[TrainerCallback] | TrainerCallback) -> TrackerCallback | None:
        """The :class:`~.io.trackers.TrackerCallback` that ``callback`` (a tracker's class or instance) names."""
        return next((c for c in self.callbacks_of(TRACKER_CALLBACK) if c.matches(callback)), None)

    def _add_configured_run_control(self, args: DiffusionSDPOConfig, probe_pairs: Dataset | None) -> None:
        """The run control the config asks for, built with the trainer's pieces now that it has them and registered
        after the callbacks given, before the reporting ones, in this order (docs/compose.md): the alarm on the
        training logs (``on_pathology``; unless one given reads them), the probe (``probe_steps``) and the probe's
        alarm, which reads the reading the probe published at the same step's end. The probe alarm's action is
        ``on_pathology``'s (the training logs' alarm's, whose record it shares), or the rewind."""
        alarm = None
        if self.alarm is None:  # none given reads the training logs
            alarm = TrainingLogAlarm(TrainingLogSignal(), PathologyAction(args.on_pathology), trainer=self)
            self._register(alarm)
        if not args.probe_steps:  # the probe's modules load only then
            return
        probe = run_callbacks.probe_for_trainer(self, probe_pairs)
        if args.on_pathology == "rewind":
            action = run_callbacks.RewindAction()
        else:
            action = alarm.action if alarm is not None else PathologyAction(args.on_pathology)
        self._register(probe)
        self._register(AlarmCallback(run_callbacks.ProbeSignal(probe), action, trainer=self))

    def log_next(self, metrics: Mapping[str, float]) -> None:
        """Put ``metrics`` into the next training log: a callback that measures between logs (the held-out probe and
        its alarm, in ``on_step_end``) hands its figures here, and :meth:`log` adds them before transformers records
        the log, so ``state.log_history``, every callback's ``on_log`` and the ``report_to`` integrations receive
        them. A key handed again before that log replaces the earlier value."""
        self._next_log.update(metrics)

    def metric_names(self) -> list[str]:
        """The metrics each micro-batch records (the data's, the objective's, the safeguard's): the same list on every
        process, since :meth:`log` reduces them together."""
        return step_metric_names(self.objective, () if self.safeguard is None else self.safeguard.metric_names)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        # A fresh seeded generator per evaluation: the same noise, timesteps and VAE samples every time.
        self.stages.draws.start_evaluation(self.args.seed)
        self._eval_metric_prefix = metric_key_prefix
        try:
            with self.mixed_precision_forward.running():
                return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self.stages.draws.end_evaluation()
            self._eval_metric_prefix = None

    def get_eval_dataloader(self, eval_dataset=None):
        collator = self._eval_collator_in_use = eval_collator_for(self._eval_collator, eval_dataset)
        train_collator, self.data_collator = self.data_collator, collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self.place_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
