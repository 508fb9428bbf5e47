"""What the probe's and the rewind's tests share: the trained weights, a recorder of each step's weights and optimizer
state, an alarm scripted by step, and exact comparisons of weights and optimizer states."""

from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace
from typing import Any

import torch
from transformers import TrainerCallback

from trl_diffusion_sdpo.callbacks.alarm import AlarmCallback
from trl_diffusion_sdpo.callbacks.probe_signal import ProbeSignal
from trl_diffusion_sdpo.callbacks.rewind import ProbeAlarmRule
from trl_diffusion_sdpo.engines.base import trainable_parameters


def trained_weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainable_parameters(trainer.family.denoiser)]


class Recorder(TrainerCallback):
    """The trainable weights and the optimizer's state at the end of every step (before the probe acts: the trainer
    adds the probe after the callbacks it is given) and at the start of every step (after a rewind)."""

    def __init__(self) -> None:
        self.parameters: list[torch.nn.Parameter] = []
        self.at_end: dict[int, tuple[list[torch.Tensor], dict]] = {}
        self.at_begin: dict[int, tuple[list[torch.Tensor], dict]] = {}

    def _take(self, optimizer) -> tuple[list[torch.Tensor], dict]:
        return [p.detach().clone() for p in self.parameters], copy.deepcopy(optimizer.state_dict())

    def on_step_begin(self, args, state, control, **kwargs):
        self.at_begin[state.global_step] = self._take(kwargs["optimizer"])

    def on_step_end(self, args, state, control, **kwargs):
        self.at_end[state.global_step] = self._take(kwargs["optimizer"])


class CopyOutputAt(TrainerCallback):
    """Copies the run's output folder to ``target`` right after the save at optimizer step ``step``: the folder an
    interruption of the run there leaves, while the run itself goes on uninterrupted."""

    def __init__(self, step: int, target) -> None:
        self.step, self.target = step, target

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            shutil.copytree(args.output_dir, self.target)


class ScriptedAlarm(ProbeAlarmRule):
    """The alarm's rule with the verdicts scripted by step: the rewind's mechanics tested apart from the rule. A step
    neither unhealthy nor in ``doubtful_steps`` (healthy for the alarm, not a restore point) is a restore point."""

    def __init__(self, patience: int, unhealthy_steps: set[int], doubtful_steps: frozenset[int] = frozenset()) -> None:
        super().__init__(patience=patience, threshold=0.0)
        object.__setattr__(self, "unhealthy_steps", unhealthy_steps)
        object.__setattr__(self, "doubtful_steps", doubtful_steps)

    def unhealthy(self, metrics, step):
        return step in self.unhealthy_steps

    def restorable(self, metrics, step):
        return step not in self.unhealthy_steps and step not in self.doubtful_steps


def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def states_equal(a: dict, b: dict) -> bool:
    if a["state"].keys() != b["state"].keys():
        return False
    for key in a["state"]:
        for name, value in a["state"][key].items():
            other = b["state"][key][name]
            if not (torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other):
                return False
    return True


class HandDriven:
    """An alarm on the probe driven by hand as a run drives it: the probe publishes a reading
    (``last_reading``), then transformers calls the alarm's ``on_step_end`` and ``on_train_begin``. The alarm's
    signal (``rule``) and ``action`` are tested apart from a training run."""

    def __init__(self, rule: ProbeAlarmRule, action: Any) -> None:
        self.probe = SimpleNamespace(last_reading=None)
        self.alarm = AlarmCallback(ProbeSignal(self.probe, rule), action)
        self.action = action

    def begin(self, optimizer: torch.optim.Optimizer) -> None:
        state = SimpleNamespace(global_step=0, stateful_callbacks={})
        self.alarm.on_train_begin(None, state, None, optimizer=optimizer)

    def read(self, metrics: dict, step: int, optimizer: torch.optim.Optimizer, control: Any) -> dict[str, float]:
        """The probe of ``step`` read ``metrics``: what the next training log gets from the alarm."""
        self.probe.last_reading = (step, metrics)
        self.alarm.on_step_end(None, SimpleNamespace(global_step=step), control, optimizer=optimizer)
        flags, self.alarm.pending = self.alarm.pending, {}
        return flags
