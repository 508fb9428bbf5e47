"""Loss masks in the data: read from a mask column (tables, pair folders), derived before training from where an
editing pair differs and grown (``add_loss_masks``, ``train --auto_mask --mask_dilate``), resized with the images,
validated per row, and carried by the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from tests.helpers.masked_pairs import edited_pair, mask_image, masked_dataset, masked_rows
from trl_diffusion_sdpo.data.formats import load_preference_data
from trl_diffusion_sdpo.data.masks import add_loss_masks

RESOLUTION = 32  # the tests' configs (conftest.fast_config_values)


def first_batch(trainer) -> dict[str, torch.Tensor]:
    return next(iter(trainer.get_train_dataloader()))


def resized_mask(mask: Image.Image) -> torch.Tensor:
    """A square mask at the training resolution as PIL resizes it (square: no crop), weights in [0, 1]."""
    resized = mask.resize((RESOLUTION, RESOLUTION), resample=Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)


def grown(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """The largest value within ``pixels`` (in each direction) of every position, by shifting a padded copy."""
    padded = np.pad(mask.numpy(), pixels)
    side = mask.shape[-1]
    shifts = [padded[dy : dy + side, dx : dx + side] for dy in range(2 * pixels + 1) for dx in range(2 * pixels + 1)]
    return torch.from_numpy(np.max(shifts, axis=0))


def test_the_mask_column_reaches_the_batch_resized_with_its_images(make_trainer):
    trainer = make_trainer(train_dataset=masked_dataset(), loss_mask=True)
    batch = first_batch(trainer)
    assert batch["loss_mask"].shape == (2, 2, 1, RESOLUTION, RESOLUTION)
    expected = resized_mask(mask_image())
    for pair in range(2):
        for image in range(2):  # one mask per image, the pair's, for the trainer's per-image flips and crops
            torch.testing.assert_close(batch["loss_mask"][pair, image, 0], expected, atol=1e-6, rtol=0)


def test_derived_masks_mark_where_the_pair_differs_and_dilate_grows_them(make_trainer):
    """The pairs differ exactly inside the rectangle the mask column marks: the derived mask is that mask, and
    dilate=2 is its max filter over 5x5 pixels at the images' size, then resized with them."""
    derived = add_loss_masks(masked_dataset(with_mask=False), derive=True)
    plain = first_batch(make_trainer(train_dataset=derived, loss_mask=True))
    given = first_batch(make_trainer(train_dataset=masked_dataset(), loss_mask=True))
    torch.testing.assert_close(plain["loss_mask"], given["loss_mask"], atol=0, rtol=0)
    dilated_rows = add_loss_masks(masked_dataset(with_mask=False), derive=True, dilate=2)
    dilated = first_batch(make_trainer(train_dataset=dilated_rows, loss_mask=True))
    source = torch.from_numpy(np.asarray(mask_image(), dtype=np.float32))
    expected = resized_mask(Image.fromarray(grown(source, 2).numpy().astype(np.uint8), mode="L"))
    torch.testing.assert_close(dilated["loss_mask"][0, 0, 0], expected, atol=1e-6, rtol=0)
    assert dilated["loss_mask"].sum() > plain["loss_mask"].sum()


def test_a_derived_mask_below_the_threshold_marks_nothing_and_the_row_is_refused(make_trainer):
    """A pair differing by 128 of 255 everywhere in the rectangle: a threshold above 0.5 marks nothing, so training
    refuses the all-black mask, naming the row, rather than train on it."""
    derived = add_loss_masks(masked_dataset(with_mask=False), derive=True, threshold=0.6)
    with pytest.raises(ValueError, match=r"row 0, column 'mask': the mask is all black"):
        make_trainer(train_dataset=derived, loss_mask=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("mask_size", r"row 1, column 'mask': the mask is 20x20 and the images 40x40"),
        ("pair_size", r"row 1, column 'mask': the two images are 40x40 and 32x32"),
        ("missing", r"row 1, column 'mask': image is missing"),
    ],
)
def test_a_bad_mask_is_named_by_its_row(make_trainer, change, message):
    from tests.helpers.masked_pairs import png

    rows = masked_rows(3)
    if change == "mask_size":
        rows[1]["mask"] = png(mask_image(size=(20, 20)))
    elif change == "pair_size":
        rows[1]["rejected"] = png(edited_pair(1)[1].resize((32, 32)))
    else:
        rows[1]["mask"] = None
    with pytest.raises(ValueError, match=message):
        make_trainer(train_dataset=Dataset.from_list(rows), loss_mask=True)


