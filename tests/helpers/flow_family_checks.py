"""Checks every flow-matching transformer family passes, shared by tests/families/test_qwen_image.py and
tests/families/test_z_image.py: training moves the right weights and starts at log 2, the files it writes load back
through the pipeline's own loaders and reproduce the trained predictions, both safeguard spaces run, a cached run
equals an uncached one.

Each check takes a ``FlowCase``: how to build the tiny pipeline, its diffusers classes and the test's sequence length.
:class:`FlowFamilyTrainingChecks` runs them all as test methods for a family's test module.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from peft import LoraConfig
from PIL import Image

from tests.helpers.common import StopAt
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.families import family_for_pipeline


@dataclass
class FlowCase:
    build: Callable[..., Any]  # build(seed=..., tokenizer_dir=...) -> pipeline
    pipeline_class: type
    transformer_class: type
    sequence_length: int
    lora_targets: tuple[str, ...]
    config_values: dict[str, Any] = field(default_factory=dict)  # more config fields (a video family's num_frames)
    sample_shape: tuple[int, ...] | None = None  # the latents of transformer_outputs; None: [2, C, 4, 4]
    sources: int | None = None  # source images in transformer_outputs; None: one if the family needs a source
    # False for a pipeline diffusers has no LoRA loader for (HunyuanVideo 1.5): its transformer's load_lora_adapter
    # reads the saved file instead of the pipeline's load_lora_weights
    pipeline_loads_lora: bool = True
    command_args: tuple[str, ...] = ()  # more train-command flags for the shipped config (a video family's clips)

    def config(self, make_config, **overrides):
        values = {"beta": 100.0, "max_sequence_length": self.sequence_length, "max_steps": 2, **self.config_values}
        return make_config(**{**values, **overrides})

    def lora(self) -> LoraConfig:
        return LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(self.lora_targets))

    @property
    def lora_loader(self) -> str:
        """The diffusers method that loads the saved adapters (named by the model card too)."""
        return "load_lora_weights" if self.pipeline_loads_lora else "load_lora_adapter"

    def load_lora(self, pipe, folder) -> None:
        if self.pipeline_loads_lora:
            pipe.load_lora_weights(folder)
        else:
            pipe.transformer.load_lora_adapter(folder, prefix="transformer", use_safetensors=True)


def transformer_outputs(
    transformer: torch.nn.Module,
    family,
    seed: int = 1,
    sample_shape: tuple[int, ...] | None = None,
    sources: int | None = None,
) -> torch.Tensor:
    """The transformer's prediction on fixed random latents (``sample_shape``, by default ``[2, C, 4, 4]``) and two
    prompts of different lengths, through the family's call; with ``sources`` random source latents per sample (by
    default one for a family that needs a source, none otherwise) and, when its prompt encoding reads them, as many
    solid-colour source images."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(sample_shape or (2, family.latent_shape(32)[0], 4, 4), generator=gen)
    if sources is None:
        sources = 1 if family.edits and not family.sources_optional else 0
    prompts, tokenize = ["a red square", "two blue circles"], family.prompt_tokenizer()
    if getattr(tokenize, "reads_sources", False):
        colours = [(200, 30, 30), (30, 30, 200), (30, 200, 30)]
        images = [[Image.new("RGB", (32, 32), colours[(row + k) % 3]) for k in range(sources)] for row in range(2)]
        embeds = family.encode_prompts(tokenize(prompts, images))
    else:
        embeds = family.encode_prompts(tokenize(prompts))
    if sources:  # source images of the target's size
        embeds.source_latents = torch.randn(sample.shape[0], sources, *sample.shape[1:], generator=gen)
    with torch.no_grad():
        return family.call_denoiser(
            transformer, sample, torch.tensor([300.0, 700.0]), family.denoiser_conditioning(embeds, None)
        )


