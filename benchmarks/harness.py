"""The benchmarks' shared harness: the SD1.5 / SDXL / small model configs (random weights, nothing downloaded),
pipelines and synthetic Pick-a-Pic-style data built from them, a trainer and the compute-floor step for a run, the
clock, the memory sampler, and the machine's description for the results files.

The scripts in ``speed/``, ``studies/`` and ``smoke/`` put the repository root on ``sys.path`` and import it as
``benchmarks.harness``. The command-line options that choose the model and the trainer's settings are added by
:func:`add_setup_arguments` (``step_time.py``'s ``--device``, ``--unet``, ``--dtype``, ...), and
:func:`parse_setup_args` parses them alone. Default output paths follow :func:`result_path`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import io
import os
import platform
import resource
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
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

RESULTS = Path(__file__).resolve().parent / "results"


def result_path(device: str, what: str, size: str, *, study: str) -> str:
    """``benchmarks/results/<study>/<device>-<what>-<size>.json``, the results' naming scheme (``device``: ``cpu``
    or ``cuda``; ``what``: the question, as the script's name; ``size``: the model preset, with ``<N>pairs`` where the
    batch is not the default; ``study``: the folder of what it measures, ``step-time``, ``gpu``, ...: the top level
    of ``results/`` holds folders only)."""
    if not study or "/" in study:
        raise ValueError(f"study must name one folder of benchmarks/results/, got {study!r}")
    return str(RESULTS / study / f"{device}-{what}-{size}.json")


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Trainer settings of each safeguard, by the name the engine matrix and the profile give it.
SAFEGUARDS: dict[str, dict[str, Any]] = {
    "dpo": {"safeguard_space": "none"},
    "output": {"safeguard_space": "output"},
    "parameter": {"safeguard_space": "parameter"},  # one pass where the engine allows it
    "parameter_two": {"safeguard_space": "parameter", "safeguard_passes": "two"},
    "pair": {"safeguard_space": "parameter", "safeguard_scope": "pair"},
    "update": {"safeguard_space": "update"},
}


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

    from trl_diffusion_sdpo.testing import write_char_tokenizer

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
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    tokenizers = [write_char_tokenizer(os.path.join(token_dir, f"tok{i}"), 77) for i in range(len(encoders))]
    if len(encoders) == 1:
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=tokenizers[0],
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
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
        {
            "caption": f"a photo of thing number {i} on a table",
            "jpg_0": jpeg(),
            "jpg_1": jpeg(),
            "label_0": float(i % 2),
        }
        for i in range(num_pairs)
    ]
    return Dataset.from_list(rows)


class MemorySampler:
    """Peak memory over a window, one window after another: CUDA's allocator peak, or the process RSS sampled by a
    thread every 5 ms on CPU (run with ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors leave the resident set
    at once and a window's peak is its own, not an earlier window's high-water mark)."""

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
                self.peak = max(self.peak, rss())
                self._stop.wait(0.005)

        self._stop.clear()
        self.peak = rss()
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.peak = max(self.peak, rss())
        return self.peak


def rss() -> int:
    """Resident set size of this process: /proc read directly (cheap enough to sample often), else psutil."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_trainer(opts: argparse.Namespace, run: str, workdir: str, num_steps: int):
    """A ``DiffusionSDPOTrainer`` for ``run`` (``cached-full``, ...); a floor run uses its model and optimizer."""
    from peft import LoraConfig

    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer

    cache, tuning = run.split("-")
    is_floor = cache == "floor"
    renamed = "activation_checkpointing" in DiffusionSDPOConfig.__dataclass_fields__
    checkpointing_field = "activation_checkpointing" if renamed else "gradient_checkpointing"
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
        # several CPU processes (engine_matrix.py): a process group over gloo, which DeepSpeed's needs on the CPU
        ddp_backend="gloo" if opts.device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        bf16=opts.dtype == "bf16",
        cache_latents=cache == "cached",
        latent_cache_dir=os.path.join(workdir, "cache"),
        optim=opts.optim,
        max_grad_norm=opts.max_grad_norm,
        torch_compile=opts.torch_compile,
        dataloader_num_workers=opts.dataloader_num_workers,
        loss_type=opts.loss_type,
        seed=0,
        # transformers 5 renamed the flag (the old name still works, with a deprecation warning)
        **{checkpointing_field: opts.gradient_checkpointing},
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
        # transformers' own clipping, walking every parameter (the lean step measured off).
        from transformers import Trainer

        trainer._clip_grad_norm = functools.partial(Trainer._clip_grad_norm, trainer)
    return trainer, init_s


