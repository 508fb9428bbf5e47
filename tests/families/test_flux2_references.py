"""FLUX.2 [dev] and [klein] with reference images (multi-reference editing): the same pipelines as text-to-image, the
data deciding; each reference encoded as ``Flux2Pipeline.prepare_image_latents`` encodes it, its tokens appended
after the target's with the pipeline's time offsets (10, 20, ...), the call equal to the pipeline's denoising call,
and the flow-family training checks (LoRA, full, safeguards, cache, the shipped YAML) on editing rows with one
reference (``source_image``) and two (``source_images``).

Tiny pipelines as in tests/families/test_flux2.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from datasets import Dataset
from PIL import Image

from tests.helpers.common import edit_rows
from tests.helpers.flow_family_checks import (
    check_cached_run_gives_the_uncached_losses,
    check_full_tuning_keeps_a_frozen_reference_and_saves_a_pipeline,
    check_lora_reloads_with_load_lora_weights,
    check_lora_training_moves_only_the_adapters_and_starts_at_log_2,
    check_safeguard_space,
    check_the_shipped_config_trains_from_local_folders,
)
from tests.helpers.flux2 import CASES, SEQ
from trl_diffusion_sdpo.data.columns import PreferenceColumns
from trl_diffusion_sdpo.data.training_data import check_sources
from trl_diffusion_sdpo.data.transforms import PairTransform
from trl_diffusion_sdpo.families import Flux2Family, Flux2KleinFamily, FluxKontextFamily, family_for_pipeline
from trl_diffusion_sdpo.families.flux2 import reference_tokens

RESOLUTION = 32  # the references' latents: 4x4 positions of 16 patchified channels


def cases(*fast: tuple[str, int]) -> pytest.MarkDecorator:
    """``(variant, references)`` for both variants with one and two references; those not in ``fast`` are slow (the
    default suite's budget)."""
    params = [
        pytest.param(v, k, marks=() if (v, k) in fast else pytest.mark.slow, id=f"{v}-{k}ref")
        for v in ("dev", "klein")
        for k in (1, 2)
    ]
    return pytest.mark.parametrize("variant,references", params)


@pytest.fixture
def make_variant_pipe(tmp_path):
    counter = iter(range(1_000))

    def make(variant: str, seed: int = 0):
        return CASES[variant].build(seed=seed, tokenizer_dir=str(tmp_path / f"tok-{next(counter)}"))

    return make


def reference_rows(references: int, n: int = 4) -> Dataset:
    """Editing rows: one reference in a ``source_image`` column, or a ``source_images`` list of several."""
    return Dataset.from_list(edit_rows(n, sources=None if references == 1 else references))


def noise_image(seed: int, size: int = RESOLUTION) -> Image.Image:
    """A random RGB image (flat colours would make every reference's latents nearly alike)."""
    pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def pipeline_condition_images(pipe, images: list[Image.Image]) -> list[torch.Tensor]:
    """``Flux2Pipeline.__call__``'s preprocessing of its ``image=`` list for images under 1024x1024 whose sides are
    multiples of 16: each kept at its size, ``preprocess(..., resize_mode="crop")``."""
    return [pipe.image_processor.preprocess(im, height=im.height, width=im.width, resize_mode="crop") for im in images]


# --------------------------------------------------------------------------------------------------- the design


def test_flux2_trains_editing_when_the_data_has_references_and_text_to_image_otherwise(make_config) -> None:
    """One pipeline, two tasks: the FLUX.2 families accept rows with and without references (the data decides), any
    number of them, while FLUX.1 Kontext still requires its source."""
    args = make_config()
    text_to_image = PreferenceColumns("prompt", "chosen", "rejected", None)
    one = dataclasses.replace(text_to_image, source="source_image")
    several = dataclasses.replace(text_to_image, source="source_images", source_list=True)
    for family in (Flux2Family, Flux2KleinFamily):
        assert family.edits and family.sources_optional and family.max_sources is None
        for columns in (text_to_image, one, several):
            check_sources(columns, args, family)  # no error
        with pytest.raises(ValueError, match="random_crop"):  # the editing checks still apply to editing data
            check_sources(several, make_config(random_crop=True), family)
    with pytest.raises(ValueError, match="no source column"):
        check_sources(text_to_image, args, FluxKontextFamily)


# ------------------------------------------------------------------------------------------- what the family does


@pytest.mark.parametrize("variant", ["dev", "klein"])
@pytest.mark.parametrize("count", [1, 3])
def test_reference_latents_and_positions_equal_the_pipelines_prepare_image_latents(
    make_variant_pipe, variant, count
) -> None:
    """From the same PIL images: the data's transform and the family's source encoding, then the packed tokens and
    positions, equal ``prepare_image_latents`` on the pipeline's own preprocessing of ``image=[...]``."""
    pipe = make_variant_pipe(variant)
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    images = [noise_image(seed) for seed in range(count)]
    transform = PairTransform(RESOLUTION)
    pixels = torch.stack([transform.source(image) for image in images])[None]  # [1, S, 3, R, R], as collated
    latents = family.encode_sources(pixels)
    assert latents.shape == (1, count, *family.latent_shape(RESOLUTION))
    tokens, positions = reference_tokens(latents.expand(2, -1, -1, -1, -1))
    with torch.no_grad():
        theirs, their_positions = pipe.prepare_image_latents(
            pipeline_condition_images(pipe, images), batch_size=2, generator=None, device="cpu", dtype=pipe.vae.dtype
        )
    assert tokens.shape == theirs.shape == (2, count * 16, 16)
    torch.testing.assert_close(tokens, theirs)
    assert torch.equal(positions, their_positions)
    assert sorted(set(positions[0, :, 0].tolist())) == [10 * (i + 1) for i in range(count)]  # time offsets


@pytest.mark.parametrize("variant", ["dev", "klein"])
@pytest.mark.parametrize("count", [1, 2])
def test_the_call_with_references_equals_the_pipelines_denoising_call(make_variant_pipe, variant, count) -> None:
    """Two samples with references of their own: each row equals the pipeline's loop for that prompt and its
    references (the references' tokens after the target's, their positions, guidance for [dev], the target's slice of
    the prediction); references that differ, or come in another order, change the prediction."""
    pipe = make_variant_pipe(variant)
    family = family_for_pipeline(pipe, max_sequence_length=SEQ, guidance_scale=2.5)
    prompts = ["put the cat on the sofa", "a longer instruction: move the lamp to the left of the red chair"]
    images = [[noise_image(10 * row + i) for i in range(count)] for row in range(2)]
    transform = PairTransform(RESOLUTION)
    pixels = torch.stack([torch.stack([transform.source(im) for im in row]) for row in images])
    latents = torch.randn((2, 16, 2, 4), generator=torch.Generator().manual_seed(0))  # not the references' size
    timestep = torch.tensor([250.0, 800.0])
    embeds = family.encode_prompts(family.prompt_tokenizer()(prompts))
    embeds.source_latents = family.encode_sources(pixels)
    ours = family.call_denoiser(pipe.transformer, latents, timestep, family.denoiser_conditioning(embeds, None))

    from diffusers import Flux2Pipeline

    prompt_embeds, text_ids = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=SEQ)
    latent_ids = Flux2Pipeline._prepare_latent_ids(latents)
    packed = Flux2Pipeline._pack_latents(latents)
    guidance = torch.full([1], 2.5) if variant == "dev" else None
    for row in range(2):  # the pipeline's loop, one prompt with its references at a time
        with torch.no_grad():
            image_latents, image_ids = pipe.prepare_image_latents(
                pipeline_condition_images(pipe, images[row]), 1, None, "cpu", pipe.vae.dtype
            )
            out = pipe.transformer(
                hidden_states=torch.cat([packed[row : row + 1], image_latents], dim=1),
                timestep=timestep[row : row + 1] / 1000,
                guidance=guidance,
                encoder_hidden_states=prompt_embeds[row : row + 1],
                txt_ids=text_ids[row : row + 1],
                img_ids=torch.cat([latent_ids[row : row + 1], image_ids], dim=1),
                return_dict=False,
            )[0][:, : packed.shape[1]]
        theirs = Flux2Pipeline._unpack_latents_with_ids(out, latent_ids[row : row + 1])
        torch.testing.assert_close(ours[row : row + 1], theirs)

    def call(source_latents):
        embeds.source_latents = source_latents
        return family.call_denoiser(pipe.transformer, latents, timestep, family.denoiser_conditioning(embeds, None))

    text_to_image = call(None)  # the text-to-image call of the same pipeline: the references reach the prediction
    assert text_to_image.shape == ours.shape and not torch.allclose(text_to_image, ours, atol=1e-5)
    sources = family.encode_sources(pixels)
    if count == 2:  # the order of the references matters (their time offsets differ)
        assert not torch.allclose(call(sources.flip(1)), ours, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- training


def reference_case(variant: str, references: int):
    """The variant's flow case whose outputs check ``references`` random references of the target's size."""
    return dataclasses.replace(CASES[variant], sources=references)


@pytest.mark.parametrize("variant", ["klein", pytest.param("dev", marks=pytest.mark.slow)])
def test_the_references_reach_the_training_step(make_variant_pipe, make_config, variant) -> None:
    """The same rows, noise and levels with and without their references: the errors differ (a family that dropped
    them would train text-to-image on editing data, and every other training check would still pass)."""
    from trl_diffusion_sdpo import DiffusionSDPOTrainer

    rows = reference_rows(2)
    errors = []
    for dataset in (rows, rows.remove_columns("source_images")):
        args = CASES[variant].config(make_config, max_steps=1, random_flip=False, proportion_empty_prompts=0.0)
        trainer = DiffusionSDPOTrainer(
            make_variant_pipe(variant), args=args, train_dataset=dataset, peft_config=CASES[variant].lora()
        )
        trainer.train()
        errors.append([h["mse/policy_winner"] for h in trainer.state.log_history if "mse/policy_winner" in h])
    assert len(errors[0]) == 1 and errors[0] != pytest.approx(errors[1], rel=1e-4)


@cases(("klein", 2))
def test_lora_training_on_references_starts_at_log_2_and_moves_only_the_adapters(
    make_variant_pipe, make_config, variant, references
) -> None:
    check_lora_training_moves_only_the_adapters_and_starts_at_log_2(
        reference_case(variant, references), make_variant_pipe(variant), make_config, reference_rows(references)
    )


@cases(("dev", 1))
def test_lora_trained_on_references_reloads_with_load_lora_weights(
    make_variant_pipe, make_config, tmp_path, variant, references
) -> None:
    make_variant_pipe(variant).save_pretrained(tmp_path / "tiny")
    check_lora_reloads_with_load_lora_weights(
        reference_case(variant, references), tmp_path / "tiny", make_config, reference_rows(references),
        tmp_path / "lora-out",
    )  # fmt: skip


@cases(("klein", 2))
def test_full_tuning_on_references_saves_a_pipeline_that_reloads_with_from_pretrained(
    make_variant_pipe, make_config, tmp_path, variant, references
) -> None:
    make_variant_pipe(variant).save_pretrained(tmp_path / "tiny")
    check_full_tuning_keeps_a_frozen_reference_and_saves_a_pipeline(
        reference_case(variant, references), tmp_path / "tiny", make_config, reference_rows(references),
        tmp_path / "full-out",
    )  # fmt: skip


@cases(("klein", 2))
@pytest.mark.parametrize("space", ["parameter", pytest.param("output", marks=pytest.mark.slow)])
def test_both_safeguard_spaces_train_on_references(make_variant_pipe, make_config, space, variant, references):
    case = reference_case(variant, references)
    check_safeguard_space(case, make_variant_pipe(variant), make_config, reference_rows(references), space)


@cases(("klein", 2))
def test_cached_reference_latents_give_the_uncached_losses(
    make_variant_pipe, make_config, tmp_path, variant, references
) -> None:
    check_cached_run_gives_the_uncached_losses(
        reference_case(variant, references), lambda: make_variant_pipe(variant), make_config,
        reference_rows(references), tmp_path / "cache",
    )  # fmt: skip


def test_the_shipped_editing_config_trains_from_local_folders(make_variant_pipe, tmp_path) -> None:
    check_the_shipped_config_trains_from_local_folders(
        CASES["klein"], "flux2_klein_edit_lora", make_variant_pipe("klein"), reference_rows(2), tmp_path
    )