def check_lora_training_moves_only_the_adapters_and_starts_at_log_2(case: FlowCase, pipe, make_config, pairs):
    frozen = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    encoder = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    trainer = DiffusionSDPOTrainer(pipe, args=case.config(make_config), train_dataset=pairs, peft_config=case.lora())
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the policy: u = 0
    assert first["implicit_acc"] == 0.5
    state = dict(pipe.transformer.named_parameters())
    moved = [n for n, p in state.items() if "lora_B" in n and p.requires_grad]
    assert moved and any(state[n].abs().sum() > 0 for n in moved)  # lora_B starts at zero: it trained
    for name, before in frozen.items():  # base weights keep their names under PEFT's base_layer
        after = state.get(
            name, state.get(name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias"))
        )
        assert torch.equal(after, before), name
    assert all(torch.equal(p, encoder[n]) for n, p in pipe.text_encoder.named_parameters())


@dataclass
class LoraRun:
    """A LoRA training of ``max_steps`` from a saved tiny pipeline (``local``), its adapters saved to ``out``: what
    :class:`FlowFamilyTrainingChecks`' LoRA, reload and cache checks read from one training."""

    trainer: DiffusionSDPOTrainer
    local: Path
    out: Path


# The uncached run of check_cached_run_gives_the_uncached_losses: every draw the same with or without the cache.
CACHE_COMPARABLE = {"random_flip": False, "proportion_empty_prompts": 0.0}


def train_lora_from_a_saved_pipeline(case: FlowCase, local: Path, make_config, pairs, out: Path) -> LoraRun:
    args = case.config(make_config, output_dir=str(out), **CACHE_COMPARABLE)
    trainer = DiffusionSDPOTrainer(str(local), args=args, train_dataset=pairs, peft_config=case.lora())
    trainer.train()
    trainer.save_model()
    return LoraRun(trainer, local, out)


def check_the_lora_run_moved_only_the_adapters_and_started_at_log_2(case: FlowCase, run: LoraRun) -> None:
    """:func:`check_lora_training_moves_only_the_adapters_and_starts_at_log_2` on ``run``: the base weights and the
    text encoder's are still the saved pipeline's."""
    trainer, original = run.trainer, case.pipeline_class.from_pretrained(run.local)
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the policy: u = 0
    assert first["implicit_acc"] == 0.5
    state = dict(trainer.pipeline.transformer.named_parameters())
    moved = [n for n, p in state.items() if "lora_B" in n and p.requires_grad]
    assert moved and any(state[n].abs().sum() > 0 for n in moved)  # lora_B starts at zero: it trained
    for name, before in original.transformer.named_parameters():  # base weights keep their names under base_layer
        after = state.get(
            name, state.get(name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias"))
        )
        assert torch.equal(after, before), name
    encoder = dict(original.text_encoder.named_parameters())
    assert all(torch.equal(p, encoder[n]) for n, p in trainer.pipeline.text_encoder.named_parameters())


def check_lora_reloads_with_load_lora_weights(case: FlowCase, local, make_config, pairs, out) -> None:
    trainer = DiffusionSDPOTrainer(
        str(local), args=case.config(make_config, output_dir=str(out)), train_dataset=pairs, peft_config=case.lora()
    )
    trainer.train()
    trainer.save_model()
    check_the_lora_run_reloads_with_load_lora_weights(case, LoraRun(trainer, Path(local), Path(out)))


def check_the_lora_run_reloads_with_load_lora_weights(case: FlowCase, run: LoraRun) -> None:
    """The adapters ``run`` saved load into a fresh pipeline through the pipeline's loader and reproduce the trained
    predictions; the model card names the family and the loader."""
    trainer, local, out = run.trainer, run.local, run.out
    shape = case.sample_shape
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    fresh = case.pipeline_class.from_pretrained(local)
    family = family_for_pipeline(fresh, max_sequence_length=case.sequence_length)
    base = transformer_outputs(fresh.transformer, family, sample_shape=shape, sources=case.sources)
    case.load_lora(fresh, out)
    expected = transformer_outputs(trained, family, sample_shape=shape, sources=case.sources)
    assert not torch.allclose(base, expected, atol=1e-5)  # training moved the adapters
    torch.testing.assert_close(
        transformer_outputs(fresh.transformer, family, sample_shape=shape, sources=case.sources),
        expected,
        atol=1e-6,
        rtol=1e-6,
    )
    trainer.create_model_card()
    card = (out / "README.md").read_text()
    assert f"- {family.name}" in card and "- lora" in card and case.lora_loader in card
    assert "LoRA adapters for the transformer" in card and "UNet" not in card.split("## Usage")[0]


def check_full_tuning_keeps_a_frozen_reference_and_saves_a_pipeline(case: FlowCase, local, make_config, pairs, out):
    trainer = DiffusionSDPOTrainer(
        str(local), args=case.config(make_config, output_dir=str(out), learning_rate=1e-4), train_dataset=pairs
    )
    reference = trainer.reference.denoiser
    reference_before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    trainer.train()
    trainer.save_model()
    assert reference is not trainer.family.denoiser
    assert all(torch.equal(p, reference_before[n]) for n, p in reference.named_parameters())
    shape = case.sample_shape
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    original = case.pipeline_class.from_pretrained(local)
    family = family_for_pipeline(original, max_sequence_length=case.sequence_length)
    expected = transformer_outputs(trained, family, sample_shape=shape, sources=case.sources)
    assert not torch.allclose(
        transformer_outputs(original.transformer, family, sample_shape=shape, sources=case.sources),
        expected,
        atol=1e-5,
    )
    whole = case.pipeline_class.from_pretrained(out)  # the output folder is a whole pipeline
    assert isinstance(whole.transformer, case.transformer_class)
    loaded = case.transformer_class.from_pretrained(out, subfolder="transformer")
    torch.testing.assert_close(transformer_outputs(loaded, family, sample_shape=shape, sources=case.sources), expected)
    torch.testing.assert_close(
        transformer_outputs(whole.transformer, family, sample_shape=shape, sources=case.sources), expected
    )
    assert not (out / "unet").exists()
    trainer.create_model_card()
    card = (out / "README.md").read_text()
    assert 'DiffusionPipeline.from_pretrained("<this repo>")' in card and f"- {family.name}" in card


def check_safeguard_space(case: FlowCase, pipe, make_config, pairs, space: str) -> None:
    trainer = DiffusionSDPOTrainer(
        pipe,
        args=case.config(
            make_config,
            safeguard_mu=0.5,
            safeguard_space=space,
        ),
        train_dataset=pairs,
        peft_config=case.lora(),
    )
    if space == "parameter":
        trainer.safeguard.log_output_lambda(trainer.args)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "safeguard/lambda_mean" in h]
    assert len(logs) == 2
    assert all(0.0 <= h["safeguard/lambda_min"] <= h["safeguard/lambda_max"] <= 1.0 for h in logs)
    if space == "parameter":
        assert all("safeguard/output_lambda_mean" in h for h in logs)


def check_cached_run_gives_the_uncached_losses(
    case: FlowCase, make_pipe, make_config, pairs, cache_dir, uncached: LoraRun | None = None
) -> None:
    """A LoRA run on the latent cache logs the losses of the same run without it; ``uncached``: that run already
    made (:func:`train_lora_from_a_saved_pipeline`, from the pipeline ``make_pipe()`` builds)."""
    losses = []
    for cache in (False, True):
        if not cache and uncached is not None:
            trainer = uncached.trainer
        else:
            trainer = DiffusionSDPOTrainer(
                make_pipe(),
                args=case.config(
                    make_config, cache_latents=cache, latent_cache_dir=str(cache_dir), **CACHE_COMPARABLE
                ),
                train_dataset=pairs,
                peft_config=case.lora(),
            )
            trainer.train()
        assert trainer.args.cache_latents is cache
        losses.append([h["mse/policy_winner"] for h in trainer.state.log_history if "mse/policy_winner" in h])
    assert len(losses[0]) == 2
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def check_the_shipped_config_trains_from_local_folders(case: FlowCase, config_name: str, pipe, pairs, tmp_path):
    """The ``train`` command with ``examples/configs/<config_name>.yaml`` on a local tiny pipeline and local pairs
    (sizes overridden for the CPU; gradient checkpointing kept from the YAML): the LoRA file holds adapters on the
    family's default targets. ``pipe``: the pipeline, or the folder it is saved in."""
    from pathlib import Path

    from safetensors.torch import load_file

    from trl_diffusion_sdpo.cli.data_options import column_renames
    from trl_diffusion_sdpo.cli.train import main, parse_args

    config_path = Path(__file__).resolve().parents[2] / "examples" / "configs" / f"{config_name}.yaml"
    _, config, model_args, data_args = parse_args(
        ["--config", str(config_path), "--output_dir", "/tmp/unused", "--use_cpu"]
    )
    assert config.beta == 100 and config.loss_type == "dpo" and config.safeguarded and model_args.use_peft
    if data_args.dataset_columns == "pickapic" and "prompt" in pairs.column_names:
        # the config reads Pick-a-Pic's label form (the editing configs: EditReward-Data's columns and votes): the
        # test's TRL-form pairs are written in it; pairs already in the label form are saved as they are
        # written under the dataset's own names, which the config's rename_columns maps back
        original = {new: old for old, new in column_renames(data_args.rename_columns).items()}
        names = {"prompt": "caption", "chosen": "jpg_0", "rejected": "jpg_1", "source_image": "source_image"}
        names = {c: original.get(n, n) for c, n in names.items() if c in pairs.column_names}
        names = {c: n for c, n in names.items() if n != c}
        label = original.get("label_0", "label_0")
        pairs = pairs.rename_columns(names).add_column(label, ["leftvote"] * len(pairs))
    pipe_dir, data_dir, out = tmp_path / "pipe", tmp_path / "pairs", tmp_path / "out"
    if isinstance(pipe, (str, Path)):
        pipe_dir = Path(pipe)
    else:
        pipe.save_pretrained(pipe_dir)
    pairs.save_to_disk(str(data_dir))
    main(
        ["--config", str(config_path), "--model_name_or_path", str(pipe_dir), "--dataset_name", str(data_dir),
         "--output_dir", str(out), "--dataset_streaming", "false", "--dtype", "float32", "--bf16", "false",
         "--use_cpu", "--resolution", "32", "--max_sequence_length", str(case.sequence_length), "--max_steps", "1",
         "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--lora_r", "4",
         "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
         *case.command_args]
    )  # fmt: skip
    keys = list(load_file(out / "pytorch_lora_weights.safetensors"))
    assert keys and all(k.startswith("transformer.") for k in keys)
    adapted = {target for target in case.lora_targets for k in keys if f".{target}.lora_" in k}
    assert adapted == set(case.lora_targets)


def check_bf16_lora_trains_float32_adapters(case: FlowCase, pipe, make_config, pairs) -> None:
    trainer = DiffusionSDPOTrainer(
        pipe, args=case.config(make_config, bf16=True), train_dataset=pairs, peft_config=case.lora()
    )
    trainer.train()
    dtypes = {n: p.dtype for n, p in pipe.transformer.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def check_resuming_gives_the_weights_of_an_uninterrupted_run(case: FlowCase, make_pipe, make_config, pairs, tmp_path):
    def run(output_dir, stop_at=None, resume=None):
        args = case.config(
            make_config, output_dir=str(output_dir), save_strategy="steps", save_steps=1, learning_rate=1e-3
        )
        trainer = DiffusionSDPOTrainer(make_pipe(), args=args, train_dataset=pairs, peft_config=case.lora())
        if stop_at is not None:
            trainer.add_callback(StopAt(stop_at))
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in trainer.family.denoiser.named_parameters() if p.requires_grad}

    straight = run(tmp_path / "straight")
    interrupted = run(tmp_path / "interrupted", stop_at=1)
    assert (tmp_path / "interrupted" / "checkpoint-1" / "pytorch_lora_weights.safetensors").exists()
    resumed = run(tmp_path / "interrupted", resume=str(tmp_path / "interrupted" / "checkpoint-1"))
    assert any(not torch.equal(interrupted[k], resumed[k]) for k in resumed)  # the resumed run trained
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-6, atol=1e-7, msg=key)


