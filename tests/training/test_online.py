"""Online training: the generation stage (samples, rewards, pairs, the pairs' latents) and the online trainer on the
shipped tiny base, against independent computations."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load_file

from tests.helpers.online import CHEAP_SAMPLING, PROMPTS, lora_weights, make_trainer, online_config, red_minus_blue
from trl_diffusion_sdpo.demo.pretrain import SHIPPED_BASE_DIR
from trl_diffusion_sdpo.demo.shapes import all_captions
from trl_diffusion_sdpo.families.noising import scale_latents, unscale_latents
from trl_diffusion_sdpo.online import OnlineDiffusionSDPOTrainer, RewardFunctions
from trl_diffusion_sdpo.online.generation import image_seed
from trl_diffusion_sdpo.online.trainer import RepeatedBlockSampler
from trl_diffusion_sdpo.step.frozen_reference import refreshed_reference
from trl_diffusion_sdpo.step.predictions import DisabledAdaptersReference

# ---------------------------------------------------------------------------------------------- pure parts


def test_image_seeds_differ_by_each_coordinate_and_repeat_for_the_same_one():
    seeds = {image_seed(0, g, r, k) for g in range(3) for r in range(4) for k in range(4)}
    assert len(seeds) == 48
    assert image_seed(3, 1, 2, 0) == image_seed(3, 1, 2, 0) != image_seed(4, 1, 2, 0)


def test_rewards_are_the_weighted_sum_of_each_function():
    images = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255), (10, 10, 10))]

    def constant(prompts, images, **columns):
        return [2.0] * len(images)

    total, parts = RewardFunctions([red_minus_blue, constant], [0.5, -1.0])(["a", "b", "c"], images)
    expected = 0.5 * torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) - 2.0
    torch.testing.assert_close(total, expected)
    assert list(parts) == ["red_minus_blue", "constant"]
    with pytest.raises(ValueError, match="returned 1 scores for 3 images"):
        RewardFunctions([lambda p, i, **c: [0.0]])(["a", "b", "c"], images)
    with pytest.raises(ValueError, match="no registered scorer.*colour"):
        RewardFunctions(["colur"])
    with pytest.raises(ValueError, match="at least one reward function"):
        RewardFunctions([])


def test_the_registered_colour_scorer_is_a_reward_function():
    caption = all_captions()[0]
    total, _ = RewardFunctions(["colour"])([caption.text], [Image.new("RGB", (32, 32), "white")])
    assert total.shape == (1,) and 0.0 <= float(total[0]) <= 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_generations": 1}, "num_generations"),
        ({"pair_mode": "best"}, "pair_mode"),
        ({"random_flip": True}, "random_flip=True"),
        ({"cache_latents": True}, "cache_latents=True"),
        ({"reward_funcs": ["colour"], "reward_weights": [1.0, 2.0]}, "reward_weights has 2 weights"),
        ({"num_iterations": 0}, "num_iterations"),
    ],
)
def test_the_config_refuses_settings_online_training_cannot_honour(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        online_config(tmp_path, **overrides)


def test_the_repeated_sampler_yields_each_optimizer_steps_prompts_num_iterations_times():
    assert list(RepeatedBlockSampler(range(6), block=2, repeats=3)) == [0, 1] * 3 + [2, 3] * 3 + [4, 5] * 3
    assert len(RepeatedBlockSampler(range(6), block=4, repeats=2)) == 12


def test_a_prompt_dataset_without_prompts_is_refused_naming_the_column_or_row(tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(str(SHIPPED_BASE_DIR))
    with pytest.raises(ValueError, match="'prompt' column.*\\['caption'\\]"):
        OnlineDiffusionSDPOTrainer(
            pipe, None, online_config(tmp_path), Dataset.from_dict({"caption": ["a"]}), reward_funcs=[red_minus_blue]
        )
    with pytest.raises(ValueError, match="row 1, column 'prompt'"):
        OnlineDiffusionSDPOTrainer(
            pipe,
            None,
            online_config(tmp_path),
            Dataset.from_dict({"prompt": ["a", " "]}),
            reward_funcs=[red_minus_blue],
        )


# ---------------------------------------------------------------------------------------------- the generation


def max_difference(a: list[list[Image.Image]], b: list[list[Image.Image]]) -> float:
    """The largest 8-bit difference between two [N][K] grids of images of the same shape."""
    assert [len(row) for row in a] == [len(row) for row in b]
    return max(
        float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
        for row_a, row_b in zip(a, b)
        for x, y in zip(row_a, row_b)
    )


@pytest.fixture(scope="module")
def sampling(tmp_path_factory) -> dict:
    """One untrained trainer of the default config, sampling in 2 steps, for the tests that only sample and score with
    its stage (each puts back any setting it changes), and the stage's generation 0 of the first four prompts, made
    once."""
    trainer = make_trainer(tmp_path_factory.mktemp("sampling"), sample_steps=2)
    return {"trainer": trainer, "generated": trainer.generation({"prompt": PROMPTS[:4]}, generation=0, first_row=0)}


@pytest.fixture
def stage_settings_kept(sampling):
    """The shared stage's settings put back after the test."""
    stage = sampling["trainer"].generation
    settings = stage.settings
    yield
    stage.settings = settings