def test_loss_mask_without_a_mask_column_names_the_column_and_the_alternatives(make_trainer):
    with pytest.raises(ValueError, match=r"column 'mask', which the dataset lacks.*--auto_mask"):
        make_trainer(train_dataset=masked_dataset(with_mask=False), loss_mask=True)


def test_pair_folders_and_tables_read_the_mask(tmp_path):
    """A pair folder's mask.png, a mask/ folder beside side folders, and a JSONL mask column of relative paths all
    become the mask column, each row's own file."""
    per_pair, sides, table = tmp_path / "per_pair", tmp_path / "sides", tmp_path / "table"
    records = []
    for i in range(2):
        chosen, rejected = edited_pair(i)
        folder = per_pair / f"pair{i}"
        folder.mkdir(parents=True)
        chosen.save(folder / "chosen.png")
        rejected.save(folder / "rejected.png")
        mask_image(fill=100 + i).save(folder / "mask.png")
        (folder / "prompt.txt").write_text(f"edit {i}")
        for side, image in (("chosen", chosen), ("rejected", rejected), ("mask", mask_image(fill=100 + i))):
            (sides / side).mkdir(parents=True, exist_ok=True)
            image.save(sides / side / f"{i}.png")
        (sides / "chosen" / f"{i}.txt").write_text(f"edit {i}")
        table.mkdir(exist_ok=True)
        for side, image in (("chosen", chosen), ("rejected", rejected), ("mask", mask_image(fill=100 + i))):
            image.save(table / f"{side}{i}.png")
        records.append(
            {"prompt": f"edit {i}", "chosen": f"chosen{i}.png", "rejected": f"rejected{i}.png", "mask": f"mask{i}.png"}
        )
    (table / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    for path in (per_pair, sides, table / "pairs.jsonl"):
        dataset = load_preference_data(str(path))
        values = [Image.open(value).getextrema() for value in dataset["mask"]]
        assert values == [(100, 100), (101, 101)], path


def test_a_pair_folder_without_its_mask_is_named(tmp_path, make_trainer):
    for i in range(2):
        chosen, rejected = edited_pair(i)
        folder = tmp_path / f"pair{i}"
        folder.mkdir()
        chosen.save(folder / "chosen.png")
        rejected.save(folder / "rejected.png")
        (folder / "prompt.txt").write_text(f"edit {i}")
    mask_image().save(tmp_path / "pair0" / "mask.png")
    dataset = load_preference_data(str(tmp_path))
    with pytest.raises(ValueError, match=r"pair1: no mask.<ext>"):
        make_trainer(train_dataset=dataset, loss_mask=True)


def test_the_cache_carries_the_mask_and_trains_as_the_uncached_run(make_trainer, tmp_path):
    """Cached and uncached runs from one seed, flips on: each batch's mask at latent size is the same (the cached one
    mirrored in latent space, the uncached one in pixels), and so are the losses."""
    losses, masks = {}, {}
    for cached in (False, True):
        trainer = make_trainer(
            train_dataset=masked_dataset(),
            loss_mask=True,
            cache_latents=cached,
            latent_cache_dir=str(tmp_path / "cache"),
            random_flip=True,
            max_steps=2,
            safeguard_mu=0.9,
        )
        batch = trainer._prepare_inputs(first_batch(trainer))
        # the draws of a step the run never takes (1000), keyed alike in both: the run's own draws stay untouched
        masks[cached] = trainer.stages.noised_pair(trainer.model, batch, "train", 1000).loss_mask
        trainer.train()
        losses[cached] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert masks[True].shape == (4, 1, RESOLUTION // 8, RESOLUTION // 8)
    torch.testing.assert_close(masks[True], masks[False], atol=1e-6, rtol=0)
    # The VAE encodes in batches of other sizes with and without the cache: its float noise, amplified by beta = 5000
    # on errors over the masked region only, moves the second step's loss by about 1e-4.
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-3)


def test_a_mask_is_flipped_and_cropped_with_its_image(make_pipeline):
    """The mask follows its image through the step's augmentations: a mask made from an image's first channel stays
    that channel's mask after a per-image flip and a per-image random crop."""
    from trl_diffusion_sdpo.data.random_crop import crop_pairs
    from trl_diffusion_sdpo.families import family_for_pipeline
    from trl_diffusion_sdpo.step.stages import encode_batch

    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 2, 3, 40, 48, generator=generator) * 2 - 1
    inputs = {
        "pixel_values": pixels,
        "loss_mask": (pixels[:, :, :1] + 1) / 2,
        "crop_sizes": torch.tensor([[40.0, 48.0], [40.0, 44.0]]).expand(2, 2, 2).clone(),
        "time_ids": torch.zeros(2, 2, 6),
    }
    cropped = crop_pairs(inputs, torch.rand(2, 2, 2, generator=generator), RESOLUTION)
    torch.testing.assert_close(cropped["loss_mask"], (cropped["pixel_values"][:, :, :1] + 1) / 2)
    clips = torch.rand(2, 2, 3, 3, 40, 48, generator=generator) * 2 - 1  # video: [B, 2, 3, F, H, W]
    video = dict(inputs, pixel_values=clips, loss_mask=(clips[:, :, :1, 1] + 1) / 2)  # frame 1's first channel
    video_cropped = crop_pairs(video, torch.rand(2, 2, 2, generator=generator), RESOLUTION)
    torch.testing.assert_close(video_cropped["loss_mask"], (video_cropped["pixel_values"][:, :, :1, 1] + 1) / 2)

    family = family_for_pipeline(make_pipeline())
    cropped = dict(cropped, input_ids=torch.zeros(2, 32, dtype=torch.long), time_ids_flipped=cropped["time_ids"])
    flip = torch.tensor([[True, False], [False, True]])
    encoded = encode_batch(cropped, family, flip, torch.float32)
    rows = torch.cat([cropped["loss_mask"][:, 0], cropped["loss_mask"][:, 1]])  # winners, then losers
    mirrored = torch.stack([rows[0].flip(-1), rows[1], rows[2], rows[3].flip(-1)])
    torch.testing.assert_close(encoded.loss_mask, mirrored, atol=0, rtol=0)


