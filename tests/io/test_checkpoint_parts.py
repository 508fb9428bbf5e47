"""What a checkpoint holds: every file transformers' own ``_save_checkpoint`` writes for the run, and the parts that
are ours beside them, the rewind's snapshot among them, written before the publish and listed in the manifest."""

from __future__ import annotations

import json
import os

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from tests.checkpoint_kill_worker import build_trainer
from tests.helpers.common import StopAt
from tests.helpers.rewind import CopyOutputAt, ScriptedAlarm, equal, trained_weights
from trl_diffusion_sdpo.callbacks.rewind import REWIND_FOLDER
from trl_diffusion_sdpo.io.checkpoints import MANIFEST_NAME, checkpoint_problem

ROWS, HELD = 8, 2  # 6 training pairs: 3 optimizer steps of 2 per epoch


def files_under(folder: str) -> set[str]:
    return {os.path.relpath(os.path.join(root, f), folder) for root, _, names in os.walk(folder) for f in names}


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y)}


def transformers_checkpoint_files(output_dir: str, **fields) -> set[str]:
    """The files a plain ``transformers.Trainer`` writes into a checkpoint with these ``TrainingArguments`` fields,
    less those its ``save_model`` writes (the weights and their files, which this package writes in diffusers'
    format): what its ``_save_checkpoint`` adds around the weights."""
    rows = [{"x": [float(i), 1.0], "y": float(i % 2)} for i in range(4)]
    args = TrainingArguments(output_dir=output_dir, **fields)
    trainer = Trainer(_Tiny(), args=args, train_dataset=Dataset.from_list(rows).with_format("torch"))
    trainer.train()
    checkpoint = os.path.join(output_dir, f"checkpoint-{trainer.state.global_step}")
    model_only = os.path.join(output_dir, "model-only")
    trainer.save_model(model_only)
    return files_under(checkpoint) - files_under(model_only)


def test_a_checkpoint_holds_every_file_transformers_own_save_writes_for_the_run(tmp_path):
    fields = dict(
        max_steps=2,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=1,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    expected = transformers_checkpoint_files(str(tmp_path / "plain"), **fields)
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= expected  # what it reads back
    trainer = build_trainer(str(tmp_path / "out"), str(tmp_path / "tok"), **fields)
    trainer.train()
    ours = files_under(str(tmp_path / "out" / "checkpoint-2"))
    assert expected <= ours, expected - ours
    # transformers resumes from them: the scheduler's state it reads is the trainer's at the save
    saved = torch.load(tmp_path / "out" / "checkpoint-2" / "scheduler.pt", weights_only=True)
    assert saved == trainer.lr_scheduler.state_dict()


def _rewind_run(make_trainer, make_pickapic, output_dir, lora: bool, callbacks=(), resume=None):
    trainer = make_trainer(
        lora=lora, train_dataset=make_pickapic(ROWS), callbacks=list(callbacks), max_steps=5, probe_steps=1,
        probe_pairs=HELD, on_pathology="rewind", save_strategy="steps", save_steps=3, output_dir=str(output_dir),
        safeguard_space="none", probe_noise_draws=2,  # the figures unread: the alarm is scripted
    )  # fmt: skip
    # Healthy at 1 and 2, unhealthy at 3 (the checkpoint's step: one unhealthy probe so far, the snapshot step 2's)
    # and 4: the alarm fires at 4, back to step 2.
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps={3, 4})
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_the_rewinds_snapshot_is_part_of_its_checkpoint_listed_and_checked_by_the_manifest(
    make_trainer, make_pickapic, tmp_path
):
    _rewind_run(make_trainer, make_pickapic, tmp_path / "out", lora=True, callbacks=[StopAt(3)])
    checkpoint = tmp_path / "out" / "checkpoint-3"
    with open(checkpoint / MANIFEST_NAME) as f:
        listed = set(json.load(f)["files"])
    snapshot = {name for name in files_under(str(checkpoint)) if name.startswith(REWIND_FOLDER + os.sep)}
    # the weights, the optimizer's state, the companions' states (tensors and the rest): each listed and checked
    names = {os.path.basename(name) for name in snapshot}
    assert names == {"weights.safetensors", "optimizer.pt", "companions.safetensors", "companions.json"}
    assert snapshot <= listed
    assert checkpoint_problem(str(checkpoint)) == ""
    missing = sorted(snapshot)[0]
    os.remove(checkpoint / missing)
    assert checkpoint_problem(str(checkpoint)) == f"{missing} is missing"


def test_a_full_tuning_run_resumed_between_the_healthy_probe_and_the_alarm_rewinds_as_the_uninterrupted_one(
    make_trainer, make_pickapic, tmp_path
):
    # The run interrupted after step 3 is the uninterrupted one up to there: its output folder as it stood right
    # after that save, the checkpoint and the live snapshot, copied while the uninterrupted run goes on.
    straight = _rewind_run(
        make_trainer, make_pickapic, tmp_path / "straight", lora=False,
        callbacks=[CopyOutputAt(3, tmp_path / "resumed")],
    )  # fmt: skip
    checkpoint = str(tmp_path / "resumed" / "checkpoint-3")
    # The snapshot read back is the checkpoint's, not the one the interrupted run left in the output folder.
    live = tmp_path / "resumed" / REWIND_FOLDER
    assert os.listdir(live)
    for name in os.listdir(live):
        os.remove(live / name)
    resumed = _rewind_run(make_trainer, make_pickapic, tmp_path / "resumed", lora=False, resume=checkpoint)
    assert straight.probe_alarm.action.rewinds == resumed.probe_alarm.action.rewinds == [(4, 2)]
    assert equal(trained_weights(resumed), trained_weights(straight))


def test_the_best_checkpoint_is_recorded_by_its_published_name(make_trainer, pickapic_dataset, tmp_path):
    """transformers names the best checkpoint by the folder it wrote; the trainer state holds the published one."""
    trainer = make_trainer(
        max_steps=2, eval_dataset=pickapic_dataset, eval_strategy="steps", eval_steps=1, save_strategy="steps",
        save_steps=1, load_best_model_at_end=True, metric_for_best_model="implicit_acc", output_dir=str(tmp_path),
    )  # fmt: skip
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert os.path.dirname(best) == str(tmp_path) and checkpoint_problem(best) == ""
    for step in (1, 2):
        with open(tmp_path / f"checkpoint-{step}" / "trainer_state.json") as f:
            recorded = json.load(f)["best_model_checkpoint"]
        assert recorded is None or (os.path.dirname(recorded) == str(tmp_path) and os.path.isdir(recorded))
