"""Step time and peak memory of ``DiffusionSDPOTrainer`` against the compute floor.

Rows (each measured in its own fresh process, so memory peaks and allocator state never leak between rows):

* ``floor-full`` / ``floor-lora``: a bare loop on the trainer's own UNet, reference and optimizer (same model, batch,
  dtype): policy forward + backward over 2B samples, reference forward over 2B samples without autograd (a frozen
  copy for full tuning, the adapter-disabled policy for LoRA), ``optimizer.step()``, ``zero_grad``. Inputs are
  fixed tensors already on the device: no data loading, no encoding, no loss beyond a plain MSE.
* ``{dpo,sdpo}-{uncached,cached}-{full,lora}``: ``DiffusionSDPOTrainer.train()`` on a synthetic Pick-a-Pic-style
  dataset (JPEG bytes at the training resolution), Diffusion-DPO (``safeguard=False``) or Diffusion-SDPO, with or
  without ``cache_latents``, with the config's defaults otherwise (gradient clipping 1.0 included).

Reported per row: median step time after warm-up (wall clock between consecutive step ends, device synchronised
there), peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process RSS sampled every 5 ms), and for
cached rows the time spent building the cache. Derived: trainer-to-floor ratio, safeguard overhead, the cache's
speed-up and LoRA's memory saving in units of one UNet's float32 weights.

The UNets (and VAEs, text encoders) of ``--unet sd15`` and ``--unet sdxl`` are built from the real model configs
embedded below, with random weights: step time and memory do not depend on the weights' values. Nothing is
downloaded. Examples::

    python benchmarks/step_time.py                                   # CPU, small UNet, all rows
    python benchmarks/step_time.py --device cuda --dtype bf16 --unet sd15
    python benchmarks/step_time.py --device cuda --dtype bf16 --unet sdxl --batch-size 1
    python benchmarks/step_time.py --rows floor-full,dpo-cached-full --steps 10   # a subset
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
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

FLOOR_ROWS = ["floor-full", "floor-lora"]
TRAINER_ROWS = [
    f"{loss}-{cache}-{tuning}"
    for tuning in ("full", "lora")
    for loss in ("dpo", "sdpo")
    for cache in ("uncached", "cached")
]
ALL_ROWS = FLOOR_ROWS + TRAINER_ROWS
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
        prediction_type="epsilon", clip_sample=False,
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
        import psutil

        process = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                self._stop.wait(0.005)

        self.peak = process.memory_info().rss
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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_trainer(opts: argparse.Namespace, row: str, workdir: str):
    """A ``DiffusionSDPOTrainer`` configured for ``row`` (the floor uses one too, for its model and optimizer)."""
    from peft import LoraConfig

    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer

    parts = row.split("-")
    tuning = parts[-1]
    is_floor = parts[0] == "floor"
    loss = "dpo" if is_floor else parts[0]
    cached = (not is_floor) and parts[1] == "cached"
    steps = opts.warmup + opts.steps
    pipeline = build_pipeline(opts.unet, opts.device)
    if opts.channels_last:
        pipeline.unet.to(memory_format=torch.channels_last)
    args = DiffusionSDPOConfig(
        output_dir=os.path.join(workdir, "out"),
        resolution=opts.resolution,
        per_device_train_batch_size=opts.batch_size,
        max_steps=steps,
        warmup_steps=0,
        logging_steps=steps,  # one log, at the end: the measured steps never log
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=opts.device == "cpu",
        bf16=opts.dtype == "bf16",
        safeguard=loss == "sdpo",
        cache_latents=cached,
        latent_cache_dir=os.path.join(workdir, "cache"),
        optim=opts.optim,
        max_grad_norm=opts.max_grad_norm,
        gradient_checkpointing=opts.gradient_checkpointing,
        torch_compile=opts.torch_compile,
        dataloader_num_workers=opts.dataloader_num_workers,
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
    return trainer, time.perf_counter() - start


def run_floor(opts: argparse.Namespace, row: str, workdir: str) -> dict[str, Any]:
    import torch.nn.functional as F

    from trl_diffusion_sdpo.model_family import PromptEmbeddings

    trainer, _ = make_trainer(opts, row, workdir)
    # The floor keeps only what a training step cannot avoid: the frozen encoders leave the device.
    for module in trainer.family.frozen_modules().values():
        module.to("cpu")
    device = trainer.args.device
    unet = trainer.model
    unet.train()
    optimizer = trainer.create_optimizer()
    policy = torch.compile(unet) if opts.torch_compile else unet

    generator = torch.Generator().manual_seed(0)
    vae_config = trainer.family.vae.config
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    size = opts.resolution // factor
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
    time_ids = torch.tensor([opts.resolution, opts.resolution, 0, 0, opts.resolution, opts.resolution],
                            dtype=torch.float32).repeat(samples, 1).to(device)
    conditioning = trainer.family.unet_conditioning(PromptEmbeddings(hidden, pooled), time_ids)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=opts.dtype == "bf16")

    def step() -> None:
        with autocast:
            prediction = policy(latents, timesteps, **conditioning, return_dict=False)[0]
        F.mse_loss(prediction.float(), noise).backward()
        with autocast:
            trainer.reference.predict(latents, timesteps, **conditioning)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory = MemorySampler(opts.device)
    memory.start()
    ends = [time.perf_counter()]
    for _ in range(opts.warmup + opts.steps):
        step()
        _sync(opts.device)
        ends.append(time.perf_counter())
    peak = memory.stop()
    return _summary(row, ends, opts.warmup, peak, unet, cache_build_s=None)


def run_trainer(opts: argparse.Namespace, row: str, workdir: str) -> dict[str, Any]:
    from transformers import TrainerCallback

    trainer, init_s = make_trainer(opts, row, workdir)
    memory = MemorySampler(opts.device)
    ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            memory.start()
            _sync(opts.device)
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            _sync(opts.device)
            ends.append(time.perf_counter())

    trainer.add_callback(StepTimer())
    trainer.train()
    peak = memory.stop()
    result = _summary(row, ends, opts.warmup, peak, trainer.model, cache_build_s=init_s if "cached" in row else None)
    result["trainer_init_s"] = init_s
    return result


def _summary(row, ends, warmup, peak, unet, cache_build_s) -> dict[str, Any]:
    step_times = [b - a for a, b in zip(ends[:-1], ends[1:])][warmup:]
    num_params = sum(p.numel() for name, p in unet.named_parameters() if "lora_" not in name)
    return {
        "row": row,
        "median_step_s": statistics.median(step_times),
        "step_times_s": step_times,
        "peak_memory_bytes": peak,
        "unet_params": num_params,
        "trainable_params": sum(p.numel() for p in unet.parameters() if p.requires_grad),
        "cache_build_s": cache_build_s,
    }


# --------------------------------------------------------------------------------------------------- driver


def worker(opts: argparse.Namespace) -> None:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        run = run_floor if opts.worker.startswith("floor") else run_trainer
        result = run(opts, opts.worker, workdir)
    print("RESULT " + json.dumps(result), flush=True)


def machine_description(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
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


def derive(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios to the floor, safeguard overhead, cache speed-up, LoRA memory saving, and the targets."""
    derived: dict[str, Any] = {"ratio_to_floor": {}, "safeguard_overhead": {}, "cache_speedup": {}}
    for name, result in rows.items():
        if name.startswith("floor"):
            continue
        floor = rows.get(f"floor-{name.split('-')[-1]}")
        if floor:
            derived["ratio_to_floor"][name] = result["median_step_s"] / floor["median_step_s"]
    for tuning in ("full", "lora"):
        for cache in ("uncached", "cached"):
            dpo, sdpo = rows.get(f"dpo-{cache}-{tuning}"), rows.get(f"sdpo-{cache}-{tuning}")
            if dpo and sdpo:
                derived["safeguard_overhead"][f"{cache}-{tuning}"] = sdpo["median_step_s"] / dpo["median_step_s"] - 1
        for loss in ("dpo", "sdpo"):
            uncached, cached = rows.get(f"{loss}-uncached-{tuning}"), rows.get(f"{loss}-cached-{tuning}")
            if uncached and cached:
                derived["cache_speedup"][f"{loss}-{tuning}"] = uncached["median_step_s"] / cached["median_step_s"]
    saving = {}
    for suffix in ("dpo-cached", "sdpo-cached", "dpo-uncached", "sdpo-uncached", "floor"):
        full, lora = rows.get(f"{suffix}-full"), rows.get(f"{suffix}-lora")
        if suffix == "floor":
            full, lora = rows.get("floor-full"), rows.get("floor-lora")
        if full and lora:
            unet_bytes = 4 * full["unet_params"]
            saving[suffix] = (full["peak_memory_bytes"] - lora["peak_memory_bytes"]) / unet_bytes
    derived["lora_memory_saving_in_unet_weights"] = saving

    targets = {}
    overheads = list(derived["safeguard_overhead"].values())
    if overheads:
        targets["safeguard_overhead_at_most_2pct"] = {"worst": max(overheads), "met": max(overheads) <= 0.02}
    for tuning in ("full", "lora"):
        ratios = [r for n, r in derived["ratio_to_floor"].items() if "-cached-" in n and n.endswith(tuning)]
        if ratios:
            targets[f"cached_{tuning}_at_most_1.05x_floor"] = {"worst": max(ratios), "met": max(ratios) <= 1.05}
    if saving:
        worst = min(saving.values())
        targets["lora_saves_at_least_one_unet"] = {"worst": worst, "met": worst >= 1.0}
    derived["targets"] = targets
    return derived


