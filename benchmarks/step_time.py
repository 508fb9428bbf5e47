"""Step time and peak memory of ``DiffusionSDPOTrainer`` against the compute floor.

Runs (each in its own fresh process, so memory peaks and allocator state never leak from one to the next):

* ``floor-full`` / ``floor-lora``: the compute floor alone, a bare loop on the trainer's own UNet, reference and
  optimizer (same model, batch, dtype): policy forward + backward over 2B samples, reference forward over 2B samples
  without autograd (a frozen copy for full tuning, the adapter-disabled policy for LoRA), ``optimizer.step()``,
  ``zero_grad``. Inputs are fixed tensors already on the device: no data loading, no encoding, a plain MSE loss.
  These rows give the floor's own step time and peak memory.
* ``{uncached,cached}-{full,lora}``: ``DiffusionSDPOTrainer.train()`` on a synthetic Pick-a-Pic-style dataset (JPEG
  bytes at the training resolution) with the config's defaults (gradient clipping 1.0 included), with or without
  ``cache_latents``. Diffusion-DPO (``safeguard=False``) and Diffusion-SDPO steps alternate on the same trainer, and
  after every trainer step one floor step runs on the same objects: the safeguard's overhead and the
  trainer-to-floor ratio are measured paired, in the same process and the same seconds, so a shared machine's
  drifts cancel out. Each run yields the rows ``dpo-<run>`` and ``sdpo-<run>``.

Reported per row: median step time after warm-up (wall clock between consecutive step ends, the device synchronised
there; also the process CPU time, which on a CPU shared with other jobs counts our work rather than our waiting),
the ratio to the paired floor, peak memory of the run (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process
RSS sampled every 5 ms), and the trainer's construction time (with the cache: building it, on a fresh cache folder).
Derived: safeguard overhead, the cache's speed-up (floor-normalised), LoRA's memory saving in units of one UNet's
float32 weights, and the issue's targets.

The UNets (and VAEs, text encoders) of ``--unet sd15`` and ``--unet sdxl`` are built from the real model configs
embedded below, with random weights: step time and memory do not depend on the weights' values. Nothing is
downloaded. Examples::

    python benchmarks/step_time.py                                    # CPU, small UNet, everything
    python benchmarks/step_time.py --device cuda --unet sd15          # bf16 mixed precision by default on CUDA
    python benchmarks/step_time.py --device cuda --unet sdxl --batch-size 1
    python benchmarks/step_time.py --runs floor-full,cached-full --steps 10 --repeats 3   # a subset
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import torch

# --------------------------------------------------------------------------------------------------- model configs

# stable-diffusion-v1-5 unet/config.json (model-defining keys).
SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stable-diffusion-xl-base-1.0 unet/config.json (model-defining keys).
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

# The SD1.5 and SDXL VAEs share their architecture; SDXL's is scaled differently and must encode in float32.
_SD_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_VAE: dict[str, Any] = {**_SD_VAE, "sample_size": 512, "scaling_factor": 0.18215}
SDXL_VAE: dict[str, Any] = {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# CLIP ViT-L/14 text encoder (SD1.5's text_encoder, SDXL's text_encoder) and OpenCLIP bigG (SDXL's text_encoder_2).
CLIP_L: dict[str, Any] = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}
CLIP_BIG_G: dict[str, Any] = {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

# The CPU model: SD1.5's layout (4 levels, 2 layers per block, cross-attention in the first three) at a tenth of the
# width; its VAE is SD's at an eighth of the width, so encoding costs about as large a share of the step as with the
# real models. Text encoder: a 4-layer CLIP of width 128.
SMALL_UNET: dict[str, Any] = {
    **SD15_UNET,
    "block_out_channels": [32, 64, 128, 128],
    "cross_attention_dim": 128,
    "sample_size": 16,
}
SMALL_VAE: dict[str, Any] = {
    **_SD_VAE,
    "block_out_channels": [16, 32, 64, 64],
    "norm_num_groups": 16,
    "sample_size": 128,
    "scaling_factor": 0.18215,
}
SMALL_CLIP: dict[str, Any] = {
    "hidden_act": "quick_gelu",
    "hidden_size": 128,
    "intermediate_size": 512,
    "max_position_embeddings": 77,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "projection_dim": 128,
    "vocab_size": 49408,
}

PRESETS: dict[str, dict[str, Any]] = {
    "small": {"unet": SMALL_UNET, "vae": SMALL_VAE, "text": [SMALL_CLIP], "resolution": 128, "batch_size": 2},
    "sd15": {"unet": SD15_UNET, "vae": SD15_VAE, "text": [CLIP_L], "resolution": 512, "batch_size": 4},
    "sdxl": {"unet": SDXL_UNET, "vae": SDXL_VAE, "text": [CLIP_L, CLIP_BIG_G], "resolution": 1024, "batch_size": 1},
}

# One process per run; a trainer run yields a Diffusion-DPO and a Diffusion-SDPO row (alternating steps).
RUNS = ["floor-full", "floor-lora", "uncached-full", "cached-full", "uncached-lora", "cached-lora"]
ALL_ROWS = ["floor-full", "floor-lora"] + [
    f"{loss}-{cache}-{tuning}"
    for tuning in ("full", "lora")
    for cache in ("uncached", "cached")
    for loss in ("dpo", "sdpo", "sdpo_param", "sdpo_update")
]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# --------------------------------------------------------------------------------------------------- building blocks


def build_pipeline(preset: str, device: str):
    """The preset's pipeline with random weights, created directly on ``device`` (float32)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trl_diffusion_sdpo.tiny_models import write_char_tokenizer

    spec = PRESETS[preset]
    torch.manual_seed(0)
    token_dir = tempfile.mkdtemp(prefix="bench-tok-")
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(spec["unet"])
        vae = AutoencoderKL.from_config(spec["vae"])
        encoders = []
        for index, text in enumerate(spec["text"]):
            config = CLIPTextConfig(**text)
            # SDXL's second encoder carries the projection that gives the pooled ``text_embeds``.
            model_cls = CLIPTextModelWithProjection if index == 1 else CLIPTextModel
            encoders.append(model_cls(config))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )
    tokenizers = [write_char_tokenizer(os.path.join(token_dir, f"tok{i}"), 77) for i in range(len(encoders))]
    if len(encoders) == 1:
        return StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
    )


