"""SD3 / SD3.5 and FLUX.1 (flow-matching transformers): encoding as the pipelines encode, noising as the rectified
flow defines it, training that moves the right weights, files that load back in diffusers, both safeguards.

Tiny transformers, CLIP and T5 encoders built from configs; the T5 tokenizer is built offline in the test.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from peft import LoraConfig

from tests.helpers.common import (
    LORA_TARGETS,
    StopAt,
    fast_config_values,
    first_batch_gradients,
    pickapic_rows,
    shift_sigmas,
)
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.families import FluxFamily, PromptEmbeddings, StableDiffusion3Family, family_for_pipeline
from trl_diffusion_sdpo.families.flow import FlowNoiser, FlowTimestepSampling, resolution_shift
from trl_diffusion_sdpo.step.predictions import denoising_errors, predict_pairs
from trl_diffusion_sdpo.testing import build_tiny_flux_pipeline, build_tiny_sd3_pipeline, write_t5_tokenizer

SEQ = 16  # T5 tokens in the tests
BUILDERS = {"sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline}
PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
TRANSFORMERS = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}


@pytest.fixture
def make_flow(tmp_path):
    counter = iter(range(1_000))

    def make(kind: str, seed: int = 0, **kwargs):
        return BUILDERS[kind](
            seed=seed, tokenizer_dir=str(tmp_path / f"tok-{next(counter)}"), max_length=SEQ, **kwargs
        )

    return make


@pytest.fixture
def flow_pairs() -> Dataset:
    return Dataset.from_list(pickapic_rows(4))


def flow_config(make_config, **overrides):
    return make_config(**{"beta": 100.0, "max_sequence_length": SEQ, "max_steps": 2, **overrides})


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS)


def transformer_outputs(transformer: torch.nn.Module, family, seed: int = 1) -> torch.Tensor:
    """The transformer's prediction on fixed random latents and conditioning, through the family's call."""
    gen = torch.Generator().manual_seed(seed)
    channels = family.pipeline.vae.config.latent_channels
    sample = torch.randn((2, channels, 4, 4), generator=gen)
    tokens = family.prompt_tokenizer()(["a red square", "a blue circle"])
    embeds = family.encode_prompts(tokens)
    with torch.no_grad():
        return family.call_denoiser(
            transformer, sample, torch.tensor([300.0, 700.0]), family.denoiser_conditioning(embeds, None)
        )


# ------------------------------------------------------------------------------------------- tokenizer and encoders


def test_t5_tokenizer_is_built_offline_and_round_trips_text(tmp_path) -> None:
    tokenizer = write_t5_tokenizer(str(tmp_path / "t5"), max_length=SEQ)
    ids = tokenizer("A red cat, 3 times!").input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A red cat, 3 times!"
    padded = tokenizer(["ab"], padding="max_length", max_length=SEQ, return_tensors="pt").input_ids
    assert padded.shape == (1, SEQ) and int((padded == tokenizer.pad_token_id).sum()) == SEQ - 3  # "▁a", "b", "</s>"


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_prompt_encoding_equals_the_pipelines_encode_prompt(make_flow, kind) -> None:
    pipe = make_flow(kind)
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    assert isinstance(family, {"sd3": StableDiffusion3Family, "flux": FluxFamily}[kind])
    assert family.flow_matching and family.denoiser is pipe.transformer
    prompts = ["a red square", "two blue circles on grass"]
    ours = family.encode_prompts(family.prompt_tokenizer()(prompts))
    if kind == "sd3":
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=SEQ, device="cpu"
        )
        assert hidden.shape[1] == SEQ + SEQ  # CLIP tokens, then T5 tokens
    else:
        hidden, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=SEQ, device="cpu")
    torch.testing.assert_close(ours.encoder_hidden_states, hidden)
    torch.testing.assert_close(ours.pooled, pooled)


def test_sd3_without_t5_conditions_on_zeros_as_the_pipeline_does(make_flow) -> None:
    pipe = make_flow("sd3", with_t5=False)
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    assert "text_encoder_3" not in family.frozen_modules()
    ours = family.encode_prompts(family.prompt_tokenizer()(["a cat"]))
    hidden, _, pooled, _ = pipe.encode_prompt(
        "a cat", None, None, do_classifier_free_guidance=False, max_sequence_length=SEQ, device="cpu"
    )
    torch.testing.assert_close(ours.encoder_hidden_states, hidden)
    assert ours.encoder_hidden_states[:, SEQ:].abs().sum() == 0


def test_flux_call_packs_latents_and_passes_guidance_as_the_pipeline_does(make_flow) -> None:
    pipe = make_flow("flux")
    family = FluxFamily(pipe, max_sequence_length=SEQ, guidance_scale=2.5)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 6, 4), generator=gen)
    embeds = family.encode_prompts(family.prompt_tokenizer()(["a", "b"]))
    timestep = torch.tensor([250.0, 800.0])
    ours = family.call_denoiser(pipe.transformer, latents, timestep, family.denoiser_conditioning(embeds, None))
    # The pipeline's own packing, ids and unpacking (height/width in pixels).
    packed = FluxPipeline._pack_latents(latents, 2, 4, 6, 4)
    img_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", latents.dtype)
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=packed,
            timestep=timestep / 1000,
            guidance=torch.full((2,), 2.5),
            pooled_projections=embeds.pooled,
            encoder_hidden_states=embeds.encoder_hidden_states,
            txt_ids=torch.zeros(SEQ, 3),
            img_ids=img_ids,
            return_dict=False,
        )[0]
    s = pipe.vae_scale_factor
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(out, 6 * s, 4 * s, s))
    # the guidance value reaches the model
    other = FluxFamily(pipe, max_sequence_length=SEQ, guidance_scale=5.0)
    assert not torch.allclose(
        other.call_denoiser(pipe.transformer, latents, timestep, family.denoiser_conditioning(embeds, None)), ours
    )


def test_flux_schnell_without_guidance_embedding_trains(make_flow, make_config, flow_pairs) -> None:
    pipe = make_flow("flux", guidance_embeds=False)
    trainer = DiffusionSDPOTrainer(pipe, args=flow_config(make_config, max_steps=1), train_dataset=flow_pairs)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


# ------------------------------------------------------------------------------------------------------- noising


def test_flow_noising_matches_an_independent_computation() -> None:
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    noising = FlowNoiser(config, FlowTimestepSampling("logit_normal", logit_mean=0.2, logit_std=0.8))
    n, shape = 64, (4, 6, 6)
    sigmas = noising.sample_sigmas(n, shape, torch.Generator().manual_seed(5), torch.device("cpu"))
    # independent: u = sigmoid(N(0.2, 0.8)), the table of t = 1000..1 shifted by 3, index floor(1000 u)
    u = torch.sigmoid(torch.normal(0.2, 0.8, (n,), generator=torch.Generator().manual_seed(5)))
    t = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    table = 3 * t / (1 + 2 * t)
    torch.testing.assert_close(sigmas.double(), table[(u * 1000).long()], atol=1e-6, rtol=0)

    gen = torch.Generator().manual_seed(1)
    mean, std = torch.randn((2 * 3, *shape), generator=gen), torch.rand((2 * 3, *shape), generator=gen)
    noise, eps = torch.randn((3, *shape), generator=gen), torch.randn((3, 2, *shape), generator=gen)
    vae = type("VaeConfig", (), {"scaling_factor": 1.5, "shift_factor": 0.1})()
    noised = noising.noise_pairs(mean, std, sigmas[:3], noise, eps, vae)
    for row in range(6):
        pair, branch = row % 3, row // 3
        x0 = (mean[row] + std[row] * eps[pair, branch] - 0.1) * 1.5
        s = sigmas[pair]
        torch.testing.assert_close(noised.latents[row], x0)
        torch.testing.assert_close(noised.noisy[row], (1 - s) * x0 + s * noise[pair])  # same s and eps for w and l
        torch.testing.assert_close(noised.target[row], noise[pair] - x0)
        torch.testing.assert_close(noised.timesteps[row], 1000 * s)
    assert noised.loss_weight is None


def test_resolution_shift_is_fluxs_time_shift() -> None:
    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15).config
    assert resolution_shift(128, 128, config) == pytest.approx(math.exp(1.15))  # 1024 px: 4096 tokens
    assert resolution_shift(64, 64, config) == pytest.approx(1.8776, abs=1e-4)  # 512 px
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    mu = math.log(resolution_shift(64, 64, config))
    torch.testing.assert_close(shift_sigmas(t, math.exp(mu)), scheduler.time_shift(mu, 1.0, t))
    noising = FlowNoiser(config, FlowTimestepSampling("none", shift="resolution"))
    sigmas = noising.sample_sigmas(32, (4, 64, 64), torch.Generator().manual_seed(0), torch.device("cpu"))
    u = torch.rand((32,), generator=torch.Generator().manual_seed(0))
    base = (1000 - (u * 1000).long()).double() / 1000
    torch.testing.assert_close(sigmas.double(), shift_sigmas(base, math.exp(mu)), atol=1e-6, rtol=0)


def test_a_weighting_scheme_multiplies_each_rows_squared_error() -> None:
    """With ``sigma_sqrt`` each branch's error is ``s^-2 * mean (pred - target)^2`` (diffusers' weighting)."""

    class Family:
        def denoiser_conditioning(self, embeds, time_ids):
            return {}

        def call_denoiser(self, model, sample, timestep, conditioning):
            return model(sample)

    gen = torch.Generator().manual_seed(0)
    s = torch.tensor([0.3, 0.8])
    noising = FlowNoiser(FlowMatchEulerDiscreteScheduler().config, FlowTimestepSampling("sigma_sqrt"))
    vae = type("VaeConfig", (), {"scaling_factor": 1.0, "shift_factor": None})()
    noised = noising.noise_pairs(
        torch.randn((4, 2, 3, 3), generator=gen),
        torch.zeros((4, 2, 3, 3)),
        s,
        torch.randn((2, 2, 3, 3), generator=gen),
        torch.zeros((2, 2, 2, 3, 3)),
        vae,
    )
    torch.testing.assert_close(noised.loss_weight, s.repeat(2) ** -2)
    policy = lambda x: 0.5 * x  # noqa: E731
    errors = denoising_errors(
        predict_pairs(policy, None, Family(), noised, PromptEmbeddings(torch.zeros(2, 1, 1)), None)
    )
    plain = (policy(noised.noisy) - noised.target).pow(2).flatten(1).mean(1) * s.repeat(2) ** -2
    torch.testing.assert_close(torch.cat([errors.policy_winner, errors.policy_loser]), plain)


# ------------------------------------------------------------------------------------------------------- training


@dataclass
class SavedFlowPipeline:
    """A tiny pipeline saved to ``local``, and its transformer's and T5 encoder's weights as saved."""

    local: Path
    transformer: dict[str, torch.Tensor]
    text_encoder_2: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def saved_flow_pipelines(tmp_path_factory) -> Callable[[str], SavedFlowPipeline]:
    """``saved_flow_pipelines(kind)``: each kind's tiny pipeline saved once per module (the runs below load it)."""
    made: dict[str, SavedFlowPipeline] = {}

    def get(kind: str) -> SavedFlowPipeline:
        if kind not in made:
            tmp_path = tmp_path_factory.mktemp(f"tiny-{kind}")
            pipe = BUILDERS[kind](seed=0, tokenizer_dir=str(tmp_path / "tok"), max_length=SEQ)
            pipe.save_pretrained(tmp_path / "pipeline")
            made[kind] = SavedFlowPipeline(
                tmp_path / "pipeline",
                {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()},
                {n: p.detach().clone() for n, p in pipe.text_encoder_2.named_parameters()},
            )
        return made[kind]

    return get


