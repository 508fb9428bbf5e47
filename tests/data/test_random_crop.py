"""random_crop draws its offsets from the keyed generator, in the trainer: resuming crops exactly as before."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from tests.helpers.common import changed_keys, lora_config, snapshot
from tests.helpers.rewind import CopyOutputAt
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.data.collators import PreferenceCollator
from trl_diffusion_sdpo.data.columns import PreferenceColumns
from trl_diffusion_sdpo.data.random_crop import crop_pairs
from trl_diffusion_sdpo.data.transforms import PairTransform


def ramp(width: int, height: int) -> Image.Image:
    """Red = column, green = row: a crop's offsets can be read off its first pixel."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, :, 0] = np.arange(width, dtype=np.uint8)[None, :]
    array[:, :, 1] = np.arange(height, dtype=np.uint8)[:, None]
    return Image.fromarray(array)


def collate(pairs, independent=False):
    columns = PreferenceColumns("prompt", "chosen", "rejected")
    collator = PreferenceCollator(
        columns, lambda p: {}, PairTransform(32, random_crop=True, independent=independent), with_flipped=True
    )
    return collator([{"prompt": "p", "chosen": w, "rejected": r} for w, r in pairs])


def test_the_collator_leaves_the_random_crop_to_the_trainer_and_draws_nothing():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    batch = collate([(ramp(96, 32), ramp(32, 64)), (ramp(40, 32), ramp(32, 32))])
    assert torch.equal(torch.get_rng_state(), state)  # no global draws
    assert batch["pixel_values"].shape == (2, 2, 3, 64, 96)  # resized, zero-padded to the largest
    assert batch["crop_sizes"].tolist() == [[[32, 96], [64, 32]], [[32, 40], [32, 32]]]


@pytest.mark.parametrize("independent", [False, True])
def test_crop_pairs_takes_the_region_its_time_ids_report(independent):
    pairs = [(ramp(96, 32), ramp(32, 64)), (ramp(40, 32), ramp(32, 48))]  # no resampling
    batch = collate(pairs, independent)
    fractions = torch.tensor([[0.5, 0.99], [0.0, 0.3]]) if not independent else torch.rand(2, 4)
    out = crop_pairs(batch, fractions, 32)
    assert out["pixel_values"].shape == (2, 2, 3, 32, 32)
    per_image = fractions.reshape(2, -1, 2).expand(2, 2, 2)
    for b, pair in enumerate(pairs):
        for k, image in enumerate(pair):
            top, left = out["time_ids"][b, k, 2:4].int().tolist()
            expected_top = min(int(per_image[b, k, 0] * (image.height - 31)), image.height - 32)
            expected_left = min(int(per_image[b, k, 1] * (image.width - 31)), image.width - 32)
            assert (top, left) == (expected_top, expected_left)
            crop = np.rint((out["pixel_values"][b, k].numpy() + 1) * 127.5).astype(int)
            np.testing.assert_array_equal(crop[0, 0], np.arange(left, left + 32))  # red: the columns
            np.testing.assert_array_equal(crop[1, :, 0], np.arange(top, top + 32))  # green: the rows
            assert out["time_ids_flipped"][b, k, 3] == image.width - 32 - left
            assert out["time_ids"][b, k, :2].tolist() == [image.height, image.width]


def textured_pairs(n: int = 6) -> Dataset:
    """Pick-a-Pic rows of ramp images of different shapes: unlike flat colours, every crop of them differs."""
    sizes = [(72, 32), (32, 56), (48, 40), (40, 64)]
    rows = []
    for i in range(n):
        images = []
        for k in range(2):
            buffer = io.BytesIO()
            ramp(*sizes[(i + 2 * k) % 4]).save(buffer, format="PNG")
            images.append(buffer.getvalue())
        rows.append({"caption": f"ramp {i}", "jpg_0": images[0], "jpg_1": images[1], "label_0": float(i % 2)})
    return Dataset.from_list(rows)


def test_resuming_with_random_crop_gives_the_weights_of_an_uninterrupted_run(make_pipeline, make_config, tmp_path):
    dataset = textured_pairs()

    class CopyAndSnapshotAt(CopyOutputAt):
        """The output folder copied right after the save at ``step`` (an interruption there) and the weights then."""

        def on_save(self, args, state, control, model=None, **kwargs):
            super().on_save(args, state, control, **kwargs)
            if state.global_step == self.step:
                self.weights = snapshot(model)

    def run(output_dir, callbacks=(), resume=None):
        trainer = DiffusionSDPOTrainer(
            make_pipeline(seed=0),
            args=make_config(
                output_dir=str(output_dir),
                max_steps=4,
                save_strategy="steps",
                save_steps=2,
                random_crop=True,
                independent_augmentation=True,
            ),
            train_dataset=dataset,
            peft_config=lora_config(),
        )
        for callback in callbacks:
            trainer.add_callback(callback)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    # The run interrupted after step 2 is the uninterrupted one up to there: its output folder right after that save.
    interrupted = CopyAndSnapshotAt(2, tmp_path / "interrupted")
    straight = run(tmp_path / "straight", callbacks=[interrupted])
    resumed = run(tmp_path / "interrupted", resume=str(tmp_path / "interrupted" / "checkpoint-2"))
    assert changed_keys(interrupted.weights, snapshot(resumed.model)), "resuming trained nothing"
    a, b = snapshot(straight.model), snapshot(resumed.model)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