def test_the_pairs_are_the_sampled_latents_of_the_best_and_worst_scored_images(sampling):
    trainer = sampling["trainer"]
    stage = trainer.generation
    generated = sampling["generated"]
    images = generated.images
    # the rewards are the function's on the decoded images, and each pair is (argmax, argmin) of its prompt
    rewards = torch.tensor([red_minus_blue(None, row) for row in images], dtype=torch.float64)
    torch.testing.assert_close(generated.rewards, rewards)
    expected = [(r, int(rewards[r].argmax()), int(rewards[r].argmin())) for r in range(4)]
    assert generated.pairs == [p for p in expected if rewards[p[0]].max() > rewards[p[0]].min()]
    # the batch holds the sampler's final latents of those images, unscaled: decoding them gives the scored images
    _, latents = stage.sample(PROMPTS[:4], 0, 0)
    vae = trainer.family.vae
    for index, (row, chosen, rejected) in enumerate(generated.pairs):
        for side, sample in ((0, chosen), (1, rejected)):
            mean = generated.batch["latent_mean"][index, side]
            torch.testing.assert_close(mean, unscale_latents(latents[row, sample][None], vae.config)[0])
            with torch.no_grad():
                decoded = vae.decode(mean[None]).sample
            pixels = trainer.pipeline.image_processor.postprocess(decoded, output_type="np")[0]
            scored = np.asarray(images[row][sample], dtype=np.float64) / 255
            assert np.abs(pixels - scored).max() <= 1 / 255 + 1e-6
    assert float(generated.batch["latent_std"].abs().max()) == 0.0
    # scale_latents (the noiser's) inverts unscale_latents
    x = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(scale_latents(unscale_latents(x, vae.config), vae.config), x)


