"""Where an online step's time goes (sampler steps, classifier-free guidance, text encoding, decode, reward, pairing,
training), before and after a change to the generation stage, side by side.

Each size runs in fresh processes, alternating the code under test (this checkout) with the code of ``--before`` (a
commit, unpacked into a temporary folder with ``git archive``), ``--repeats`` times each; every process trains
``--warmup + --steps`` online steps and times the measured steps' stages:

- ``sampling``: the generation stage's sampling call, split into ``text_encoding`` (the text encoders' forwards),
  ``denoiser`` (the denoiser's forwards, both guidance branches), ``scheduler`` (the scheduler's steps), ``decode``
  (the VAE's decode) and ``sampling_other`` (the rest: inputs, the images' conversion to PIL);
- ``guidance``: what classifier-free guidance adds to sampling, measured apart: the same sampling call (same seeds)
  with the configured guidance and with guidance 1, which runs one branch (medians of ``--repeats`` calls each);
- ``reward``: the reward functions; ``pairing``: the rest of the generation (pairs, their latents, metrics);
- ``training``: the rest of the optimizer step (the offline step on the pairs, the optimizer);
- ``generation_time_share``: the trainer's own ``online/generation_time_share``.

The result file holds each stage's median seconds per step, its share of the step, and the median of the trainer's
generation share, for both codes, with the load average before and after each process. The sizes: ``demo`` (the
shipped tiny base, 32 px, as ``examples/configs/online_tiny_cpu.yaml``), ``sd15`` (SD1.5's real UNet, VAE and
text encoder with random weights, ``harness.build_pipeline``, at ``--resolution``), and on CUDA ``sd15-512`` (SD1.5 at
512 px, bf16, scored by a PickScore-sized CLIP ViT-H/14 with random weights).

    nice -n -5 python benchmarks/speed/online_step_profile.py --sizes demo,sd15 --before fad9c20 \
        --output benchmarks/results/online/cpu-online-step-profile-demo-sd15-256px.json
    python benchmarks/speed/online_step_profile.py --device cuda --sizes sd15-512 --before fad9c20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

#: Each size's model and generation settings.
SIZES: dict[str, dict[str, Any]] = {
    "demo": {"model": "demo", "resolution": 32, "prompts": 4, "generations": 4, "sample_steps": 8, "guidance": 5.0},
    # the script's end-to-end test: the demo's base at its smallest step
    "demo-tiny": {"model": "demo", "resolution": 32, "prompts": 2, "generations": 2, "sample_steps": 2, "guidance": 5},
    "sd15": {"model": "sd15", "resolution": 256, "prompts": 2, "generations": 2, "sample_steps": 4, "guidance": 7.5},
    "sd15-512": {
        "model": "sd15",
        "resolution": 512,
        "prompts": 4,
        "generations": 4,
        "sample_steps": 20,
        "guidance": 7.5,
        "reward": "pickscore-sized",
    },
}
STAGES = (
    "text_encoding",
    "denoiser",
    "scheduler",
    "decode",
    "sampling_other",
    "reward",
    "pairing",
    "training",
)

# ------------------------------------------------------------------------------------------------- one process


class PickScoreSized:
    """A reward of PickScore's size and form: a CLIP ViT-H/14 (the vision tower 32 layers of width 1280 at 224 px, the
    text tower 24 layers of width 1024) with random weights, scoring the scaled cosine of the image and prompt
    embeddings."""

    __name__ = "pickscore_sized"

    def __init__(self, device: str) -> None:
        import torch
        from transformers import CLIPConfig, CLIPModel

        from trl_diffusion_sdpo.testing import write_char_tokenizer

        config = CLIPConfig(
            text_config={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                         "num_hidden_layers": 24, "projection_dim": 1024, "max_position_embeddings": 77},
            vision_config={"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                           "num_hidden_layers": 32, "patch_size": 14, "image_size": 224, "projection_dim": 1024},
            projection_dim=1024,
        )  # fmt: skip
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        with torch.device(device):
            self.model = CLIPModel(config).to(dtype).eval()
        self.tokenizer = write_char_tokenizer(tempfile.mkdtemp(prefix="pick-tok-"), 77)
        self.device, self.dtype = device, dtype

    def __call__(self, prompts, images, **columns):
        import numpy as np
        import torch

        pixels = np.stack([np.asarray(im.convert("RGB").resize((224, 224)), dtype=np.float32) / 255 for im in images])
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device, self.dtype)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt")
        with torch.no_grad():
            image = self.model.get_image_features(pixel_values=pixels)
            text = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device))
        image = getattr(image, "pooler_output", image)
        text = getattr(text, "pooler_output", text)
        image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
        return (self.model.logit_scale.exp() * (image * text).sum(-1)).float().cpu()


class StageTimer:
    """Seconds per stage name, accumulated until :meth:`take`."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self.sampling = False

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    @contextlib.contextmanager
    def span(self, name: str, only_sampling: bool = False):
        if only_sampling and not self.sampling:
            yield
            return
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.totals[name] += time.perf_counter() - start

    def wrap(self, function, name: str, only_sampling: bool = False):
        def timed(*args, **kwargs):
            with self.span(name, only_sampling):
                return function(*args, **kwargs)

        return timed

    def hook(self, module, name: str) -> None:
        """Times ``module``'s forwards while sampling."""
        starts: list[float] = []

        def before(*_):
            if self.sampling:
                self.sync()
                starts.append(time.perf_counter())

        def after(*_):
            if self.sampling and starts:
                self.sync()
                self.totals[name] += time.perf_counter() - starts.pop()

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def take(self) -> dict[str, float]:
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals


def instrument(trainer, timer: StageTimer) -> None:
    """Timers around the trainer's stages (instance attributes: the classes stay as they are)."""
    stage, pipeline = trainer.generation, trainer.family.pipeline
    sample = stage.sample

    def timed_sample(*args, **kwargs):
        timer.sampling = True
        try:
            with timer.span("sampling"):
                return sample(*args, **kwargs)
        finally:
            timer.sampling = False

    stage.sample = timed_sample
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipeline, name, None) is not None:
            timer.hook(getattr(pipeline, name), "text_encoding")
    timer.hook(getattr(pipeline, "unet", None) or pipeline.transformer, "denoiser")
    pipeline.vae.decode = timer.wrap(pipeline.vae.decode, "decode", only_sampling=True)
    pipeline.scheduler.step = timer.wrap(pipeline.scheduler.step, "scheduler", only_sampling=True)
    rewards = stage.rewards

    class TimedRewards:
        def __call__(self, *args, **kwargs):
            with timer.span("reward"):
                return rewards(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(rewards, name)

    stage.rewards = TimedRewards()
    trainer._generation = timer.wrap(trainer._generation, "generation")


def build_trainer(size: dict[str, Any], device: str, workdir: str):
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from benchmarks import harness
    from trl_diffusion_sdpo import OnlineDiffusionSDPOConfig, OnlineDiffusionSDPOTrainer
    from trl_diffusion_sdpo.demo.shapes import all_captions

    if size["model"] == "demo":
        from diffusers import StableDiffusionPipeline

        from trl_diffusion_sdpo.demo.pretrain import SHIPPED_BASE_DIR

        pipeline = StableDiffusionPipeline.from_pretrained(str(SHIPPED_BASE_DIR))
    else:
        pipeline = harness.build_pipeline(size["model"], device)
    reward: Any = PickScoreSized(device) if size.get("reward") == "pickscore-sized" else "colour"
    args = OnlineDiffusionSDPOConfig(
        output_dir=os.path.join(workdir, "out"),
        resolution=size["resolution"],
        per_device_train_batch_size=size["prompts"],
        num_generations=size["generations"],
        sample_steps=size["sample_steps"],
        sample_guidance_scale=size["guidance"],
        max_steps=size["warmup"] + size["steps"],
        learning_rate=1e-4,
        warmup_steps=0,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        dataloader_num_workers=0,
        seed=0,
    )
    # the demo's captions: the colour reward parses them; the SD1.5 pipeline's tokenizer reads any text
    prompts = Dataset.from_dict({"prompt": [c.text for c in all_captions()[:16]]})
    lora = LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=harness.LORA_TARGETS)
    torch.manual_seed(0)
    return OnlineDiffusionSDPOTrainer(pipeline, None, args, prompts, reward_funcs=[reward], peft_config=lora)


