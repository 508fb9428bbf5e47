"""Resuming with a changed config: what would make the checkpoint meaningless is refused, naming the fields; safe
changes are logged and take effect (a changed learning rate included, which the restored scheduler used to undo)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from tests.checkpoint_kill_worker import build_trainer
from tests.helpers.common import RecordingDataset, global_sample_order, lora_config
from trl_diffusion_sdpo.io.checkpoints import MANIFEST_NAME, file_sha256
from trl_diffusion_sdpo.io.resume_check import RUN_IDENTITY_NAME, ResumeConfigError
from trl_diffusion_sdpo.io.resume_world import batch_options, plan_process_count_change


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> str:
    """An output folder after 2 steps at learning rate 1e-3 (checkpoint-1 and checkpoint-2)."""
    root = tmp_path_factory.mktemp("run")
    build_trainer(str(root / "out"), str(root / "tok"), max_steps=2).train()
    return str(root / "out")


@pytest.fixture
def run(two_steps, tmp_path) -> str:
    target = str(tmp_path / "out")
    shutil.copytree(two_steps, target)
    return target


def test_the_checkpoint_records_what_its_weights_are(two_steps):
    with open(os.path.join(two_steps, "checkpoint-2", RUN_IDENTITY_NAME)) as f:
        identity = json.load(f)
    assert identity["training"] == "lora"
    assert identity["denoiser_class"] == "UNet2DConditionModel"
    assert (identity["lora_rank"], identity["lora_alpha"]) == (4, 8)
    assert identity["lora_target_modules"] == sorted(["to_q", "to_k", "to_v", "to_out.0"])


@pytest.mark.parametrize(
    "change,peft,expected",
    [
        ({"loss_type": "dmpo", "resolution": 64}, None, ["loss_type ('dpo' -> 'dmpo')", "resolution (32 -> 64)"]),
        ({"safeguard_mu": 0.6}, None, ["safeguard_mu (0.9 -> 0.6)"]),
        ({"beta": 100.0}, None, ["beta (5000.0 -> 100.0)"]),  # an objective's field: refused through the registry
        ({}, lora_config(r=8), ["lora_rank (4 -> 8)"]),
    ],
)
def test_a_change_that_makes_the_checkpoint_meaningless_is_refused_naming_the_fields(
    run, tmp_path, change, peft, expected
):
    before = sorted(os.listdir(run))
    trainer = build_trainer(run, str(tmp_path / "tok"), peft_config=peft, **change)
    with pytest.raises(ResumeConfigError, match="Cannot resume from") as info:
        trainer.train(resume_from_checkpoint=True)
    for text in expected:
        assert text in str(info.value)
    assert trainer.state.global_step == 0
    assert sorted(os.listdir(run)) == before  # nothing trained, nothing written, the lock released


def test_a_changed_learning_rate_is_applied_from_the_resumed_step_and_logged(run, tmp_path, caplog):
    trainer = build_trainer(run, str(tmp_path / "tok"), max_steps=4, learning_rate=2e-3)
    with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo.io"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    logged = {entry["step"]: entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry}
    # Steps 1-2 ran before the resume at 1e-3 (the restored history); steps 3-4 at the new schedule's rate (constant:
    # 2e-3), not the old one the restored optimizer and scheduler states bring back.
    assert logged == pytest.approx({1: 1e-3, 2: 1e-3, 3: 2e-3, 4: 2e-3})
    groups = trainer.optimizer.param_groups
    assert trainer.lr_scheduler.base_lrs == pytest.approx([2e-3] * len(groups))
    assert [group["lr"] for group in groups] == pytest.approx([2e-3] * len(groups))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("learning_rate (0.001 -> 0.002)" in w and "multiplied by 2" in w for w in warnings)
    assert any("the learning rate changed at resume applied" in w and "0.002" in w for w in warnings)


def test_the_same_rate_resumes_at_the_restored_schedule_and_safe_changes_are_logged(run, tmp_path, caplog):
    trainer = build_trainer(run, str(tmp_path / "tok2"), max_steps=4, weight_decay=0.0)
    with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo.io"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    logged = {entry["step"]: entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry}
    assert logged == {1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 1e-3}
    assert "max_steps (2 -> 4)" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("weight_decay (0.01 -> 0.0)" in w and "not the run the checkpoint began" in w for w in warnings)


def _as_if_written_by_two_processes(run: str) -> None:
    """Edit checkpoint-2's run identity (and its manifest entry) on disk as a 2-process run of per-device batch 1
    writes it: the same global batch (2 pairs) and the same global data order as the 1-process run that wrote it."""
    path = os.path.join(run, "checkpoint-2", RUN_IDENTITY_NAME)
    with open(path) as f:
        identity = json.load(f)
    assert (identity["num_processes"], identity["global_batch_size"], identity["samples_seen"]) == (1, 2, 4)
    identity.update(num_processes=2, per_device_train_batch_size=1, global_batch_size=2)
    with open(path, "w") as f:
        json.dump(identity, f)
    manifest_path = os.path.join(run, "checkpoint-2", MANIFEST_NAME)  # as that run's save would have listed it
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["files"][RUN_IDENTITY_NAME] = os.path.getsize(path)
    manifest["sha256"][RUN_IDENTITY_NAME] = file_sha256(path)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


def test_resuming_on_another_number_of_processes_with_another_global_batch_is_refused_naming_the_flags(run, tmp_path):
    _as_if_written_by_two_processes(run)
    before = sorted(os.listdir(run))
    # The same command line on 1 process: per-device batch 1 would make the global batch 1 instead of 2.
    trainer = build_trainer(run, str(tmp_path / "tok"), max_steps=3, per_device_train_batch_size=1)
    with pytest.raises(ResumeConfigError, match="global batch would change from 2 to 1 pairs") as info:
        trainer.train(resume_from_checkpoint=os.path.join(run, "checkpoint-2"))
    assert (
        "Keep it with --per_device_train_batch_size 2 --gradient_accumulation_steps 1 or "
        "--per_device_train_batch_size 1 --gradient_accumulation_steps 2 on 1 process(es)"
    ) in str(info.value)
    assert "the 4 samples seen" in str(info.value)
    assert trainer.state.global_step == 0
    assert sorted(os.listdir(run)) == before


def test_resuming_on_another_number_of_processes_continues_at_the_samples_seen(run, tmp_path, caplog):
    """Global batch kept (1 process x 2 pairs for 2 processes x 1): the resumed step 3 reads the samples an
    uninterrupted run reads at step 3 (rows 4 and 5 of its data order), in the same order."""
    _as_if_written_by_two_processes(run)
    tok = str(tmp_path / "tok")
    trainer = build_trainer(run, tok, max_steps=3)
    resumed: list[list[int]] = []
    trainer.train_dataset = RecordingDataset(trainer.train_dataset, resumed)
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.io"):
        trainer.train(resume_from_checkpoint=os.path.join(run, "checkpoint-2"))
    assert trainer.state.global_step == 3
    assert "Resuming on 1 process(es) from a checkpoint written by 2: global batch 2 kept" in caplog.text
    assert "training continues at sample 4 of the same data order" in caplog.text
    assert "the same micro-batches and draws as the uninterrupted run" in caplog.text

    straight = build_trainer(str(tmp_path / "straight"), tok, max_steps=3, save_strategy="no")
    uninterrupted: list[list[int]] = []
    straight.train_dataset = RecordingDataset(straight.train_dataset, uninterrupted)
    straight.train()
    assert global_sample_order([uninterrupted], 3)[4:6] == global_sample_order([resumed], 1)
    assert sorted(global_sample_order([uninterrupted], 3)) == list(range(6))  # one epoch, each row once


@pytest.mark.parametrize(
    "saved,current,outcome",
    [
        # 2 processes x 2 pairs -> 1 process x 4: kept, same micro-batches; samples seen = step x global batch
        ((2, 2, 1), (1, 4, 1), ("kept", 4, True)),
        # -> 1 process x 2 pairs x 2 accumulated: kept, micro-batches split differently
        ((2, 2, 1), (1, 2, 2), ("kept", 4, False)),
        ((1, 4, 1), (2, 2, 1), ("kept", 4, True)),
        ((1, 2, 2), (2, 1, 2), ("kept", 4, True)),
        # the same command line on another count: refused, naming what keeps it
        ((2, 2, 1), (1, 2, 1), ("refused", "--per_device_train_batch_size 4 --gradient_accumulation_steps 1 or")),
        ((1, 3, 1), (2, 3, 1), ("refused", "No per-device batch gives 3 pairs on 2 processes")),
        ((2, 2, 1), (2, 1, 1), ("same count", None)),
    ],
)
def test_the_data_position_rule_on_another_number_of_processes(saved, current, outcome):
    def identity(processes, batch, accumulation):
        return {
            "num_processes": processes,
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": accumulation,
        }

    old = identity(*saved) | {"global_batch_size": saved[0] * saved[1] * saved[2]}
    if outcome[0] == "refused":
        with pytest.raises(ResumeConfigError, match="the global batch would change") as info:
            plan_process_count_change(old, identity(*current), global_step=5)
        assert outcome[1] in str(info.value)
        return
    change = plan_process_count_change(old, identity(*current), global_step=5)
    if outcome[0] == "same count":
        assert change is None
        return
    assert (change.global_batch, change.samples_seen, change.same_micro_batches) == (
        outcome[1],
        5 * outcome[1],
        outcome[2],
    )
    assert batch_options(4, 2) == [(2, 1), (1, 2)]


def test_the_recorded_denoiser_class_is_the_models_own_under_fsdp2(tmp_path):
    """fully_shard swaps the class for ``FSDP<name>``; the checkpoint must name the model's class, which is what a
    resumed run (checked before it shards) sees."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from trl_diffusion_sdpo.io.resume_check import model_class_name

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = fully_shard(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        assert isinstance(model, FSDPModule) and type(model).__name__ == "FSDPSequential"
        assert model_class_name(model) == "Sequential"
    finally:
        dist.destroy_process_group()
    assert model_class_name(torch.nn.Linear(2, 2)) == "Linear"


def test_the_refused_fields_are_every_registered_objectives_hyperparameters(objective_registry):
    """The objectives declare their fields, so one registered outside the package has its own refused on resume."""
    from dataclasses import dataclass

    from trl_diffusion_sdpo.io.resume_check import REFUSED_FIELDS, refused_fields
    from trl_diffusion_sdpo.objectives import PreferenceObjective, base, hyperparameter, register_objective

    built_in = {"beta", "dmpo_alpha", "dspo_form", "mapo_beta", "mapo_snr_value", "smpo_gamma", "smpo_score_min"}
    assert built_in | {"smpo_score_max", "loss_type", "safeguard_mu", "resolution"} <= refused_fields()
    assert not built_in & REFUSED_FIELDS  # stated by the objectives, not restated here

    @register_objective
    @dataclass(frozen=True)
    class Scaled(PreferenceObjective):
        scaled_weight: float = hyperparameter(base.Range(0, low_open=True), 1.0)
        name = "scaled_resume_test"

        def loss(self, predictions, errors):
            raise AssertionError("not called")

    assert "scaled_weight" in refused_fields()
