"""Qwen-Image-Edit and Qwen-Image-Edit-Plus: each pipeline gets its family, the instruction is encoded with its source
images as the pipelines' own ``encode_prompt(prompt, image=...)`` encodes it, the sources' latents are the pipelines'
``_encode_vae_image``, the call packs and concatenates them after the target's as the pipelines do, and the shared
flow-family checks (LoRA, full, safeguards, cache, shipped config) pass on editing rows (two sources each for Plus).

Tiny pipelines built from configs (``build_tiny_qwen_image_edit_pipeline``, ``..._plus_pipeline``): Qwen-Image's
tiny transformer and VAE, a Qwen2.5-VL with a tiny vision tower, Qwen2-VL's PIL image processor and a byte-level
tokenizer written offline. Without torchvision transformers' ``Qwen2VLProcessor`` cannot be constructed (its video
processor's class check), so the pipelines then hold ``Qwen2VLImageOnlyProcessor``: the same ``__call__`` without a
video processor.
"""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from diffusers import QwenImageEditPipeline
from PIL import Image

from tests.helpers.common import edit_rows, encode_image
from tests.helpers.flow_family_checks import (
    FlowFamilyTrainingChecks,
    check_the_shipped_config_trains_from_local_folders,
    check_validation_grids_sample_with_the_pipeline,
)
from tests.helpers.qwen_image_edit import EDIT_CASE, EDITING, PLUS_CASE, PLUS_SEQ, SEQ
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.families import (
    QwenImageEditFamily,
    QwenImageEditPlusFamily,
    QwenImageFamily,
    family_for_pipeline,
    scale_latents,
)
from trl_diffusion_sdpo.testing import (
    build_tiny_qwen_image_edit_pipeline,
    build_tiny_qwen_image_edit_plus_pipeline,
    build_tiny_qwen_image_pipeline,
)

BUILDERS = {"edit": build_tiny_qwen_image_edit_pipeline, "plus": build_tiny_qwen_image_edit_plus_pipeline}


@pytest.fixture
def make_edit_pipe(tmp_path):
    counter = iter(range(1_000))

    def make(variant: str = "edit", seed: int = 0, **kwargs):
        return BUILDERS[variant](seed=seed, tokenizer_dir=str(tmp_path / f"tok-{next(counter)}"), **kwargs)

    return make


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.new("RGB", size, colour)