def print_table(rows: dict[str, dict[str, Any]], derived: dict[str, Any], opts: argparse.Namespace) -> None:
    unit = "GiB" if opts.device == "cuda" else "MiB"
    scale = 2**30 if opts.device == "cuda" else 2**20
    print(f"\n{opts.unet} UNet, {opts.device}, {opts.dtype}, {opts.batch_size} pairs/step, {opts.resolution}px, "
          f"median of {opts.steps} steps after {opts.warmup} warm-up")
    header = f"| {'row':<20} | {'median step (ms)':>16} | {'x floor':>7} | {'peak mem (' + unit + ')':>15} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for name in ALL_ROWS:
        if name not in rows:
            continue
        result = rows[name]
        ratio = derived["ratio_to_floor"].get(name, 1.0 if name.startswith("floor") else float("nan"))
        print(f"| {name:<20} | {1000 * result['median_step_s']:>16.1f} | {ratio:>7.3f} | "
              f"{result['peak_memory_bytes'] / scale:>15.1f} |")
    print()
    for key in ("safeguard_overhead", "cache_speedup", "lora_memory_saving_in_unet_weights"):
        values = ", ".join(f"{k}: {v:+.1%}" if key == "safeguard_overhead" else f"{k}: {v:.2f}"
                           for k, v in derived[key].items())
        print(f"{key}: {values}")
    for name, target in derived["targets"].items():
        print(f"target {name}: worst {target['worst']:.3f} -> {'met' if target['met'] else 'NOT met'}")


