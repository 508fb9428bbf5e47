"""The model family decides how a pipeline's UNet is conditioned; SD 1.x/2.x prompt encoding must equal the diffusers
pipeline's own, and pipelines the trainer cannot condition are rejected with a message saying why."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DiffusionPipeline

from trl_diffusion_sdpo.families import StableDiffusionFamily, family_for_pipeline


def test_sd_family_encodes_prompts_as_the_diffusers_pipeline_does(make_pipeline) -> None:
    pipe = make_pipeline()
    family = family_for_pipeline(pipe)
    assert isinstance(family, StableDiffusionFamily) and not family.needs_time_ids
    prompts = ["a watercolor fox", ""]
    embeds = family.encode_prompts(family.prompt_tokenizer()(prompts))
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(
            prompts, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    torch.testing.assert_close(embeds.encoder_hidden_states, expected, atol=1e-6, rtol=0)
    assert embeds.pooled is None
    assert set(family.denoiser_conditioning(embeds, None)) == {"encoder_hidden_states"}


def test_pipeline_without_a_unet_is_rejected(make_pipeline) -> None:
    class NoUNetPipeline(DiffusionPipeline):
        unet = None

    with pytest.raises(ValueError, match="no `unet`"):
        family_for_pipeline(NoUNetPipeline())


def test_sd2_style_v_prediction_model_trains_and_starts_at_log_2(make_pipeline, make_trainer) -> None:
    trainer = make_trainer(lora=True, pipeline=make_pipeline(prediction_type="v_prediction"), max_steps=1)
    assert trainer.noiser.scheduler.config.prediction_type == "v_prediction"
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