def synthetic_pairs(num_pairs: int, resolution: int, seed: int = 0):
    """Pick-a-Pic-style rows: smooth random JPEGs at the training resolution (decoded, not resized, each step)."""
    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(seed)

    def jpeg() -> bytes:
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        coarse.resize((resolution, resolution), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    rows = [
        {"caption": f"a photo of thing number {i} on a table", "jpg_0": jpeg(), "jpg_1": jpeg(),
         "label_0": float(i % 2)}
        for i in range(num_pairs)
    ]
    return Dataset.from_list(rows)


class MemorySampler:
    """Peak memory over a window: CUDA's allocator peak, or the process RSS sampled by a thread on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss())
                self._stop.wait(0.005)

        self.peak = _rss()
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
        return self.peak


def _rss() -> int:
    """Resident set size of this process: /proc read directly (cheap enough to sample often), else psutil."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_trainer(opts: argparse.Namespace, run: str, workdir: str, num_steps: int):
    """A ``DiffusionSDPOTrainer`` for ``run`` (``cached-full``, ...); a floor run uses its model and optimizer."""
    from peft import LoraConfig

    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer

    cache, tuning = run.split("-")
    is_floor = cache == "floor"
    pipeline = build_pipeline(opts.unet, opts.device)
    if opts.channels_last:
        pipeline.unet.to(memory_format=torch.channels_last)
    args = DiffusionSDPOConfig(
        output_dir=os.path.join(workdir, "out"),
        resolution=opts.resolution,
        per_device_train_batch_size=opts.batch_size,
        max_steps=num_steps,
        warmup_steps=0,
        logging_steps=num_steps,  # one log, at the end: the measured steps never log
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=opts.device == "cpu",
        bf16=opts.dtype == "bf16",
        cache_latents=cache == "cached",
        latent_cache_dir=os.path.join(workdir, "cache"),
        optim=opts.optim,
        max_grad_norm=opts.max_grad_norm,
        gradient_checkpointing=opts.gradient_checkpointing,
        torch_compile=opts.torch_compile,
        dataloader_num_workers=opts.dataloader_num_workers,
        loss_type=opts.loss_type,
        seed=0,
    )
    peft_config = None
    if tuning == "lora":
        peft_config = LoraConfig(
            r=opts.lora_rank, lora_alpha=opts.lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS
        )
    num_pairs = opts.batch_size * (2 if is_floor else opts.dataset_batches)
    dataset = synthetic_pairs(num_pairs, opts.resolution)
    start = time.perf_counter()
    trainer = DiffusionSDPOTrainer(pipeline, args=args, train_dataset=dataset, peft_config=peft_config)
    init_s = time.perf_counter() - start
    if opts.stock_step:
        # transformers' own clipping and Module.zero_grad, walking every parameter (the lean step measured off).
        from transformers import Trainer

        trainer.train = functools.partial(Trainer.train, trainer)
    return trainer, init_s


def make_floor_step(trainer, opts: argparse.Namespace, optimizer, policy):
    """One step of the floor on the trainer's own UNet, reference and optimizer, with fixed inputs on the device."""
    import torch.nn.functional as F

    from trl_diffusion_sdpo.families import PromptEmbeddings

    device = trainer.args.device
    generator = torch.Generator().manual_seed(0)
    vae_config = trainer.family.vae.config
    size = opts.resolution // 2 ** (len(vae_config.block_out_channels) - 1)
    samples = 2 * opts.batch_size
    latents = torch.randn(samples, vae_config.latent_channels, size, size, generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (samples,), generator=generator).to(device)
    spec = PRESETS[opts.unet]
    width = sum(text["hidden_size"] for text in spec["text"])
    compute_dtype = torch.bfloat16 if opts.dtype == "bf16" else torch.float32
    hidden = torch.randn(samples, 77, width, generator=generator).to(device, compute_dtype)
    pooled = None
    if trainer.family.needs_time_ids:
        pooled = torch.randn(samples, spec["text"][-1]["projection_dim"], generator=generator).to(device)
    res = float(opts.resolution)
    time_ids = torch.tensor([res, res, 0.0, 0.0, res, res]).repeat(samples, 1).to(device)
    conditioning = trainer.family.denoiser_conditioning(PromptEmbeddings(hidden, pooled), time_ids)
    use_bf16 = opts.dtype == "bf16"

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            prediction = policy(latents, timesteps, **conditioning, return_dict=False)[0]
        F.mse_loss(prediction.float(), noise).backward()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            trainer.reference.predict(latents, timesteps, **conditioning)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class Clock:
    """Wall-clock and process-CPU-time intervals, the device synchronised at every reading."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.wall = self.cpu = 0.0

    def reset(self) -> None:
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        _sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        interval = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return interval


def run_floor(opts: argparse.Namespace, run: str, workdir: str) -> dict[str, Any]:
    """The bare loop alone: its step time and, above all, its peak memory."""
    num_steps = opts.warmup + opts.steps
    trainer, _ = make_trainer(opts, run, workdir, num_steps)
    # The floor keeps only what a training step cannot avoid: the frozen encoders leave the device.
    for module in trainer.family.frozen_modules().values():
        module.to("cpu")
    trainer.model.train()
    policy = torch.compile(trainer.model) if opts.torch_compile else trainer.model
    step = make_floor_step(trainer, opts, trainer.create_optimizer(), policy)
    memory, clock, times = MemorySampler(opts.device), Clock(opts.device), []
    memory.start()
    clock.reset()
    for _ in range(num_steps):
        step()
        times.append(clock.lap())
    peak = memory.stop()
    return {
        "run": run,
        "rows": {run: _timing(times[opts.warmup:])},
        "peak_memory_bytes": peak,
        "unet_params": _unet_params(trainer.model),
    }


def run_trainer(opts: argparse.Namespace, run: str, workdir: str) -> dict[str, Any]:
    """``trainer.train()`` with the losses alternating step by step and, paired, a floor step after each step."""
    from transformers import TrainerCallback

    losses = opts.losses.split(",")
    num_steps = (opts.warmup + opts.steps) * len(losses)
    trainer, init_s = make_trainer(opts, run, workdir, num_steps)
    # The per-branch backward stages, swapped in step by step (the trainer builds only the configured one).
    from trl_diffusion_sdpo.step.parameter_space import ParameterSpaceBackward
    from trl_diffusion_sdpo.step.update_space import UpdateSpaceRule

    a = trainer.args
    backward_stages = {
        "sdpo_param": ParameterSpaceBackward(trainer.engine, a.safeguard_mu, a.safeguard_max_lambda, False),
        "sdpo_update": ParameterSpaceBackward(
            trainer.engine, a.safeguard_mu, a.safeguard_max_lambda, False,
            UpdateSpaceRule(a.safeguard_mu, a.safeguard_max_lambda, a.max_grad_norm),
        ),
    }
    memory, clock = MemorySampler(opts.device), Clock(opts.device)
    times: dict[str, list[tuple[float, float]]] = {loss: [] for loss in losses}
    times["floor"] = []
    floor_step = []

    class Schedule(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if opts.paired_floor:
                floor_step.append(make_floor_step(trainer, opts, trainer.optimizer, trainer.model_wrapped))
            memory.start()
            clock.reset()

        def on_step_begin(self, args, state, control, **kwargs):
            # Diffusion-DPO and Diffusion-SDPO (output and parameter space) alternate on the same trainer: the
            # safeguards' costs are paired.
            loss = losses[state.global_step % len(losses)]
            args.safeguard = loss != "dpo"
            args.safeguard_space = {"sdpo_param": "parameter", "sdpo_update": "update"}.get(loss, "output")
            trainer.parameter_space = backward_stages.get(loss)

        def on_step_end(self, args, state, control, **kwargs):
            times[losses[(state.global_step - 1) % len(losses)]].append(clock.lap())
            if floor_step:
                floor_step[0]()
                times["floor"].append(clock.lap())

    trainer.add_callback(Schedule())
    trainer.train()
    peak = memory.stop()
    cache, tuning = run.split("-")
    rows = {f"{loss}-{run}": _timing(times[loss][opts.warmup:]) for loss in losses}
    paired = _timing(times["floor"][opts.warmup * len(losses):]) if times["floor"] else None
    for row in rows.values():
        row["paired_floor"] = paired
        row["trainer_init_s"] = init_s  # with the cache: includes building it
    return {"run": run, "rows": rows, "peak_memory_bytes": peak, "unet_params": _unet_params(trainer.model)}


def _timing(intervals: list[tuple[float, float]]) -> dict[str, Any]:
    return {
        "median_step_s": statistics.median(wall for wall, _ in intervals),
        # Process CPU time per step: on a shared CPU it counts our work, not our waiting.
        "median_step_cpu_s": statistics.median(cpu for _, cpu in intervals),
        "step_times_s": [wall for wall, _ in intervals],
    }


def _unet_params(unet: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in unet.named_parameters() if "lora_" not in name)


# --------------------------------------------------------------------------------------------------- driver


def worker(opts: argparse.Namespace) -> None:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        run = run_floor if opts.worker.startswith("floor") else run_trainer
        result = run(opts, opts.worker, workdir)
    print("RESULT " + json.dumps(result), flush=True)


def machine_description(device: str, threads: int = 0) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
    }
    with contextlib.suppress(Exception):
        import diffusers
        import transformers

        info["diffusers"] = diffusers.__version__
        info["transformers"] = transformers.__version__
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor()


TIME_METRICS = {"wall": "median_step_s", "cpu": "median_step_cpu_s"}


def merge_repeats(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows over all runs and repeats: medians of the per-repeat medians and of the per-repeat paired ratios."""
    per_row: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        for name, row in result["rows"].items():
            row = dict(row, peak_memory_bytes=result["peak_memory_bytes"], unet_params=result["unet_params"])
            per_row.setdefault(name, []).append(row)
    merged: dict[str, dict[str, Any]] = {}
    for name, repeats in per_row.items():
        row: dict[str, Any] = {
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in repeats),
            "unet_params": repeats[0]["unet_params"],
            "trainer_init_s": repeats[0].get("trainer_init_s"),
            "step_times_s": [t for r in repeats for t in r["step_times_s"]],
        }
        for metric, key in TIME_METRICS.items():
            row[key] = statistics.median(r[key] for r in repeats)
            if repeats[0].get("paired_floor"):
                row[f"paired_floor_{key}"] = statistics.median(r["paired_floor"][key] for r in repeats)
                row[f"ratio_to_floor_{metric}"] = statistics.median(
                    r[key] / r["paired_floor"][key] for r in repeats
                )
        merged[name] = row
    return merged


