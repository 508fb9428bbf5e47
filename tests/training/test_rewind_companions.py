"""``on_pathology="rewind"`` puts back everything that moved with training, not only the weights and the optimizer's
state: the EMA weights (``ema_decay``), the auto-beta, ``safeguard_mu="auto"`` and the fp16 gradient scaler. The
learning-rate schedule goes on counting steps."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from tests.helpers.rewind import HandDriven, ScriptedAlarm
from trl_diffusion_sdpo.callbacks.rewind import Companion, MemorySnapshot, RewindAction

ROWS, HELD = 8, 2  # 6 training pairs: 3 optimizer steps of 2 per epoch
DPO = {"safeguard_space": "none"}


class StateAtStepBegin(TrainerCallback):
    """``read()`` at the start of every step: after every callback of the step before (the probe's rewind too)."""

    def __init__(self) -> None:
        self.read = lambda: None
        self.seen: dict[int, Any] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.seen[state.global_step] = copy.deepcopy(self.read())

    def on_train_end(self, args, state, control, **kwargs):
        self.seen["end"] = copy.deepcopy(self.read())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _rewinding_trainer(make_trainer, make_pickapic, watch: StateAtStepBegin, lora: bool = True, **fields):
    trainer = make_trainer(
        lora=lora,
        train_dataset=make_pickapic(ROWS),
        callbacks=[watch],
        max_steps=5,
        probe_steps=1,
        probe_pairs=HELD,
        probe_noise_draws=2,  # the figures unread: the alarm is scripted
        on_pathology="rewind",
        **fields,
    )
    # Healthy at 1, unhealthy at 2 and 3: the alarm fires at 3 and the run goes back to step 1.
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps={2, 3})
    return trainer


# by default: full-on-disk (the EMA's state through the snapshot on disk); a companion put back from the memory
# snapshot of a LoRA run by default: test_a_rewind_restores_the_auto_beta
@pytest.mark.parametrize(
    "lora", [pytest.param(True, marks=pytest.mark.slow), False], ids=["lora-in-memory", "full-on-disk"]
)
def test_a_rewind_restores_the_ema_weights_of_the_healthy_step(make_trainer, make_pickapic, lora):
    watch = StateAtStepBegin()
    trainer = _rewinding_trainer(make_trainer, make_pickapic, watch, lora=lora, ema_decay=0.9, **DPO)
    watch.read = lambda: [p.detach().clone() for p in trainer.ema.ema.shadow_params]
    trainer.train()
    assert [c.name for c in trainer.probe_alarm.action.snapshot.companions] == ["ema"]
    healthy, broken, restored = watch.seen[1], watch.seen[2], watch.seen[3]  # after steps 1, 2; after 3's rewind
    assert not _same(broken, healthy)  # the EMA moved between the healthy step and the alarm
    assert _same(restored, healthy)
    # diffusers' warm-up of the decay counts the optimizer steps the EMA took: back to the healthy step's count too
    assert trainer.ema.ema.optimization_step == 1 + 2  # step 1, then the two steps after the rewind (4 and 5)


def test_a_rewind_restores_the_auto_beta(make_trainer, make_pickapic):
    watch = StateAtStepBegin()
    trainer = _rewinding_trainer(make_trainer, make_pickapic, watch, auto_beta=True, **DPO)
    auto_beta = trainer.auto_beta
    watch.read = lambda: {"ema": auto_beta.ema, "beta": auto_beta.beta}
    trainer.train()
    healthy, broken, restored = watch.seen[1], watch.seen[2], watch.seen[3]
    assert healthy["ema"] is not None and not _same(broken, healthy)
    assert _same(restored, healthy)


def test_a_rewind_restores_the_automatic_mu_of_a_safeguarded_run_that_stops(make_trainer, make_pickapic):
    watch = StateAtStepBegin()
    trainer = _rewinding_trainer(
        make_trainer,
        make_pickapic,
        watch,
        safeguard_space="output",
        safeguard_mu="auto",
        learning_rate=1e-2,
        rewind_max_times=0,
    )
    margin = trainer.safeguard.margin
    watch.read = lambda: torch.as_tensor(margin.value).clone()
    trainer.train()
    assert trainer.state.global_step == 3  # no rung of the ladder: the run stops after its rewind
    healthy, broken = watch.seen[1], watch.seen[2]
    assert not _same(broken, healthy)
    assert _same(watch.seen["end"], healthy)  # the run's mu is the healthy step's, as its weights are


def test_the_learning_rate_schedule_goes_on_counting_steps_after_a_rewind(make_trainer, make_pickapic):
    watch = StateAtStepBegin()
    trainer = _rewinding_trainer(make_trainer, make_pickapic, watch, lr_scheduler_type="linear", **DPO)
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert len(rates) == 5 and rates == sorted(rates, reverse=True) and len(set(rates)) == 5


def test_a_rewind_restores_the_gradient_scaler():
    """fp16's scaler halves its scale at each overflow: a rewind puts back the healthy step's scale and growth count
    (the scaler itself needs a GPU in a run: here the snapshot and the alarm act on a CPU scaler)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    snapshot = MemorySnapshot([weight], [Companion("grad_scaler", scaler.state_dict, scaler.load_state_dict)])
    rewind = HandDriven(ScriptedAlarm(patience=1, unhealthy_steps={2}), RewindAction(snapshot))

    class Control:
        should_training_stop = False

    def step(overflow: bool) -> None:
        weight.grad = torch.full_like(weight, float("inf") if overflow else 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()

    scaler.scale(torch.ones(()))  # the scaler's state starts with its first use
    rewind.begin(optimizer)
    step(overflow=False)
    rewind.read({}, 1, optimizer, Control())  # healthy: the snapshot
    healthy = scaler.state_dict()
    step(overflow=True)
    assert scaler.get_scale() == healthy["scale"] / 2
    logged = rewind.read({}, 2, optimizer, Control())  # the alarm
    assert logged["health/rewind_to"] == 1.0
    assert scaler.state_dict() == healthy