FlowLoraRun = tuple[SavedFlowPipeline, DiffusionSDPOTrainer, Path]


@pytest.fixture(scope="module")
def flow_lora_runs(saved_flow_pipelines, tmp_path_factory) -> Callable[[str], FlowLoraRun]:
    """``flow_lora_runs(kind)``: ``(saved pipeline, trainer, output folder)`` of the 2-step LoRA run of
    :func:`flow_config`'s settings from the saved pipeline, trained and saved once per module for the LoRA tests."""
    made: dict[str, FlowLoraRun] = {}

    def get(kind: str) -> FlowLoraRun:
        if kind not in made:
            saved, out = saved_flow_pipelines(kind), tmp_path_factory.mktemp(f"lora-{kind}") / "lora-out"
            args = flow_config(lambda **values: DiffusionSDPOConfig(**{**fast_config_values(str(out)), **values}))
            trainer = DiffusionSDPOTrainer(
                str(saved.local),
                args=args,
                train_dataset=Dataset.from_list(pickapic_rows(4)),
                peft_config=lora(),
            )
            trainer.train()
            trainer.save_model()
            made[kind] = (saved, trainer, out)
        return made[kind]

    return get


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_training_moves_only_the_adapters_and_starts_at_log_2(flow_lora_runs, kind) -> None:
    saved, trainer, _ = flow_lora_runs(kind)
    pipe, frozen, encoders = trainer.pipeline, saved.transformer, saved.text_encoder_2
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at the base: u = 0
    assert first["implicit_acc"] == 0.5
    moved = {n for n, p in pipe.transformer.named_parameters() if "lora_" in n and p.requires_grad}
    assert moved and all(p.dtype == torch.float32 for n, p in pipe.transformer.named_parameters() if n in moved)
    state = dict(pipe.transformer.named_parameters())
    assert any(not torch.equal(state[n], frozen.get(n, state[n] * 0)) for n in moved if "lora_B" in n)
    for name, before in frozen.items():  # base weights keep their names under PEFT's base_layer
        after = state.get(
            name, state.get(name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias"))
        )
        assert torch.equal(after, before), name
    assert all(torch.equal(p, encoders[n]) for n, p in pipe.text_encoder_2.named_parameters())


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_saved_by_the_trainer_reloads_with_load_lora_weights(flow_lora_runs, kind) -> None:
    saved, trainer, out = flow_lora_runs(kind)
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()

    fresh = PIPELINES[kind].from_pretrained(saved.local)
    family = family_for_pipeline(fresh, max_sequence_length=SEQ)
    base = transformer_outputs(fresh.transformer, family)
    fresh.load_lora_weights(out)
    expected = transformer_outputs(trained, family)
    assert not torch.allclose(base, expected, atol=1e-5)  # training moved the adapters
    torch.testing.assert_close(transformer_outputs(fresh.transformer, family), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_full_tuning_keeps_a_frozen_reference_and_saves_a_loadable_transformer(
    saved_flow_pipelines, make_config, flow_pairs, tmp_path, kind
) -> None:
    local = saved_flow_pipelines(kind).local
    out = tmp_path / "full-out"
    trainer = DiffusionSDPOTrainer(
        str(local), args=flow_config(make_config, output_dir=str(out), learning_rate=1e-4), train_dataset=flow_pairs
    )
    reference = trainer.reference.denoiser
    reference_before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    trainer.train()
    trainer.save_model()
    assert reference is not trainer.family.denoiser
    assert all(torch.equal(p, reference_before[n]) for n, p in reference.named_parameters())
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded = TRANSFORMERS[kind].from_pretrained(out, subfolder="transformer")
    fresh = PIPELINES[kind].from_pretrained(local, transformer=loaded)
    family = family_for_pipeline(fresh, max_sequence_length=SEQ)
    original = PIPELINES[kind].from_pretrained(local)
    expected = transformer_outputs(trained, family)
    assert not torch.allclose(transformer_outputs(original.transformer, family), expected, atol=1e-5)
    torch.testing.assert_close(transformer_outputs(loaded, family), expected)
    # The output folder is a whole pipeline (the frozen parts written beside transformer/), as the card says.
    whole = PIPELINES[kind].from_pretrained(out)
    torch.testing.assert_close(transformer_outputs(whole.transformer, family), expected)
    assert not (out / "unet").exists()
    trainer.create_model_card()
    card = (out / "README.md").read_text()
    assert 'DiffusionPipeline.from_pretrained("<this repo>")' in card
    assert "fine-tuned from" in card and "UNet" not in card.split("## Usage")[0]


# the output space by default: the parameter case computes the output rule's lambda on the family's predictions too
# (log_output_lambda), and test_step_reference.py's unet-epsilon-output-full checks the output space's step
@pytest.mark.parametrize("space", [pytest.param("output", marks=pytest.mark.slow), "parameter"])
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_both_safeguard_spaces_train_and_log_lambda(make_flow, make_config, flow_pairs, kind, space) -> None:
    trainer = DiffusionSDPOTrainer(
        make_flow(kind),
        args=flow_config(
            make_config,
            safeguard_mu=0.5,
            safeguard_space=space,
        ),
        train_dataset=flow_pairs,
        peft_config=lora(),
    )
    if space == "parameter":
        trainer.safeguard.log_output_lambda(trainer.args)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "safeguard/lambda_mean" in h]
    assert len(logs) == 2
    assert all(0.0 <= h["safeguard/lambda_min"] <= h["safeguard/lambda_max"] <= 1.0 for h in logs)
    if space == "parameter":
        assert all("safeguard/output_lambda_mean" in h for h in logs)


def test_gradient_checkpointing_gives_the_same_gradients(make_flow, make_config, flow_pairs) -> None:
    grads = []
    for checkpointing in (False, True):
        trainer = DiffusionSDPOTrainer(
            make_flow("flux"),
            args=flow_config(make_config, gradient_checkpointing=checkpointing, max_steps=1, learning_rate=1e-4),
            train_dataset=flow_pairs,
        )
        assert trainer.family.denoiser.is_gradient_checkpointing == checkpointing
        grads.append(first_batch_gradients(trainer))
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_lora_trains_float32_adapters_on_a_bf16_transformer(make_flow, make_config, flow_pairs) -> None:
    pipe = make_flow("sd3")
    trainer = DiffusionSDPOTrainer(
        pipe, args=flow_config(make_config, bf16=True), train_dataset=flow_pairs, peft_config=lora()
    )
    trainer.train()
    dtypes = {n: p.dtype for n, p in pipe.transformer.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_cached_latents_and_t5_embeddings_give_the_uncached_losses(
    make_flow, make_config, flow_pairs, tmp_path
) -> None:
    losses = []
    for cache in (False, True):
        trainer = DiffusionSDPOTrainer(
            make_flow("flux"),
            args=flow_config(
                make_config,
                cache_latents=cache,
                latent_cache_dir=str(tmp_path / "cache"),
                random_flip=False,
                proportion_empty_prompts=0.0,
            ),
            train_dataset=flow_pairs,
            peft_config=lora(),
        )
        trainer.train()
        losses.append([h["mse/policy_winner"] for h in trainer.state.log_history if "mse/policy_winner" in h])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("loss_type", ["dspo", "dmpo", "sft"])
def test_other_objectives_train_on_a_flow_model(make_flow, make_config, flow_pairs, loss_type) -> None:
    trainer = DiffusionSDPOTrainer(
        make_flow("sd3"),
        args=flow_config(
            make_config, loss_type=loss_type, max_steps=1, safeguard_space="none" if loss_type == "sft" else "output"
        ),
        train_dataset=flow_pairs,
        peft_config=lora(),
    )
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_settings_without_flow_meaning_are_refused_naming_the_field(make_flow, make_config, flow_pairs) -> None:
    with pytest.raises(ValueError, match="loss_type='mapo'"):
        DiffusionSDPOTrainer(
            make_flow("sd3"), args=flow_config(make_config, loss_type="mapo"), train_dataset=flow_pairs
        )
    with pytest.raises(ValueError, match="min_timestep"):
        DiffusionSDPOTrainer(
            make_flow("sd3"), args=flow_config(make_config, min_timestep=100), train_dataset=flow_pairs
        )
    with pytest.raises(ValueError, match="multiple of 16"):
        DiffusionSDPOTrainer(make_flow("flux"), args=flow_config(make_config, resolution=40), train_dataset=flow_pairs)


def test_exact_safeguard_keeps_the_winner_term_from_rising_on_a_flux_transformer() -> None:
    """The first-order check of ``tests/helpers/winner_term_check.py`` on a FLUX.1-dev-style transformer: after a
    small SGD step along the parameter-space rule's gradient the winner term never rises beyond the second-order
    tolerance, while plain Diffusion-DPO's step does on some of the same batches."""
    from tests.helpers.winner_term_check import Setting, run

    report = run(
        Setting(batches=30, pairs=2, beta=100.0, drift_steps=5),
        progress=False,
        starts=("drifted",),
        model="flux",
        rules=("dpo", "parameter"),  # the rules read below
    )
    rules = report["starts"]["drifted"]
    assert rules["parameter"]["batches"] == 30 and rules["parameter"]["rose_beyond_tolerance"] == 0
    assert rules["parameter"]["lambda_min"] < 1.0  # the rule bound somewhere: the check is not vacuous
    assert rules["dpo"]["rose_beyond_tolerance"] > 0


def test_flow_example_configs_parse_and_the_script_trains_from_local_folders(make_flow, flow_pairs, tmp_path) -> None:
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    examples = Path(__file__).resolve().parents[2] / "examples"
    sys.path.insert(0, str(examples))
    try:
        import train_flow
    finally:
        sys.path.remove(str(examples))
    for name, field, value in (("sd3_lora", "flow_shift", "scheduler"), ("flux_lora", "flux_guidance_scale", 3.5)):
        script_args, config, model_args, _ = train_flow.parse_args(
            ["--config", str(examples / "configs" / f"{name}.yaml"), "--output_dir", "/tmp/unused", "--use_cpu"]
        )
        assert config.beta == 100 and getattr(config, field) == value and model_args.use_peft
    pipe_dir, data_dir, out = tmp_path / "flux", tmp_path / "pairs", tmp_path / "out"
    make_flow("flux").save_pretrained(pipe_dir)
    flow_pairs.save_to_disk(str(data_dir))
    train_flow.main(
        ["--config", str(examples / "configs" / "flux_lora.yaml"), "--model_name_or_path", str(pipe_dir),
         "--dataset_name", str(data_dir), "--output_dir", str(out), "--dataset_streaming", "false", "--dtype",
         "float32", "--bf16", "false", "--use_cpu", "--resolution", "32", "--max_sequence_length", str(SEQ),
         "--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
         "--lora_r", "4", "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0",
         "--disable_tqdm", "true"]
    )  # fmt: skip
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any("add_q_proj" in k for k in keys)  # both attention streams are adapted


def test_validation_grids_sample_a_flux_model_with_its_flow_scheduler(make_flow, make_config, flow_pairs, tmp_path):
    import os

    pipe = make_flow("flux")
    from trl_diffusion_sdpo.callbacks.validation import ValidationCallback

    args = flow_config(make_config, max_steps=1, output_dir=str(tmp_path / "run"))
    trainer = DiffusionSDPOTrainer(pipe, args=args, train_dataset=flow_pairs, peft_config=lora())
    trainer.add_callback(
        ValidationCallback(
            ["a red square"], seeds=[0], every_n_steps=1, num_inference_steps=2, guidance_scale=1.0, trainer=trainer
        )
    )
    trainer.train()
    assert sorted(os.listdir(tmp_path / "run" / "validation")) == ["step-000000.png", "step-000001.png"]
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)  # training's scheduler untouched


@pytest.mark.parametrize("kind,use_lora", [("flux", True), pytest.param("sd3", False, marks=pytest.mark.slow)])
def test_resuming_a_flow_run_gives_the_weights_of_an_uninterrupted_one(
    make_flow, make_config, flow_pairs, tmp_path, kind, use_lora
) -> None:

    def run(output_dir, stop_at=None, resume=None):
        args = flow_config(
            make_config, output_dir=str(output_dir), max_steps=2, save_strategy="steps", save_steps=1,
            learning_rate=1e-3 if use_lora else 1e-4,
        )  # fmt: skip
        trainer = DiffusionSDPOTrainer(
            make_flow(kind), args=args, train_dataset=flow_pairs, peft_config=lora() if use_lora else None
        )
        if stop_at is not None:
            trainer.add_callback(StopAt(stop_at))
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in trainer.family.denoiser.named_parameters() if p.requires_grad}

    straight = run(tmp_path / "straight")
    interrupted = run(tmp_path / "interrupted", stop_at=1)
    name = "pytorch_lora_weights.safetensors" if use_lora else "transformer"
    assert (tmp_path / "interrupted" / "checkpoint-1" / name).exists()
    resumed = run(tmp_path / "interrupted", resume=str(tmp_path / "interrupted" / "checkpoint-1"))
    assert any(not torch.equal(interrupted[k], resumed[k]) for k in resumed)  # the resumed run trained
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-6, atol=1e-7, msg=key)