def guidance_cost(trainer, timer: StageTimer, repeats: int) -> dict[str, float]:
    """The sampling call's seconds and its denoiser's, at the configured guidance and at guidance 1 (one branch)."""
    import dataclasses

    stage = trainer.generation
    settings = stage.settings
    prompts = list(trainer.train_dataset["prompt"][: trainer.args.per_device_train_batch_size])
    out: dict[str, list[float]] = defaultdict(list)
    try:
        for _ in range(repeats):
            for label, scale in (("guided", settings.sample_guidance_scale), ("unguided", 1.0)):
                stage.settings = dataclasses.replace(settings, sample_guidance_scale=scale)
                timer.take()
                stage.sample(prompts, 10_000, 0)
                totals = timer.take()
                out[f"{label}_sampling_s"].append(totals.get("sampling", 0.0))
                out[f"{label}_denoiser_s"].append(totals.get("denoiser", 0.0))
    finally:
        stage.settings = settings
    return {name: statistics.median(values) for name, values in out.items()}


def worker(opts: argparse.Namespace) -> dict[str, Any]:
    """One process: build the size's trainer, train, time each step's stages."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, opts.code)  # the code measured comes first
    import torch
    from transformers import TrainerCallback

    import trl_diffusion_sdpo

    size = {**SIZES[opts.size], "warmup": opts.warmup, "steps": opts.steps}
    if opts.resolution:
        size["resolution"] = opts.resolution
    load_before = os.getloadavg()
    timer = StageTimer(opts.device)
    steps: list[dict[str, float]] = []
    first_rewards: list[float] = []
    with tempfile.TemporaryDirectory() as workdir:
        trainer = build_trainer(size, opts.device, workdir)
        instrument(trainer, timer)
        timed_generation = trainer._generation

        def recorded_generation(inputs):  # the first generation's rewards: the two codes sample the same seeds
            generated = timed_generation(inputs)
            if not first_rewards:
                first_rewards.extend(generated.rewards.flatten().tolist())
            return generated

        trainer._generation = recorded_generation

        class Steps(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.take()
                timer.sync()
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.sync()
                totals = timer.take()
                totals["step"] = time.perf_counter() - self.start
                shares = trainer._metrics["train"]["online/generation_time_share"]
                totals["generation_time_share"] = float(shares[-1])
                steps.append(totals)

        trainer.add_callback(Steps())
        trainer.train()
        guidance = guidance_cost(trainer, timer, opts.guidance_repeats)
    measured = steps[opts.warmup :]
    for totals in measured:
        sampled = sum(totals.get(name, 0.0) for name in ("text_encoding", "denoiser", "scheduler", "decode"))
        totals["sampling_other"] = totals.get("sampling", 0.0) - sampled
        totals["pairing"] = totals.get("generation", 0.0) - totals.get("sampling", 0.0) - totals.get("reward", 0.0)
        totals["training"] = totals["step"] - totals.get("generation", 0.0)
    return {
        "package": str(Path(trl_diffusion_sdpo.__file__).parent),
        "size": size,
        "steps": measured,
        "guidance": guidance,
        "first_generation_rewards": first_rewards,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------------- the comparison


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median seconds per step of each stage (over every measured step of every process), shares of the median
    step, the trainer's median generation share and the guidance measure's medians."""
    steps = [step for run in runs for step in run["steps"]]
    median_step = statistics.median(s["step"] for s in steps)
    seconds = {name: statistics.median(s.get(name, 0.0) for s in steps) for name in (*STAGES, "sampling", "step")}
    measured = [run["guidance"] for run in runs if run["guidance"]]  # --guidance-repeats 0: not measured
    guidance = {name: statistics.median(g[name] for g in measured) for name in (measured[0] if measured else ())}
    if guidance:
        guidance["guidance_s"] = guidance["guided_sampling_s"] - guidance["unguided_sampling_s"]
        guidance["guidance_share_of_sampling"] = guidance["guidance_s"] / guidance["guided_sampling_s"]
    return {
        "steps_measured": len(steps),
        "median_s": seconds,
        "share_of_median_step": {name: seconds[name] / median_step for name in (*STAGES, "sampling")},
        "generation_time_share_median": statistics.median(s["generation_time_share"] for s in steps),
        "generation_time_share_all": [s["generation_time_share"] for s in steps],
        "step_s_all": [s["step"] for s in steps],
        "guidance": guidance,
        "load_averages": [[run["load_average_before"], run["load_average_after"]] for run in runs],
    }


