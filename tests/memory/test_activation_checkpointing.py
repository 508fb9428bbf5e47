"""Activation checkpointing in every family: with ``activation_checkpointing=True`` the tiny pipeline's denoiser
recomputes its blocks (diffusers' ``is_gradient_checkpointing``) and a micro-batch's gradients equal those of the same
trainer without it. SD runs by default; the other families (FLUX.1's is in tests/families/test_flow_families.py) are
slow."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from datasets import Dataset

from tests.helpers import (
    flux2,
    flux_kontext,
    hunyuan_video15,
    qwen_image,
    qwen_image21,
    qwen_image_edit,
    video,
    z_image,
)
from tests.helpers.common import edit_rows, first_batch_gradients, pickapic_rows
from tests.helpers.flow_family_checks import FlowCase
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.testing import build_tiny_sd3_pipeline, build_tiny_sd_pipeline, build_tiny_sdxl_pipeline


def flow_case(case: FlowCase, rows=pickapic_rows) -> tuple[Any, dict[str, Any], Any]:
    values = {"beta": 100.0, "max_sequence_length": case.sequence_length, **case.config_values}
    return case.build, values, rows


def cases() -> dict[str, Any]:
    return {
        "sd": lambda: (build_tiny_sd_pipeline, {}, pickapic_rows),
        "sdxl": lambda: (build_tiny_sdxl_pipeline, {}, pickapic_rows),
        "sd3": lambda: (build_tiny_sd3_pipeline, {"beta": 100.0}, pickapic_rows),
        "flux-kontext": lambda: flow_case(flux_kontext.CASE, rows=edit_rows),
        "flux2-klein": lambda: flow_case(flux2.CASES["klein"]),
        "qwen-image": lambda: flow_case(qwen_image.CASE),
        "qwen-image-2.1": lambda: flow_case(qwen_image21.CASE),
        "qwen-image-edit": lambda: flow_case(qwen_image_edit.EDIT_CASE, rows=edit_rows),
        "z-image": lambda: flow_case(z_image.CASE),
        "wan": lambda: flow_case(video.CASE, rows=video.video_rows),
        "hunyuan-video-1.5": lambda: flow_case(hunyuan_video15.CASE, rows=video.video_rows),
    }


FAMILIES = [pytest.param(name, marks=() if name == "sd" else pytest.mark.slow) for name in cases()]


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_gives_the_same_gradients(family, make_config, tmp_path) -> None:
    build, values, rows = cases()[family]()
    dataset = Dataset.from_list(rows(2))
    grads = []
    for checkpointing in (False, True):
        pipe = build(seed=0, tokenizer_dir=str(tmp_path / f"tokenizer-{checkpointing}"))
        trainer = DiffusionSDPOTrainer(
            pipe,
            args=make_config(**values, activation_checkpointing=checkpointing, max_steps=1),
            train_dataset=dataset,
        )
        assert trainer.family.denoiser.is_gradient_checkpointing == checkpointing
        grads.append(first_batch_gradients(trainer))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])
