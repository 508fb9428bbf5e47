"""The lean optimizer step: the host never waits for the device between logs, clipping and skipping stay exact."""

from __future__ import annotations

import traceback

import pytest
import torch
from transformers import TrainerCallback

from tests.helpers.common import first_batch_gradients
from trl_diffusion_sdpo.engines.base import (
    fused_scaling_optimizer,
    gradient_norm,
    optimizer_parameters,
)
from trl_diffusion_sdpo.objectives import ObjectiveOutput

# Tensor methods that copy a value to the host, which on an accelerator makes the host wait for the device.
_HOST_READS = ["item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"]
# The data pipeline reads CPU tensors (the sampler's shuffle, the collators' flip, crop and prompt dropout draws):
# no device involved.
_HOST_DATA_FILES = ("trl_diffusion_sdpo/data/", "torch/utils/data/")  # host-side data preparation


class _HostReadRecorder(TrainerCallback):
    """Records where tensors are read on the host from the start of step 2 to the end of step 3 (no logging)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        self.callers: list[str] = []
        for name in _HOST_READS:
            original = getattr(torch.Tensor, name)

            def recording(tensor, *args, _original=original, _name=name, **kwargs):
                if self.active:
                    frame = traceback.extract_stack(limit=2)[0]
                    self.callers.append(f"{_name} in {frame.filename}:{frame.lineno}")
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, recording)

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = self.active or state.global_step == 1

    def on_step_end(self, args, state, control, **kwargs):
        self.active = self.active and state.global_step < 3

    def device_reads(self) -> list[str]:
        return [c for c in self.callers if not any(f in c.split(" in ")[1] for f in _HOST_DATA_FILES)]


# Full tuning from cached latents in the slow tier; by default: test_host_syncs.py's test_a_non_logging_step_reads_...
# (full tuning from cached latents: a non-logging step's host reads, counted by the profiler)
SLOW_FULL_CACHED = pytest.param(False, True, marks=pytest.mark.slow)


@pytest.mark.parametrize(("lora", "cache_latents"), [(True, False), SLOW_FULL_CACHED])
def test_no_host_reads_of_device_tensors_between_logging_steps(
    make_trainer, monkeypatch, tmp_path, lora, cache_latents
):
    trainer = make_trainer(
        lora=lora, max_steps=4, logging_steps=10, cache_latents=cache_latents, latent_cache_dir=str(tmp_path / "cache")
    )
    recorder = _HostReadRecorder(monkeypatch)
    trainer.add_callback(recorder)
    trainer.train()
    assert recorder.callers, "the window saw no host reads at all: the recorder is not working"
    assert recorder.device_reads() == []


def test_the_recorder_sees_the_sync_of_a_non_fused_optimizer(make_trainer, monkeypatch):
    # Without a fused optimizer the non-finite guard must read its flag on the host before each step.
    trainer = make_trainer(lora=True, max_steps=4, logging_steps=10, optim="adamw_torch")
    recorder = _HostReadRecorder(monkeypatch)
    trainer.add_callback(recorder)
    trainer.train()
    assert any(
        "callbacks/interruptions.py" in c for c in recorder.device_reads()
    )  # the non-finite guard reads its flag


class _GradientsSeenByTheOptimizer(TrainerCallback):
    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.norms: list[float] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        # After the step, before zero_grad: the fused kernel wrote back the gradients it used.
        self.norms.append(float(gradient_norm([p for p in self.trainer.model.parameters() if p.requires_grad])))


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_clipping_gives_the_optimizer_gradients_of_norm_max_grad_norm(make_trainer, optim):
    trainer = make_trainer(lora=False, max_steps=2, optim=optim, max_grad_norm=0.5)
    seen = _GradientsSeenByTheOptimizer(trainer)
    trainer.add_callback(seen)
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert all(norm > 0.5 for norm in logged)  # beta=5000 makes large gradients: clipping is active
    assert seen.norms == pytest.approx([0.5, 0.5], rel=1e-4)
    fused = fused_scaling_optimizer(trainer.optimizer, trainer.accelerator.scaler, trainer.engine.manages_gradients)
    uses_fused_path = fused is not None
    assert uses_fused_path == (optim == "adamw_torch_fused")


def _norm_over_groups(optimizer) -> float:
    """``||g||_2`` over every parameter group's gradients, in float64, independently of torch.nn.utils."""
    total = sum(
        float(p.grad.double().pow(2).sum()) for g in optimizer.param_groups for p in g["params"] if p.grad is not None
    )
    return total**0.5


def _two_group_optimizer() -> torch.optim.Optimizer:
    params = [
        torch.nn.Parameter(torch.zeros(3, 4)),
        torch.nn.Parameter(torch.zeros(7)),
        torch.nn.Parameter(torch.zeros(5)),
    ]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    return torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}])


def test_the_norm_covers_every_parameter_group():
    torch.manual_seed(0)
    optimizer = _two_group_optimizer()
    expected = _norm_over_groups(optimizer)
    assert float(gradient_norm(optimizer_parameters(optimizer))) == pytest.approx(expected, rel=1e-6)


def test_the_trainers_clipping_covers_both_of_transformers_parameter_groups(make_trainer):
    trainer = make_trainer(lora=False, max_steps=1, max_grad_norm=0.5)
    trainer.create_optimizer()
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and all(g["params"] for g in groups)  # with and without weight decay
    first_batch_gradients(trainer)
    assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in g["params"]) for g in groups)
    expected = _norm_over_groups(trainer.optimizer)
    assert expected > 0.5  # clipping is active
    assert float(trainer._clip_grad_norm(trainer.model)) == pytest.approx(expected, rel=1e-5)
    assert _norm_over_groups(trainer.optimizer) == pytest.approx(0.5, rel=1e-4)


def test_training_leaves_no_gradients(make_trainer):
    trainer = make_trainer(lora=True, max_steps=1)
    trainer.train()
    assert "zero_grad" not in vars(trainer.model)  # transformers' own Module.zero_grad
    assert all(p.grad is None for p in trainer.model.parameters())


def test_a_non_finite_step_is_skipped_with_a_non_fused_optimizer_too(make_trainer):
    trainer = make_trainer(lora=False, max_steps=3, optim="adamw_torch")
    objective, calls = trainer.objective, {"n": 0}

    class PoisonSecondStep:
        name, requires_reference = objective.name, objective.requires_reference

        def __call__(self, predictions, errors, **kwargs):
            out = objective(predictions, errors, **kwargs)
            calls["n"] += 1
            return ObjectiveOutput(out.loss * float("nan"), out.logits) if calls["n"] == 2 else out

    trainer.objective = PoisonSecondStep()
    trainer.train()
    assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {2.0}
    assert [h["nonfinite_skipped"] for h in trainer.state.log_history if "loss" in h] == [0, 1, 1]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
