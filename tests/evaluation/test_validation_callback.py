"""ValidationCallback: sample grids during training without disturbing it, logged to the trackers that take images."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import TrainerState
from transformers.integrations import TensorBoardCallback

from tests.helpers.cli_runs import FAST, pair_folders
from trl_diffusion_sdpo.callbacks.validation import (
    PROMPT_LABEL_CHARS,
    ValidationCallback,
    prompt_label,
    validation_grid,
)
from trl_diffusion_sdpo.cli.train import main as train_main
from trl_diffusion_sdpo.evaluation import Scorer
from trl_diffusion_sdpo.evaluation.compare import image_grid
from trl_diffusion_sdpo.families import family_for_pipeline

torch.set_num_threads(1)
PROMPTS = ["a red square", "a blue circle"]


class RednessScorer(Scorer):
    name = "redness"
    scale = "mean(R - B) / 255"

    def score(self, images, prompts) -> torch.Tensor:
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float64) for image in images]
        return torch.tensor([(a[..., 0] - a[..., 2]).mean() / 255 for a in arrays])


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.pipeline.unet.named_parameters() if "lora" in k}


def test_training_with_validation_is_identical_to_training_without(make_trainer, tmp_path):
    plain = make_trainer(max_steps=3)
    plain.train()
    validated = make_trainer(max_steps=3, output_dir=str(tmp_path / "validated"))
    callback = ValidationCallback(
        PROMPTS,
        seeds=[0, 1],
        num_inference_steps=2,
        every_n_steps=2,
        pipeline=validated.pipeline,
        scorers=[RednessScorer()],
        height=32,
        width=32,
    )
    validated.add_callback(callback)
    validated.train()
    assert [h["step"] for h in callback.history] == [0, 2]
    before, after = lora_weights(plain), lora_weights(validated)
    assert before.keys() == after.keys() and before
    for key in before:
        torch.testing.assert_close(before[key], after[key], rtol=0, atol=0)
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (plain, validated)]
    assert losses[0] == losses[1]
    folder = tmp_path / "validated" / "validation"
    assert sorted(os.listdir(folder)) == ["step-000000.png", "step-000002.png"]
    grid = Image.open(folder / "step-000002.png")
    # the seed labels' column (as wide as "seed 1" drawn, and a margin), then 2 prompts across and 2 seeds down, in
    # tiles of 64 pixels (image_grid's least under captions), below the prompts' caption strip
    label = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength("seed 1", font=ImageFont.load_default())
    assert grid.size[1] > 2 * 64 and label < grid.size[0] - 2 * 64 <= label + 8
    rewards = [e for e in validated.state.log_history if "eval/reward/redness" in e]
    assert [e["step"] for e in rewards] == [0, 2]


def test_generate_restores_mode_and_rng_and_keeps_the_training_scheduler(make_pipeline):
    pipe = make_pipeline()
    scheduler = pipe.scheduler
    callback = ValidationCallback(PROMPTS, num_inference_steps=2, pipeline=pipe, height=32, width=32)
    for training in (True, False):
        pipe.unet.train(training)
        rng = torch.get_rng_state()
        grid, images = callback.generate()
        assert pipe.unet.training is training
        assert torch.equal(torch.get_rng_state(), rng)
    assert pipe.scheduler is scheduler and len(images) == 2
    # the images as image_grid lays them out, one column per prompt, captioned with it
    assert np.array_equal(np.asarray(grid), np.asarray(image_grid([images], column_labels=PROMPTS)))
    again = callback.generate()[1]
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(again[0]))  # its own seeded generators


def test_a_resumed_run_does_not_validate_step_zero_again(make_pipeline, tmp_path):
    callback = ValidationCallback(
        PROMPTS, num_inference_steps=1, every_n_steps=10, pipeline=make_pipeline(), height=32, width=32
    )
    args = SimpleNamespace(output_dir=str(tmp_path), report_to=[])
    state = TrainerState(global_step=5)
    callback.on_train_begin(args, state, None)
    callback.on_step_end(args, state, None)
    assert callback.history == [] and not os.path.exists(tmp_path / "validation")
    state.global_step = 10
    callback.on_step_end(args, state, None)
    assert [h["step"] for h in callback.history] == [10]
    with pytest.raises(
        ValueError, match=r"ValidationCallback\(prompts, trainer=trainer\), and add it .* or give pipeline="
    ):
        ValidationCallback(PROMPTS)  # refused where it is built: it has nothing to sample


class RecordingWriter:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def add_image(self, tag, array, step, dataformats):
        self.calls.append(("image", tag, np.asarray(array).shape, step, dataformats))

    def add_scalar(self, tag, value, step):
        self.calls.append(("scalar", tag, value, step))

    def flush(self) -> None:
        pass


def test_images_and_rewards_go_to_the_trainers_tensorboard_writer_and_unknown_trackers_are_skipped(
    make_pipeline, tmp_path
):
    writer = RecordingWriter()
    pipeline = make_pipeline()

    class Trainer:  # the trainer's surface the callback reads: its lookup answers report_to's TensorBoard tracker
        engine = SimpleNamespace(check_validation_sampling=lambda: None)
        family, args = family_for_pipeline(pipeline), SimpleNamespace(resolution=32)

        def __init__(self) -> None:
            self.pipeline = pipeline

        def callbacks_of(self, kind):
            return [SimpleNamespace(tb_writer=writer)] if kind is TensorBoardCallback else []

    trainer = Trainer()
    callback = ValidationCallback(
        PROMPTS,
        num_inference_steps=1,
        every_n_steps=3,
        trainer=trainer,
        scorers=[RednessScorer()],
        height=32,
        width=32,
    )
    args = SimpleNamespace(output_dir=str(tmp_path), report_to=["tensorboard", "comet_ml", "wandb"])
    state = TrainerState(global_step=3)
    callback.on_step_end(args, state, None)
    images = [c for c in writer.calls if c[0] == "image"]
    scalars = [c for c in writer.calls if c[0] == "scalar"]
    saved = np.asarray(Image.open(tmp_path / "validation" / "step-000003.png"))
    assert images == [("image", "validation/samples", saved.shape, 3, "HWC")]  # the saved grid, as HWC
    assert [(tag, step) for _, tag, _, step in scalars] == [("eval/reward/redness", 3)]
    # the rewards of the images the grid shows: sampled again, as its own seeded generators draw them
    expected = RednessScorer()(callback.generate()[1], PROMPTS).mean()
    assert scalars[0][2] == pytest.approx(float(expected))
    assert callback.history[0]["eval/reward/redness"] == pytest.approx(float(expected))


def test_auto_autocast_samples_a_pipeline_that_mixes_bf16_and_float32(make_pipeline):
    pipe = make_pipeline()
    pipe.text_encoder.to(torch.bfloat16)  # a frozen module in the compute dtype, the UNet in float32
    plain = ValidationCallback(
        PROMPTS[:1], num_inference_steps=1, pipeline=pipe, height=32, width=32, autocast_dtype=None
    )
    with pytest.raises(RuntimeError):
        plain.generate()
    auto = ValidationCallback(PROMPTS[:1], num_inference_steps=1, pipeline=pipe, height=32, width=32)
    assert auto._autocast_dtype(pipe) == torch.bfloat16
    assert auto.generate()[1][0].size == (32, 32)
    assert ValidationCallback(PROMPTS, pipeline=make_pipeline())._autocast_dtype(make_pipeline()) is None


def test_one_built_with_the_trainer_saves_a_grid_at_step_zero_and_every_n(make_trainer, tmp_path):
    """Built with ``trainer=`` and added with ``add_callback``, the callback samples the trainer's pipeline at the
    training resolution with the family's guidance (8.5 for SD)."""
    trainer = make_trainer(max_steps=2, output_dir=str(tmp_path / "run"))
    validation = ValidationCallback(PROMPTS, seeds=[0], every_n_steps=2, num_inference_steps=2, trainer=trainer)
    trainer.add_callback(validation)
    assert trainer.callbacks_of(ValidationCallback) == [validation] and validation.trainer is trainer
    assert (validation.settings.guidance_scale, validation.settings.height) == (8.5, trainer.args.resolution)
    trainer.train()
    assert sorted(os.listdir(tmp_path / "run" / "validation")) == ["step-000000.png", "step-000002.png"]