def test_encoded_pair_latents_are_the_vae_encoding_of_the_scored_images(tmp_path):
    trainer = make_trainer(tmp_path, pair_latents="encoded", sample_steps=2)
    assert not trainer.generation.direct_latents
    generated = trainer.generation({"prompt": PROMPTS[:2]}, generation=0, first_row=0)
    row, chosen, rejected = generated.pairs[0]
    for side, sample in ((0, chosen), (1, rejected)):
        pixels = np.asarray(generated.images[row][sample], dtype=np.float32) / 127.5 - 1.0
        with torch.no_grad():
            posterior = trainer.family.vae.encode(torch.from_numpy(pixels).permute(2, 0, 1)[None]).latent_dist
        torch.testing.assert_close(generated.batch["latent_mean"][0, side], posterior.mean[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(generated.batch["latent_std"][0, side], posterior.std[0], rtol=1e-4, atol=1e-5)


def test_samples_do_not_depend_on_the_batch_split_or_generation_batch_size(sampling, stage_settings_kept):
    stage = sampling["trainer"].generation
    whole = sampling["generated"].images  # generation 0 of the four prompts, sampled in one call
    first, _ = stage.sample(PROMPTS[:2], 0, 0)  # process 0 of two, two prompts each
    second, _ = stage.sample(PROMPTS[2:4], 0, 2)  # process 1: its prompts are rows 2 and 3 of the global batch
    stage.settings = type(stage.settings)(**{**stage.settings.__dict__, "generation_batch_size": 1})
    one_by_one, _ = stage.sample(PROMPTS[:4], 0, 0)
    # batched convolutions may round differently in the last bit: one 8-bit level at most
    assert max_difference(first + second, whole) <= 1
    assert max_difference(one_by_one, whole) <= 1
    other, _ = stage.sample(PROMPTS[:4], 1, 0)  # another generation draws other noise
    assert max_difference(other, whole) > 10


@pytest.mark.parametrize("generation_batch_size", [None, pytest.param(2, marks=pytest.mark.slow)])
def test_samples_equal_an_unbatched_guided_sampler_run_image_by_image(tmp_path, sampling, generation_batch_size):
    """The stage's final latents against DDIM written out per image, guidance's two branches as two forwards of
    prompts encoded one by one; the stage encodes each prompt once and runs both branches of every image of a call in
    one forward per sampler step (with 2 images a call, a prompt's 3 samples span two calls, passed one by one)."""
    if generation_batch_size is None:  # the default config's
        trainer = sampling["trainer"]
    else:
        trainer = make_trainer(tmp_path, generation_batch_size=generation_batch_size)
    stage, pipe, settings = trainer.generation, trainer.pipeline, trainer.generation.settings
    prompts, k = PROMPTS[:2], settings.num_generations
    encoded_rows, denoiser_rows = [], []
    hooks = [
        pipe.text_encoder.register_forward_hook(lambda m, args, out: encoded_rows.append(len(args[0]))),
        pipe.unet.register_forward_hook(lambda m, args, out: denoiser_rows.append(len(args[0]))),
    ]
    _, latents = stage.sample(prompts, 4, 0)
    for hook in hooks:
        hook.remove()
    calls = -(-len(prompts) * k // (generation_batch_size or len(prompts) * k))
    assert len(denoiser_rows) == calls * settings.sample_steps
    assert sum(denoiser_rows) == 2 * len(prompts) * k * settings.sample_steps
    if generation_batch_size is None:  # each prompt and its unconditional prompt once, not once per sample
        assert sum(encoded_rows) == 2 * len(prompts)

    def embed(text: str) -> torch.Tensor:
        ids = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids
        return pipe.text_encoder(torch.tensor(ids)).last_hidden_state

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(settings.sample_steps)
    unet, g = trainer._policy(), settings.sample_guidance_scale
    shape = (1, *latents.shape[2:])
    training = unet.training
    unet.eval()
    with torch.no_grad():
        unconditional = embed("")
        for row, prompt in enumerate(prompts):
            conditional = embed(prompt)
            for j in range(k):
                generator = torch.Generator().manual_seed(image_seed(settings.seed, 4, row, j))
                x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
                for t in scheduler.timesteps:
                    plain = unet(x, t, encoder_hidden_states=unconditional).sample
                    guided = unet(x, t, encoder_hidden_states=conditional).sample
                    x = scheduler.step(plain + g * (guided - plain), t, x).prev_sample
                torch.testing.assert_close(latents[row, j], x[0], rtol=1e-4, atol=1e-4)
    unet.train(training)


def test_the_samples_come_from_the_policy_with_its_adapters_not_from_the_reference(tmp_path):
    """With trained (non-zero) adapters the stage's samples are the pipeline's own samples of the policy, adapters on,
    with the same seeds, and not the base's (the reference of a LoRA run, adapters off)."""
    trainer = make_trainer(tmp_path, sample_steps=2)
    policy = trainer._policy()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as after some training: lora_B is zero at initialisation
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    stage, prompts = trainer.generation, PROMPTS[:2]
    images, _ = stage.sample(prompts, 3, 0)
    k, settings = stage.settings.num_generations, stage.settings

    def pipeline_samples() -> list[list[Image.Image]]:
        seeds = [image_seed(settings.seed, 3, row, j) for row in range(len(prompts)) for j in range(k)]
        out = trainer.pipeline(
            prompt=[p for p in prompts for _ in range(k)],
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            height=settings.resolution,
            width=settings.resolution,
            num_inference_steps=settings.sample_steps,
            guidance_scale=settings.sample_guidance_scale,
        ).images
        return [out[r * k : (r + 1) * k] for r in range(len(prompts))]

    policy.eval()
    assert max_difference(images, pipeline_samples()) <= 1
    policy.disable_adapters()
    base = pipeline_samples()
    policy.enable_adapters()
    assert max_difference(images, base) > 10  # the adapters change the samples: the test can tell the two apart


def test_each_micro_batch_of_an_accumulation_window_samples_its_own_generation(tmp_path):
    """Two micro-batches a step, two steps: four generations, 0 to 3, each on its own prompts; a generation index that
    ignored the micro-batch would sample one window's micro-batches with the same noise."""
    trainer = make_trainer(tmp_path, **CHEAP_SAMPLING, gradient_accumulation_steps=2, max_steps=2)
    stage, calls = trainer.generation, []

    class CountingStage:
        def start(self, inputs, generation, first_row):
            calls.append((generation, tuple(inputs["prompt"])))
            return stage.start(inputs, generation, first_row)

        def __getattr__(self, name):
            return getattr(stage, name)

    trainer.generation = CountingStage()
    trainer.train()
    assert [g for g, _ in calls] == [0, 1, 2, 3]
    assert len({p for _, p in calls}) == 4


def test_reward_margin_leaves_prompts_whose_best_and_worst_are_closer_unpaired(sampling, stage_settings_kept):
    """The stage's pairs against the rule computed here: a prompt is paired (best, worst) only where its rewards' range
    exceeds ``reward_margin``; the margin is put between the prompts' ranges so that it keeps some and drops some."""
    stage = sampling["trainer"].generation
    prompts = {"prompt": PROMPTS[:4]}
    ranges = sorted(float(r.max() - r.min()) for r in sampling["generated"].rewards)  # generation 0 of these prompts
    assert ranges[0] < ranges[-1]
    margin = (ranges[0] + ranges[-1]) / 2
    stage.settings = type(stage.settings)(**{**stage.settings.__dict__, "reward_margin": margin})
    generated = stage(prompts, generation=0, first_row=0)
    rewards = generated.rewards
    expected = [
        (r, int(rewards[r].argmax()), int(rewards[r].argmin()))
        for r in range(4)
        if rewards[r].max() - rewards[r].min() > margin
    ]
    assert generated.pairs == expected and 0 < len(expected) < 4


def test_a_step_where_every_prompt_ties_is_counted_and_not_applied(tmp_path):
    trainer = make_trainer(tmp_path, reward=lambda p, images, **c: [0.5] * len(images), max_steps=1, **CHEAP_SAMPLING)
    before = lora_weights(trainer)
    trainer.train()
    for name, value in lora_weights(trainer).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    log = trainer.state.log_history[0]
    assert log["online/prompts_without_pair"] == 1.0 and log["online/pairs"] == 0.0


# ---------------------------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize(  # the parameter space by default: test_every_text_to_image_family_trains_online_on_...
    "space", ["output", pytest.param("parameter", marks=pytest.mark.slow)]
)
def test_online_training_logs_the_generation_and_safeguard_and_moves_the_weights(tmp_path, space):
    trainer = make_trainer(tmp_path, safeguard_space=space, **CHEAP_SAMPLING)
    before = lora_weights(trainer)
    trainer.train()
    assert any(not torch.equal(value, before[name]) for name, value in lora_weights(trainer).items())
    log = trainer.state.log_history[0]
    for name in (
        "online/reward_mean",
        "online/chosen_reward",
        "online/rejected_reward",
        "online/reward_margin",
        "online/prompts_without_pair",
        "online/diversity",
        "online/generation_time_share",
        "online/reward/red_minus_blue",
        "safeguard/lambda_mean",
        "implicit_acc",
    ):
        assert name in log, name
    assert log["online/chosen_reward"] > log["online/rejected_reward"]
    assert 0.0 < log["online/generation_time_share"] < 1.0


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.mark.parametrize(
    "family, tokens, direct, targets",
    [
        ("stable-diffusion-xl", 77, True, ATTENTION),
        ("stable-diffusion-3", 16, True, ATTENTION),
        ("flux", 16, False, (*ATTENTION, "add_q_proj", "to_add_out")),
        ("qwen-image", 24, False, (*ATTENTION, "add_k_proj", "to_add_out")),
        ("z-image", 32, False, ATTENTION),
        # the slow tier's (the default suite's time is spent): FLUX.2's text-to-image (references:
        # test_online_families.py) and Qwen-Image 2.1
        pytest.param("flux2", 48, False, (*ATTENTION, "to_qkv_mlp_proj"), marks=pytest.mark.slow),
        pytest.param("flux2-klein", 48, False, (*ATTENTION, "to_qkv_mlp_proj"), marks=pytest.mark.slow),
        pytest.param("qwen-image-2.1", 32, False, ATTENTION, marks=pytest.mark.slow),
    ],
)
def test_every_text_to_image_family_trains_online_on_its_own_samples(tmp_path, family, tokens, direct, targets):
    """One step of each family's tiny pipeline with the exact safeguard: pairs are formed from its samples, their
    latents taken as sampled where the pipeline ends in the denoiser's layout, else encoded from the images."""
    from trl_diffusion_sdpo.testing import TINY_PIPELINES

    pipe = TINY_PIPELINES[family](seed=0, tokenizer_dir=str(tmp_path / "tok"), max_length=tokens)
    trainer = OnlineDiffusionSDPOTrainer(
        pipe,
        None,
        online_config(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=2,
            num_generations=2,
            sample_steps=2,
            beta=100.0,
            max_sequence_length=tokens,
            safeguard_space="parameter",
        ),
        Dataset.from_dict({"prompt": ["a red square", "a blue circle"]}),
        reward_funcs=[red_minus_blue],
        peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(targets)),
    )
    assert trainer.family.name == family and trainer.generation.direct_latents is direct
    before = lora_weights(trainer)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["online/pairs"] > 0 and "safeguard/lambda_mean" in log
    assert any(not torch.equal(value, before[name]) for name, value in lora_weights(trainer).items())


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory) -> tuple[OnlineDiffusionSDPOTrainer, list]:
    """The 4-step run with ``num_iterations=2``, trained once per module and saved at every step (the resume test
    below resumes from its checkpoint and compares with it, the refreshed-reference test copies its trained policy),
    and the generation and prompts each sampling started."""
    trainer = make_trainer(
        tmp_path_factory.mktemp("two-iterations"),
        num_iterations=2,
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
        **CHEAP_SAMPLING,
    )
    stage, calls = trainer.generation, []

    class CountingStage:
        """The trainer's stage, recording which generation each sampling starts."""

        def start(self, inputs, generation, first_row):
            calls.append((generation, tuple(inputs["prompt"])))
            return stage.start(inputs, generation, first_row)

        def __getattr__(self, name):
            return getattr(stage, name)

    trainer.generation = CountingStage()
    trainer.train()
    return trainer, calls


