"""The lean optimizer step: the host never waits for the device between logs, clipping and skipping stay exact."""

from __future__ import annotations

import traceback

import pytest
import torch
from transformers import TrainerCallback

from trl_diffusion_sdpo.objectives import ObjectiveOutput
from trl_diffusion_sdpo.step.optimizer import clip_divisor, fused_scaling_optimizer, grad_norm

# Tensor methods that copy a value to the host, which on an accelerator makes the host wait for the device.
_HOST_READS = ["item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"]
# The data pipeline reads CPU tensors (the sampler's shuffle, the collators' flip, crop and prompt dropout draws):
# no device involved.
_HOST_DATA_FILES = ("trl_diffusion_sdpo/data.py", "trl_diffusion_sdpo/latent_cache.py", "torch/utils/data/")


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


@pytest.mark.parametrize(("lora", "cache_latents"), [(True, False), (False, True)])
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
    assert any("step/guard.py" in c for c in recorder.device_reads())  # the non-finite guard reads its flag


class _GradientsSeenByTheOptimizer(TrainerCallback):
    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.norms: list[float] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        # After the step, before zero_grad: the fused kernel wrote back the gradients it used.
        self.norms.append(float(grad_norm([p for p in self.trainer.model.parameters() if p.requires_grad])))


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


def test_clip_divisor_is_the_reciprocal_of_clip_grad_norms_factor():
    grads = [torch.randn(3, 4) * 10, torch.randn(7) * 10]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = grad_norm(params)
    expected_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=2.0)
    torch.testing.assert_close(norm, expected_norm)
    for p, g in zip(params, grads):
        torch.testing.assert_close(g / clip_divisor(norm, 2.0), p.grad)
    assert float(clip_divisor(torch.tensor(0.5), 2.0)) == 1.0  # below the threshold nothing is scaled


def test_training_restores_module_zero_grad(make_trainer):
    trainer = make_trainer(lora=True, max_steps=1)
    trainer.train()
    assert "zero_grad" not in vars(trainer.model)
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