def check_exact_safeguard_keeps_the_winner_term_from_rising(model: str, dpo_rises: bool = True) -> None:
    """The first-order check of ``tests/helpers/winner_term_check.py`` on the family's tiny transformer: after a small
    SGD step along the parameter-space rule's gradient the winner term never rises beyond the second-order tolerance,
    while plain Diffusion-DPO's step does on some of the same batches (``dpo_rises``; on tiny Z-Image it does on about
    a third of 100 batches from the reference, but on none of these 20 from the drifted start)."""
    from tests.helpers.winner_term_check import Setting, run

    report = run(
        Setting(batches=20, pairs=2, beta=100.0, drift_steps=5),
        progress=False,
        starts=("drifted",),
        model=model,
        rules=("dpo", "output", "parameter"),  # the rules read below
    )
    rules = report["starts"]["drifted"]
    assert rules["parameter"]["batches"] == 20 and rules["parameter"]["rose_beyond_tolerance"] == 0
    assert rules["output"]["rose_beyond_tolerance"] == 0
    assert rules["parameter"]["lambda_min"] < 1.0  # the rule bound somewhere: the check is not vacuous
    assert (rules["dpo"]["rose_beyond_tolerance"] > 0) is dpo_rises


def check_validation_grids_sample_with_the_pipeline(
    case: FlowCase, pipe, make_config, pairs, tmp_path, source: bool = False
) -> None:
    """A grid at step 0 and after step 1; with ``source`` (an editing family) the grid edits a source image."""
    import os

    from trl_diffusion_sdpo.callbacks.validation import ValidationCallback

    sources = None
    if source:
        Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "source.png")
        sources = [str(tmp_path / "source.png")]
    args = case.config(make_config, max_steps=1, output_dir=str(tmp_path / "run"))
    scheduler = pipe.scheduler
    trainer = DiffusionSDPOTrainer(pipe, args=args, train_dataset=pairs, peft_config=case.lora())
    validation = ValidationCallback(
        ["a red square"], seeds=[0], every_n_steps=1, num_inference_steps=2, guidance_scale=1.0, sources=sources,
        trainer=trainer,
    )  # fmt: skip
    trainer.add_callback(validation)
    trainer.train()
    assert sorted(os.listdir(tmp_path / "run" / "validation")) == ["step-000000.png", "step-000001.png"]
    assert pipe.scheduler is scheduler  # training's scheduler untouched


