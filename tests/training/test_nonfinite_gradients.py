"""A non-finite gradient with a finite loss is skipped (and counted) or raised on, like a non-finite loss."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.common import changed_keys
from tests.helpers.trainer_steps import StepSnapshots, step_logs


def poison_gradient(trainer, on_backward: int) -> None:
    """Put an inf into one element of one trainable parameter's gradient at the ``on_backward``-th backward pass."""
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    calls = {"n": 0}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] != on_backward:
            return grad
        grad = grad.clone(memory_format=torch.contiguous_format)
        grad.view(-1)[0] = float("inf")
        return grad

    param.register_hook(hook)


@pytest.mark.parametrize(
    ("lora", "optim", "max_grad_norm"),
    [
        (False, "adamw_torch_fused", 1.0),
        pytest.param(True, "adamw_torch", 1.0, marks=pytest.mark.slow),  # the guard's host-read path, as for losses
        (True, "adamw_torch_fused", 0.0),
    ],
    ids=["full-fused", "lora-unfused", "lora-fused-no-clipping"],
)
def test_an_inf_gradient_with_a_finite_loss_skips_the_step_and_counts_it(make_trainer, lora, optim, max_grad_norm):
    trainer = make_trainer(lora=lora, max_steps=3, optim=optim, max_grad_norm=max_grad_norm)
    poison_gradient(trainer, on_backward=2)
    snapshots = StepSnapshots(trainer.model)
    trainer.add_callback(snapshots)
    trainer.train()
    before, after_1, after_2, after_3 = snapshots.snapshots
    assert changed_keys(before, after_1) and changed_keys(after_2, after_3)
    assert not changed_keys(after_1, after_2), "the step with an inf gradient changed parameters"
    assert all(torch.isfinite(v).all() for v in after_3.values())
    assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {2.0}
    logs = step_logs(trainer)
    assert [h["nonfinite_skipped"] for h in logs] == [0, 1, 1]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)  # the loss itself was finite


def test_an_inf_gradient_with_raise_stops_after_a_checkpoint_of_the_last_good_state(make_trainer, tmp_path):
    trainer = make_trainer(lora=True, max_steps=3, on_nonfinite_loss="raise", output_dir=str(tmp_path / "run"))
    poison_gradient(trainer, on_backward=2)
    with pytest.raises(RuntimeError, match="Non-finite loss or gradient norm at optimizer step 2"):
        trainer.train()
    assert (tmp_path / "run" / "checkpoint-1" / "pytorch_lora_weights.safetensors").is_file()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