def test_validation_is_off_by_default_and_empty_prompt_lists_are_refused(make_trainer):
    trainer = make_trainer(max_steps=1)
    assert trainer.callbacks_of(ValidationCallback) == []
    with pytest.raises(ValueError, match="at least one prompt"):
        ValidationCallback([])


def test_the_train_command_builds_the_callback_from_its_options(make_trainer):
    from trl_diffusion_sdpo.cli.train import parse_args

    *_, diffusion_args = parse_args(
        ["--output_dir", "unused", "--use_cpu", "--validation_prompts", "a cat", "a dog", "--validation_steps", "7"]
    )
    trainer = make_trainer(max_steps=1)
    (callback,) = diffusion_args.validation_callbacks(trainer)
    assert isinstance(callback, ValidationCallback) and callback.trainer is trainer
    assert (callback.prompts, callback.every_n_steps, callback.settings.guidance_scale) == (
        ["a cat", "a dog"],
        7,
        8.5,  # the family's, from the trainer it samples
    )
    assert parse_args(["--output_dir", "unused", "--use_cpu"])[3].validation_callbacks(trainer) == []


def test_the_model_card_shows_the_last_validation_grid(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=2, output_dir=str(tmp_path / "run"))
    trainer.add_callback(ValidationCallback(PROMPTS, every_n_steps=2, num_inference_steps=2, trainer=trainer))
    trainer.train()
    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "![validation samples](validation/step-000002.png)" in card
    assert (tmp_path / "run" / "validation" / "step-000002.png").exists()


