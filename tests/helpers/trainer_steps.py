"""Per-step snapshots and logs of a training run."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from trl_diffusion_sdpo import DiffusionSDPOTrainer


def step_logs(trainer: DiffusionSDPOTrainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


class StepSnapshots(TrainerCallback):
    """Trainable parameters after each optimizer step (index 0: before training)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.snapshots = [self._take()]

    def _take(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, **kwargs):
        self.snapshots.append(self._take())
