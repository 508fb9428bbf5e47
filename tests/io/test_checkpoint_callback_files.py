"""Nothing a callback writes is outside its checkpoint's guarantee: the EMA's state is part of every checkpoint and a
resumed average equals the uninterrupted run's bit for bit; files any callback writes in ``on_save`` (transformers
calls it after its save returns), registered before the trainer's own callbacks or added after them, are listed in
the checkpoint's manifest with their checksums."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import TrainerCallback

from tests.checkpoint_kill_worker import build_trainer
from trl_diffusion_sdpo.callbacks.ema import EMA_FOLDER, EMA_STATE
from trl_diffusion_sdpo.io.checkpoints import MANIFEST_NAME, checkpoint_problem
from trl_diffusion_sdpo.io.saving import LORA_WEIGHTS_NAME

# The review's run: an average that moves (learning rate 1e-2), a checkpoint every step, resumed from step 2 of 4.
SETTINGS = dict(ema_decay=0.999, learning_rate=1e-2, save_total_limit=None)


class WritesOnSave(TrainerCallback):
    """Writes ``<name>.json`` into each checkpoint in ``on_save``, as a user's callback keeping its own state does."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        with open(os.path.join(folder, f"{self.name}.json"), "w") as f:
            json.dump({"step": state.global_step}, f)


def ema_of(trainer) -> tuple[int, list[torch.Tensor]]:
    ema = trainer.ema.ema
    return ema.optimization_step, [p.detach().clone() for p in ema.shadow_params]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run to step 4 with the EMA, a callback given in ``callbacks=`` and one added after the trainer was built,
    each writing a file in ``on_save``; its output folder and its EMA at the end."""
    root = tmp_path_factory.mktemp("whole")
    trainer = build_trainer(str(root / "out"), str(root / "tok"), callbacks=[WritesOnSave("given")], **SETTINGS)
    trainer.add_callback(WritesOnSave("added"))
    trainer.train()
    return str(root / "out"), str(root / "tok"), ema_of(trainer)


def test_a_resumed_ema_equals_the_uninterrupted_runs_bit_for_bit(uninterrupted, tmp_path):
    out, tokenizer, (steps, shadow) = uninterrupted
    assert steps == 4
    resumed_out = str(tmp_path / "resumed")
    os.makedirs(resumed_out)
    checkpoint = shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(resumed_out, "checkpoint-2"))
    trainer = build_trainer(resumed_out, tokenizer, **SETTINGS)
    trainer.train(resume_from_checkpoint=checkpoint)
    resumed_steps, resumed_shadow = ema_of(trainer)
    assert resumed_steps == steps
    for got, want in zip(resumed_shadow, shadow, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the average moved away from the weights it started from: a restarted one would differ
    assert any(not torch.equal(a, b) for a, b in zip(resumed_shadow, trainer.ema.parameters, strict=True))
    # the same weights, the same bytes: the trained LoRA file and the EMA's, to the last byte of their metadata
    for name in (LORA_WEIGHTS_NAME, f"{EMA_FOLDER}/{LORA_WEIGHTS_NAME}"):
        files = [os.path.join(folder, "checkpoint-4", name) for folder in (out, resumed_out)]
        with open(files[0], "rb") as whole, open(files[1], "rb") as again:
            assert whole.read() == again.read(), name


def test_every_file_written_in_on_save_and_the_ema_are_in_the_checkpoints_manifest(uninterrupted, tmp_path):
    out, _, _ = uninterrupted
    for step in (1, 2, 3, 4):
        folder = os.path.join(out, f"checkpoint-{step}")
        with open(os.path.join(folder, MANIFEST_NAME)) as f:
            manifest = json.load(f)
        written = {os.path.relpath(os.path.join(r, n), folder) for r, _, ns in os.walk(folder) for n in ns}
        assert set(manifest["files"]) == set(manifest["sha256"]) == written - {MANIFEST_NAME}
        assert {"given.json", "added.json", f"{EMA_FOLDER}/{EMA_STATE}.safetensors"} <= written
        assert checkpoint_problem(folder) == ""
    damaged = str(tmp_path / "damaged")
    shutil.copytree(os.path.join(out, "checkpoint-4"), damaged)
    with open(os.path.join(damaged, "added.json"), "w") as f:  # the same size, other bytes
        json.dump({"step": 9}, f)
    assert checkpoint_problem(damaged).startswith("added.json is damaged: its SHA-256 differs")
