"""FLUX.1 Kontext: the source image's latents packed beside the target's as FluxKontextPipeline packs them, the
source encoded as the pipeline encodes its input image, editing rows through every stage, and the shared flow-family
checks (LoRA, full, safeguards, cache, the shipped YAML) on editing pairs.

The tiny pipeline is FLUX.1's tiny components in a FluxKontextPipeline (Kontext's components are FLUX.1's).
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from diffusers import FluxKontextPipeline
from peft import LoraConfig

from tests.helpers.common import edit_rows, pickapic_rows
from tests.helpers.flow_family_checks import (
    FlowFamilyTrainingChecks,
    check_the_shipped_config_trains_from_local_folders,
)
from tests.helpers.flux_kontext import CASE, SEQ, tiny_preferred_source_sizes
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.families import FluxFamily, FluxKontextFamily, family_for_pipeline
from trl_diffusion_sdpo.testing import build_tiny_flux_kontext_pipeline, build_tiny_flux_pipeline


@pytest.fixture
def make_pipe(tmp_path):
    counter = iter(range(1_000))

    def make(seed: int = 0, **kwargs) -> FluxKontextPipeline:
        return build_tiny_flux_kontext_pipeline(
            seed=seed, tokenizer_dir=str(tmp_path / f"tok-{next(counter)}"), max_length=SEQ, **kwargs
        )

    return make


@pytest.fixture
def pairs() -> Dataset:
    return Dataset.from_list(edit_rows(4))


# --------------------------------------------------------------------------------------------- what the family does


def test_the_kontext_pipeline_gets_the_kontext_family_and_flux_keeps_its_own(make_pipe, tmp_path) -> None:
    family = family_for_pipeline(make_pipe())
    assert isinstance(family, FluxKontextFamily) and family.edits and family.max_sources == 1
    assert family.guidance_scale == 1.0 and family.default_learning_rate == 1e-4
    flux = family_for_pipeline(build_tiny_flux_pipeline(seed=0, tokenizer_dir=str(tmp_path / "flux")))
    assert type(flux) is FluxFamily and not flux.edits  # the same components in FluxPipeline: text-to-image


def test_sources_are_encoded_as_the_pipeline_encodes_its_input_image(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe)
    pixels = torch.rand((2, 1, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = family.encode_sources(pixels)
    theirs = pipe._encode_vae_image(pixels[:, 0], generator=torch.Generator().manual_seed(1))
    assert ours.shape == (2, 1, *theirs.shape[1:])
    torch.testing.assert_close(ours[:, 0], theirs)  # the mode ("argmax"): no sampling noise, whatever the seed


def test_the_call_packs_the_source_beside_the_target_as_the_pipeline_does(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    gen = torch.Generator().manual_seed(0)
    target = torch.randn((2, 4, 8, 6), generator=gen)  # a non-square target: rows and columns must not swap
    pixels = torch.rand((2, 1, 3, 64, 48), generator=gen) * 2 - 1
    embeds = family.encode_prompts(family.prompt_tokenizer()(["make it red", "remove the cat"]))
    embeds.source_latents = family.encode_sources(pixels)
    timestep = torch.tensor([250.0, 800.0])
    ours = family.call_denoiser(pipe.transformer, target, timestep, family.denoiser_conditioning(embeds, None))
    # The pipeline's own preparation of the same latents and image (prepare_latents), and its transformer call.
    scale = pipe.vae_scale_factor
    packed = FluxKontextPipeline._pack_latents(target, 2, 4, 8, 6)
    _, image_latents, latent_ids, image_ids = pipe.prepare_latents(
        pixels[:, 0], 2, 4, 8 * scale, 6 * scale, torch.float32, torch.device("cpu"), None, packed
    )
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=torch.cat([packed, image_latents], dim=1),
            timestep=timestep / 1000,
            guidance=torch.full((2,), 1.0),
            pooled_projections=embeds.pooled,
            encoder_hidden_states=embeds.encoder_hidden_states,
            txt_ids=torch.zeros(SEQ, 3),
            img_ids=torch.cat([latent_ids, image_ids], dim=0),
            return_dict=False,
        )[0][:, : packed.shape[1]]
    torch.testing.assert_close(ours, FluxKontextPipeline._unpack_latents(out, 8 * scale, 6 * scale, scale))
    # The source really conditions the prediction: another source, another output.
    embeds.source_latents = embeds.source_latents.flip(0)
    other = family.call_denoiser(pipe.transformer, target, timestep, family.denoiser_conditioning(embeds, None))
    assert not torch.allclose(other, ours, atol=1e-4)


def test_a_batch_without_sources_is_refused_by_the_family(make_pipe) -> None:
    family = family_for_pipeline(make_pipe(), max_sequence_length=SEQ)
    embeds = family.encode_prompts(family.prompt_tokenizer()(["a"]))
    with pytest.raises(ValueError, match="no source latents"):
        family.denoiser_conditioning(embeds, None)


def test_text_to_image_data_is_refused_for_kontext_and_editing_data_for_flux(make_pipe, make_config, tmp_path):
    with pytest.raises(ValueError, match="flux-kontext edits a source image, but the train dataset has no source"):
        DiffusionSDPOTrainer(
            make_pipe(), args=CASE.config(make_config), train_dataset=Dataset.from_list(pickapic_rows(2))
        )
    flux = build_tiny_flux_pipeline(seed=0, tokenizer_dir=str(tmp_path / "flux"), max_length=SEQ)
    with pytest.raises(ValueError, match="source column 'source_image', but flux is a text-to-image family"):
        DiffusionSDPOTrainer(flux, args=CASE.config(make_config), train_dataset=Dataset.from_list(edit_rows(2)))
    with pytest.raises(ValueError, match="holds lists of source images, but flux-kontext edits one image"):
        DiffusionSDPOTrainer(
            make_pipe(), args=CASE.config(make_config), train_dataset=Dataset.from_list(edit_rows(2, sources=2))
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"random_crop": True}, "random_crop=True cannot be used with editing data"),
        ({"random_flip": True, "independent_augmentation": True}, "set independent_augmentation=False"),
    ],
)
def test_augmentations_that_would_misalign_the_source_are_refused(make_pipe, make_config, pairs, overrides, message):
    with pytest.raises(ValueError, match=message):
        DiffusionSDPOTrainer(make_pipe(), args=CASE.config(make_config, **overrides), train_dataset=pairs)


def test_a_flipped_pair_mirrors_its_source_with_it(make_pipe, make_config, pairs) -> None:
    """With random_flip the step encodes the mirrored source for exactly the pairs whose images it mirrors."""
    import io

    import numpy as np
    from PIL import Image

    def half_red(size: tuple[int, int]) -> bytes:  # red on the left only: mirroring changes it
        array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        array[:, : size[0] // 2, 0] = 255
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = edit_rows(2)
    for row in rows:
        row["source_image"] = half_red(Image.open(io.BytesIO(row["chosen"])).size)
    pairs = Dataset.from_list(rows)
    trainer = DiffusionSDPOTrainer(
        make_pipe(), args=CASE.config(make_config, random_flip=True, max_steps=1), train_dataset=pairs,
        peft_config=CASE.lora(),
    )  # fmt: skip
    batch = trainer.data_collator([pairs[0], pairs[1]])
    assert not torch.equal(batch["source_pixel_values"], batch["source_pixel_values"].flip(-1))
    family = trainer.family
    encoded_sources = []
    original = family.encode_sources
    family.encode_sources = lambda pixels: encoded_sources.append(pixels) or original(pixels)
    flip = torch.tensor([True, False])
    from trl_diffusion_sdpo.step.stages import encode_batch

    encoded = encode_batch(dict(batch), family, flip, torch.float32)
    sent = encoded_sources[0]
    torch.testing.assert_close(sent[0], batch["source_pixel_values"][0].flip(-1))
    torch.testing.assert_close(sent[1], batch["source_pixel_values"][1])
    assert encoded.prompt_embeds.source_latents.shape == (2, 1, 4, 4, 4)


def test_the_source_reaches_the_loss(make_pipe, make_config) -> None:
    """Two datasets that differ only in their sources give different first-step errors (the same seed)."""
    errors = []
    for shift in (0, 1):
        rows = edit_rows(2)
        if shift:  # another source of the same size: the chosen image of the same row
            for row in rows:
                row["source_image"] = row["chosen"]
        trainer = DiffusionSDPOTrainer(
            make_pipe(), args=CASE.config(make_config, max_steps=1), train_dataset=Dataset.from_list(rows),
            peft_config=CASE.lora(),
        )  # fmt: skip
        trainer.train()
        errors.append(trainer.state.log_history[0]["mse/policy_winner"])
    assert errors[0] != pytest.approx(errors[1], rel=1e-6)


def test_full_tuning_runs_the_one_pass_safeguard_equal_to_two_passes(make_pipe, make_config, pairs) -> None:
    grads = []
    for passes in ("one", "two"):
        pipe = make_pipe()
        trainer = DiffusionSDPOTrainer(
            pipe,
            args=CASE.config(make_config, max_steps=1, safeguard_space="output", safeguard_passes=passes, beta=5.0),
            train_dataset=pairs,
        )  # fmt: skip
        captured = {}
        trainer.add_callback(_GradientCapture(captured, trainer))
        trainer.train()
        grads.append(captured)
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


class _GradientCapture:
    """A callback keeping the denoiser's gradients before the optimizer step."""

    def __new__(cls, captured, trainer):
        from transformers import TrainerCallback

        class Capture(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                for name, parameter in trainer.family.denoiser.named_parameters():
                    if parameter.grad is not None:
                        captured[name] = parameter.grad.detach().clone()

        return Capture()


# ----------------------------------------------------------------------------------------------------- training


class TestFluxKontextTraining(FlowFamilyTrainingChecks):
    """LoRA, full tuning, both safeguard spaces, the latent cache, the shipped config, bf16, resuming, exactness and
    validation grids (see tests/helpers/flow_family_checks.py), on editing pairs."""

    case = CASE
    config_name = "flux_kontext_lora"
    family_name = "flux-kontext"
    slow_repeats = {
        "test_full_tuning_keeps_a_frozen_reference_and_saves_a_loadable_pipeline": (
            "test_flow_families.py's "
            "test_full_tuning_keeps_a_frozen_reference_and_saves_a_loadable_transformer[flux] (the same "
            "transformer class) and test_full_tuning_runs_the_one_pass_safeguard_equal_to_two_passes (full tuning"
            " on this family's sources)"
        ),
        "test_validation_grids_sample_with_the_pipeline": (
            "test_validation_grids_edit_the_given_sources_and_editing_scorers_get_them (the same grid)"
        ),
    }

    def test_the_shipped_config_trains_from_local_folders(self, saved_pipeline, pairs, tmp_path) -> None:
        # The YAML reads EditReward-Data's column names: the local pairs name their source as it does.
        pairs = pairs.rename_column("source_image", "source_img")
        check_the_shipped_config_trains_from_local_folders(
            self.case, self.config_name, saved_pipeline, pairs, tmp_path
        )


@pytest.mark.slow  # by default: test_flow_families.py's test_lora_saved_by_the_trainer_reloads_... (FLUX.1's format)
def test_lora_loads_into_the_pipeline_and_edits(make_pipe, make_config, pairs, tmp_path) -> None:
    """The saved adapter loads into a FluxKontextPipeline with load_lora_weights, which then edits an image."""
    from PIL import Image

    make_pipe().save_pretrained(tmp_path / "tiny")
    trainer = DiffusionSDPOTrainer(
        str(tmp_path / "tiny"), args=CASE.config(make_config, output_dir=str(tmp_path / "out")), train_dataset=pairs,
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k"]),
    )  # fmt: skip
    trainer.train()
    trainer.save_model()
    pipe = FluxKontextPipeline.from_pretrained(tmp_path / "tiny")

    def edit() -> torch.Tensor:
        return pipe(
            image=Image.new("RGB", (32, 32), (200, 20, 20)), prompt="make it blue", height=32, width=32,
            num_inference_steps=2, max_sequence_length=SEQ, generator=torch.Generator().manual_seed(0),
            output_type="pt", _auto_resize=False,
        ).images  # fmt: skip

    base = edit()
    pipe.load_lora_weights(tmp_path / "out")
    edited = edit()
    assert edited.shape == base.shape and edited.shape[:2] == (1, 3) and torch.isfinite(edited).all()
    assert not torch.allclose(edited, base, atol=1e-4)  # the adapter is in the pipeline's transformer


def test_validation_grids_edit_the_given_sources_and_editing_scorers_get_them(
    make_pipe, make_config, pairs, tmp_path, monkeypatch
):
    """A ValidationCallback's sources: the grid edits those images (another source, another grid) and an editing
    scorer among its scorers receives each cell's source. The pipeline resizes each source to its preferred size,
    here scaled to the tiny model's (``tiny_preferred_source_sizes``)."""
    import numpy as np
    from PIL import Image

    from trl_diffusion_sdpo.callbacks.validation import ValidationCallback
    from trl_diffusion_sdpo.evaluation import EditScorer, register_scorer

    received = []

    class Recorder(EditScorer):
        name = "recorder"
        scale = "mean red of the source"

        def score(self, images, prompts, sources):
            received.extend((prompt, np.asarray(group[0])) for prompt, group in zip(prompts, sources))
            return torch.tensor([float(np.asarray(group[0])[..., 0].mean()) for group in sources])

    register_scorer("test-kontext-recorder", Recorder, overwrite=True)
    tiny_preferred_source_sizes(monkeypatch)
    grids = []
    for index, colour in enumerate([(220, 20, 20), (20, 20, 220)]):
        source = tmp_path / f"source-{index}.png"
        Image.new("RGB", (32, 32), colour).save(source)
        args = CASE.config(make_config, max_steps=1, output_dir=str(tmp_path / f"run-{index}"))
        trainer = DiffusionSDPOTrainer(make_pipe(), args=args, train_dataset=pairs, peft_config=CASE.lora())
        validation = ValidationCallback(
            ["make it green"], seeds=[0, 1], every_n_steps=1, num_inference_steps=2,
            scorers=["test-kontext-recorder"], sources=[str(source)], trainer=trainer,
        )  # fmt: skip
        trainer.add_callback(validation)
        trainer.train()
        grids.append(np.asarray(Image.open(tmp_path / f"run-{index}" / "validation" / "step-000000.png")))
    assert not np.array_equal(grids[0], grids[1])  # the source reached the pipeline
    # two validations (steps 0 and 1) x two seeds per run, each with its run's source
    assert [prompt for prompt, _ in received] == ["make it green"] * 8
    assert all(tuple(s[0, 0]) == (220, 20, 20) for _, s in received[:4])
    assert all(tuple(s[0, 0]) == (20, 20, 220) for _, s in received[4:])


def test_validation_sources_are_checked_when_the_callback_is_built_with_the_trainer(
    make_pipe, make_config, pairs, tmp_path
):
    from trl_diffusion_sdpo.callbacks.validation import ValidationCallback

    with pytest.raises(ValueError, match="Got 2 prompts and 1 source images"):
        ValidationCallback(["a", "b"], sources=["x.png"])
    args = CASE.config(make_config)
    kontext = DiffusionSDPOTrainer(make_pipe(), args=args, train_dataset=pairs, peft_config=CASE.lora())
    with pytest.raises(ValueError, match=r"validation source image 0 .*missing.png.* cannot be read"):
        ValidationCallback(["a"], sources=[str(tmp_path / "missing.png")], trainer=kontext)
    flux = build_tiny_flux_pipeline(seed=0, tokenizer_dir=str(tmp_path / "flux"), max_length=SEQ)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    flux_trainer = DiffusionSDPOTrainer(flux, args=args, train_dataset=Dataset.from_list(pickapic_rows(2)))
    with pytest.raises(ValueError, match="validation source images are for editing families; flux generates"):
        ValidationCallback(["a"], sources=[str(tmp_path / "ok.png")], trainer=flux_trainer)
