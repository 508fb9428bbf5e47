"""``async_rewards``: the rewards run in a background thread while the next images are sampled, and the scores that
train a micro-batch are its own images' (checked against the reward recomputed on each generation's images); the
policy does not move within an optimizer step, so the run trains exactly as with ``async_rewards=False``."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from tests.helpers.online import lora_weights, make_trainer

OVERLAP_WAIT = 60.0  # seconds a scoring call waits to see the next images sampled (only a broken pipeline waits long)


def red_minus_blue_scores(images) -> list[float]:
    return [
        float((np.asarray(im, dtype=np.float64)[..., 0] - np.asarray(im, dtype=np.float64)[..., 2]).mean() / 255)
        for im in images
    ]


class OverlapRecorder:
    """The reward, recording each call's thread and whether the policy sampled while the call ran: a call that is
    not the optimizer step's last waits until a sampling forward of the denoiser (no gradient) starts after it."""

    def __init__(self, trainer, calls_per_step: int, wait: bool) -> None:
        self.calls_per_step, self.wait = calls_per_step, wait
        self.sampling_forwards = 0
        self.calls: list[dict] = []
        trainer.family.denoiser.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        if not torch.is_grad_enabled():
            self.sampling_forwards += 1

    def __call__(self, prompts, images, **columns) -> list[float]:
        index, seen = len(self.calls), self.sampling_forwards
        overlapped = None
        if self.wait and index % self.calls_per_step != self.calls_per_step - 1:
            deadline = time.monotonic() + OVERLAP_WAIT
            while self.sampling_forwards == seen and time.monotonic() < deadline:
                time.sleep(0.005)
            overlapped = self.sampling_forwards > seen
        self.calls.append({"thread": threading.current_thread().name, "overlapped": overlapped})
        return red_minus_blue_scores(images)

    __name__ = "red_minus_blue"


def run(tmp_path, async_rewards: bool):
    overrides = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        generation_batch_size=3,  # 2 prompts x 3 samples: two sampling calls per micro-batch
        max_steps=2,
        async_rewards=async_rewards,
    )
    trainer = make_trainer(tmp_path / str(async_rewards), reward=lambda p, i, **c: [0.0] * len(i), **overrides)
    recorder = OverlapRecorder(trainer, calls_per_step=4, wait=async_rewards)
    trainer.rewards.functions[0] = recorder
    finished = []
    finish = trainer.generation.finish

    def recording(pending):
        finished.append(finish(pending))
        return finished[-1]

    trainer.generation.finish = recording
    trainer.train()
    return trainer, recorder, finished


def test_async_rewards_score_beside_sampling_and_train_each_batch_on_its_own_scores(tmp_path):
    trainer, recorder, finished = run(tmp_path, async_rewards=True)
    assert len(recorder.calls) == 8 and all(c["thread"].startswith("rewards") for c in recorder.calls)
    # every call but each step's last (which only training follows) ran while the next images were sampled
    assert [c["overlapped"] for c in recorder.calls] == [True, True, True, None] * 2
    assert len(finished) == 4
    for generated in finished:  # the rewards a micro-batch is paired on are those of its own images
        images = [image for row in generated.images for image in row]
        expected = torch.tensor(red_minus_blue_scores(images), dtype=torch.float64).reshape(generated.rewards.shape)
        torch.testing.assert_close(generated.rewards, expected, rtol=0, atol=0)

    plain, plain_recorder, plain_finished = run(tmp_path, async_rewards=False)
    assert all(c["thread"] == threading.main_thread().name for c in plain_recorder.calls)
    for ours, theirs in zip(finished, plain_finished, strict=True):
        torch.testing.assert_close(ours.rewards, theirs.rewards, rtol=0, atol=0)
        assert ours.pairs == theirs.pairs
    reference = lora_weights(plain)
    for name, value in lora_weights(trainer).items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)
