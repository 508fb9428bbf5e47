"""The held-out probe's alarm, and ``on_pathology="rewind"``: back to the last step the probe called healthy.

The alarm (:class:`ProbeAlarmRule`, from the config's ``probe_alarm_rise`` and ``probe_alarm_z``:
:func:`probe_alarm`) reads the probe's reduced figures (:mod:`.probe`), so every process reaches the same verdict at
the same step. It reads the pathology as the paper defines it (Fu et al., arXiv 2511.03317: the winner's denoising
error rising above the reference's) as a share of the reference's error (:func:`relative_winner_rise`,
``probe/delta_winner / probe/mse_ref_winner``), counted where the probe tells the rise from zero
(``probe/winner_rise_z`` above ``probe_alarm_z``): it fires at the first probe whose rise exceeds
``probe_alarm_rise``. One rule, offline and online, for any model's scale and probe size; chosen on recorded runs with
one model and one dataset held out of the choice (benchmarks/research/alarm.md); :class:`~.probe_signal.ProbeSignal`
counts it. Every ``on_pathology`` reads it when the probe
runs: ``rewind`` rewinds (:class:`RewindAction`, below); the others act through the run's pathology action
(:meth:`~.guards.PathologyAction.on_probe`: ``warn`` warns, naming the step a rewind would restore; ``stop`` stops;
``safeguard`` switches; ``escalate`` raises ``mu``).

A rewind goes back to a restore point, by a criterion stricter than the alarm's (:meth:`ProbeAlarmRule.restorable`):
a probe whose ``probe/winner_rise_z`` is at most :data:`RESTORE_Z` (1.645, a rise the probe cannot tell from zero),
not merely one below ``probe_alarm_z``; where no probe since the start was one, the start. At every restore point
(and when training begins) :class:`RewindAction` keeps one snapshot of the trainable weights, the optimizer's state and
every other state that moves with them (:func:`companions`: the EMA weights of ``ema_decay``, the auto-beta's and
``safeguard_mu="auto"``'s state, the fp16 gradient scaler's): in memory for LoRA, in ``<output_dir>/rewind-healthy/``
for full tuning (one snapshot at a time: about three times the trainable weights with Adam, four with the EMA). One
is enough: whether a probe is a restore point is decided when it is read, and a rewind goes back to the latest. When
the alarm fires, every process puts all of them back to that snapshot (the learning-rate schedule, the step count and
the data order go on counting), logs ``health/rewind_to`` (the step restored) and responds as the evidence supports
for its regime:

* an offline Diffusion-DPO run (``safeguard_space="none"``) goes on from the healthy weights with the safeguard
  ``on_pathology="safeguard"`` switches to (:func:`~.health.switch_target`: the one fixed setting that held where
  Diffusion-DPO's held-out reward fell); should the alarm fire again, the run rewinds once more and stops;
* a run with a safeguard already on stops with the healthy weights as the result (a larger fixed ``mu`` or the
  update space are choices for the next run, not a switch the engine was checked for).

A checkpoint keeps the alarm's state (the restore point and its reading, the unhealthy probes in a row, the rewinds,
whether the safeguard is on) in ``trainer_state.json`` and the snapshot in ``rewind-healthy/`` inside the checkpoint:
a part of the checkpoint (:meth:`RewindAction.save`, through its alarm's callback), written before it is published and
listed in its manifest, so a kill leaves either the previous checkpoint or a whole new one, each with its snapshot,
and a resumed run rewinds as the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config.fields import DiffusionSDPOConfig
from ..config.file_modes import follow_umask
from ..engines.base import trainable_parameters
from .health import start_weights_sentence, switch_target
from .learning_rate import scale_learning_rate
from .state_files import read_state, write_state

__all__ = [
    "RESTORE_Z",
    "REWIND_FOLDER",
    "Companion",
    "DiskSnapshot",
    "EngineSnapshot",
    "MemorySnapshot",
    "ProbeAlarmRule",
    "RewindAction",
    "RewindRecord",
    "alarm_steps",
    "companions",
    "probe_alarm",
    "relative_winner_rise",
    "restore_point_note",
]

logger = logging.getLogger(__name__)

#: the snapshot's folder, in the output folder (full tuning) and inside each checkpoint
REWIND_FOLDER = "rewind-healthy"
#: a rewind's restore point: a probe whose ``probe/winner_rise_z`` is at most this, the one-sided 95 % point of the
#: normal: the probe cannot tell the winner error's rise from zero there (its one-sided 95 % confidence bound includes
#: 0). Stricter than the alarm's significance floor (``probe_alarm_z``), which says only that a probe's rise is not
#: yet both large and significant: a reading of z = 4 is not one to go back to.
RESTORE_Z = 1.645
#: the companions' states (:func:`companions`) are ``companions.safetensors`` and ``companions.json``
#: (:func:`~trl_diffusion_sdpo.callbacks.state_files.write_state`), never a pickle
_WEIGHTS, _OPTIMIZER, _COMPANIONS = "weights.safetensors", "optimizer.pt", "companions"


def relative_winner_rise(metrics: Mapping[str, float]) -> float:
    """The held-out winner error's rise as a share of the reference's error, ``r_t = probe/delta_winner /
    probe/mse_ref_winner`` (``nan`` where either is missing or the reference's error is not positive).

    Unlike ``probe/winner_rise_z``, whose value for one rise grows with the square root of the probe's pairs and
    draws and differs with the spread of a model's errors, ``r_t`` has no unit and its expectation does not depend
    on the probe's size: a rise of half the reference's error reads 0.5 on 4 held-back pairs and on an eval split of
    64, on any model."""
    delta = metrics.get("probe/delta_winner", math.nan)
    reference = metrics.get("probe/mse_ref_winner", math.nan)
    return delta / reference if reference > 0 else math.nan


@dataclass(frozen=True)
class ProbeAlarmRule:
    """The held-out probe's alarm on the series of its readings ``z_1, z_2, ...`` of ``probe/winner_rise_z`` (a
    reading without a spread to measure, ``nan``: fewer than two pair-draws, reads as ``z_t = 0``, no rise) and
    ``r_1, r_2, ...`` of the relative rise (:func:`relative_winner_rise`).

    * ``statistic="relative_rise"`` (:meth:`relative`, the config's rule): probe ``t`` is unhealthy when
      ``r_t > rise`` while ``z_t > threshold`` (the significance floor: a rise the probe tells from zero); the alarm
      fires at the ``patience``-th unhealthy probe in a row, as ``in_a_row`` counts them.

    * ``statistic="in_a_row"``: probe ``t`` is unhealthy when ``z_t > threshold``; with ``n_0 = 0`` and
      ``n_t = n_(t-1) + 1`` at an unhealthy probe, ``0`` at a healthy one, the alarm fires at the probe where ``n_t``
      reaches ``patience``.
    * ``statistic="cusum"`` (:meth:`cusum`): the one-sided CUSUM ``S_0 = 0``,
      ``S_t = max(0, S_(t-1) + z_t - threshold)`` (``threshold``: the allowance ``k``, the reading a healthy run
      stays below), fires at the probe where ``S_t > limit`` (``h``); ``patience`` is not read. Evidence adds up over
      probes, so a rise well above ``k`` fires at once and one just above it after a few probes.

    Either statistic counts afresh from 0 after it fires (:meth:`advance`, :func:`alarm_steps`).

    A rewind goes back to the last probe that is a restore point (:meth:`restorable`), by a criterion stricter than
    the alarm's: ``z_t`` at most ``min(restore_z, threshold)``, a rise the probe cannot tell from zero.
    """

    patience: int
    threshold: float
    restore_z: float = RESTORE_Z
    statistic: str = "in_a_row"
    limit: float = 0.0
    rise: float = 0.0

    #: the probe's figure the rule reads (:func:`~.probe.winner_rise_z`)
    SIGNAL = "probe/winner_rise_z"

    @classmethod
    def cusum(cls, allowance: float, limit: float, restore_z: float = RESTORE_Z) -> ProbeAlarmRule:
        """The CUSUM rule with allowance ``k = allowance`` and limit ``h = limit``."""
        return cls(patience=1, threshold=allowance, restore_z=restore_z, statistic="cusum", limit=limit)

    @classmethod
    def relative(cls, rise: float, z_floor: float, patience: int = 1, restore_z: float = RESTORE_Z) -> ProbeAlarmRule:
        """The relative-rise rule: unhealthy where ``r_t > rise`` and ``z_t > z_floor``, firing at ``patience`` such
        probes in a row."""
        return cls(patience=patience, threshold=z_floor, restore_z=restore_z, statistic="relative_rise", rise=rise)

    def unhealthy(self, metrics: Mapping[str, float], step: int) -> bool:
        """Whether the probe of optimizer step ``step`` (``metrics``: its reduced figures) shows the pathology: its
        ``z`` above ``threshold`` (for the CUSUM: a reading that adds to the sum; for the relative rise, also its
        ``r`` above ``rise``)."""
        if self.statistic == "relative_rise" and not relative_winner_rise(metrics) > self.rise:
            return False
        return metrics[self.SIGNAL] > self.threshold

    def restorable(self, metrics: Mapping[str, float], step: int) -> bool:
        """Whether the probe of step ``step`` is a point a rewind may go back to: healthy for the alarm and its
        ``z`` at most ``min(restore_z, threshold)`` (``nan``, no spread to measure, tells no rise from zero)."""
        return not self.unhealthy(metrics, step) and not metrics[self.SIGNAL] > min(self.restore_z, self.threshold)

    def describe_restore(self) -> str:
        """The restore criterion in words, for the start summary and the records."""
        return (
            f"{self.SIGNAL} at most {min(self.restore_z, self.threshold):g}, a rise of the winner's error the probe "
            "cannot tell from zero"
        )

    def count(self, in_a_row: int, unhealthy: bool) -> tuple[int, bool]:
        """``(n_t, fired)`` of ``statistic="in_a_row"``: the unhealthy probes in a row after a probe (``unhealthy``:
        its verdict) that followed ``in_a_row`` of them, and whether the alarm fires at it (``n_t`` then starts again
        from 0)."""
        in_a_row = in_a_row + 1 if unhealthy else 0
        return (0, True) if in_a_row >= self.patience else (in_a_row, False)

    def advance(self, state: float, metrics: Mapping[str, float], step: int) -> tuple[float, bool]:
        """``(state_t, fired)``: the statistic after the probe of step ``step`` (``metrics``) that followed
        ``state`` (``n_(t-1)`` or ``S_(t-1)``), and whether the alarm fires at it (the statistic then starts again
        from 0)."""
        if self.statistic != "cusum":
            in_a_row, fired = self.count(int(state), self.unhealthy(metrics, step))
            return float(in_a_row), fired
        z = metrics[self.SIGNAL]
        total = max(0.0, state + (0.0 if math.isnan(z) else z) - self.threshold)
        return (0.0, True) if total > self.limit else (total, False)

    def describe(self) -> str:
        if self.statistic == "relative_rise":
            count = "at a single probe" if self.patience == 1 else f"for {self.patience} probes in a row"
            return (
                f"the held-out winner error's rise over the reference's above {self.rise:g} of the reference's error "
                f"(probe/delta_winner / probe/mse_ref_winner) with {self.SIGNAL} above {self.threshold:g} {count}"
            )
        if self.statistic == "cusum":
            return (
                f"the CUSUM of {self.SIGNAL} (the held-out winner error's rise over the reference's, in standard "
                f"errors across the probe's pairs and noise draws), S_t = max(0, S_(t-1) + z_t - {self.threshold:g}), "
                f"above {self.limit:g}"
            )
        count = "at a single probe" if self.patience == 1 else f"for {self.patience} probes in a row"
        return (
            f"{self.SIGNAL} (the held-out winner error's rise over the reference's, in standard errors across the "
            f"probe's pairs and noise draws) above {self.threshold:g} {count}"
        )


def alarm_steps(rule: ProbeAlarmRule, probes: Iterable[tuple[int, Mapping[str, float]]]) -> list[int]:
    """The steps at which ``rule`` fires on a run's probes (``(step, metrics)`` in order), nothing acting on them:
    the calibration's replay of a stored series and what :class:`~.probe_signal.ProbeSignal` does as the run goes."""
    state, fired = 0.0, []
    for step, metrics in probes:
        state, fires = rule.advance(state, metrics, step)
        if fires:
            fired.append(step)
    return fired


def probe_alarm(args: Any) -> ProbeAlarmRule:
    """The alarm's rule for ``args``'s run: the relative rise above its config's ``probe_alarm_rise`` with
    ``probe/winner_rise_z`` above ``probe_alarm_z``, at a single probe (:meth:`ProbeAlarmRule.relative`), whose
    defaults (the config's fields) were chosen on recorded runs of the calibration model and dataset, offline and
    online, LoRA and full tuning, and checked on a held-out model and dataset:
    ``benchmarks/results/probe/cpu-probe-alarm-carry.json`` (``benchmarks/studies/probe_alarm_carry.py``,
    benchmarks/research/alarm.md)."""
    return ProbeAlarmRule.relative(args.probe_alarm_rise, args.probe_alarm_z)


def restore_point_note(step: int, z: float | None, rule: ProbeAlarmRule) -> str:
    """How healthy a restore point was, in words, for the records: step ``step`` (0: the start) and its probe's
    ``probe/winner_rise_z`` ``z`` (``None``: not on record), against ``rule``'s restore criterion; a point that fails
    it is called unhealthy."""
    if step == 0:
        return f"the start of training: no probe before had {rule.describe_restore()}"
    if z is None:
        return "its probe reading is not on record, so whether it was healthy is unknown"
    if math.isnan(z):
        return "its probe had no spread to measure, so it could not tell a rise from zero"
    if rule.restorable({rule.SIGNAL: z}, step):
        return f"{rule.SIGNAL} {z:.2f} there, a rise the probe cannot tell from zero"
    bound = min(rule.restore_z, rule.threshold)
    return f"an unhealthy point: its {rule.SIGNAL} {z:.2f} is above the restore criterion's {bound:g}"


@dataclass(frozen=True)
class Companion:
    """A state that moves with training beside the weights and the optimizer, so a rewind puts it back with them:
    ``get()`` returns it (live tensors may be returned: the snapshot copies them), ``put(state)`` restores a copy."""

    name: str
    get: Callable[[], Any]
    put: Callable[[Any], None]

    @classmethod
    def of(cls, name: str, held: Any) -> Companion:
        """The companion read and put back through ``held``'s public ``state_dict()`` / ``load_state_dict()``."""
        return cls(name, held.state_dict, held.load_state_dict)


def companions(trainer: Any) -> list[Companion]:
    """What moves with ``trainer``'s training besides the trainable weights and the optimizer's state, each read and
    put back through its own ``state_dict()`` / ``load_state_dict()``: the EMA weights (``ema_decay``,
    :class:`~.ema.EMAWeights`), the objective's auto-beta (``auto_beta``, ``trainer.auto_beta``), the safeguard's
    ``mu`` with ``safeguard_mu="auto"`` (``trainer.safeguard.margin``) and the gradient scaler (fp16, accelerate's).
    A fixed ``mu`` moves only with ``on_pathology="escalate"``, which a rewinding run does not have."""
    margin = None if trainer.safeguard is None else trainer.safeguard.margin
    held = {
        "ema": trainer.ema,
        "auto_beta": trainer.auto_beta,
        "safeguard_mu": margin if margin is not None and margin.auto else None,
        "grad_scaler": trainer.accelerator.scaler,
    }
    return [Companion.of(name, state) for name, state in held.items() if state is not None]


class MemorySnapshot:
    """The trainable weights, the optimizer's state and the :class:`Companion` states of one step, kept in memory
    (clones, never views)."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], companions: Sequence[Companion] = ()) -> None:
        self.parameters = list(parameters)
        # counted whole, before an engine partitions them (a ZeRO-3 parameter's own numel is then 0)
        self.elements = sum(p.numel() for p in self.parameters)
        self.companions = list(companions)
        self.weights: list[torch.Tensor] | None = None
        self.optimizer_state: dict[str, Any] | None = None
        self.companion_states: dict[str, Any] = {}

    def where(self) -> str:
        return "in memory"

    def take(self, optimizer: torch.optim.Optimizer) -> None:
        self.weights = [p.detach().clone() for p in self.parameters]
        # Copies: the live states would move on with training.
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())
        self.companion_states = {c.name: copy.deepcopy(c.get()) for c in self.companions}

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        weights, state, companion_states = self._load()
        with torch.no_grad():
            for parameter, saved in zip(self.parameters, weights, strict=True):
                parameter.copy_(saved)
        # Copies: the optimizer and the companions keep the tensors they are given and update them in place.
        with _schedule_kept(optimizer):
            optimizer.load_state_dict(copy.deepcopy(state))
        for companion in self.companions:
            companion.put(copy.deepcopy(companion_states[companion.name]))

    def _load(self) -> tuple[list[torch.Tensor], dict[str, Any], dict[str, Any]]:
        if self.weights is None or self.optimizer_state is None:
            raise RuntimeError("the rewind has no healthy snapshot to restore")
        return self.weights, self.optimizer_state, self.companion_states

    def write(self, folder: str) -> None:
        """The snapshot into ``folder`` (a checkpoint's): the weights as safetensors, the optimizer's state as
        ``torch.save`` writes it (read back with ``weights_only=True``), the companions' states as safetensors and
        JSON."""
        weights, state, companion_states = self._load()
        os.makedirs(folder, exist_ok=True)
        save_file(
            {str(i): w.detach().cpu().contiguous() for i, w in enumerate(weights)}, os.path.join(folder, _WEIGHTS)
        )
        torch.save(state, os.path.join(folder, _OPTIMIZER))
        write_state(folder, _COMPANIONS, companion_states)

    def read(self, folder: str) -> None:
        """The snapshot :meth:`write` put in ``folder``."""
        self.weights, self.optimizer_state, self.companion_states = _read(folder, self.parameters)


class DiskSnapshot(MemorySnapshot):
    """The same snapshot written to ``folder`` (full tuning: the whole denoiser and its optimizer state would double
    the memory a run needs), read back when restored. Every process writes its own folder's copy only on the main
    process; the others read it after the main one has written it (``wait``)."""

    def __init__(
        self,
        parameters: Sequence[torch.nn.Parameter],
        folder: str,
        main: bool,
        wait: Callable[[], None],
        companions: Sequence[Companion] = (),
    ) -> None:
        super().__init__(parameters, companions)
        self.folder, self.main, self.wait = folder, main, wait
        self.taken = False

    def where(self) -> str:
        return f"on disk in {self.folder}"

    def take(self, optimizer: torch.optim.Optimizer) -> None:
        if self.main:
            tmp = f"{self.folder}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(self.parameters)},
                      os.path.join(tmp, _WEIGHTS))  # fmt: skip
            torch.save(optimizer.state_dict(), os.path.join(tmp, _OPTIMIZER))
            write_state(tmp, _COMPANIONS, {c.name: c.get() for c in self.companions})
            follow_umask(tmp)  # safetensors writes its file owner-only
            shutil.rmtree(self.folder, ignore_errors=True)
            os.replace(tmp, self.folder)
        self.wait()
        self.taken = True

    def _load(self) -> tuple[list[torch.Tensor], dict[str, Any], dict[str, Any]]:
        if not self.taken:
            raise RuntimeError("the rewind has no healthy snapshot to restore")
        return _read(self.folder, self.parameters)

    def read(self, folder: str) -> None:
        if self.main:
            shutil.rmtree(self.folder, ignore_errors=True)
            shutil.copytree(folder, self.folder)
        self.wait()
        self.taken = True


class EngineSnapshot(DiskSnapshot):
    """The snapshot under an engine that shards the trainable weights or their optimizer state (DeepSpeed ZeRO-1/2/3,
    FSDP2; :attr:`~trl_diffusion_sdpo.engines.Engine.shards_training_state`), in ``folder``: every process writes
    its own part through the engine (:meth:`~trl_diffusion_sdpo.engines.Engine.save_training_state`) and reads its
    own part back at a rewind; the companions' states, the same on every process, are the main process's file. The
    folder is written aside and renamed once every process has written its part.

    Args:
        engine: the run's engine, which writes and reads each process's part.
        *args, **kwargs: :class:`DiskSnapshot`'s.
    """

    def __init__(self, engine: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine = engine

    def where(self) -> str:
        return f"on disk in {self.folder}, each process's own part"

    def take(self, optimizer: torch.optim.Optimizer) -> None:
        tmp = f"{self.folder}.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.wait()
        self.engine.save_training_state(tmp, optimizer)
        if self.main:
            write_state(tmp, _COMPANIONS, {c.name: c.get() for c in self.companions})
        self.wait()  # every process's part is written
        if self.main:
            follow_umask(tmp)
            shutil.rmtree(self.folder, ignore_errors=True)
            os.replace(tmp, self.folder)
        self.wait()
        self.taken = True

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.taken:
            raise RuntimeError("the rewind has no healthy snapshot to restore")
        with _schedule_kept(optimizer):
            self.engine.load_training_state(self.folder, optimizer)
        states = read_state(self.folder, _COMPANIONS)
        for companion in self.companions:
            companion.put(states[companion.name])

    def write(self, folder: str) -> None:
        """Every process's part into ``folder`` (a checkpoint's), copied by the main process (the snapshot's folder
        is on the output folder's filesystem, which every process shares)."""
        if not self.taken:
            raise RuntimeError("the rewind has no healthy snapshot to restore")
        shutil.copytree(self.folder, folder, dirs_exist_ok=True)


@contextlib.contextmanager
def _schedule_kept(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within the block the optimizer's state is put back; after it, each parameter group's hyperparameters are the
    ones it had before (the learning rate the schedule has reached): a saved state carries the snapshot step's, and
    the rewind runs after the scheduler has set the next step's rate, which the step after the rewind must use."""
    kept = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    yield
    for group, hyperparameters in zip(optimizer.param_groups, kept, strict=True):
        group.update(hyperparameters)


def _read(
    folder: str, parameters: Sequence[torch.nn.Parameter]
) -> tuple[list[torch.Tensor], dict[str, Any], dict[str, Any]]:
    tensors = load_file(os.path.join(folder, _WEIGHTS))
    weights = [tensors[str(i)].to(p.device, p.dtype) for i, p in enumerate(parameters)]
    state = torch.load(os.path.join(folder, _OPTIMIZER), map_location="cpu", weights_only=True)
    companion_states = read_state(folder, _COMPANIONS)
    return weights, state, companion_states


def _ladder_default(name: str) -> Any:
    """The config's default of the ladder's field ``name``, for a rewind built by hand without a trainer."""
    return DiffusionSDPOConfig.__dataclass_fields__[name].default


@dataclass(frozen=True)
class RewindRecord:
    """What a run's rewind did: each rewind as ``(step fired, step restored)``, in order; ``lr_scales``: the
    learning rate's factor after each rewind that trained on (the first ``len(lr_scales)`` of them: a later one
    stopped the run); with the switch to the safeguard, the step it was switched on after (the first rewind's) and its
    fields; ``restored_z``: each restored step's ``probe/winner_rise_z`` (``None``: the start, or not on record) and
    ``rule`` the alarm's, which judges them. Read by the model card and the end-of-run summary (:meth:`lines`)."""

    rewinds: tuple[tuple[int, int], ...]
    switched_at: int | None = None
    switch_to: Mapping[str, Any] = field(default_factory=dict)
    restored_z: tuple[float | None, ...] = ()
    rule: ProbeAlarmRule | None = None
    lr_scales: tuple[float, ...] = ()

    def ended_at_start(self, last_step: int) -> bool:
        """Whether the run, now at ``last_step``, holds the weights it started from: its last rewind went back to the
        start at that step (it stopped there, or that was the run's last step)."""
        return bool(self.rewinds) and self.rewinds[-1] == (last_step, 0)

    def lines(self, last_step: int) -> list[str]:
        """One sentence per rewind (``last_step``: the run's step now), or one saying that none happened."""
        if not self.rewinds:
            return ["on_pathology='rewind': the held-out probe's alarm never fired, so no rewind happened."]
        settings = ", ".join(f"{k}={v!r}" for k, v in self.switch_to.items())
        readings = self.restored_z if len(self.restored_z) == len(self.rewinds) else (None,) * len(self.rewinds)
        lines = []
        for index, ((fired, restored), z) in enumerate(zip(self.rewinds, readings, strict=True)):
            text = (
                f"Step {fired}: the held-out probe's alarm fired (on_pathology='rewind') and the trainable weights "
                f"and optimizer state went back to step {restored}'s"
            )
            if self.rule is not None:
                text += f" ({restore_point_note(restored, z, self.rule)})"
            if index < len(self.lr_scales):
                end = self.rewinds[index + 1][0] if index + 1 < len(self.rewinds) else last_step
                steps = f"steps {fired + 1}-{end}" if end > fired else f"every step after step {fired}"
                safeguard = self.switched_at is not None and fired >= self.switched_at
                text += f"; {steps} trained" + (f" with the safeguard on ({settings})" if safeguard else "")
                text += f" at {self.lr_scales[index]:.4g} x the learning rate (rewind_lr_factor)"
            else:
                text += (
                    f"; training stopped there, with step {restored}'s weights as the result (the ladder spent: "
                    f"{len(self.lr_scales)} rewind(s) trained on, rewind_max_times)"
                )
            if index == len(self.rewinds) - 1 and self.ended_at_start(last_step):
                text += f"; {start_weights_sentence(fired)}"
            lines.append(text + ".")
        return lines


class RewindAction:
    """``on_pathology="rewind"``: the action of an :class:`~.alarm.AlarmCallback` reading the held-out probe
    (:class:`~.probe_signal.ProbeSignal`). At every restore point of the probe (and when training begins) it keeps the
    snapshot; when the alarm fires it puts the weights, the optimizer state and their companions back to it, then
    trains on at a learning rate lowered by ``lr_factor`` (:func:`~.learning_rate.scale_learning_rate`), the dormant
    safeguard switched on the first time, for ``max_times`` rewinds; the alarm after those stops the run (module
    docstring).

    Args:
        snapshot: where the last restore point's weights and optimizer state are kept; ``None``: the trainer's, when
            the alarm is given one (:meth:`bind`).
        switch: turns the dormant safeguard on; ``None``: the trainer's
            :attr:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.dormant_safeguard` when the alarm is given one, else the
            run trains on with the safeguard it has (or none).
        switch_to: the fields of that safeguard, for the log line.
        max_times: the rewinds that train on before one stops the run (the ladder's rungs); ``None``: the config's
            ``rewind_max_times`` (the trainer's when the alarm is given one).
        lr_factor: what each of them multiplies the learning rate by; ``None``: the config's ``rewind_lr_factor``.
    """

    #: the on_pathology value it acts as
    action = "rewind"

    def __init__(
        self,
        snapshot: MemorySnapshot | None = None,
        switch: Callable[[], Any] | None = None,
        switch_to: Mapping[str, Any] | None = None,
        max_times: int | None = None,
        lr_factor: float | None = None,
    ) -> None:
        self.snapshot, self.switch = snapshot, switch
        self.switch_to = dict(switch_to or {})
        self.max_times, self.lr_factor = max_times, lr_factor
        self.rule: ProbeAlarmRule | None = None  # the alarm's, which judged the restore points (from its verdicts)
        self.rewinds: list[tuple[int, int]] = []  # (step fired, step restored)
        self.restored_z: list[float | None] = []  # each restored step's reading
        self.lr_scales: list[float] = []  # the learning rate's factor after each rewind that trained on
        self.safeguard_on = False
        self.resume_folder: str | None = None  # the snapshot of the checkpoint resumed from (load)

    def bind(self, trainer: Any) -> None:
        """What was left unset, for ``trainer``: LoRA's snapshot in memory, full tuning's on disk, under an engine that
        shards the weights or the optimizer state each process's part on disk (:class:`EngineSnapshot`), each with
        the :func:`companions`; the switch to its dormant safeguard; the ladder of its config."""
        if self.snapshot is None:
            args = trainer.args
            parameters = list(trainable_parameters(trainer.policy))  # in the optimizer's order
            moving = companions(trainer)
            accelerator = trainer.accelerator
            folder = os.path.join(args.output_dir, REWIND_FOLDER)
            on_disk = (parameters, folder, accelerator.is_main_process, accelerator.wait_for_everyone, moving)
            if trainer.engine.shards_training_state:  # each process's part, through the engine, LoRA's too
                self.snapshot = EngineSnapshot(trainer.engine, *on_disk)
            elif trainer.is_lora:
                self.snapshot = MemorySnapshot(parameters, moving)
            else:
                self.snapshot = DiskSnapshot(*on_disk)
        dormant = trainer.dormant_safeguard
        if self.switch is None and dormant is not None:
            self.switch = functools.partial(trainer.set_safeguard, dormant)
            self.switch_to = dict(switch_target(trainer.args) or {"safeguard_space": dormant.name})
        if self.max_times is None:
            self.max_times = trainer.args.rewind_max_times
        if self.lr_factor is None:
            self.lr_factor = trainer.args.rewind_lr_factor

    def lacks(self) -> str | None:
        """What it needs of a trainer and was not given: where to keep the restore point's weights and optimizer."""
        return None if self.snapshot is not None else "RewindAction() keeps and restores the trainer's weights"

    def ladder(self) -> tuple[int, float]:
        """``(max_times, lr_factor)``: the constructor's, the trainer's config's, else the config's defaults."""
        max_times = _ladder_default("rewind_max_times") if self.max_times is None else self.max_times
        return max_times, _ladder_default("rewind_lr_factor") if self.lr_factor is None else self.lr_factor

    def summary(self, rule: ProbeAlarmRule) -> str:
        """What the alarm (``rule``) reads, what is kept and what follows a rewind, for the start summary."""
        elements = self.snapshot.elements
        max_times, factor = self.ladder()
        if max_times:
            safeguard = (
                " with the safeguard on (" + ", ".join(f"{k}={v!r}" for k, v in self.switch_to.items()) + ")"
                if self.switch is not None
                else ""
            )
            then = (
                f"then trains on{safeguard} at the learning rate times {factor:g} (rewind_lr_factor), lowered again "
                f"at each rewind up to {max_times} (rewind_max_times); the alarm after those stops the run with the "
                "healthy weights"
            )
        else:
            then = "then stops with the healthy weights (rewind_max_times=0)"
        beside = "".join(f", {c.name}" for c in self.snapshot.companions)
        return (
            f"the alarm ({rule.describe()}) restores the weights, optimizer state{beside} of the last probe with "
            f"{rule.describe_restore()} (else of the start), one snapshot ({elements:,} weights and their "
            f"optimizer state{beside}) kept {self.snapshot.where()}; the learning-rate schedule goes on counting "
            f"steps; {then}"
        )

    # ------------------------------------------------------------------ the run

    def begin(self, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any] | None = None) -> None:
        """When training begins: the weights it starts from are the first restore point; a resumed run takes the
        checkpoint's record (``saved``: :meth:`state` as its alarm saved it) and snapshot instead (the lowered
        learning rate comes back with transformers' optimizer and scheduler states)."""
        if not saved:
            self.snapshot.take(optimizer)
            return
        self.rewinds = [tuple(pair) for pair in saved["rewinds"]]
        self.restored_z = list(saved.get("restored_z", [None] * len(self.rewinds)))
        self.lr_scales = [float(scale) for scale in saved.get("lr_scales", [])]
        if saved["safeguard_on"] and self.switch is not None:
            self.switch()
            self.safeguard_on = True
        if self.resume_folder is None:
            raise RuntimeError("a resumed rewind needs its checkpoint's snapshot (load) before training begins")
        self.snapshot.read(self.resume_folder)

    def on_probe(
        self, verdict: Any, control, optimizer: torch.optim.Optimizer, lr_scheduler: Any | None = None
    ) -> tuple[dict[str, float], str]:
        """Act on the probe's verdict (:class:`~.probe_signal.ProbeVerdict`): a restore point's weights become the
        snapshot; where the alarm fired, every process restores it, then either trains on at the learning rate of
        ``optimizer`` and ``lr_scheduler`` lowered (the safeguard switched on the first time) or, the ladder spent,
        stops. Returns what the training log adds at a rewind (``health/rewind_to``, ``health/rewinds``,
        ``health/lr_factor``) and what was done, in words."""
        self.rule = verdict.rule
        if verdict.restore_point:
            self.snapshot.take(optimizer)
        if not verdict.fired:
            return {}, ""
        step, healthy_step, healthy_z = verdict.step, verdict.healthy_step, verdict.healthy_z
        self.snapshot.restore(optimizer)
        self.rewinds.append((step, healthy_step))
        self.restored_z.append(healthy_z)
        flags = {"health/rewind_to": float(healthy_step), "health/rewinds": float(len(self.rewinds))}
        max_times, factor = self.ladder()
        if len(self.lr_scales) >= max_times:
            control.should_training_stop = True
            then = f"training stops with these weights (the ladder spent: rewind_max_times={max_times})"
            if healthy_step == 0:
                then += f"; {start_weights_sentence(step)}"
        else:
            with_safeguard = ""
            if not self.safeguard_on and self.switch is not None:
                self.switch()
                self.safeguard_on = True
                with_safeguard = (
                    " with the safeguard on (" + ", ".join(f"{k}={v!r}" for k, v in self.switch_to.items()) + ")"
                )
            rates = scale_learning_rate(optimizer, lr_scheduler, factor)
            self.lr_scales.append((self.lr_scales[-1] if self.lr_scales else 1.0) * factor)
            flags["health/lr_factor"] = self.lr_scales[-1]
            then = (
                f"training goes on{with_safeguard} at {self.lr_scales[-1]:.4g} x the learning rate (rewind "
                f"{len(self.lr_scales)} of {max_times}; the next step's rate {rates[0]:.3g})"
            )
        logger.warning(
            "Step %d: on_pathology='rewind': %s; the trainable weights, the optimizer state%s are back at step %d "
            "(%s; the learning-rate schedule goes on counting steps) and %s.",
            step,
            verdict.rule.describe(),
            "".join(f", {c.name}" for c in self.snapshot.companions),
            healthy_step,
            restore_point_note(healthy_step, healthy_z, verdict.rule),
            then,
        )
        return flags, then

    def record(self) -> RewindRecord:
        """What this run's rewind has done so far, the steps before a resume included (:meth:`begin` reads them
        back). The safeguard is only ever switched on at the first rewind (:meth:`on_probe`)."""
        switched_at = self.rewinds[0][0] if self.safeguard_on and self.rewinds else None
        return RewindRecord(
            tuple(self.rewinds),
            switched_at,
            dict(self.switch_to),
            tuple(self.restored_z),
            self.rule,
            tuple(self.lr_scales),
        )

    def ended_at_start(self, last_step: int) -> bool:
        """Whether the run, now at ``last_step``, holds the weights it started from
        (:meth:`RewindRecord.ended_at_start`)."""
        return self.record().ended_at_start(last_step)

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        return {
            "rewinds": [list(pair) for pair in self.rewinds],
            "restored_z": self.restored_z,
            "lr_scales": self.lr_scales,
            "safeguard_on": self.safeguard_on,
            "snapshot": REWIND_FOLDER,  # inside the checkpoint
        }

    def save(self, checkpoint: str, args: Any, state: Any) -> None:
        """The snapshot into ``checkpoint``, the folder being written, before it is published (so its manifest lists
        and checks the snapshot's files): the main process's copy (every process holds the same)."""
        if state.is_world_process_zero:
            self.snapshot.write(os.path.join(checkpoint, REWIND_FOLDER))

    def load(self, checkpoint: str) -> None:
        """Before a resumed run begins: its snapshot is ``checkpoint``'s (read in :meth:`begin`)."""
        self.resume_folder = os.path.join(checkpoint, REWIND_FOLDER)
