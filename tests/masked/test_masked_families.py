"""The loss mask at each family's latent size: FLUX's packed tokens, Qwen-Image's five-dimensional latents and an
editing family (FLUX.1 Kontext) train on the masked errors, recomputed here from the model's outputs; video latents
take one mask for every frame."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from PIL import Image

from tests.helpers.masked_pairs import masked_rows, png
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.families import family_for_pipeline
from trl_diffusion_sdpo.families.masks import latent_mask
from trl_diffusion_sdpo.step.predictions import evaluate_objective
from trl_diffusion_sdpo.testing import (
    build_tiny_flux_kontext_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_qwen_image_pipeline,
)

SEQ = 16
BUILDERS = {
    "flux": build_tiny_flux_pipeline,
    "qwen_image": build_tiny_qwen_image_pipeline,
    "flux_kontext": build_tiny_flux_kontext_pipeline,
}


def area_mask(pixel_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[N, 1, R, R]`` to the mean over each latent position's pixel block, shaped to broadcast against ``like``."""
    side = like.shape[-1]
    pooled = F.avg_pool2d(pixel_mask, pixel_mask.shape[-1] // side)
    return pooled.reshape(pooled.shape[0], 1, *([1] * (like.dim() - 4)), side, side)


def masked_mean_error(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    squared = (prediction.double() - target.double()) ** 2
    weights = mask.double().expand_as(squared)
    dims = tuple(range(1, squared.dim()))
    return (weights * squared).sum(dim=dims) / weights.sum(dim=dims)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_each_familys_masked_errors_are_the_masked_mean_over_its_latents(kind, make_config, tmp_path):
    rows = masked_rows(2)
    if kind == "flux_kontext":  # an editing family: each pair edits a source (here the chosen image itself)
        for row in rows:
            row["source_image"] = row["chosen"]
    family = family_for_pipeline(BUILDERS[kind](seed=0, tokenizer_dir=str(tmp_path / "tok"), max_length=SEQ))
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(family.lora_target_modules))
    args = make_config(
        loss_mask=True, beta=100.0, max_sequence_length=SEQ, random_flip=False, proportion_empty_prompts=0.0
    )
    trainer = DiffusionSDPOTrainer(family.pipeline, args=args, train_dataset=Dataset.from_list(rows), peft_config=lora)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    noised = trainer.stages.noised_pair(trainer.model, batch, "train", 0)
    predictions = trainer.stages.predict_noised(trainer.model, noised, False)
    pixel_masks = batch["loss_mask"].transpose(0, 1).flatten(0, 1)  # winners, then losers
    masks = area_mask(pixel_masks, predictions.target_winner)
    pairs = predictions.target_winner.shape[0]
    evaluation = evaluate_objective(trainer.objective_in_force(), predictions)
    expected = {
        "policy_winner": (predictions.policy_winner, predictions.target_winner, masks[:pairs]),
        "policy_loser": (predictions.policy_loser, predictions.target_loser, masks[pairs:]),
        "reference_winner": (predictions.reference_winner, predictions.target_winner, masks[:pairs]),
        "reference_loser": (predictions.reference_loser, predictions.target_loser, masks[pairs:]),
    }
    for name, (prediction, target, mask) in expected.items():
        torch.testing.assert_close(
            getattr(evaluation.errors, name).double(), masked_mean_error(prediction, target, mask), rtol=1e-5, atol=0
        )


def test_a_video_latent_takes_one_mask_for_every_frame():
    """``[N, C, F, h, w]`` latents: every frame's weights are the area fractions of the one image mask."""
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, 0, 4:20, 8:16] = 1.0
    mask[1, 0, :, 30:] = 1.0
    weights = latent_mask(mask, (2, 16, 5, 4, 4))
    assert weights.shape == (2, 1, 1, 4, 4)
    expected = mask.reshape(2, 1, 4, 8, 4, 8).mean(dim=(3, 5))  # each 8x8 block's covered fraction
    torch.testing.assert_close(weights[:, :, 0], expected)
    assert torch.equal(weights.expand(2, 16, 5, 4, 4)[:, 3, 2], expected[:, 0])


def test_wans_masked_errors_are_the_masked_mean_over_every_latent_frame(make_config, tmp_path):
    """Video pairs with an image mask (the left half of a 24 x 20 clip): one mask, resized and cropped as every frame
    is, weighs every latent frame of Wan's ``[N, C, F, h, w]`` errors."""
    pytest.importorskip("av")
    from tests.helpers.video import FRAMES, SIZE, write_video
    from trl_diffusion_sdpo.testing import build_tiny_wan_pipeline

    mask = Image.new("L", SIZE, 0)
    mask.paste(255, (0, 0, SIZE[0] // 2, SIZE[1]))
    rows = [
        {
            "prompt": f"clip {i}",
            "chosen": write_video((30 * i, 0, 90)),
            "rejected": write_video((0, 30 * i, 0)),
            "mask": png(mask),
        }
        for i in range(2)
    ]
    family = family_for_pipeline(build_tiny_wan_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"), max_length=SEQ))
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    args = make_config(
        loss_mask=True,
        beta=100.0,
        max_sequence_length=SEQ,
        resolution=16,
        num_frames=FRAMES,
        random_flip=False,
        proportion_empty_prompts=0.0,
    )
    trainer = DiffusionSDPOTrainer(family.pipeline, args=args, train_dataset=Dataset.from_list(rows), peft_config=lora)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["loss_mask"].shape == (2, 2, 1, 16, 16)
    noised = trainer.stages.noised_pair(trainer.model, batch, "train", 0)
    predictions = trainer.stages.predict_noised(trainer.model, noised, False)
    assert predictions.target_winner.dim() == 5 and predictions.winner_mask.shape[2] == 1
    masks = area_mask(batch["loss_mask"][:, 0], predictions.target_winner)
    evaluation = evaluate_objective(trainer.objective_in_force(), predictions)
    torch.testing.assert_close(
        evaluation.errors.reference_loser.double(),
        masked_mean_error(predictions.reference_loser, predictions.target_loser, masks),
        rtol=1e-5,
        atol=0,
    )
    torch.testing.assert_close(
        evaluation.errors.policy_winner.double(),
        masked_mean_error(predictions.policy_winner, predictions.target_winner, masks),
        rtol=1e-5,
        atol=0,
    )
