"""The held-out probe (``probe_steps``) and ``on_pathology="rewind"`` in an online run, through real tiny online runs
on the shipped base: the probe's prompts are never sampled for training, its pairs are the initial policy's samples
at the probe's own seeds, a run whose probe never acts trains bit for bit as the same run without it, and a rewind
puts the weights and the optimizer state back to the last healthy probe's, then trains on at a lower learning rate
(online there is no safeguard to switch to) or, its ladder spent, stops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset
from diffusers import StableDiffusionPipeline
from peft import LoraConfig

from tests.helpers.online import CHEAP_SAMPLING, LORA, PROMPTS, online_config, red_minus_blue
from tests.helpers.rewind import Recorder, ScriptedAlarm, equal, states_equal, trained_weights
from trl_diffusion_sdpo import DiffusionSDPOConfig
from trl_diffusion_sdpo.callbacks.probe import probe_seed, stratified_draw
from trl_diffusion_sdpo.callbacks.rewind import probe_alarm
from trl_diffusion_sdpo.demo.pretrain import SHIPPED_BASE_DIR
from trl_diffusion_sdpo.demo.shapes import all_captions
from trl_diffusion_sdpo.engines.base import trainable_parameters
from trl_diffusion_sdpo.families.noising import unscale_latents
from trl_diffusion_sdpo.online import OnlineDiffusionSDPOTrainer
from trl_diffusion_sdpo.online.generation import image_seed

HELD = 2
EVAL_PROMPTS = [c.text for c in all_captions()[8:12]]  # not among the training prompts


def held_and_kept(prompts: list[str], seed: int, count: int = HELD) -> tuple[list[str], list[str]]:
    """The prompts the probe holds back, drawn apart from the package (a seeded stratified draw: every prompt differs
    here, so a plain draw without replacement), and the training prompts left, each in the given order."""
    drawn = set(stratified_draw(prompts, count, seed))
    return [p for i, p in enumerate(prompts) if i in drawn], [p for i, p in enumerate(prompts) if i not in drawn]


DPO = {"safeguard_space": "none"}


def noisy_red_minus_blue(prompts, images, **columns) -> list[float]:
    """:func:`red_minus_blue` plus a jitter drawn from the process's global torch generator, as a reward model with
    random crops or dropout draws: a probe that let its pairing draw from the global generators would move the run."""
    jitter = torch.rand(len(images), dtype=torch.float64) * 1e-9
    return [score + float(j) for score, j in zip(red_minus_blue(prompts, images), jitter, strict=True)]


def online_trainer(tmp_path, prompts=PROMPTS, eval_prompts=None, reward=noisy_red_minus_blue, lora=True,
                   callbacks=None, **overrides) -> OnlineDiffusionSDPOTrainer:  # fmt: skip
    """An online run of 3 steps of 2 prompts, each sampled 3 times in 2 sampling steps (what the probe is checked
    against does not depend on how many prompts a step samples or how finely); its probe, where it has one, noises
    its pairs twice (several draws, the figures unread: the alarm is scripted or never acts)."""
    pipe = StableDiffusionPipeline.from_pretrained(str(SHIPPED_BASE_DIR))
    train = prompts if isinstance(prompts, IterableDataset) else Dataset.from_dict({"prompt": list(prompts)})
    return OnlineDiffusionSDPOTrainer(
        pipe,
        None,
        online_config(tmp_path, **{**CHEAP_SAMPLING, "max_steps": 3, "probe_noise_draws": 2, **DPO, **overrides}),
        train,
        None if eval_prompts is None else Dataset.from_dict({"prompt": list(eval_prompts)}),
        reward_funcs=[reward],
        # LoRA dropout draws from the global torch generator while training: a probe that moved it would show
        peft_config=LoraConfig(**{**LORA, "lora_dropout": 0.1}) if lora else None,
        callbacks=callbacks,
    )


@pytest.mark.parametrize(  # full tuning by default: test_probe.py's offline probe
    "lora", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["lora", "full"]
)
def test_an_online_probe_and_a_quiet_rewind_train_bit_for_bit_as_the_run_without_them(tmp_path, lora):
    """Two steps: the probe after step 1 runs between two training steps (a probe that moved a generator or the
    weights would show in step 2)."""
    plain = online_trainer(tmp_path / "plain", lora=lora, max_steps=2)
    plain.train()
    expected = trained_weights(plain)
    probed = online_trainer(
        tmp_path / "probed", eval_prompts=EVAL_PROMPTS, lora=lora, max_steps=2, probe_steps=1, probe_pairs=HELD
    )
    probed.train()
    assert equal(trained_weights(probed), expected)
    assert [e["step"] for e in probed.state.log_history if "probe/delta_winner" in e] == [1, 2]
    quiet = online_trainer(
        tmp_path / "quiet", eval_prompts=EVAL_PROMPTS, lora=lora, max_steps=2, probe_steps=1, probe_pairs=HELD,
        on_pathology="rewind",
    )  # fmt: skip
    quiet.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps=set())
    quiet.train()
    assert equal(trained_weights(quiet), expected)
    assert not any("health/rewind_to" in e for e in quiet.state.log_history)


@pytest.mark.slow  # by default: the bit-for-bit test above and test_the_held_out_prompts_are_never_sampled_...
def test_prompts_held_back_from_training_leave_the_run_as_one_on_the_other_prompts(tmp_path):
    seed = online_config(tmp_path / "unused").seed  # the run's seed draws the held-back prompts
    plain = online_trainer(tmp_path / "plain", prompts=held_and_kept(PROMPTS, seed)[1])
    plain.train()
    probed = online_trainer(tmp_path / "probed", probe_steps=1, probe_pairs=HELD)
    probed.train()
    assert equal(trained_weights(probed), trained_weights(plain))


def _expected_pairs(trainer, prompts: list[str], seed: int) -> torch.Tensor:
    """The pairs' latents ``[P, 2, C, h, w]`` computed apart from the trainer's generation stage: each prompt sampled
    ``num_generations`` times by the pipeline with the image seeds of ``seed``, scored by the reward, the best sample
    against the worst."""
    settings, family = trainer.generation.settings, trainer.family
    pipeline = family.pipeline
    kwargs = dict(num_inference_steps=settings.sample_steps, guidance_scale=settings.sample_guidance_scale,
                  **family.sampling_keywords(settings.resolution))  # fmt: skip
    pairs = []
    family.denoiser.eval()
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            seeds = [image_seed(seed, 0, row, j) for j in range(settings.num_generations)]

            def sample(output_type: str, seeds=seeds, prompt=prompt):
                generators = [torch.Generator().manual_seed(s) for s in seeds]
                return pipeline(prompt=[prompt] * len(seeds), generator=generators, output_type=output_type, **kwargs)

            images = sample("pil").images
            latents = sample("latent").images
            rewards = np.array(red_minus_blue([prompt] * len(images), images))
            best, worst = int(rewards.argmax()), int(rewards.argmin())
            pairs.append(torch.stack([latents[best], latents[worst]]))
    family.denoiser.train()
    scaled = torch.stack(pairs)
    return unscale_latents(scaled.reshape(-1, *scaled.shape[2:]), family.latents_config()).reshape(scaled.shape)


def test_the_held_out_prompts_are_never_sampled_for_training_and_their_pairs_are_the_probes_own_samples(tmp_path):
    seen: list[str] = []

    def recording(prompts, images, **columns):
        seen.extend(prompts)
        return red_minus_blue(prompts, images)

    trainer = online_trainer(tmp_path, reward=recording, probe_steps=1, probe_pairs=HELD, max_steps=2)
    held, kept = held_and_kept(PROMPTS, trainer.args.seed)
    assert seen == [p for p in held for _ in range(trainer.args.num_generations)]  # the probe's pairing, once
    assert list(trainer.train_dataset["prompt"]) == kept
    # The probe's pairs: the initial policy's samples of the held-out prompts at the probe's seeds, never at the
    # training stream's (the run's seed), each prompt's best against its worst.
    batch = trainer.probe.probe.batch
    own = _expected_pairs(trainer, held, probe_seed(trainer.args.seed))
    torch.testing.assert_close(batch["latent_mean"], own, rtol=1e-5, atol=1e-6)
    training_stream = _expected_pairs(trainer, held, trainer.args.seed)
    assert not torch.allclose(batch["latent_mean"], training_stream, atol=1e-3)
    embeds = trainer.family.encode_prompts(
        {k: v for k, v in trainer.family.prompt_tokenizer()(held).items()}
    ).encoder_hidden_states
    torch.testing.assert_close(batch["prompt_embeds"], embeds)
    seen.clear()
    trainer.train()
    assert seen and set(seen) <= set(kept)


@pytest.mark.parametrize(  # the snapshot on disk by default: test_probe.py's test_a_rewind_restores_the_last_...
    "lora", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["lora-in-memory", "full-on-disk"]
)
def test_an_online_rewind_restores_the_healthy_steps_weights_and_optimizer_state_then_stops(tmp_path, lora):
    recorder = Recorder()
    trainer = online_trainer(
        tmp_path, eval_prompts=EVAL_PROMPTS, lora=lora, callbacks=[recorder], max_steps=5, probe_steps=1,
        probe_pairs=HELD, on_pathology="rewind", rewind_max_times=0,
    )  # fmt: skip
    recorder.parameters = list(trainable_parameters(trainer.family.denoiser))
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps={2, 3})
    trainer.train()
    # Healthy at 1, unhealthy at 2 and 3: the alarm fires at 3, the run goes back to step 1 and, no rung of the
    # ladder, stops there.
    healthy_weights, healthy_optimizer = recorder.at_end[1]
    broken_weights, broken_optimizer = recorder.at_end[3]
    assert trainer.state.global_step == 3
    assert not equal(broken_weights, healthy_weights)
    assert equal(trained_weights(trainer), healthy_weights)
    restored_optimizer = trainer.optimizer.state_dict()
    assert states_equal(restored_optimizer, healthy_optimizer)
    assert not states_equal(restored_optimizer, broken_optimizer)
    rewinds = [e for e in trainer.state.log_history if "health/rewind_to" in e]
    assert [(e["step"], e["health/rewind_to"]) for e in rewinds] == [(3, 1.0)]
    assert trainer.safeguard is None and not trainer.probe_alarm.action.safeguard_on
    # The model card records the rewind as the log did, and that the run stopped with the healthy weights.
    trainer.create_model_card()
    with open(f"{trainer.args.output_dir}/README.md") as f:
        card = f.read()
    assert "- Step 3: the held-out probe's alarm fired" in card and "back to step 1's (" in card
    assert "; training stopped there" in card


def test_the_start_summary_states_the_held_back_prompts_and_how_they_were_paired(tmp_path, caplog):
    trainer = online_trainer(tmp_path, max_steps=1, probe_steps=1, probe_pairs=HELD, on_pathology="rewind")
    with caplog.at_level("INFO", logger="trl_diffusion_sdpo.io.run_summary"):
        trainer.train()
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Training "))
    seed = trainer.args.seed
    assert (
        f"on {HELD} pairs of {HELD} prompts held back from the training prompts (drawn at random with seed {seed})"
        in summary
    )
    assert "sampled once before training by the initial policy" in summary
    # online there is no safeguard to switch to: the ladder lowers the learning rate alone
    assert "then trains on at the learning rate times" in summary and "safeguard on" not in summary
    assert "the alarm after those stops the run with the healthy weights" in summary
    # One rule offline and online: the config's fields, at the offline config's defaults.
    offline = probe_alarm(DiffusionSDPOConfig(output_dir="unused", use_cpu=True))
    assert trainer.probe_alarm.signal.rule == probe_alarm(trainer.args) == offline
    assert f"the alarm ({offline.describe()})" in summary


def test_an_online_probe_draws_its_prompts_across_a_sorted_prompt_list_with_its_own_seed():
    from types import SimpleNamespace

    from trl_diffusion_sdpo.online.probe_pairs import hold_back_prompts

    prompts = sorted(f"{colour} shape {i}" for colour in ("blue", "green", "red") for i in range(8))  # by prompt
    data = Dataset.from_dict({"prompt": prompts})
    args = SimpleNamespace(probe_steps=5, probe_pairs=6, seed=42, probe_pairs_seed=None)
    train, held = hold_back_prompts(data, None, args)
    assert list(held["prompt"]) == held_and_kept(prompts, 42, 6)[0]
    assert list(held["prompt"]) != prompts[-6:] and len({p.split()[0] for p in held["prompt"]}) > 1
    assert sorted(list(train["prompt"]) + list(held["prompt"])) == prompts  # every prompt once, on one side
    assert "drawn at random with seed 42" in held.info.description
    # probe_pairs_seed draws them in place of the run's seed
    _, other = hold_back_prompts(data, None, SimpleNamespace(**{**vars(args), "probe_pairs_seed": 7}))
    assert list(other["prompt"]) == held_and_kept(prompts, 7, 6)[0] != list(held["prompt"])


def test_an_online_probe_refuses_what_it_cannot_honour(tmp_path):
    stream = IterableDataset.from_generator(lambda: ({"prompt": p} for p in PROMPTS[:1]))
    with pytest.raises(ValueError, match="the streamed train_dataset holds only 1 prompts"):
        online_trainer(tmp_path, prompts=stream, probe_steps=1, probe_pairs=HELD)
    with pytest.raises(ValueError, match="the eval_dataset holds only 1 prompts"):
        online_trainer(tmp_path, eval_prompts=EVAL_PROMPTS[:1], probe_steps=1, probe_pairs=HELD)
    with pytest.raises(ValueError, match="eval prompts only for the held-out probe"):
        online_trainer(tmp_path, eval_prompts=EVAL_PROMPTS)
    with pytest.raises(ValueError, match="would hold back every one of the 2 training prompts"):
        online_trainer(tmp_path, prompts=PROMPTS[:2], probe_steps=1, probe_pairs=HELD)


@pytest.mark.slow  # by default: test_probe.py's resumed rewind and test_online.py's resume inside a window
def test_an_online_run_resumed_from_a_checkpoint_probes_the_same_pairs_and_rewinds_as_the_uninterrupted_one(tmp_path):
    from tests.helpers.common import StopAt

    def run(output_dir, callbacks=(), resume=None):
        trainer = online_trainer(
            output_dir, eval_prompts=EVAL_PROMPTS, callbacks=list(callbacks), max_steps=5, probe_steps=1,
            probe_pairs=HELD, on_pathology="rewind", save_strategy="steps", save_steps=3,
        )  # fmt: skip
        # Healthy at 1 and 2, unhealthy at 3 (the checkpoint's step) and 4: the alarm fires at 4, back to step 2.
        trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=2, unhealthy_steps={3, 4})
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", callbacks=[StopAt(3)])
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "out" / "checkpoint-3"))
    assert torch.equal(resumed.probe.probe.batch["latent_mean"], straight.probe.probe.batch["latent_mean"])
    assert straight.probe_alarm.action.rewinds == resumed.probe_alarm.action.rewinds == [(4, 2)]
    assert resumed.probe.readings == straight.probe.readings[3:]  # step 4: the same figures
    assert equal(trained_weights(resumed), trained_weights(straight))


@pytest.mark.parametrize("online", [True, False], ids=["online-prompts", "offline-pairs"])
def test_a_streamed_dataset_gives_its_first_rows_to_the_probe_and_trains_on_the_rest(online):
    from types import SimpleNamespace

    from trl_diffusion_sdpo.callbacks.probe import hold_back_pairs as offline
    from trl_diffusion_sdpo.online.probe_pairs import hold_back_prompts

    hold_back_pairs = hold_back_prompts if online else offline  # what each trainer's hold_back_probe_pairs calls
    rows = [{"prompt": f"prompt {i}", "row": i} for i in range(7)]
    stream = Dataset.from_list(rows).to_iterable_dataset()
    args = SimpleNamespace(probe_steps=5, probe_pairs=HELD)
    train, held = hold_back_pairs(stream, None, args)
    assert [r["row"] for r in held] == [0, 1]
    assert [r["row"] for r in train] == [2, 3, 4, 5, 6]  # every other row trains, none twice
    with pytest.raises(ValueError, match=r"probe_pairs=8: the streamed train_dataset holds only 7"):
        hold_back_pairs(stream, None, SimpleNamespace(probe_steps=5, probe_pairs=8))
    # With eval prompts an online run's probe reads their first rows and the stream trains whole.
    eval_prompts = Dataset.from_dict({"prompt": EVAL_PROMPTS})
    train, held = hold_back_pairs(stream, eval_prompts, args)
    if online:
        assert held["prompt"] == EVAL_PROMPTS[:HELD] and [r["row"] for r in train] == list(range(7))
    else:
        assert held is None and train is stream