class FlowFamilyTrainingChecks:
    """The checks above as tests: a family's test module subclasses this as ``Test...Training``, sets ``case``,
    ``config_name`` (the shipped ``examples/configs/<name>.yaml``), ``family_name`` and ``dpo_rises``, and defines the
    ``make_pipe`` (``make_pipe(seed=...)``: a fresh tiny pipeline) and ``pairs`` fixtures.

    ``slow_repeats`` names the checks a family leaves to the slow tier, each with the default-tier test that runs the
    same code path (another family's same check on the same transformer class, or this family's own test of it): the
    subclass runs each of them as inherited, marked slow."""

    case: ClassVar[FlowCase]
    config_name: ClassVar[str]
    family_name: ClassVar[str]
    dpo_rises: ClassVar[bool] = True  # whether plain DPO raises the winner term on the exactness batch
    slow_repeats: ClassVar[dict[str, str]] = {}  # check -> the default-tier test that covers it

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, covered_by in cls.__dict__.get("slow_repeats", {}).items():
            if name in cls.__dict__ or not covered_by:
                raise TypeError(f"{cls.__name__}.slow_repeats: {name!r} must be inherited and name its default cover")
            check = getattr(cls, name)

            def repeat(self, *args: Any, _check: Callable = check, **kwargs: Any) -> None:
                _check(self, *args, **kwargs)

            # the inherited check's name, signature (its fixtures) and marks (its parametrization), marked slow
            setattr(cls, name, pytest.mark.slow(functools.update_wrapper(repeat, check)))

    @pytest.fixture(scope="class")
    def runs(self) -> dict[str, Any]:
        """Trainings several of the class's tests read, each made by the first test that needs it."""
        return {}

    @pytest.fixture
    def saved_pipeline(self, runs, make_pipe, tmp_path) -> Path:
        """``make_pipe()`` saved once for the class: the folder the LoRA and full-tuning runs load."""
        if "saved" not in runs:
            make_pipe().save_pretrained(tmp_path / "tiny")
            runs["saved"] = tmp_path / "tiny"
        return runs["saved"]

    @pytest.fixture
    def lora_run(self, runs, saved_pipeline, make_config, pairs, tmp_path) -> LoraRun:
        """One LoRA training for the LoRA, reload and cache tests (:func:`train_lora_from_a_saved_pipeline`)."""
        if "lora" not in runs:
            runs["lora"] = train_lora_from_a_saved_pipeline(
                self.case, saved_pipeline, make_config, pairs, tmp_path / "lora-out"
            )
        return runs["lora"]

    def test_lora_training_moves_only_the_adapters_and_starts_at_log_2(self, lora_run) -> None:
        check_the_lora_run_moved_only_the_adapters_and_started_at_log_2(self.case, lora_run)

    def test_lora_saved_by_the_trainer_reloads_with_load_lora_weights(self, lora_run) -> None:
        check_the_lora_run_reloads_with_load_lora_weights(self.case, lora_run)

    def test_full_tuning_keeps_a_frozen_reference_and_saves_a_loadable_pipeline(
        self, saved_pipeline, make_config, pairs, tmp_path
    ) -> None:
        check_full_tuning_keeps_a_frozen_reference_and_saves_a_pipeline(
            self.case, saved_pipeline, make_config, pairs, tmp_path / "full-out"
        )

    # the output space by default: the parameter case computes the output rule's lambda on the family's predictions
    # too (log_output_lambda), and test_step_reference.py's unet-epsilon-output-full checks the output space's step
    @pytest.mark.parametrize("space", [pytest.param("output", marks=pytest.mark.slow), "parameter"])
    def test_both_safeguard_spaces_train_and_log_lambda(self, make_pipe, make_config, pairs, space) -> None:
        check_safeguard_space(self.case, make_pipe(), make_config, pairs, space)

    def test_cached_latents_and_prompt_embeddings_give_the_uncached_losses(
        self, make_pipe, make_config, pairs, tmp_path, lora_run
    ):
        check_cached_run_gives_the_uncached_losses(
            self.case, make_pipe, make_config, pairs, tmp_path / "cache", uncached=lora_run
        )

    def test_the_shipped_config_trains_from_local_folders(self, saved_pipeline, pairs, tmp_path) -> None:
        check_the_shipped_config_trains_from_local_folders(
            self.case, self.config_name, saved_pipeline, pairs, tmp_path
        )

    def test_bf16_lora_trains_float32_adapters_on_a_bf16_transformer(self, make_pipe, make_config, pairs) -> None:
        check_bf16_lora_trains_float32_adapters(self.case, make_pipe(), make_config, pairs)

    @pytest.mark.slow
    def test_resuming_gives_the_weights_of_an_uninterrupted_run(self, make_pipe, make_config, pairs, tmp_path) -> None:
        check_resuming_gives_the_weights_of_an_uninterrupted_run(self.case, make_pipe, make_config, pairs, tmp_path)

    @pytest.mark.slow
    def test_exact_safeguard_keeps_the_winner_term_from_rising(self) -> None:
        check_exact_safeguard_keeps_the_winner_term_from_rising(self.family_name, dpo_rises=self.dpo_rises)

    def test_validation_grids_sample_with_the_pipeline(self, make_pipe, make_config, pairs, tmp_path) -> None:
        check_validation_grids_sample_with_the_pipeline(self.case, make_pipe(), make_config, pairs, tmp_path)