def run_worker(code: str, size: str, opts: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    command = [
        sys.executable, __file__, "--worker", "--code", code, "--size", size, "--device", opts.device,
        "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--guidance-repeats", str(opts.guidance_repeats),
        "--worker-output", out,
    ]  # fmt: skip
    if opts.resolution:
        command += ["--resolution", str(opts.resolution)]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run(command, check=True, env=env, cwd=str(ROOT))
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def unpack(commit: str, folder: str) -> str:
    """The package as it was at ``commit``, unpacked into ``folder``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "trl_diffusion_sdpo"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="demo,sd15", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--before", default=None, help="a commit whose generation stage is measured beside this one")
    parser.add_argument("--repeats", type=int, default=2, help="processes per code and size, alternating")
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps before the measured ones")
    parser.add_argument("--guidance-repeats", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=None, help="overrides the size's resolution")
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        result = worker(opts)
        with open(opts.worker_output, "w") as f:
            json.dump(result, f)
        return None

    sys.path.insert(0, str(ROOT))
    from benchmarks import harness

    sizes = [s for s in opts.sizes.split(",") if s]
    report: dict[str, Any] = {
        "what": "an online step's time by stage, before and after the generation stage's cuts",
        "command": "python " + " ".join([f"benchmarks/speed/{Path(__file__).name}", *(argv or sys.argv[1:])]),
        "machine": harness.machine_description(opts.device),
        "niceness": os.nice(0),
        "sizes": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        codes = {"after": str(ROOT)}
        if opts.before:
            codes = {"before": unpack(opts.before, folder), **codes}
            report["before_commit"] = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", opts.before], check=True, capture_output=True, text=True
            ).stdout.strip()
        report["after_commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()
        for size in sizes:
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label in codes}
            for _ in range(opts.repeats):
                for label, code in codes.items():
                    runs[label].append(run_worker(code, size, opts))
                    print(f"{size} {label}: {[round(s['step'], 2) for s in runs[label][-1]['steps']]}", flush=True)
            entry: dict[str, Any] = {"settings": runs["after"][0]["size"]}
            for label in codes:
                entry[label] = summary(runs[label])
            if "before" in codes:
                before = [r["first_generation_rewards"] for r in runs["before"]]
                after = [r["first_generation_rewards"] for r in runs["after"]]
                entry["first_generation_rewards_max_abs_difference"] = max(
                    abs(a - b) for x, y in zip(before, after) for a, b in zip(x, y)
                )
                entry["step_speedup_median"] = entry["before"]["median_s"]["step"] / entry["after"]["median_s"]["step"]
            report["sizes"][size] = entry
    text = json.dumps(report, indent=2)
    if opts.output:
        Path(opts.output).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
