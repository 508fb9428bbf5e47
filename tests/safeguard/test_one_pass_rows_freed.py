"""Nothing of the one pass's rows outlives the step: after a full-tuning optimizer step of the tiny SD trainer under
bf16 autocast, the live tensors beyond Diffusion-DPO's are at most a tenth of the trainable weights' bytes, in the
parameter and in the update space.

The census (:func:`~trl_diffusion_sdpo.engines.memory.measure.live_tensor_bytes`) sums the storages of every tensor
the garbage collector tracks, each once, at the end of the second optimizer step (``on_step_end``: after the
optimizer's step and ``zero_grad``), less the same census at the start of training; Diffusion-DPO's run gives the
baseline (the weights' optimizer state, the trainer's own buffers). The second step is the first whose rows are laid
out in the products' dtypes (bf16 for the convolutions and linear layers). Every census runs with every live object
back under the collector (:func:`live_bytes`); in between, what was alive at the last census is frozen out of the
collector's scans again, so that the collections a run makes (accelerate's at each ``train()``, the automatic ones)
scan only what it made since, as the other tests' do.

The update space's search keeps a workspace of run-sized buffers across steps (``UpdateSpaceRule.workspace``, bounded
by its run size, ``CPU_CHUNK`` elements, not by the model's): on the tiny model it is several times the trainable
weights, so it is counted apart (the census once more without it) and the limit applies to the rest.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch
from transformers import TrainerCallback

from trl_diffusion_sdpo.engines.memory.measure import live_tensor_bytes

LIMIT = 0.10  # of the trainable weights' bytes
STEPS = 2


def live_bytes() -> int:
    """:func:`live_tensor_bytes` of every live object: unfrozen for the census, frozen again after it."""
    gc.unfreeze()
    try:
        return live_tensor_bytes()
    finally:
        gc.freeze()


@pytest.fixture
def frozen_between_censuses() -> Iterator[None]:
    """:func:`live_bytes` freezes what is alive at each census: every object is back under the collector after the
    test, so that what it leaves is collected."""
    yield
    gc.unfreeze()


class Census(TrainerCallback):
    """Live tensor bytes at the start of training and at the end of the last step; at that end also without the
    update space's workspace (``workspace``: the bytes that dropping it gave back)."""

    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref = trainer_ref
        self.start = self.end = self.workspace = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = live_bytes()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps:
            return
        self.end = live_bytes() - self.start
        rule = getattr(self.trainer_ref[0].safeguard, "rule", None)
        if rule is not None and hasattr(rule, "workspace"):
            rule.workspace = type(rule.workspace)()  # the search's buffers dropped: what they held is given back
            self.workspace = self.end - (live_bytes() - self.start)


def held(make_trainer, make_pickapic, space: str) -> tuple[int, int, int, object]:
    """``(bytes live at the last step's end beyond the start, of which the update space's workspace, trainable
    weights' bytes, the trainer)`` of a full-tuning bf16 run of ``space`` (``"none"``: Diffusion-DPO)."""
    ref: list = []
    census = Census(ref)
    trainer = make_trainer(
        lora=False,
        bf16=True,
        max_steps=STEPS,
        logging_steps=1000,
        safeguard_space=space,
        train_dataset=make_pickapic(2 * STEPS),
        callbacks=[census],
    )
    ref.append(trainer)
    trainer.train()
    trainable = sum(p.numel() * p.element_size() for p in trainer.family.denoiser.parameters() if p.requires_grad)
    return census.end, census.workspace, trainable, trainer


def test_the_rows_do_not_outlive_the_step(make_trainer, make_pickapic, frozen_between_censuses):
    """Each exact space's live bytes at a step's end, less Diffusion-DPO's (and less the update space's search
    workspace), are at most :data:`LIMIT` of the trainable weights' bytes; the one pass ran, its rows in bf16."""
    dpo, _, trainable, _ = held(make_trainer, make_pickapic, "none")
    for space in ("parameter", "update"):
        mine, workspace, _, trainer = held(make_trainer, make_pickapic, space)
        stage = trainer.safeguard.backward_stage
        assert stage.two_pass_reason is None  # the one pass ran
        assert torch.bfloat16 in {piece.dtype for piece in stage.one_pass.pieces}
        extra = mine - workspace - dpo
        assert extra <= LIMIT * trainable, (space, extra / trainable, workspace / trainable)
        del trainer, stage
