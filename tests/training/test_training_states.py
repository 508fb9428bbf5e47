"""The states that move with training (the objective's auto-beta, the safeguard's ``mu``, the EMA, the gradient
scaler) on disk: safetensors and JSON written from their ``state_dict()``, never pickles, in every checkpoint and in
the rewind's snapshot."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers.rewind import ScriptedAlarm
from trl_diffusion_sdpo.callbacks.health import PathologyRule
from trl_diffusion_sdpo.callbacks.state_files import STATES_FILE, read_state, split_tensors, write_state
from trl_diffusion_sdpo.objectives.auto_beta import auto_beta


def test_a_state_comes_back_from_safetensors_and_json_as_it_was(tmp_path):
    state = {
        "ema": {"decay": 0.9, "optimization_step": 3, "use_ema_warmup": False, "shadow_params": [
            torch.arange(6.0).reshape(2, 3), torch.ones(2, dtype=torch.bfloat16)]},
        "auto_beta": {"ema": torch.tensor(0.25), "beta": None},
        "grad_scaler": {"scale": 1024.0, "_growth_tracker": 2},
    }  # fmt: skip
    write_state(str(tmp_path), "states", state)
    assert sorted(os.listdir(tmp_path)) == ["states.json", "states.safetensors"]
    back = read_state(str(tmp_path), "states")
    assert back["grad_scaler"] == state["grad_scaler"] and back["auto_beta"]["beta"] is None
    assert torch.equal(back["auto_beta"]["ema"], state["auto_beta"]["ema"])
    shadow = back["ema"].pop("shadow_params")
    assert back["ema"] == {k: v for k, v in state["ema"].items() if k != "shadow_params"}
    for got, want in zip(shadow, state["ema"]["shadow_params"], strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("bad", [{1: torch.ones(1)}, {"x": object()}], ids=["int-key", "object"])
def test_what_json_would_change_or_cannot_hold_is_refused(bad):
    with pytest.raises(TypeError):
        split_tensors(bad)


def test_every_checkpoint_holds_the_auto_beta_and_mu_the_run_has_learnt(make_trainer, tmp_path):
    trainer = make_trainer(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        beta=500.0,
        auto_beta=True,
        safeguard_mu="auto",
        safeguard_mu_step=5.0,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
    )
    trainer.train()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    assert {f"{STATES_FILE}.json", f"{STATES_FILE}.safetensors"} <= set(os.listdir(checkpoint))
    saved = read_state(checkpoint, STATES_FILE)
    (last,) = [log for log in trainer.state.log_history if log.get("step") == 2 and "delta/winner" in log]
    # the beta and mu the log at step 2 carried, and the beta the auto-beta's rule gives for the saved EMA
    assert float(saved["auto_beta"]["beta"]) == pytest.approx(last["beta"], rel=1e-6)
    assert float(saved["safeguard_mu"]["value"]) == pytest.approx(last["safeguard/mu"], rel=1e-6)
    rule = auto_beta(saved["auto_beta"]["ema"], trainer.args.auto_beta_target, 50.0, 5000.0)
    assert torch.equal(rule, saved["auto_beta"]["beta"])
    assert last["beta"] != 500.0  # it had moved


def test_the_rewind_snapshot_in_a_checkpoint_holds_no_pickle_but_the_optimizers(make_trainer, make_pickapic, tmp_path):
    """Full tuning with the EMA and the auto-beta: the snapshot's companions are safetensors and JSON; the optimizer's
    state, as transformers writes its own, reads back with ``weights_only=True``."""
    trainer = make_trainer(
        lora=False,
        output_dir=str(tmp_path / "out"),
        train_dataset=make_pickapic(8),
        max_steps=2,
        probe_steps=1,
        probe_pairs=2,
        probe_noise_draws=2,  # the figures unread: the alarm is scripted
        on_pathology="rewind",
        safeguard_space="none",
        ema_decay=0.9,
        auto_beta=True,
        save_strategy="steps",
        save_steps=2,
    )
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps=set())
    trainer.train()
    folder = tmp_path / "out" / "checkpoint-2" / "rewind-healthy"
    assert sorted(p.name for p in folder.iterdir()) == [
        "companions.json",
        "companions.safetensors",
        "optimizer.pt",
        "weights.safetensors",
    ]
    torch.load(folder / "optimizer.pt", weights_only=True)
    states = read_state(str(folder), "companions")
    assert set(states) == {"ema", "auto_beta"} and json.loads((folder / "companions.json").read_text())
    # the snapshot is step 2's (a healthy probe): the EMA and the auto-beta as the run ended
    assert states["ema"]["optimization_step"] == trainer.ema.state_dict()["optimization_step"] == 2
    for got, live in zip(states["ema"]["shadow_params"], trainer.ema.state_dict()["shadow_params"], strict=True):
        assert torch.equal(got, live.cpu())
    assert torch.equal(states["auto_beta"]["ema"], trainer.auto_beta.state_dict()["ema"].cpu())


def _rule(fires: bool) -> PathologyRule:
    """The training logs' alarm at every log with ``delta/winner`` (``fires``), or at none."""
    return PathologyRule(windows=1, window_steps=None, min_delta_winner=-1e9 if fires else 1e9, max_implicit_acc=None)


def test_a_fixed_mu_raised_by_escalate_comes_back_at_resume(make_trainer, tmp_path):
    """``on_pathology="escalate"`` raises a fixed ``mu`` (not only ``"auto"`` moves it): every checkpoint keeps the
    raised value and a resumed run trains with it, not with the configured one."""
    out = str(tmp_path / "out")
    settings = dict(
        output_dir=out, safeguard_space="output", safeguard_mu=0.5, on_pathology="escalate", save_strategy="steps",
        save_steps=2, logging_steps=1,
    )  # fmt: skip
    trainer = make_trainer(max_steps=2, **settings)
    # the alarm made to fire at the first training log: mu raised halfway to 1, once (the next escalation waits)
    trainer.alarm.signal.rule = _rule(fires=True)
    trainer.train()
    raised = (1.0 + 0.5) / 2.0
    assert trainer.safeguard.margin.current() == raised
    assert float(read_state(os.path.join(out, "checkpoint-2"), STATES_FILE)["safeguard_mu"]["value"]) == raised
    resumed = make_trainer(max_steps=3, **settings)
    resumed.alarm.signal.rule = _rule(fires=False)
    assert resumed.safeguard.margin.current() == 0.5  # the configured mu, until the checkpoint is read
    resumed.train(resume_from_checkpoint=True)
    assert resumed.safeguard.margin.current() == raised
    [log] = [e for e in resumed.state.log_history if e.get("step") == 3 and "loss" in e]
    assert log["safeguard/mu"] == raised  # step 3 trained with the raised mu