def test_num_iterations_trains_one_generation_for_several_optimizer_steps(two_iterations):
    _, calls = two_iterations
    assert [g for g, _ in calls] == [0, 1]  # steps 0-1 train generation 0, steps 2-3 generation 1
    assert calls[0][1] != calls[1][1]  # each generation samples the next prompts


def test_a_refreshed_lora_reference_predicts_what_the_policy_predicts(two_iterations):
    trainer, _ = two_iterations  # a trained LoRA run; the refresh below copies its policy and changes nothing of it
    policy = trainer._policy()
    assert isinstance(trainer.reference, DisabledAdaptersReference)
    sample = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 77, policy.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        tuned = policy(sample, t, encoder_hidden_states=hidden).sample
        base = trainer.reference.predict(sample, t, encoder_hidden_states=hidden)
    assert (tuned - base).abs().max() > 1e-6  # the run moved the policy away from the initial reference
    refreshed = refreshed_reference(trainer.reference, policy, trainer.family.call_denoiser)
    torch.testing.assert_close(refreshed.predict(sample, t, encoder_hidden_states=hidden), tuned, rtol=1e-5, atol=1e-5)


def test_the_gathered_merged_policy_state_is_what_peft_merges(tmp_path):
    """merged_policy_state (the ZeRO-3 / FSDP2 refresh, here with whole weights) against peft's own merge of a copy,
    for linear and 3x3 convolution adapters with non-zero weights and lora_alpha != r."""
    from peft.tuners.lora import LoraLayer

    from trl_diffusion_sdpo.step.frozen_reference import merged_copy, merged_policy_state

    pipe = StableDiffusionPipeline.from_pretrained(str(SHIPPED_BASE_DIR))
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_out.0", "conv1"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    kinds = {type(m.get_base_layer()).__name__ for m in unet.modules() if isinstance(m, LoraLayer)}
    assert kinds == {"Linear", "Conv2d"}
    state = merged_policy_state(unet, lambda p: p.detach())
    expected = merged_copy(unet).state_dict()
    bases = [name for name in state if name.endswith("base_layer.weight")]
    assert bases
    for name in state:
        torch.testing.assert_close(state[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = max(float((state[n] - unet.get_parameter(n)).abs().max()) for n in bases)
    assert moved > 1e-3  # the adapters were merged in, not left out


def test_ref_update_steps_moves_the_reference_during_training(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, ref_update_steps=2, lora=False, **CHEAP_SAMPLING)
    trainer.train()
    policy, reference = trainer._policy(), trainer.reference.denoiser
    # refreshed after step 2: the reference holds step 2's weights, the policy step 3's
    moved = [not torch.equal(p, r) for p, r in zip(policy.parameters(), reference.parameters())]
    assert any(moved)
    deltas = [abs(log["delta/winner"]) for log in trainer.state.log_history if "delta/winner" in log]
    # step 1 (the initial weights) and step 3 (step 2's weights, just copied into the reference): policy = reference;
    # step 2 trains weights that moved from the reference
    assert deltas[0] < 1e-9 and deltas[2] < 1e-9 and deltas[1] > 1e-7


@pytest.mark.slow  # by default: test_a_resume_inside_a_num_iterations_window_... (same weights check)
def test_resuming_from_a_checkpoint_samples_and_trains_as_the_uninterrupted_run(tmp_path):
    whole = make_trainer(tmp_path / "a", max_steps=4)
    whole.train()
    first = make_trainer(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    resumed = make_trainer(tmp_path / "c", max_steps=4, output_dir=str(tmp_path / "b" / "out"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    expected = lora_weights(whole)
    for name, value in lora_weights(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)


def test_a_resume_inside_a_num_iterations_window_trains_on_the_generation_it_had(tmp_path, two_iterations):
    """num_iterations=2: checkpoint-1 is saved inside window 0. Resumed from it, the run reads window 0's pairs from
    the checkpoint (the stage samples window 1 only) and ends with the uninterrupted run's weights and metrics."""
    whole, _ = two_iterations
    shutil.copytree(whole.args.output_dir, tmp_path / "b" / "out")  # its checkpoints, resumed in a folder of its own
    checkpoint = tmp_path / "b" / "out" / "checkpoint-1"
    assert (checkpoint / "online_generation-0.safetensors").exists()
    assert not (tmp_path / "b" / "out" / "checkpoint-2" / "online_generation-0.safetensors").exists()  # window end
    resumed = make_trainer(
        tmp_path / "c", max_steps=4, num_iterations=2, output_dir=str(tmp_path / "b" / "out"), **CHEAP_SAMPLING
    )
    stage, calls = resumed.generation, []

    class CountingStage:
        def start(self, inputs, generation, first_row):  # the trainer samples through start, scores through finish
            calls.append(generation)
            return stage.start(inputs, generation, first_row)

        def __getattr__(self, name):
            return getattr(stage, name)

    resumed.generation = CountingStage()
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert calls == [1]  # window 0's generation came from the checkpoint
    expected = lora_weights(whole)
    for name, value in lora_weights(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
    step_2 = [log for log in resumed.state.log_history if log.get("step") == 2 and "loss" in log][0]
    reference = [log for log in whole.state.log_history if log.get("step") == 2 and "loss" in log][0]
    for name in ("loss", "online/reward_mean", "online/pairs", "online/chosen_reward", "online/diversity"):
        assert step_2[name] == pytest.approx(reference[name], rel=1e-5, abs=1e-7), name


def test_the_model_card_names_the_online_trainer_and_its_rewards(tmp_path):
    from trl_diffusion_sdpo.callbacks.validation import ValidationCallback

    trainer = make_trainer(tmp_path, max_steps=1, **CHEAP_SAMPLING)
    trainer.add_callback(
        ValidationCallback(prompts=[PROMPTS[0]], num_inference_steps=2, every_n_steps=1, trainer=trainer)
    )
    trainer.train()
    assert os.listdir(os.path.join(trainer.args.output_dir, "validation"))  # the offline trainer's grids
    trainer.save_model()
    trainer.create_model_card()
    card = open(os.path.join(trainer.args.output_dir, "README.md")).read()
    assert "OnlineDiffusionSDPOTrainer" in card and "Online Diffusion-DPO" in card  # the online default: no safeguard
    assert "| `reward_funcs` | `red_minus_blue` |" in card
    assert set(load_file(os.path.join(trainer.args.output_dir, "pytorch_lora_weights.safetensors")))
    saved = json.load(open(os.path.join(trainer.args.output_dir, "training_config.json")))
    assert saved["num_generations"] == 3