def driver(opts: argparse.Namespace, argv: list[str]) -> None:
    rows = opts.rows.split(",") if opts.rows else ALL_ROWS
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {ALL_ROWS}")
    runs: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
    for repeat in range(opts.repeats):
        # Interleaved repeats: slow drifts of a shared machine hit every row alike.
        for row in rows:
            command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", row]
            start = time.perf_counter()
            completed = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                sys.stderr.write(completed.stderr[-4000:])
                raise SystemExit(f"row {row} failed (exit {completed.returncode})")
            result = json.loads(lines[-1][len("RESULT "):])
            runs[row].append(result)
            print(f"[{repeat + 1}/{opts.repeats}] {row:<20} {1000 * result['median_step_s']:8.1f} ms/step "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    merged = {}
    for row, results in runs.items():
        merged[row] = dict(results[0])
        merged[row]["median_step_s"] = statistics.median(r["median_step_s"] for r in results)
        merged[row]["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in results)
        merged[row]["repeat_medians_s"] = [r["median_step_s"] for r in results]
        merged[row]["step_times_s"] = [t for r in results for t in r["step_times_s"]]
    derived = derive(merged)
    print_table(merged, derived, opts)
    report = {
        "machine": machine_description(opts.device),
        "settings": {k: v for k, v in vars(opts).items() if k not in ("worker", "output")},
        "rows": merged,
        "derived": derived,
    }
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
    parser.add_argument("--warmup", type=int, default=3, help="steps discarded before measuring")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of every row; median of medians")
    parser.add_argument("--rows", default=None, help=f"comma-separated subset of {ALL_ROWS}")
    parser.add_argument("--dataset-batches", type=int, default=8, help="dataset size in batches (epochs repeat)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--optim", default="adamw_torch_fused", help="transformers optimizer name (both loops)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="trainer gradient clipping (0: off)")
    parser.add_argument("--channels-last", action="store_true", help="UNet in channels-last memory format")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--dataloader-num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/<device>-<unet>.json)")
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
    if opts.worker:
        worker(opts)
    else:
        gc.collect()
        driver(opts, argv)


if __name__ == "__main__":
    main()