def test_the_sharded_cache_carries_the_masks_the_in_trainer_cache_holds(tmp_path, make_config, make_pipeline):
    """The streamed, sharded cache (``trl-diffusion-sdpo cache``) stores each pair's latent mask as the in-trainer
    cache does, and refuses a run whose mask setting differs from its own, naming it."""
    from trl_diffusion_sdpo.data.latent_cache import CachedPreferenceCollator, build_latent_cache
    from trl_diffusion_sdpo.data.preparation import prepare_preference_dataset
    from trl_diffusion_sdpo.data.sharded_cache import build_sharded_latent_cache
    from trl_diffusion_sdpo.families import family_for_pipeline

    family = family_for_pipeline(make_pipeline())
    args = make_config(loss_mask=True)
    dataset = add_loss_masks(masked_dataset(3, with_mask=False), derive=True, dilate=1)
    sharded = build_sharded_latent_cache(dataset, args, family, str(tmp_path / "sharded"), chunk_size=2, batch_size=1)
    prepared, columns, _ = prepare_preference_dataset(dataset, args)
    reference = build_latent_cache(
        prepared, columns, family, resolution=RESOLUTION, random_flip=True, cache_dir=str(tmp_path / "map")
    )
    expected = CachedPreferenceCollator(with_flipped=True)([reference.dataset[i] for i in range(3)])
    got = sharded.collator()(list(sharded.dataset))
    assert got["loss_mask"].shape == (3, 2, 1, RESOLUTION // 8, RESOLUTION // 8)
    torch.testing.assert_close(got["loss_mask"], expected["loss_mask"], rtol=0, atol=0)
    sharded.check_matches(family, args)
    with pytest.raises(ValueError, match="loss masks: built with, wanted without"):
        sharded.check_matches(family, make_config())


def test_online_training_refuses_a_loss_mask_its_sampled_pairs_cannot_carry(tmp_path):
    from trl_diffusion_sdpo.online.config import OnlineDiffusionSDPOConfig

    with pytest.raises(ValueError, match="loss_mask=True: sampled pairs carry no loss mask yet"):
        OnlineDiffusionSDPOConfig(output_dir=str(tmp_path), random_flip=False, loss_mask=True)


@pytest.mark.slow
def test_the_command_line_trains_pair_folders_with_their_masks(tmp_path):
    """``trl-diffusion-sdpo train --loss_mask true`` on pair folders holding mask.png, as a user runs it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for i in range(4):
        chosen, rejected = edited_pair(i)
        folder = tmp_path / "pairs" / f"pair{i}"
        folder.mkdir(parents=True)
        chosen.save(folder / "chosen.png")
        rejected.save(folder / "rejected.png")
        mask_image().save(folder / "mask.png")
        (folder / "prompt.txt").write_text(f"red circle on white {i}")
    config = str(root / "examples" / "configs" / "tiny_cpu.yaml")
    command = [sys.executable, "-m", "trl_diffusion_sdpo", "train", "--config", config, "--dataset_name"]
    command += [str(tmp_path / "pairs"), "--output_dir", str(tmp_path / "tuned"), "--max_steps", "2"]
    command += ["--logging_steps", "1", "--loss_mask", "true", "--mask_dilate", "1"]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (result.stdout + result.stderr).count("'loss'") >= 2