def derive(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Safeguard overhead (paired: same process), cache speed-up (floor-normalised), LoRA's memory saving."""
    derived: dict[str, Any] = {}
    for metric in TIME_METRICS:
        overhead, parameter_overhead, update_overhead, speedup = {}, {}, {}, {}
        for tuning in ("full", "lora"):
            for cache in ("uncached", "cached"):
                dpo = rows.get(f"dpo-{cache}-{tuning}")
                sdpo, exact = rows.get(f"sdpo-{cache}-{tuning}"), rows.get(f"sdpo_param-{cache}-{tuning}")
                if dpo and sdpo:
                    overhead[f"{cache}-{tuning}"] = sdpo[TIME_METRICS[metric]] / dpo[TIME_METRICS[metric]] - 1
                if dpo and exact:
                    parameter_overhead[f"{cache}-{tuning}"] = exact[TIME_METRICS[metric]] / dpo[TIME_METRICS[metric]]
                update = rows.get(f"sdpo_update-{cache}-{tuning}")
                if dpo and update:
                    update_overhead[f"{cache}-{tuning}"] = update[TIME_METRICS[metric]] / dpo[TIME_METRICS[metric]]
            for loss in ("dpo", "sdpo"):
                uncached, cached = rows.get(f"{loss}-uncached-{tuning}"), rows.get(f"{loss}-cached-{tuning}")
                key = f"ratio_to_floor_{metric}"
                if uncached and cached and key in uncached and key in cached:
                    speedup[f"{loss}-{tuning}"] = uncached[key] / cached[key]
        derived[f"safeguard_overhead_{metric}"] = overhead
        derived[f"parameter_safeguard_ratio_to_dpo_{metric}"] = parameter_overhead
        derived[f"update_safeguard_ratio_to_dpo_{metric}"] = update_overhead
        derived[f"cache_speedup_{metric}"] = speedup
    saving = {}
    for prefix in ("floor", "dpo-uncached", "dpo-cached"):
        full, lora = rows.get(f"{prefix}-full"), rows.get(f"{prefix}-lora")
        if full and lora:
            saving[prefix] = (full["peak_memory_bytes"] - lora["peak_memory_bytes"]) / (4 * full["unet_params"])
    derived["lora_memory_saving_in_unet_weights"] = saving
    return derived


def check_targets(rows: dict[str, dict[str, Any]], derived: dict[str, Any], metric: str) -> dict[str, Any]:
    """The issue's targets, each with the worst measured value."""
    targets: dict[str, dict[str, Any]] = {}
    overheads = list(derived[f"safeguard_overhead_{metric}"].values())
    if overheads:
        targets["safeguard overhead <= 2%"] = {"worst": max(overheads), "met": max(overheads) <= 0.02}
    exact = list(derived[f"parameter_safeguard_ratio_to_dpo_{metric}"].values())
    if exact:
        targets["parameter-space step <= 1.15x DPO"] = {"worst": max(exact), "met": max(exact) <= 1.15}
    for tuning in ("full", "lora"):
        ratios = [row[f"ratio_to_floor_{metric}"] for name, row in rows.items()
                  if "-cached-" in name and name.endswith(tuning) and f"ratio_to_floor_{metric}" in row]
        if ratios:
            targets[f"cached {tuning} step <= 1.05x floor"] = {"worst": max(ratios), "met": max(ratios) <= 1.05}
    saving = derived["lora_memory_saving_in_unet_weights"]
    if saving:
        worst = min(saving.values())
        targets["LoRA peak memory below full by >= 1 UNet (fp32)"] = {"worst": worst, "met": worst >= 1.0}
    return targets


def print_table(rows: dict[str, dict[str, Any]], report: dict[str, Any], opts: argparse.Namespace) -> None:
    unit, scale = ("GiB", 2**30) if opts.device == "cuda" else ("MiB", 2**20)
    print(f"\n{opts.unet} UNet, {opts.device}, {opts.dtype}, {opts.batch_size} pairs/step, {opts.resolution} px, "
          f"median of {opts.steps} steps after {opts.warmup} warm-up, {opts.repeats} repeat(s)")
    columns = ["row", "ms/step", "paired floor ms", "x floor", "CPU ms/step", "x floor (CPU)", f"peak mem {unit}",
               "trainer init s"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|")
    for name in ALL_ROWS:
        if name not in rows:
            continue
        row = rows[name]
        floor = name.startswith("floor")
        build = row.get("trainer_init_s")
        paired = row.get("paired_floor_median_step_s")
        cells = [
            name,
            f"{1000 * row['median_step_s']:.1f}",
            "" if paired is None else f"{1000 * paired:.1f}",
            "1" if floor else f"{row.get('ratio_to_floor_wall', float('nan')):.3f}",
            f"{1000 * row['median_step_cpu_s']:.1f}",
            "1" if floor else f"{row.get('ratio_to_floor_cpu', float('nan')):.3f}",
            f"{row['peak_memory_bytes'] / scale:.2f}",
            "" if build is None else f"{build:.1f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    derived = report["derived"]
    for metric in TIME_METRICS:
        text = ", ".join(f"{k} {v:+.1%}" for k, v in derived[f"safeguard_overhead_{metric}"].items())
        print(f"safeguard overhead ({metric}): {text}")
        text = ", ".join(f"{k} {v:.3f}x" for k, v in derived[f"parameter_safeguard_ratio_to_dpo_{metric}"].items())
        print(f"parameter-space step / DPO step ({metric}): {text}")
        text = ", ".join(f"{k} {v:.3f}x" for k, v in derived[f"update_safeguard_ratio_to_dpo_{metric}"].items())
        print(f"update-space step / DPO step ({metric}): {text}")
        text = ", ".join(f"{k} {v:.2f}x" for k, v in derived[f"cache_speedup_{metric}"].items())
        print(f"cache speed-up ({metric}): {text}")
    text = ", ".join(f"{k} {v:.2f}" for k, v in derived["lora_memory_saving_in_unet_weights"].items())
    print(f"LoRA memory saving, in UNets of fp32 weights: {text}")
    print(f"targets (time metric: {opts.metric}):")
    for name, target in report["targets"].items():
        print(f"  {name}: worst {target['worst']:.3f} -> {'met' if target['met'] else 'NOT met'}")


def driver(opts: argparse.Namespace, argv: list[str]) -> None:
    runs = opts.runs.split(",") if opts.runs else RUNS
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {RUNS}")
    results = []
    for repeat in range(opts.repeats):
        # Interleaved repeats: slow drifts of a shared machine hit every run alike.
        for run in runs:
            command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", run]
            start = time.perf_counter()
            completed = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                sys.stderr.write(completed.stderr[-4000:])
                raise SystemExit(f"run {run} failed (exit {completed.returncode})")
            result = json.loads(lines[-1][len("RESULT "):])
            results.append(result)
            summary = ", ".join(f"{name} {1000 * row['median_step_s']:.1f} ms" for name, row in result["rows"].items())
            print(f"[{repeat + 1}/{opts.repeats}] {run:<14} {summary} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    rows = merge_repeats(results)
    derived = derive(rows)
    report: dict[str, Any] = {
        "machine": machine_description(opts.device, opts.threads),
        "settings": {k: v for k, v in vars(opts).items() if k not in ("worker", "output")},
        "rows": rows,
        "derived": derived,
        "targets": check_targets(rows, derived, opts.metric),
    }
    print_table(rows, report, opts)
    output = opts.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                         f"{opts.device}-{opts.unet}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {output}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="fp32 (CPU default) or bf16 mixed precision (CUDA default)")
    parser.add_argument("--unet", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (preset default)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (preset default)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="steps per row discarded before measuring")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of everything; median of medians")
    parser.add_argument("--runs", default=None, help=f"comma-separated subset of {RUNS}")
    parser.add_argument("--losses", default="dpo,sdpo,sdpo_param",
                        help="alternated within a trainer run: dpo, sdpo (output space), sdpo_param (parameter "
                        "space), sdpo_update (update space)")
    parser.add_argument("--loss-type", default="dpo",
                        help="the trainer's objective (rows keep the dpo/sdpo names: without/with the safeguard); "
                        "reference-free ones (mapo, sft) need --no-paired-floor")
    parser.add_argument("--no-paired-floor", dest="paired_floor", action="store_false",
                        help="do not interleave floor steps with the trainer's steps")
    parser.add_argument("--dataset-batches", type=int, default=8, help="dataset size in batches (epochs repeat)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--optim", default="adamw_torch_fused", help="transformers optimizer name (both loops)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="trainer gradient clipping (0: off)")
    parser.add_argument("--channels-last", action="store_true", help="UNet in channels-last memory format")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--dataloader-num-workers", type=int, default=0)
    parser.add_argument("--stock-step", action="store_true",
                        help="measure without the lean step (transformers' clipping and zero_grad)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--metric", choices=sorted(TIME_METRICS), default="wall",
                        help="time metric the targets are checked on: wall clock, or process CPU time (for a CPU "
                             "shared with other jobs)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/<device>-<unet>.json)")
    parser.add_argument("--render", default=None, help="print the table of a results JSON instead of measuring")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    preset = PRESETS[opts.unet]
    opts.dtype = opts.dtype or ("bf16" if opts.device == "cuda" else "fp32")
    opts.batch_size = opts.batch_size or preset["batch_size"]
    opts.resolution = opts.resolution or preset["resolution"]
    return opts


def main() -> None:
    argv = sys.argv[1:]
    opts = parse_args(argv)
    if opts.render:
        with open(opts.render) as f:
            report = json.load(f)
        print_table(report["rows"], report, argparse.Namespace(**{**report["settings"], "metric": opts.metric}))
        return
    if opts.worker:
        worker(opts)
    else:
        driver(opts, argv)


if __name__ == "__main__":
    main()
