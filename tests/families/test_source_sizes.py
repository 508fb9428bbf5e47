"""Editing families encode a pair's source at the size ``source_resolution`` chooses (by default the training
resolution) and warn at start where their pipeline, called with its defaults, would encode that source at another
size: FluxKontextPipeline resizes its input image to about 1024^2 pixels, and so do Qwen-Image-Edit's pipelines.

The pipeline's own size and token count are read from real pipeline calls (its VAE encoder's input, the source
positions its transformer receives), not recomputed.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from PIL import Image

from tests.helpers.common import edit_rows, pickapic_rows
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo import testing as tiny
from trl_diffusion_sdpo.families import family_for_pipeline

SEQ = 16
LOGGER = "trl_diffusion_sdpo.families.editing"


@pytest.fixture
def kontext(tmp_path):
    return tiny.build_tiny_flux_kontext_pipeline(tokenizer_dir=str(tmp_path / "tok"), max_length=SEQ)


def config(make_config, source_resolution: int | None = None, **overrides):
    args = make_config(max_sequence_length=SEQ, max_steps=1, beta=100.0, **overrides)
    if source_resolution is not None:
        args.source_resolution = source_resolution
    return args


class PipelineSources:
    """What a pipeline call does with its source image: the pixel size its VAE encodes and, for FLUX.1 Kontext, the
    number of source tokens its transformer receives (positions whose first coordinate is 1)."""

    def __init__(self, pipe) -> None:
        self.encoded: list[tuple[int, int]] = []  # (width, height) of each VAE encoder input
        self.source_tokens: list[int] = []
        pipe.vae.encoder.register_forward_pre_hook(self._encoder)
        pipe.transformer.register_forward_pre_hook(self._transformer, with_kwargs=True)

    def _encoder(self, module, args) -> None:
        self.encoded.append((args[0].shape[-1], args[0].shape[-2]))

    def _transformer(self, module, args, kwargs) -> None:
        ids = kwargs.get("img_ids")
        if ids is not None:
            self.source_tokens.append(int((ids[:, 0] == 1).sum()))


def kontext_call(pipe, image: Image.Image, **kwargs) -> None:
    pipe(
        prompt="make it red",
        image=image,
        num_inference_steps=1,
        max_area=32 * 32,  # a small output: only the source's size is under test
        max_sequence_length=SEQ,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )


def family_tokens(family, resolution: int) -> int:
    """Source tokens of a ``resolution``-pixel square source as the family encodes it for training."""
    pixels = torch.rand((1, 1, 3, resolution, resolution), generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = family.encode_sources(pixels)
    return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)


def test_kontext_warns_at_start_that_its_pipeline_encodes_sources_at_1024(kontext, make_config, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        DiffusionSDPOTrainer(kontext, args=config(make_config), train_dataset=Dataset.from_list(edit_rows(2)))
    (message,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "encodes each source at 32x32 pixels (4 tokens)" in message
    assert (
        "FluxKontextPipeline, called with its defaults, encodes a 32x32 source at 1024x1024 (4096 tokens)" in message
    )
    assert "source_resolution=1024" in message and "_auto_resize=False" in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer = DiffusionSDPOTrainer(
            kontext, args=config(make_config, 1024), train_dataset=Dataset.from_list(edit_rows(2))
        )
    assert not [r for r in caplog.records if r.name == LOGGER]
    assert trainer.family.source_resolution == 1024


@pytest.fixture
def kontext_sized(kontext):
    """``kontext`` with a VAE whose middle blocks have no self-attention: the test encodes sources of about a
    megapixel, where that attention over every latent position (128 x 128 at 1024^2) is most of the time, and the sizes
    and token counts it reads come from the VAE's convolutions and the pipeline's resizing alone."""
    from diffusers import AutoencoderKL

    lean = AutoencoderKL.from_config(kontext.vae.config, mid_block_add_attention=False)
    assert not lean.load_state_dict(kontext.vae.state_dict(), strict=False).missing_keys
    kontext.register_modules(vae=lean)
    return kontext


def test_kontext_sources_have_the_pipelines_token_count_for_the_same_image_and_setting(kontext_sized) -> None:
    kontext = kontext_sized
    family = family_for_pipeline(kontext, max_sequence_length=SEQ)
    seen = PipelineSources(kontext)
    image = Image.new("RGB", (32, 32), (200, 40, 40))

    kontext_call(kontext, image)  # the defaults: _auto_resize=True
    assert seen.encoded[-1] == family.pipeline_source_size(32, 32) == (1024, 1024)
    family.configure_sources(SimpleNamespace(source_resolution=1024, resolution=32))
    assert family_tokens(family, 32) == seen.source_tokens[-1] == 4096

    kontext_call(kontext, image, _auto_resize=False)  # the source at its own size
    family.configure_sources(SimpleNamespace(source_resolution=None, resolution=32))
    assert seen.encoded[-1] == (32, 32)
    assert family_tokens(family, 32) == seen.source_tokens[-1] == 4

    # another aspect ratio: the nearest preferred resolution, as the pipeline picks it
    kontext_call(kontext, Image.new("RGB", (48, 32), (200, 40, 40)))
    assert seen.encoded[-1] == family.pipeline_source_size(48, 32) == (1248, 832)


def test_training_encodes_the_sources_at_source_resolution(kontext, make_config) -> None:
    seen = PipelineSources(kontext)
    trainer = DiffusionSDPOTrainer(
        kontext, args=config(make_config, 64), train_dataset=Dataset.from_list(edit_rows(2))
    )
    trainer.train()
    assert (64, 64) in seen.encoded  # the sources, resized from the 32-pixel training crop
    assert set(seen.source_tokens) == {(64 // 16) ** 2}  # every training call carries 16 source tokens


def test_source_resolution_is_refused_where_it_cannot_apply(kontext, make_pipeline) -> None:
    family = family_for_pipeline(kontext, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match="multiple of 16"):
        family.configure_sources(SimpleNamespace(source_resolution=40, resolution=32))
    with pytest.raises(ValueError, match="cache_latents"):
        family.configure_sources(SimpleNamespace(source_resolution=64, resolution=32, cache_latents=True))
    with pytest.raises(ValueError, match="editing families"):
        family_for_pipeline(make_pipeline()).configure_sources(SimpleNamespace(source_resolution=64, resolution=32))


def test_a_text_to_image_family_never_warns(make_pipeline, make_config, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        DiffusionSDPOTrainer(
            make_pipeline(), args=make_config(max_steps=1), train_dataset=Dataset.from_list(pickapic_rows(2))
        )
    assert not [r for r in caplog.records if r.name == LOGGER]


def flux2_reference_sizes(tmp_path, sizes: list[tuple[int, int]]) -> None:
    """For each ``(width, height)``: the size the family says FLUX.2's pipeline encodes a reference at is the size
    its VAE encoder receives in a real call."""
    pipe = tiny.build_tiny_flux2_klein_pipeline(tokenizer_dir=str(tmp_path / "tok"))
    family = family_for_pipeline(pipe, max_sequence_length=48)
    seen = PipelineSources(pipe)
    for size in sizes:
        pipe(
            prompt="a red fox",
            image=Image.new("RGB", size, (200, 40, 40)),
            height=32,
            width=32,
            num_inference_steps=1,
            max_sequence_length=48,
            output_type="latent",
        )
        assert seen.encoded[-1] == family.pipeline_source_size(*size)
    assert family.pipeline_source_size(128, 128) == (128, 128)


def test_flux2_encodes_a_reference_at_its_own_size(tmp_path) -> None:
    """FLUX.2 keeps a reference's size (sides rounded down to the latent patch): a square training source is what
    the pipeline encodes, so nothing is to warn about."""
    flux2_reference_sizes(tmp_path, [(88, 72)])


@pytest.mark.slow
def test_flux2_scales_a_reference_of_more_than_a_megapixel_down(tmp_path) -> None:
    flux2_reference_sizes(tmp_path, [(1600, 800)])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["edit", "plus"])
def test_qwen_image_edit_pipelines_encode_sources_at_about_1024(variant, tmp_path, make_config, caplog) -> None:
    build = {"edit": tiny.build_tiny_qwen_image_edit_pipeline, "plus": tiny.build_tiny_qwen_image_edit_plus_pipeline}
    pipe = build[variant](tokenizer_dir=str(tmp_path / "tok"))
    family = family_for_pipeline(pipe, max_sequence_length=64)
    seen = PipelineSources(pipe)
    for size in [(32, 32), (48, 32)]:
        pipe(
            prompt="make it red",
            image=Image.new("RGB", size, (200, 40, 40)),
            height=32,
            width=32,
            num_inference_steps=1,
            max_sequence_length=64,
            output_type="latent",
        )
        assert seen.encoded[-1] == family.pipeline_source_size(*size)
    assert family.pipeline_source_size(32, 32) == (1024, 1024)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        family.configure_sources(SimpleNamespace(resolution=32))
    assert "encodes a 32x32 source at 1024x1024" in caplog.text