def test_every_registered_flow_family_declares_its_default_beta_and_learning_rate_with_a_source() -> None:
    from trl_diffusion_sdpo.families import FlowMatchingFamily, registered_families
    from trl_diffusion_sdpo.families.flow import UNET_SCALE_BETA

    flow = [f for f in registered_families() if issubclass(f, FlowMatchingFamily)]
    assert {"stable-diffusion-3", "flux", "qwen-image", "z-image"} <= {f.name for f in flow}
    for family in flow:
        assert 0 < family.default_beta < UNET_SCALE_BETA, family.name  # the warning never fires on the default
        assert 0 < family.default_learning_rate < 1e-2, family.name
        assert len(family.defaults_source) > 20, family.name


def test_a_flow_family_states_only_what_differs_from_the_flow_defaults() -> None:
    from trl_diffusion_sdpo.families import FlowMatchingFamily

    class HouseFlow(FlowMatchingFamily):
        transformer_class = "HouseTransformer2DModel"
        default_learning_rate = 5e-5
        learning_rate_source = "a house recipe"

    # The shared defaults come from the base, and the source is "beta: <shared>; lr: <the family's>".
    assert (HouseFlow.default_beta, HouseFlow.default_max_sequence_length) == (100.0, 512)
    assert (HouseFlow.default_weighting_scheme, HouseFlow.default_flow_shift) == ("logit_normal", "scheduler")
    assert HouseFlow.required_components == ("text_encoder", "tokenizer")
    assert HouseFlow.defaults_source == f"beta: {FlowMatchingFamily.beta_source}; lr: a house recipe"

    class Retuned(HouseFlow):
        learning_rate_source = "a second recipe"

    class Written(HouseFlow):
        defaults_source = "one recipe for both"

    assert Retuned.defaults_source.endswith("; lr: a second recipe") and HouseFlow.defaults_source.endswith(
        "house recipe"
    )
    assert Written.defaults_source == "one recipe for both"  # a source written whole is kept


@pytest.mark.parametrize(
    "builder, family_name, lr_source",
    [
        ("build_tiny_sd3_pipeline", "stable-diffusion-3", "the same recipe's LoRA learning rate"),
        ("build_tiny_flux_pipeline", "flux", "train_dreambooth_lora_flux.py"),
        ("build_tiny_flux2_klein_pipeline", "flux2-klein", "train_dreambooth_lora_flux2.py"),
    ],
)
def test_the_unet_scale_beta_warning_quotes_the_family_defaults_and_both_sources(
    builder, family_name, lr_source, make_config, caplog, tmp_path
) -> None:
    from trl_diffusion_sdpo import testing
    from trl_diffusion_sdpo.families import family_for_pipeline

    family = family_for_pipeline(getattr(testing, builder)(tokenizer_dir=str(tmp_path)))
    assert family.name == family_name
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.families.flow"):
        family.noiser(make_config(beta=5000.0))
    message = caplog.text
    assert f"default is beta=100 with learning_rate={family.default_learning_rate:g}" in message
    assert "beta: flow_grpo's SD3.5 Flow-DPO" in message and lr_source in message