def condition_image(pipe, image: Image.Image, area: int) -> Image.Image:
    """What the pipeline's ``__call__`` hands its prompt encoding for a square ``image``: resized to
    ``calculate_dimensions(area, 1)`` with its own image processor."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    width, height, _ = calculate_dimensions(area, image.size[0] / image.size[1])
    return pipe.image_processor.resize(image, height, width)


# --------------------------------------------------------------------------------------------- which family


def test_each_qwen_image_pipeline_gets_its_own_family(make_edit_pipe, tmp_path) -> None:
    edit, plus = make_edit_pipe("edit"), make_edit_pipe("plus")
    text = build_tiny_qwen_image_pipeline(tokenizer_dir=str(tmp_path / "t2i"))
    assert type(family_for_pipeline(edit)) is QwenImageEditFamily
    assert type(family_for_pipeline(plus)) is QwenImageEditPlusFamily
    assert type(family_for_pipeline(text)) is QwenImageFamily
    # The components are the same: the class tells them apart, for subclasses too.
    assert not QwenImageFamily.matches(edit) and not QwenImageFamily.matches(plus)
    assert not QwenImageEditFamily.matches(plus) and not QwenImageEditPlusFamily.matches(edit)
    assert not QwenImageEditFamily.matches(text) and not QwenImageEditPlusFamily.matches(text)
    subclass = type("MyEditPipeline", (QwenImageEditPipeline,), {})(**edit.components)
    assert type(family_for_pipeline(subclass)) is QwenImageEditFamily
    family = family_for_pipeline(plus)
    assert family.edits and family.prompt_reads_sources and family.max_sources == 3
    assert family_for_pipeline(edit).max_sources == 1
    assert set(family.frozen_modules()) == {"vae", "text_encoder"}
    assert family.default_beta == 100.0 and family.default_learning_rate == 1e-4
    assert "Qwen-Image-Edit-2509.sh" in family.defaults_source


def test_the_edit_inpainting_pipeline_is_still_refused_by_name(make_edit_pipe) -> None:
    from diffusers import QwenImageEditInpaintPipeline

    inpaint = QwenImageEditInpaintPipeline(**make_edit_pipe().components)
    with pytest.raises(ValueError, match="QwenImageEditInpaintPipeline is an editing pipeline .*not supported"):
        family_for_pipeline(inpaint)


def test_an_edit_pipeline_without_its_processor_is_refused(make_edit_pipe) -> None:
    pipe = make_edit_pipe()
    pipe.processor = None
    with pytest.raises(ValueError, match="Qwen2-VL `processor`.*missing: processor"):
        family_for_pipeline(pipe)


def test_the_condition_sizes_are_the_pipelines() -> None:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE

    assert QwenImageEditPlusFamily.condition_area == CONDITION_IMAGE_SIZE
    assert QwenImageEditFamily.condition_area == 1024 * 1024  # the literal of QwenImageEditPipeline.__call__


# ------------------------------------------------------------------------------------------ the prompt encoding


def test_the_templates_prefix_is_dropped_and_the_kept_tokens_start_with_the_image(make_edit_pipe) -> None:
    for variant, first in (("edit", "<|vision_start|>"), ("plus", "Picture 1: <|vision_start|>")):
        pipe = make_edit_pipe(variant)
        family = family_for_pipeline(pipe, max_sequence_length=SEQ)
        tokens = family.prompt_tokenizer()(["ab"], [[solid((200, 0, 0))]])
        kept = tokens["input_ids"][0, pipe.prompt_template_encode_start_idx :]
        assert pipe.tokenizer.decode(kept).startswith(first), variant
        assert tokens["input_ids"].shape[1] == 64 + family.vision_tokens + SEQ
        assert tokens["prompt_image_grid_thw"].tolist() == [[[1, 6, 6]]]  # 84 px: 6 x 6 patches, 9 tokens
        assert family.vision_tokens == 9 and family.prompt_length == family.max_sources * 9 + SEQ


def test_edit_prompt_encoding_equals_the_pipelines_encode_prompt_with_the_image(make_edit_pipe) -> None:
    pipe = make_edit_pipe("edit")
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    prompts = ["ab", "make it blue now"]
    sources = [solid((200, 30, 30), (40, 40)), solid((30, 30, 200), (64, 64))]
    ours = family.encode_prompts(family.prompt_tokenizer()(prompts, [[s] for s in sources]))
    images = [condition_image(pipe, s, 1024 * 1024) for s in sources]
    assert {image.size for image in images} == {(1024, 1024)}
    hidden, mask = pipe.encode_prompt(prompts, image=images, device="cpu")
    # kept: 9 image tokens between the vision markers, the instruction and the 5 closing tokens
    assert mask is not None and mask.sum(1).tolist() == [11 + 2 + 5, 11 + 16 + 5]
    length = hidden.shape[1]
    assert ours.encoder_hidden_states.shape == (2, family.prompt_length, hidden.shape[-1])
    torch.testing.assert_close(ours.encoder_hidden_states[:, :length] * mask[..., None], hidden * mask[..., None])
    assert ours.encoder_hidden_states[0, 18:].abs().sum() == 0
    # the image really conditions the prompt: another source gives other embeddings
    other = family.encode_prompts(family.prompt_tokenizer()(prompts, [[s] for s in reversed(sources)]))
    assert not torch.allclose(other.encoder_hidden_states[:, :11], ours.encoder_hidden_states[:, :11])


def test_plus_prompt_encoding_labels_each_image_as_the_pipeline_does(make_edit_pipe) -> None:
    pipe = make_edit_pipe("plus")
    family = family_for_pipeline(pipe, max_sequence_length=PLUS_SEQ)
    prompts = ["put 1 on 2", "swap"]
    sources = [[solid((200, 30, 30)), solid((30, 200, 30))], [solid((30, 30, 200)), solid((200, 200, 30))]]
    ours = family.encode_prompts(family.prompt_tokenizer()(prompts, sources)).encoder_hidden_states
    assert ours.shape[1] == 3 * 9 + PLUS_SEQ
    for row, (prompt, images) in enumerate(zip(prompts, sources)):  # the pipeline takes one prompt per call
        hidden, mask = pipe.encode_prompt([prompt], image=[condition_image(pipe, i, 384 * 384) for i in images])
        assert mask is None  # one prompt: no padding
        torch.testing.assert_close(ours[row, : hidden.shape[1]], hidden[0])
        assert ours[row, hidden.shape[1] :].abs().sum() == 0


def test_the_vision_encoder_reads_the_central_square_the_training_crop_keeps(make_edit_pipe) -> None:
    """A wide source of three vertical stripes: the centre crop of the edited images keeps the middle stripe, so the
    prompt encoding must read a green image, as for a green square source."""
    pipe = make_edit_pipe("edit")
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    wide = Image.new("RGB", (96, 32), (200, 30, 30))
    wide.paste((30, 200, 30), (32, 0, 64, 32))
    wide.paste((30, 30, 200), (64, 0, 96, 32))
    tokenize = family.prompt_tokenizer()
    assert set(tokenize.condition_image(wide).getdata()) == {(30, 200, 30)}
    striped = family.encode_prompts(tokenize(["ab"], [[wide]])).encoder_hidden_states
    green = family.encode_prompts(tokenize(["ab"], [[solid((30, 200, 30))]])).encoder_hidden_states
    torch.testing.assert_close(striped, green)


def test_a_batch_of_prompts_needs_the_same_number_of_sources_within_the_pipelines_limit(make_edit_pipe) -> None:
    tokenize = family_for_pipeline(make_edit_pipe("plus"), max_sequence_length=SEQ).prompt_tokenizer()
    with pytest.raises(ValueError, match=r"source lists of \[1, 2\] images"):
        tokenize(["a", "b"], [[solid((1, 2, 3))], [solid((1, 2, 3)), solid((3, 2, 1))]])
    with pytest.raises(ValueError, match="4 source images per prompt; this pipeline takes 1 to 3"):
        tokenize(["a"], [[solid((1, 2, 3))] * 4])


def test_a_long_instruction_is_cut_at_its_end_and_a_length_too_short_for_the_images_is_named(make_edit_pipe) -> None:
    pipe = make_edit_pipe("edit")
    tokenize = family_for_pipeline(pipe, max_sequence_length=SEQ).prompt_tokenizer()
    ids = tokenize(["x" * 100], [[solid((1, 2, 3))]])["input_ids"][0]
    kept = pipe.tokenizer.decode(ids[pipe.prompt_template_encode_start_idx :])
    assert len(ids) == 64 + 9 + SEQ and kept.endswith("<|vision_end|>" + "x" * (SEQ - 2))  # the markers count
    short = family_for_pipeline(make_edit_pipe("plus"), max_sequence_length=4).prompt_tokenizer()
    with pytest.raises(ValueError, match="max_sequence_length=4 leaves no room for the images' tokens"):
        short(["ab"], [[solid((1, 2, 3))]])


# -------------------------------------------------------------------------------------- the sources and the call


def test_source_latents_are_the_pipelines_encoded_image(make_edit_pipe) -> None:
    pipe = make_edit_pipe("edit")
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    pixels = torch.rand((2, 2, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = family.encode_sources(pixels)
    assert ours.shape == (2, 2, *family.latent_shape(32))
    theirs = pipe._encode_vae_image(pixels.flatten(0, 1).unsqueeze(2), generator=None)[:, :, 0]
    torch.testing.assert_close(ours.flatten(0, 1), theirs)
    torch.testing.assert_close(
        ours, scale_latents(family.encode_moments(pixels.flatten(0, 1))[0], pipe.vae.config).view_as(ours)
    )


@pytest.mark.parametrize("variant,count", [("edit", 1), ("plus", 2)])
def test_the_call_concatenates_the_sources_after_the_target_as_the_pipeline_does(make_edit_pipe, variant, count):
    pipe = make_edit_pipe(variant)
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    gen = torch.Generator().manual_seed(0)
    n, channels, height, width = 2, 4, 6, 4
    latents = torch.randn((n, channels, height, width), generator=gen)
    # sources of another shape than the target's, so that each entry of img_shapes matters
    sources = torch.randn((n, count, channels, 4, 6), generator=gen)
    images = [[solid((200, 30, 30))] * count, [solid((30, 30, 200))] * count]
    embeds = family.encode_prompts(family.prompt_tokenizer()(["a", "a longer one"], images))
    embeds.source_latents = sources
    timestep = torch.tensor([250.0, 800.0])
    ours = family.call_denoiser(pipe.transformer, latents, timestep, family.denoiser_conditioning(embeds, None))

    s = pipe.vae_scale_factor
    packed = pipe._pack_latents(latents, n, channels, height, width)
    images = [source.unsqueeze(2) for source in sources.unbind(1)]  # the pipeline's [N, C, 1, h, w] latents
    _, image_latents = pipe.prepare_latents(
        images[0] if variant == "edit" else images, n, channels, height * s, width * s, torch.float32, "cpu", None,
        packed,
    )  # fmt: skip
    hidden = embeds.encoder_hidden_states
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=torch.cat([packed, image_latents], dim=1),
            timestep=timestep / 1000,
            encoder_hidden_states=hidden,
            encoder_hidden_states_mask=hidden.ne(0).any(-1),
            img_shapes=[[(1, height // 2, width // 2), *[(1, 2, 3)] * count]] * n,
            return_dict=False,
        )[0][:, : packed.shape[1]]
    torch.testing.assert_close(ours, pipe._unpack_latents(out, height * s, width * s, s)[:, :, 0])
    embeds.source_latents = sources.flip(0)  # the sources condition the prediction
    moved = family.call_denoiser(pipe.transformer, latents, timestep, family.denoiser_conditioning(embeds, None))
    assert not torch.allclose(moved, ours, atol=1e-4)


def test_the_conditioning_needs_the_source_latents(make_edit_pipe) -> None:
    family = family_for_pipeline(make_edit_pipe("edit"), max_sequence_length=SEQ)
    embeds = family.encode_prompts(family.prompt_tokenizer()(["a"], [[solid((1, 2, 3))]]))
    with pytest.raises(ValueError, match="qwen-image-edit edits a source image: the batch has no source latents"):
        family.denoiser_conditioning(embeds, None)


# ----------------------------------------------------------------------------------------------------- the data


def test_settings_that_break_the_prompts_view_of_its_sources_are_refused(make_edit_pipe, make_config) -> None:
    pairs = Dataset.from_list(edit_rows(2))
    for overrides, message in (
        (
            {"random_flip": True, "proportion_empty_prompts": 0.0},
            "random_flip=True cannot be used with qwen-image-edit",
        ),
        ({"random_flip": False, "proportion_empty_prompts": 0.2}, "proportion_empty_prompts=0.2 cannot be used"),
    ):
        with pytest.raises(ValueError, match=message):
            DiffusionSDPOTrainer(make_edit_pipe(), args=make_config(**overrides), train_dataset=pairs)


def test_text_to_image_rows_are_refused_for_an_edit_pipeline(make_edit_pipe, make_config) -> None:
    from tests.helpers.common import pickapic_rows

    with pytest.raises(ValueError, match="qwen-image-edit edits a source image, but the train dataset has no source"):
        DiffusionSDPOTrainer(
            make_edit_pipe(), args=make_config(**EDITING), train_dataset=Dataset.from_list(pickapic_rows(2))
        )


def test_an_undecodable_source_is_named(make_edit_pipe, make_config) -> None:
    rows = edit_rows(3, sources=2)
    rows[1]["source_images"][1] = b"not an image"
    with pytest.raises(ValueError, match=r"row 1.*source_images.*source image 1"):
        DiffusionSDPOTrainer(
            make_edit_pipe("plus"), args=make_config(**EDITING), train_dataset=Dataset.from_list(rows)
        )


def test_a_row_with_another_number_of_sources_in_a_batch_is_named_and_skipped(make_edit_pipe, make_config, caplog):
    rows = edit_rows(2, sources=2)
    rows[1]["source_images"] = rows[1]["source_images"][:1]
    trainer = DiffusionSDPOTrainer(
        make_edit_pipe("plus"), args=make_config(**EDITING, max_steps=1), train_dataset=Dataset.from_list(rows)
    )
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.data.collators"):
        trainer.train()
    assert "column 'source_images': 1 source images where the batch's first row has 2" in caplog.text
    assert trainer.state.log_history[0]["data/skipped_rows"] == 1


def test_a_single_source_of_another_aspect_ratio_is_named(make_edit_pipe, make_config) -> None:
    rows = edit_rows(2)
    rows[0]["source_image"] = encode_image((10, 10, 10), (80, 20))
    with pytest.raises(ValueError, match="row 0"):
        DiffusionSDPOTrainer(make_edit_pipe(), args=make_config(**EDITING), train_dataset=Dataset.from_list(rows))


# ----------------------------------------------------------------------------------------------------- training


class _EditingChecks(FlowFamilyTrainingChecks):
    """The shared checks on editing rows; validation grids and the exactness benchmark build text-to-image inputs."""

    variant: str
    sources: int | None = None
    slow_repeats = {  # the sources reach the transformer in each class's LoRA run by default
        "test_full_tuning_keeps_a_frozen_reference_and_saves_a_loadable_pipeline": (
            "test_qwen_image.py's TestQwenImageTraining (the same transformer class: the frozen copy, the pipeline "
            "saved and loaded)"
        ),
        "test_both_safeguard_spaces_train_and_log_lambda": (
            "test_qwen_image.py's TestQwenImageTraining's [parameter] case (the same transformer class under the same "
            "safeguard) and test_flux_kontext.py's (sources in the sequence)"
        ),
    }

    @pytest.fixture
    def make_pipe(self, make_edit_pipe):
        return lambda seed=0, **kwargs: make_edit_pipe(self.variant, seed=seed, **kwargs)

    @pytest.fixture
    def pairs(self) -> Dataset:
        return Dataset.from_list(edit_rows(4, sources=self.sources))

    # Slow (about 40 s each): the default suite's editing grid is FLUX.1 Kontext's (test_flux_kontext.py),
    # which hands the sources to the same validation callback.
    @pytest.mark.slow
    def test_validation_grids_sample_with_the_pipeline(self, make_pipe, make_config, pairs, tmp_path) -> None:
        # the edit pipelines need an image: the grid edits validation_source_images
        check_validation_grids_sample_with_the_pipeline(self.case, make_pipe(), make_config, pairs, tmp_path, True)

    def test_the_shipped_config_trains_from_local_folders(self, saved_pipeline, pairs, tmp_path) -> None:
        # The YAML reads EditReward-Data's column names: a single source is named as it names it.
        if "source_image" in pairs.column_names:
            pairs = pairs.rename_column("source_image", "source_img")
        check_the_shipped_config_trains_from_local_folders(
            self.case, self.config_name, saved_pipeline, pairs, tmp_path
        )


class TestQwenImageEditTraining(_EditingChecks):
    """Single-source editing rows (``source_image``)."""

    case = EDIT_CASE
    config_name = "qwen_image_edit_lora"
    family_name = "qwen-image-edit"
    variant = "edit"


class TestQwenImageEditPlusTraining(_EditingChecks):
    """Multi-image editing rows (``source_images``, two per row)."""

    case = PLUS_CASE
    config_name = "qwen_image_edit_plus_lora"
    family_name = "qwen-image-edit-plus"
    variant = "plus"
    sources = 2
    slow_repeats = {  # this class's LoRA run, which trains the two sources' concatenation, stays by default
        "test_bf16_lora_trains_float32_adapters_on_a_bf16_transformer": (
            "TestQwenImageEditTraining's same test (the same family code and transformer)"
        ),
        "test_lora_saved_by_the_trainer_reloads_with_load_lora_weights": (
            "TestQwenImageEditTraining's same test (the same adapters' file format, loaded by the same loader)"
        ),
    }


def test_plus_embeddings_have_one_length_whatever_the_number_of_sources(make_edit_pipe) -> None:
    """One source or three, a pair's embeddings have the family's one length: the latent cache stores them in one
    column shape, and its empty prompt (a grey source) has it too."""
    family = family_for_pipeline(make_edit_pipe("plus"), max_sequence_length=PLUS_SEQ)
    tokenize = family.prompt_tokenizer()
    for count in (1, 3):
        embeds = family.encode_prompts(tokenize(["ab"], [[solid((1, 2, 3))] * count])).encoder_hidden_states
        assert embeds.shape[1] == family.prompt_length == 3 * 9 + PLUS_SEQ
        # each image: its label (11 byte tokens), the vision markers and 9 tokens; then "ab" and the closing turn
        assert embeds.ne(0).any(-1).sum() == count * (11 + 2 + 9) + 2 + 5


def test_the_latent_caches_settings_change_with_how_the_sources_are_read(make_edit_pipe) -> None:
    """The cached prompt embeddings depend on the image processor and the condition size: a cache built with other
    settings is not reused (its fingerprint differs and the sharded cache names the mismatch)."""
    from trl_diffusion_sdpo.data.latent_cache import encoding_settings, settings_mismatches

    pipe = make_edit_pipe("edit")
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    built = encoding_settings(family, 32, False, None)
    assert built["vision"]["condition_size"] == [1024, 1024]
    pipe.processor.image_processor.size["longest_edge"] = 56 * 56  # fewer vision tokens
    wanted = encoding_settings(family, 32, False, None)
    assert any(
        line.startswith("how the prompt encoding reads the source images")
        for line in settings_mismatches(built, wanted)
    )
    text = build_tiny_qwen_image_pipeline(tokenizer_dir=str(pipe.tokenizer.name_or_path) + "-t2i")
    assert "vision" not in encoding_settings(family_for_pipeline(text), 32, False, None)
