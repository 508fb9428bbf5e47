"""The demo's base model: a tiny Stable Diffusion pipeline pretrained from scratch on procedural shapes.

Two stages, both on CPU in a couple of minutes:

1. the VAE is trained as an autoencoder (pixel MSE plus a small KL term, as in latent diffusion), then its
   ``scaling_factor`` is set to ``1 / std`` of the latents so the UNet sees unit-variance inputs;
2. the UNet and the CLIP text encoder are trained together with the plain diffusion loss (epsilon prediction,
   uniform timesteps), with a fraction of captions replaced by the empty prompt so classifier-free guidance works.

The default recipe's result ships inside the package (``trl_diffusion_sdpo/demo/base/``: a ``save_pretrained``
folder, safetensors weights and JSON configs, plus ``demo_recipe.json`` recording the recipe and its hash), so no
run pretrains it. :func:`load_base` loads it with ``StableDiffusionPipeline.from_pretrained`` after checking that
the recorded hash is the hash of the code's default recipe. Any other recipe is pretrained on first use and cached
in a folder keyed by its hash, ``${XDG_CACHE_HOME:-~/.cache}/trl-diffusion-sdpo/demo/<hash>``.
:func:`rebuild_and_check` reruns the recipe (``trl-diffusion-sdpo demo --pretrain``), checks the result against
stated thresholds and reports how far it lies from the shipped weights (both in :mod:`.base_check`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from ..config.file_modes import follow_umask
from ..testing import write_char_tokenizer
from ..testing.components import SD_NOISE_SCHEDULE, tokenizer_folder
from .shapes import Caption, all_captions, draw_shape

__all__ = ["SHIPPED_BASE_DIR", "PretrainRecipe", "load_base", "load_or_pretrain", "recipe_hash"]

# Bump when the pretraining code changes in a way that changes the weights for an unchanged recipe.
_CODE_VERSION = 1
_RECIPE_FILE = "demo_recipe.json"
SHIPPED_BASE_DIR = Path(__file__).resolve().parent / "base"
"""The default recipe's pretrained base, shipped as package data."""