def test_with_ema_decay_validation_samples_the_ema_weights_not_the_trained_ones(make_trainer, tmp_path):
    """The grid of a run with ``ema_decay`` is sampled from the EMA of the trained weights (swapped in for it, the
    trained ones back afterwards)."""
    trainer = make_trainer(max_steps=2, learning_rate=1e-2, ema_decay=0.5, output_dir=str(tmp_path / "run"))
    trainer.add_callback(
        ValidationCallback(PROMPTS[:1], seeds=[0], every_n_steps=2, num_inference_steps=1, trainer=trainer)
    )
    (callback,) = trainer.callbacks_of(ValidationCallback)
    sampled = {}

    def record_weights():
        sampled[trainer.state.global_step] = [p.detach().clone() for p in trainer.ema.parameters]
        return Image.new("RGB", (2, 2)), []

    callback.generate = record_weights
    trainer.train()
    assert sorted(sampled) == [0, 2]
    trained = [p.detach() for p in trainer.ema.parameters]
    ema = trainer.ema.ema.shadow_params
    assert any(not torch.equal(a, b) for a, b in zip(trained, ema, strict=True))  # the EMA lags the trained weights
    for at_sampling, average in zip(sampled[2], ema, strict=True):
        torch.testing.assert_close(at_sampling, average.to(at_sampling.dtype), rtol=0, atol=0)


def test_each_column_of_the_grid_is_captioned_with_its_prompt(make_pipeline):
    """The same images under other prompts make another grid, which is the images laid out by image_grid with the
    prompts as column captions (a seed row label each with several seeds); a prompt longer than
    PROMPT_LABEL_CHARS is cut at a word and ends in "...", so its caption stays a few lines tall."""
    pipe = make_pipeline()
    long = "a watercolour painting of a lighthouse on a cliff at dusk, " * 4
    grids = {}
    for prompts in (PROMPTS, ["a green triangle", long]):
        callback = ValidationCallback(prompts, seeds=[0, 1], num_inference_steps=1, pipeline=pipe, height=32, width=32)
        grid, images = callback.generate()
        captions = [prompt_label(p) for p in prompts]
        expected = image_grid([images[:2], images[2:]], ["seed 0", "seed 1"], captions)
        assert np.array_equal(np.asarray(grid), np.asarray(expected))
        grids[tuple(prompts)] = (grid, images)
    # the same images captioned with other prompts: another grid
    first, images = grids[tuple(PROMPTS)]
    recaptioned = validation_grid(images, ["a green triangle", long], [0, 1])
    assert np.asarray(first).shape != np.asarray(recaptioned).shape or not np.array_equal(first, recaptioned)
    assert prompt_label(PROMPTS[0]) == PROMPTS[0]
    label = prompt_label(long)
    assert len(label) <= PROMPT_LABEL_CHARS and label.endswith("...")
    assert long.startswith(label[: -len("...")]) and long[len(label) - 3] == " "  # cut between words
    assert prompt_label(" a  red\nsquare ") == "a red square"


def test_a_cut_caption_never_exceeds_its_limit_wherever_a_word_ends():
    """Every position of the last word boundary before the limit, the ellipsis included: at most the limit, a prefix
    of the prompt cut between words, and the longest such prefix that leaves room for the ellipsis."""
    for first in range(1, 2 * PROMPT_LABEL_CHARS):
        prompt = "x" * first + " " + "ab " * PROMPT_LABEL_CHARS
        label = prompt_label(prompt)
        assert len(label) <= PROMPT_LABEL_CHARS and label.endswith("...")
        kept = label[: -len("...")]
        assert prompt.startswith(kept)
        room = PROMPT_LABEL_CHARS - len("...")
        if first <= room:  # a whole word fits: the cut is after the last word that fits, not inside one
            assert prompt[len(kept)] == " " and (len(kept) + 3 > room or " " not in prompt[len(kept) + 1 : room + 1])


def test_the_evaluation_page_states_the_caption_limit_the_grid_uses():
    page = " ".join((Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text().split())
    assert f"a prompt longer than {PROMPT_LABEL_CHARS} characters is cut after a whole word" in page


def test_the_train_command_adds_its_validation_to_the_trainer_it_builds(tmp_path):
    """``--validation_prompts``: the command builds the callback with the trainer it made and adds it; the run saves
    the step-0 and step-1 grids at the training resolution."""
    data, out = pair_folders(tmp_path / "pairs"), tmp_path / "out"
    argv = ["--model_name_or_path", "trl-diffusion-sdpo:tiny", "--dataset_name", str(data), "--output_dir", str(out)]
    argv += [
        *FAST,
        "--validation_prompts",
        "a cat",
        "--validation_steps",
        "1",
        "--validation_num_inference_steps",
        "1",
    ]
    trainer = train_main(argv)
    (validation,) = trainer.callbacks_of(ValidationCallback)
    assert validation.trainer is trainer and validation.prompts == ["a cat"]
    assert (validation.settings.height, validation.settings.width) == (32, 32)  # the training resolution
    assert sorted(os.listdir(out / "validation")) == ["step-000000.png", "step-000001.png"]
