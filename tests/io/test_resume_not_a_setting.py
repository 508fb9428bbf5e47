"""Resuming lists the settings that changed since the checkpoint; how the run was started (``resume_from_checkpoint``,
which the command line sets to true) is not one of them."""

from __future__ import annotations

import logging

from tests.checkpoint_kill_worker import build_trainer


def test_resuming_does_not_list_resume_from_checkpoint_as_a_changed_setting(tmp_path, caplog):
    out, tokenizers = str(tmp_path / "out"), str(tmp_path / "tok")
    build_trainer(out, tokenizers, max_steps=1).train()
    trainer = build_trainer(out, tokenizers, max_steps=2, resume_from_checkpoint=True)  # as --resume_from_checkpoint
    with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo.io"):
        trainer.train(resume_from_checkpoint=True)
    changed = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert changed and "max_steps (1 -> 2)" in changed[0]  # the listing ran and names the real change
    assert not any("resume_from_checkpoint" in message for message in changed), changed