def make_floor_step(trainer, opts: argparse.Namespace, optimizer, policy):
    """One step of the floor on the trainer's own UNet, reference and optimizer, with fixed inputs on the device."""
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
    return floor_step(trainer, optimizer, policy, (latents, timesteps, conditioning, noise), opts.dtype == "bf16")


def floor_step(
    trainer, optimizer, policy, inputs: tuple[torch.Tensor, torch.Tensor, dict[str, Any], torch.Tensor], bf16: bool
) -> Callable[[], None]:
    """The floor's step on fixed ``inputs`` ``(latents, timesteps, conditioning, target)`` of ``2B`` rows already on
    the device: policy forward + MSE backward, reference forward, ``optimizer.step()``, ``zero_grad``. The denoiser is
    called through the trainer's family, so any family's inputs serve (``gpu_matrix.py`` takes a trainer's own first
    micro-batch)."""
    import torch.nn.functional as F

    latents, timesteps, conditioning, target = inputs
    device_type, family = latents.device.type, trainer.family

    def step() -> None:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
            prediction = family.call_denoiser(policy, latents, timesteps, conditioning)
        F.mse_loss(prediction.float(), target.float()).backward()
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
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
        sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        interval = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return interval


def minor_page_faults() -> int:
    """The process's minor page faults so far: ``getrusage(RUSAGE_SELF).ru_minflt``, every thread's, the count the
    kernel keeps as field 10 of ``/proc/self/stat``."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def process_step(step: Callable[[], Any]) -> tuple[float, int]:
    """One call of ``step``: the process CPU seconds it took and the minor page faults it caused (on a CPU a fresh
    allocation costs a fault per page first touched; a reused buffer costs none)."""
    cpu, faults = time.process_time(), minor_page_faults()
    step()
    return time.process_time() - cpu, minor_page_faults() - faults


def unet_params(unet: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in unet.named_parameters() if "lora_" not in name)


def machine_description(device: str, threads: int = 0) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
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


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor()


def add_setup_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options :func:`make_trainer` and :func:`make_floor_step` read: model, device, precision, batch, trainer."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default=None,
        help="fp32 (CPU default) or bf16 mixed precision (CUDA default)",
    )
    parser.add_argument("--unet", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (preset default)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (preset default)")
    parser.add_argument(
        "--loss-type",
        default="dpo",
        help="the trainer's objective (rows keep the dpo/sdpo names: without/with the safeguard); "
        "reference-free ones (mapo, sft) need --no-paired-floor",
    )
    parser.add_argument("--dataset-batches", type=int, default=8, help="dataset size in batches (epochs repeat)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--optim", default="adamw_torch_fused", help="transformers optimizer name (both loops)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="trainer gradient clipping (0: off)")
    parser.add_argument("--channels-last", action="store_true", help="UNet in channels-last memory format")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--dataloader-num-workers", type=int, default=0)
    parser.add_argument(
        "--stock-step",
        action="store_true",
        help="measure without the lean step (transformers' clipping over every parameter)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return parser


def resolve_setup(opts: argparse.Namespace) -> argparse.Namespace:
    """Fill the preset's defaults in: bf16 on CUDA and fp32 on CPU, the preset's batch size and resolution."""
    preset = PRESETS[opts.unet]
    opts.dtype = opts.dtype or ("bf16" if opts.device == "cuda" else "fp32")
    opts.batch_size = opts.batch_size or preset["batch_size"]
    opts.resolution = opts.resolution or preset["resolution"]
    return opts


def parse_setup_args(argv: list[str]) -> argparse.Namespace:
    """Only the setup options (for scripts that build a trainer or a floor step without measuring runs)."""
    return resolve_setup(add_setup_arguments(argparse.ArgumentParser()).parse_args(argv))