@dataclass(frozen=True)
class PretrainRecipe:
    """Every knob of the base model: architecture, data and the two pretraining stages."""

    seed: int = 0
    image_size: int = 32
    images_per_caption: int = 48
    # VAE: 3 blocks = 4x downsampling, 32x32 RGB -> 8x8x4 latents
    vae_channels: tuple[int, ...] = (32, 32, 32)
    latent_channels: int = 4
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_learning_rate: float = 2e-3
    vae_kl_weight: float = 1e-6
    # UNet and CLIP text encoder
    unet_channels: tuple[int, ...] = (32, 64)
    text_hidden_size: int = 64
    text_layers: int = 2
    max_caption_length: int = 32
    unet_steps: int = 3000
    unet_batch_size: int = 64
    unet_learning_rate: float = 1e-3
    caption_dropout: float = 0.1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainRecipe:
        """Inverse of :meth:`to_dict` (JSON turns the tuples into lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def tiny(cls, seed: int = 0) -> PretrainRecipe:
        """The same architecture pretrained for a few steps: exercises the code path in seconds, fails the check."""
        return cls(seed=seed, images_per_caption=2, vae_steps=15, vae_batch_size=8, unet_steps=20, unet_batch_size=16)


def recipe_hash(recipe: PretrainRecipe) -> str:
    """A short stable hash of the recipe and the pretraining code version: the cache key."""
    payload = json.dumps({"code_version": _CODE_VERSION, **recipe.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/trl-diffusion-sdpo/demo``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trl-diffusion-sdpo" / "demo"


def shipped_base_record(folder: str | os.PathLike = SHIPPED_BASE_DIR) -> dict[str, Any] | None:
    """The ``demo_recipe.json`` of a saved base (by default the shipped one), or ``None`` if there is none."""
    path = Path(folder) / _RECIPE_FILE
    if not path.is_file() or not (Path(folder) / "model_index.json").is_file():
        return None
    return json.loads(path.read_text())


def shipped_base_problem(recipe: PretrainRecipe | None = None) -> str | None:
    """Why the shipped base cannot stand for ``recipe`` (default: the default recipe), or ``None`` if it can.

    The shipped ``demo_recipe.json`` records the recipe and the hash it was built under. Both must agree with the
    code: the hash recomputed from the recorded recipe (which includes the pretraining code version) and the hash
    of ``recipe``.
    """
    recipe = recipe or PretrainRecipe()
    record = shipped_base_record()
    if record is None:
        return f"no shipped base in {SHIPPED_BASE_DIR}"
    recorded = record.get("recipe_hash")
    try:
        rebuilt = recipe_hash(PretrainRecipe.from_dict(record["recipe"]))
    except (KeyError, TypeError) as error:
        return f"the shipped base's {_RECIPE_FILE} does not describe a recipe this code knows ({error})"
    if rebuilt != recorded:
        return (
            f"the shipped base records hash {recorded}, but its recorded recipe hashes to {rebuilt} under this code "
            f"(pretraining code version {_CODE_VERSION}); rebuild it with `trl-diffusion-sdpo demo --pretrain`"
        )
    if recipe_hash(recipe) != recorded:
        return f"the shipped base was built from recipe {recorded}, not {recipe_hash(recipe)}"
    return None


def save_base(
    pipeline: StableDiffusionPipeline,
    recipe: PretrainRecipe,
    folder: str | os.PathLike,
    extra: dict[str, Any] | None = None,
) -> Path:
    """``save_pretrained`` (safetensors) plus ``demo_recipe.json`` (recipe, hash, code version, ``extra``).

    Written to a sibling temporary folder and renamed, so an interrupted run never leaves a half-written base.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        record = {
            "recipe_hash": recipe_hash(recipe),
            "code_version": _CODE_VERSION,
            "recipe": recipe.to_dict(),
            **(extra or {}),
        }
        (staging / _RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        # mkdtemp's 0o700 and safetensors' owner-only files would make a shared cache or a shipped folder private.
        follow_umask(staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_base(
    recipe: PretrainRecipe,
    cache_root: str | os.PathLike | None = None,
    use_cache: bool = True,
    warn: Any = None,
) -> tuple[StableDiffusionPipeline, str, Path | None]:
    """The base pipeline for ``recipe``: the shipped one when its recorded hash is ``recipe``'s, else the cache, else
    pretrained (and cached unless ``use_cache`` is off).

    Returns ``(pipeline, source, folder)`` with ``source`` one of ``"shipped"``, ``"cache"``, ``"pretrained"``.
    ``warn`` (a callable taking a line) hears why the shipped base was not used when ``recipe`` is the default.
    """
    problem = shipped_base_problem(recipe)
    if problem is None:
        return StableDiffusionPipeline.from_pretrained(SHIPPED_BASE_DIR), "shipped", SHIPPED_BASE_DIR
    if warn is not None and recipe == PretrainRecipe():
        warn(f"      the shipped base cannot be used: {problem}")
    pipeline, cache_hit, folder = load_or_pretrain(recipe, cache_root=cache_root, use_cache=use_cache)
    return pipeline, "cache" if cache_hit else "pretrained", folder


def load_or_pretrain(
    recipe: PretrainRecipe, cache_root: str | os.PathLike | None = None, use_cache: bool = True
) -> tuple[StableDiffusionPipeline, bool, Path | None]:
    """Load the base pipeline for ``recipe`` from the cache, or pretrain it (and cache it unless ``use_cache`` is off).

    Returns ``(pipeline, cache_hit, folder)``; ``folder`` is ``None`` when nothing was cached.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    folder = root / recipe_hash(recipe)
    if use_cache and (folder / _RECIPE_FILE).is_file() and (folder / "model_index.json").is_file():
        return StableDiffusionPipeline.from_pretrained(folder), True, folder
    pipeline = pretrain_base(recipe)
    if not use_cache:
        return pipeline, False, None
    save_base(pipeline, recipe, folder)
    return StableDiffusionPipeline.from_pretrained(folder), False, folder


def build_untrained_pipeline(recipe: PretrainRecipe) -> StableDiffusionPipeline:
    """The architecture of the demo pipeline with freshly initialised weights."""
    torch.manual_seed(recipe.seed)
    tokenizer = write_char_tokenizer(tokenizer_folder(None), recipe.max_caption_length)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(recipe.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(recipe.vae_channels),
        block_out_channels=recipe.vae_channels,
        layers_per_block=1,
        latent_channels=recipe.latent_channels,
        norm_num_groups=16,
        sample_size=recipe.image_size,
    )
    latent_size = recipe.image_size // 2 ** (len(recipe.vae_channels) - 1)
    depth = len(recipe.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=recipe.latent_channels,
        out_channels=recipe.latent_channels,
        block_out_channels=recipe.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (depth - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (depth - 1),
        cross_attention_dim=recipe.text_hidden_size,
        attention_head_dim=16,
        norm_num_groups=16,
    )
    vocab_size = len(tokenizer)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=recipe.text_hidden_size,
            intermediate_size=recipe.text_hidden_size * 2,
            num_hidden_layers=recipe.text_layers,
            num_attention_heads=4,
            max_position_embeddings=recipe.max_caption_length,
            projection_dim=recipe.text_hidden_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Stable Diffusion 1.x's noise schedule; sampling uses DDIM with few steps.
    scheduler = DDIMScheduler(**SD_NOISE_SCHEDULE, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def pretraining_images(recipe: PretrainRecipe) -> tuple[torch.Tensor, list[Caption]]:
    """``images_per_caption`` drawings of every caption: pixels ``[N, 3, H, W]`` in [-1, 1] and their captions."""
    rng = random.Random(recipe.seed)
    captions = [c for c in all_captions() for _ in range(recipe.images_per_caption)]
    arrays = [np.asarray(draw_shape(c, recipe.image_size, rng), dtype=np.float32) for c in captions]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return pixels, captions


def pretrain_base(recipe: PretrainRecipe) -> StableDiffusionPipeline:
    """Build the pipeline and pretrain its VAE, then its UNet and text encoder. Deterministic for a recipe."""
    pipeline = build_untrained_pipeline(recipe)
    pixels, captions = pretraining_images(recipe)
    generator = torch.Generator().manual_seed(recipe.seed)
    _train_vae(pipeline.vae, pixels, recipe, generator)
    _train_denoiser(pipeline, pixels, captions, recipe, generator)
    for module in (pipeline.vae, pipeline.unet, pipeline.text_encoder):
        module.eval()
        module.requires_grad_(False)
    return pipeline


def _warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_fraction`` of the steps, then cosine decay to zero."""
    warmup = max(1, round(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_vae(vae: AutoencoderKL, pixels: torch.Tensor, recipe: PretrainRecipe, generator: torch.Generator) -> None:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_learning_rate, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, recipe.vae_steps, warmup_fraction=0.1)
    bar = tqdm(range(recipe.vae_steps), desc="Pretraining the VAE", dynamic_ncols=True, disable=None)
    for _ in bar:
        index = torch.randint(0, len(pixels), (recipe.vae_batch_size,), generator=generator)
        batch = pixels[index]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.sample(generator=generator)
        reconstruction = vae.decode(latents).sample
        mse = F.mse_loss(reconstruction, batch)
        loss = mse + recipe.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(mse=f"{mse.item():.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def _train_denoiser(
    pipeline: StableDiffusionPipeline,
    pixels: torch.Tensor,
    captions: list[Caption],
    recipe: PretrainRecipe,
    generator: torch.Generator,
) -> None:
    vae, unet, text_encoder, tokenizer = pipeline.vae, pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    with torch.no_grad():
        # The VAE is frozen from here on: encode once, draw from the posterior at every step.
        posteriors = [vae.encode(chunk).latent_dist for chunk in pixels.split(256)]
        mean = torch.cat([p.mean for p in posteriors])
        std = torch.cat([p.std for p in posteriors])
    texts = [c.text for c in captions]
    unique = sorted(set(texts)) + [""]
    token_ids = tokenizer(
        unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    caption_index = torch.tensor([unique.index(t) for t in texts])
    empty_index = len(unique) - 1

    unet.train()
    text_encoder.train()
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=recipe.unet_learning_rate, weight_decay=0.01)
    schedule = _warmup_cosine(optimizer, recipe.unet_steps, warmup_fraction=0.05)
    bar = tqdm(range(recipe.unet_steps), desc="Pretraining the UNet", dynamic_ncols=True, disable=None)
    ema = None
    for _ in bar:
        index = torch.randint(0, len(mean), (recipe.unet_batch_size,), generator=generator)
        latents = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        latents = latents * vae.config.scaling_factor
        prompts = caption_index[index].clone()
        dropped = torch.rand(len(index), generator=generator) < recipe.caption_dropout
        prompts[dropped] = empty_index
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(token_ids[prompts]).last_hidden_state
        prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
