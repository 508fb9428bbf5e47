"""Cached VAE latents and text embeddings: encode every pair once instead of at every step.

``cache_latents=True`` maps the prepared preference dataset through the frozen VAE and text encoder(s) once (with a
progress bar) and stores, per pair, through ``datasets``:

* ``latent_mean``, ``latent_std`` ``[2, C, h, w]`` (winner, loser): the VAE posterior's mean and standard deviation,
  unscaled, in float32. Each step samples ``mean + std * eps`` exactly as ``latent_dist.sample()`` would, so the
  cache keeps the VAE's sampling noise; only the deterministic encoder forward is saved.
* with ``random_flip``, ``latent_mean_flipped`` and ``latent_std_flipped`` as well: the cropped pair is mirrored in
  pixel space and encoded again (a VAE is not flip-equivariant, so mirroring latents would not be the same
  augmentation).
* ``prompt_embeds`` ``[L, D]`` and, for SDXL, SD3 and FLUX, ``pooled_prompt_embeds`` ``[P]`` (for SD3 and FLUX
  the T5 part of the encoding, by far the costliest, is then never repeated; see docs/flux.md for the saving).
* ``time_ids`` ``[2, 6]`` (and ``time_ids_flipped``): SDXL's micro-conditioning of each image.
* editing data (a source column): ``source_latents`` ``[S, C, h, w]`` (and ``source_latents_flipped``, the
  mirrored sources, with ``random_flip``), each source image's latents
  (:meth:`~trl_diffusion_sdpo.families.ModelFamily.encode_sources`: the VAE posterior's mode, scaled, as the editing
  pipelines encode their input image), encoded once per pair and shared by both branches; the prompt embedding of a
  family whose prompt encoding reads the sources (Qwen-Image-Edit) is computed with them.
* with a loss mask (``loss_mask``), ``loss_mask`` ``[2, 1, h, w]``: each image's mask (the pair's,
  dilated) at latent size, area-interpolated as the uncached step does it
  (:meth:`~trl_diffusion_sdpo.families.ModelFamily.latent_mask`); the flip mirrors it in latent space, which equals
  the mirrored pixels' area average because each latent position covers a whole block of pixels.
* with score columns (``loss_type="smpo"``), ``scores`` ``[2]`` float64 (read back as Python floats): the ordered
  pair's (winner, loser) scores, which :class:`CachedPreferenceCollator` hands on as the same ``pair_scores`` as
  the uncached path.

The empty-prompt embedding is stored once beside the table; the trainer substitutes it for prompt dropout and picks
the mirrored or plain view with the same draws as without the cache.

Random crops cannot be cached (every step would need a new crop of the pixels); ``random_crop=True`` is refused.

Where and when the cache is reused: the table lives in ``<cache dir>/<fingerprint>/latents.arrow`` where the
fingerprint hashes :func:`encoding_settings` (the model family, the VAE and text-encoder configs, a digest of their
weights (see :func:`frozen_weights_digest`), the tokenizers' vocabularies and lengths, the resolution, flips and
video frames, the image-conversion rules (:func:`.transforms.image_conversion_digest`): the settings the sharded cache
checks too), the dataset's own
``datasets`` fingerprint, the resolved columns and :data:`CACHE_VERSION`. A later run with the same inputs loads
the table instead of encoding. Under several processes only the main process encodes; the others wait and load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Array2D, Array4D, Array5D, Dataset, Features, IterableDataset, Sequence, Value
from datasets import config as datasets_config
from PIL import Image
from safetensors.torch import load_file, save_file

from ..config._lazy import import_target
from ..config.file_modes import follow_umask
from ..families import ModelFamily, PromptEmbeddings
from .collators import pair_scores
from .columns import PreferenceColumns, order_pair
from .progress import datasets_progress_bars
from .transforms import PairTransform, image_conversion_digest
from .video import VideoClip, VideoPairTransform

__all__ = [
    "CACHE_VERSION",
    "CachedPreferenceCollator",
    "LatentCache",
    "build_latent_cache",
    "cache_fingerprint",
    "cached_moments",
    "cached_prompt_embeds",
    "cached_time_ids",
    "encoding_settings",
    "latent_cache_for",
    "frozen_weights_digest",
    "settings_mismatches",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = "3"  # 2: the flipped view is the mirrored center crop; 3: encoding_settings recorded and checked
"""Bumped whenever what is stored, or how it is computed, changes; old caches are then ignored, never misread."""

_SAMPLES_PER_TENSOR = 1024


@dataclass
class LatentCache:
    """A cached split: the table of encoded pairs, the empty-prompt embedding and where both live."""

    dataset: Dataset
    empty_prompt: PromptEmbeddings
    directory: str
    flipped: bool


def frozen_weights_digest(modules: dict[str, torch.nn.Module]) -> str:
    """A digest of the frozen modules' weights that is cheap for multi-billion-parameter encoders.

    Per tensor: its name, shape and dtype, its float64 sum and sum of squares, and 1024 evenly spaced values. That
    reads every weight once on its own device and copies only a few kilobytes to the host, so SDXL's VAE and text
    encoders (3.6 GB in float32) are digested in about a second. Any fine-tune or other checkpoint changes the
    sums and the samples; an edit that changed a single weight while keeping both sums would go unnoticed (use
    a new ``latent_cache_dir`` after such surgery).
    """
    hasher = hashlib.sha256()
    for module_name in sorted(modules):
        for name, tensor in sorted(modules[module_name].state_dict().items()):
            flat = tensor.detach().reshape(-1)
            hasher.update(f"{module_name}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if flat.numel() == 0:
                continue
            if flat.is_floating_point() or flat.is_complex():
                values = flat.double()
                stats = torch.stack([values.sum(), values.pow(2).sum()])
            else:
                stats = flat.long().sum().double().reshape(1)
            step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
            samples = flat[::step][:_SAMPLES_PER_TENSOR].double()
            hasher.update(stats.cpu().numpy().tobytes())
            hasher.update(samples.cpu().numpy().tobytes())
    return hasher.hexdigest()


def _tokenizers_digest(family: ModelFamily) -> str:
    """The tokenizers' classes and vocabularies (their lengths are :func:`encoding_settings`' own entry)."""
    hasher = hashlib.sha256()
    for key, tokenizer in sorted(family.prompt_tokenizer().tokenizers.items()):
        vocab = sorted(tokenizer.get_vocab().items())
        hasher.update(json.dumps([key, type(tokenizer).__name__, vocab]).encode())
    return hasher.hexdigest()


def _config_dict(module: torch.nn.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # Paths and library versions say nothing about what the module computes.
    return {k: v for k, v in as_dict.items() if not k.startswith("_") and k not in ("transformers_version",)}


def encoding_settings(family: ModelFamily, resolution: int, flipped: bool, clip: VideoClip | None) -> dict[str, Any]:
    """Every setting besides the data that the cached values depend on, as JSON values.

    The one list both caches check: the in-trainer cache hashes it into its folder name (:func:`cache_fingerprint`),
    the sharded cache stores it in its manifest and compares it with the run's (:func:`settings_mismatches`).
    """
    frozen = family.frozen_modules()
    prompt_tokenizer = family.prompt_tokenizer()
    settings = {
        "family": family.name,
        "configs": {name: _config_dict(module) for name, module in sorted(frozen.items())},
        "weights": frozen_weights_digest(frozen),
        "tokenizers": _tokenizers_digest(family),
        "max_sequence_length": {
            key: prompt_tokenizer.max_lengths.get(key, tokenizer.model_max_length)
            for key, tokenizer in sorted(prompt_tokenizer.tokenizers.items())
        },
        "resolution": resolution,
        "crop": "center",
        "flipped": bool(flipped),
        "clip": None if clip is None else {"num_frames": clip.num_frames, "frame_stride": clip.frame_stride},
        "image_conversion": image_conversion_digest(),  # the rules turning every PIL mode into RGB
    }
    vision = getattr(prompt_tokenizer, "vision_settings", None)  # a prompt encoding that reads the source images
    if vision is not None:
        settings["vision"] = vision
    return json.loads(json.dumps(settings, sort_keys=True, default=str))  # as a manifest reads back: lists, str keys


# Each setting of encoding_settings as an error message names it.
_SETTING_NAMES = {
    "family": "model family",
    "configs": "VAE or text-encoder configs",
    "weights": "VAE or text-encoder weights",
    "tokenizers": "tokenizer (class or vocabulary)",
    "max_sequence_length": "max_sequence_length (tokens per prompt)",
    "resolution": "resolution",
    "crop": "crop",
    "clip": "video frames (num_frames, frame_stride)",
    "image_conversion": "image-conversion rules (data/transforms.py or Pillow's version changed since)",
    "vision": "how the prompt encoding reads the source images (image processor, condition size, template)",
}


def settings_mismatches(built: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between the :func:`encoding_settings` a cache was ``built`` with and those a run ``wanted``, one
    line per setting naming it; a cache with mirrored views serves a run without ``random_flip`` as well."""
    problems = [
        f"{name}: built with {_shown(built.get(key))}, this run has {_shown(wanted.get(key))}"
        for key, name in _SETTING_NAMES.items()
        if built.get(key) != wanted.get(key)
    ]
    if wanted["flipped"] and not built.get("flipped"):
        problems.append("random_flip: built without mirrored views, this run has random_flip=True")
    return problems


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:12] + "..."


def cache_fingerprint(
    dataset: Dataset, columns: PreferenceColumns, family: ModelFamily, resolution: int, flipped: bool
) -> str:
    """The name under which a split's cache is stored: changes whenever the cached values could."""
    description = {
        "cache_version": CACHE_VERSION,
        "settings": encoding_settings(family, resolution, flipped, columns.clip),
        # Score columns only when present, so that caches made before they existed keep their names.
        # None where the label column was named before the label form was mapped to TRL's: TRL caches keep their names.
        "columns": [columns.prompt, columns.first, columns.second, None]
        + ([columns.score_0, columns.score_1] if columns.scored else [])
        + ([columns.source] if columns.edits else [])
        # Mask settings only when masked, so that caches made before masks existed keep their names.
        + ([columns.mask] if columns.masked else []),
        "dataset": dataset._fingerprint,
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class _FrozenEncoders:
    """The VAE and text encoder(s), moved to the encoding device in float32 on first use and put back afterwards."""

    def __init__(self, family: ModelFamily, device: torch.device) -> None:
        self.family = family
        self.device = torch.device(device)
        self._placement: dict[str, tuple[torch.device, torch.dtype]] | None = None
        self.vae_encode_calls = 0

    def _ensure_ready(self) -> None:
        if self._placement is not None:
            return
        self._placement = {}
        for name, module in self.family.frozen_modules().items():
            parameter = next(module.parameters())
            self._placement[name] = (parameter.device, parameter.dtype)
            # float32 once: the cache is computed once, so it may as well be computed at full precision.
            module.to(device=self.device)
            if parameter.dtype != torch.float32:
                module.to(dtype=torch.float32)

    def restore(self) -> None:
        if self._placement is None:
            return
        for name, module in self.family.frozen_modules().items():
            device, dtype = self._placement[name]
            module.to(device=device)
            if dtype != torch.float32:
                module.to(dtype=dtype)
        self._placement = None

    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._ensure_ready()
        # Through the family: it knows its VAE's input layout (Qwen-Image's VAE takes a frame axis).
        mean, std = self.family.encode_moments(pixels.to(device=self.device, dtype=torch.float32))
        return mean.cpu(), std.cpu()

    @torch.no_grad()
    def prompts(self, prompts: list[str], sources: list[list[Any]] | None = None) -> PromptEmbeddings:
        """The prompts' embeddings; ``sources`` (decoded images per prompt) for a tokenizer that reads them."""
        self._ensure_ready()
        tokenize = self.family.prompt_tokenizer()
        with torch.autocast(device_type=self.device.type, enabled=False):
            tokens = tokenize(prompts, sources) if getattr(tokenize, "reads_sources", False) else tokenize(prompts)
            embeds = self.family.encode_prompts(tokens)
        pooled = None if embeds.pooled is None else embeds.pooled.float().cpu()
        return PromptEmbeddings(embeds.encoder_hidden_states.float().cpu(), pooled)

    @torch.no_grad()
    def sources(self, pixels: torch.Tensor) -> torch.Tensor:
        """Source latents ``[N, S, C, h, w]`` of ``pixels [N, S, 3, R, R]`` (:meth:`ModelFamily.encode_sources`)."""
        self._ensure_ready()
        return self.family.encode_sources(pixels.to(device=self.device, dtype=torch.float32)).float().cpu()


def _latent_shape(family: ModelFamily, resolution: int, clip: VideoClip | None = None) -> tuple[int, ...]:
    """``(C, h, w)`` of an image's latents (``family.latent_shape``), or ``(C, F', h, w)`` of a video clip's (the
    video family's ``latent_shape`` for ``clip.num_frames`` frames)."""
    if clip is None:
        return family.latent_shape(resolution)
    return family.latent_shape(resolution, num_frames=clip.num_frames)


def _features(
    latent_shape: tuple[int, ...],
    empty: PromptEmbeddings,
    flipped: bool,
    scored: bool = False,
    source_shape: tuple[int, ...] | None = None,
    masked: bool = False,
) -> Features:
    array = Array4D if len(latent_shape) == 3 else Array5D  # images, or video clips
    pair_latents = array(shape=(2, *latent_shape), dtype="float32")
    features: dict[str, Any] = {
        "latent_mean": pair_latents,
        "latent_std": pair_latents,
        "time_ids": Array2D(shape=(2, 6), dtype="float32"),
    }
    if flipped:
        features.update(
            latent_mean_flipped=pair_latents,
            latent_std_flipped=pair_latents,
            time_ids_flipped=Array2D(shape=(2, 6), dtype="float32"),
        )
    features["prompt_embeds"] = Array2D(shape=tuple(empty.encoder_hidden_states.shape[1:]), dtype="float32")
    if empty.pooled is not None:
        features["pooled_prompt_embeds"] = Sequence(Value("float32"), length=empty.pooled.shape[-1])
    if scored:
        features["scores"] = Sequence(Value("float64"), length=2)
    if masked:  # [2, 1, h, w]: one mask per image (the pair's, twice), at latent size
        features["loss_mask"] = Array4D(shape=(2, 1, *latent_shape[-2:]), dtype="float32")
    if source_shape is not None:  # editing: [S, C, h, w], S may differ between rows
        features["source_latents"] = Array4D(shape=(None, *source_shape), dtype="float32")
        if flipped:
            features["source_latents_flipped"] = Array4D(shape=(None, *source_shape), dtype="float32")
    return Features(features)


def _default_cache_root(dataset: Dataset) -> str:
    if dataset.cache_files:
        return os.path.join(os.path.dirname(dataset.cache_files[0]["filename"]), "trl_diffusion_sdpo_latents")
    return os.path.join(str(datasets_config.HF_DATASETS_CACHE), "trl_diffusion_sdpo_latents")


def build_latent_cache(
    dataset: Dataset,
    columns: PreferenceColumns,
    family: ModelFamily,
    *,
    resolution: int,
    random_flip: bool,
    random_crop: bool = False,
    cache_dir: str | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    split: str = "train",
    progress: bool = True,
) -> LatentCache:
    """Encode a prepared preference dataset once, or load the cache a previous run left.

    Args:
        dataset: a prepared map-style dataset (see :func:`~trl_diffusion_sdpo.data.prepare_preference_dataset`).
        columns: its resolved columns.
        family: the pipeline's model family (VAE, text encoders, tokenizers).
        resolution: training resolution; images are resized and center-cropped like the uncached path.
        random_flip: also store the latents of the horizontally flipped pair.
        random_crop: must be ``False``; a random crop cannot be cached.
        cache_dir: where caches live; defaults to a ``trl_diffusion_sdpo_latents`` folder beside the dataset's
            own cache files, or in the ``datasets`` cache for in-memory datasets.
        device: where to encode (the accelerator); the encoders are moved back afterwards.
        batch_size: pairs per encoding batch.
        split: a name for the progress bar and messages.
        progress: show ``datasets``' progress bar while encoding (the trainer passes ``not disable_tqdm``).

    Returns:
        A :class:`LatentCache` whose dataset is formatted as torch tensors (``scores`` as float64 Python floats).
    """
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "cache_latents=True needs a map-style datasets.Dataset: a streamed IterableDataset cannot be encoded "
            "ahead of training. Load the dataset without streaming, or set cache_latents=False."
        )
    if random_crop:
        raise ValueError(
            "cache_latents=True cannot be combined with random_crop=True: each step would need a new crop of the "
            "pixels, which the cached latents no longer hold. Use the center crop (random_crop=False), crop the "
            "images before training, or set cache_latents=False."
        )
    flipped = bool(random_flip)
    fingerprint = cache_fingerprint(dataset, columns, family, resolution, flipped)
    directory = os.path.join(cache_dir or _default_cache_root(dataset), fingerprint)
    os.makedirs(directory, exist_ok=True)
    transform = (
        PairTransform(resolution, random_crop=False)
        if columns.clip is None
        else VideoPairTransform(resolution, columns.clip)
    )
    encoders = _FrozenEncoders(family, torch.device(device))
    try:
        empty_prompt = _empty_prompt(directory, encoders, resolution if columns.edits else None)
        latent_shape = _latent_shape(family, resolution, columns.clip)
        features = _features(
            latent_shape,
            empty_prompt,
            flipped,
            columns.scored,
            latent_shape if columns.edits else None,
            columns.masked,
        )

        def encode(batch: dict[str, list]) -> dict[str, np.ndarray]:
            rows = [{k: batch[k][i] for k in batch} for i in range(len(batch[columns.prompt]))]
            views = [False, True] if flipped else [False]
            pixels, time_ids = {flip: [] for flip in views}, {flip: [] for flip in views}
            scores, sources, masks = [], [], []
            for row in rows:
                pair = order_pair(row, columns)
                if pair is None:
                    raise ValueError("a tie reached the latent cache; pass a prepared dataset (ties dropped)")
                winner, loser = transform.load(pair[0]), transform.load(pair[1])
                scores.append(pair[2])
                if columns.masked:
                    masks.append(
                        import_target("trl_diffusion_sdpo.data.masks:pair_mask")(
                            row, winner, loser, columns, transform
                        )
                    )
                if columns.edits:
                    values = import_target("trl_diffusion_sdpo.data.editing:source_values")(row, columns)
                    sources.append([transform.load(value) for value in values])
                for flip in views:
                    pair_pixels, pair_ids = transform.center_crop_pair(winner, loser, flip)
                    pixels[flip].append(pair_pixels)
                    time_ids[flip].append(pair_ids)
            # One VAE batch for every view of every pair: [views * n * 2, 3, R, R] (videos: [..., 3, F, R, R]).
            stacked = torch.cat([torch.stack(pixels[flip]) for flip in views]).flatten(0, 1)
            mean, std = encoders.posterior(stacked)
            encoders.vae_encode_calls += 1
            n = len(rows)
            mean = mean.reshape(len(views), n, 2, *mean.shape[1:])
            std = std.reshape(len(views), n, 2, *std.shape[1:])
            embeds = encoders.prompts([row[columns.prompt] for row in rows], sources if columns.edits else None)
            out: dict[str, Any] = {}
            if columns.edits:  # one VAE batch for every view of every source of every pair, split back per pair
                source_pixels = torch.stack([transform.source(image) for row in sources for image in row])
                views_pixels = torch.cat([source_pixels.flip(-1) if flip else source_pixels for flip in views])
                latents = encoders.sources(views_pixels[:, None])[:, 0].chunk(len(views))
                counts = [len(row) for row in sources]
                for index, flip in enumerate(views):
                    suffix = "_flipped" if flip else ""
                    out[f"source_latents{suffix}"] = [part.numpy() for part in torch.split(latents[index], counts)]
            for index, flip in enumerate(views):
                suffix = "_flipped" if flip else ""
                out[f"latent_mean{suffix}"] = mean[index].numpy()
                out[f"latent_std{suffix}"] = std[index].numpy()
                out[f"time_ids{suffix}"] = torch.stack(time_ids[flip]).numpy()
            out["prompt_embeds"] = embeds.encoder_hidden_states.numpy()
            if embeds.pooled is not None:
                out["pooled_prompt_embeds"] = embeds.pooled.numpy()
            if columns.scored:
                out["scores"] = np.asarray(scores, dtype=np.float64)
            if columns.masked:  # [n, 1, R, R] pixels -> [n, 2, 1, h, w] at latent size
                pixel_masks = torch.stack(masks)
                latent = family.latent_mask(pixel_masks, (n, *latent_shape)).reshape(n, 1, *latent_shape[-2:])
                out["loss_mask"] = latent[:, None].expand(n, 2, *latent.shape[1:]).numpy()
            return out

        with datasets_progress_bars(progress):
            cached = dataset.map(
                encode,
                batched=True,
                batch_size=batch_size,
                remove_columns=dataset.column_names,
                features=features,
                cache_file_name=os.path.join(directory, "latents.arrow"),
                load_from_cache_file=True,
                new_fingerprint=fingerprint,
                writer_batch_size=max(batch_size, 64),
                desc=f"Caching {split} latents and text embeddings",
            )
    finally:
        encoders.restore()
    if encoders.vae_encode_calls:
        logger.info("Cached %d %s pairs in %s", len(cached), split, directory)
    else:
        logger.info("Loaded the cached %s latents from %s", split, directory)
    # ``scores`` stay float64 Python floats, rounded to float32 once by the collator's ``pair_scores`` exactly as on
    # the uncached path.
    tensors = [name for name in cached.column_names if name != "scores"]
    return LatentCache(
        cached.with_format("torch", columns=tensors, output_all_columns=True), empty_prompt, directory, flipped
    )


def _empty_prompt(directory: str, encoders: _FrozenEncoders, edit_resolution: int | None = None) -> PromptEmbeddings:
    """The empty prompt's embedding ``[1, L, D]`` (and pooled ``[1, P]``), computed once and stored with the cache;
    for editing data (``edit_resolution`` set) with a grey source, for a prompt encoding that reads the sources."""
    path = os.path.join(directory, "empty_prompt.safetensors")
    if os.path.exists(path):
        tensors = load_file(path)
        return PromptEmbeddings(tensors["prompt_embeds"], tensors.get("pooled_prompt_embeds"))
    grey = None
    if edit_resolution is not None:
        grey = [[Image.new("RGB", (edit_resolution, edit_resolution), (127, 127, 127))]]
    embeds = encoders.prompts([""], grey)
    tensors = {"prompt_embeds": embeds.encoder_hidden_states.contiguous()}
    if embeds.pooled is not None:
        tensors["pooled_prompt_embeds"] = embeds.pooled.contiguous()
    save_file(tensors, path + ".tmp")
    follow_umask(path + ".tmp")  # safetensors writes it owner-only
    os.replace(path + ".tmp", path)
    return embeds


class CachedPreferenceCollator:
    """Batch cached rows: ``latent_mean``/``latent_std`` ``[B, 2, C, h, w]`` (winner first), ``prompt_embeds``
    ``[B, L, D]``, ``pooled_prompt_embeds`` ``[B, P]`` (SDXL), ``time_ids [B, 2, 6]``; with ``with_flipped`` also
    the mirrored views (``*_flipped``), among which the trainer draws its flips. Nothing random happens here.

    When the cache holds ``scores`` (built with score columns), the batch has ``pair_scores [B, 2]`` float32, exactly
    as :class:`~trl_diffusion_sdpo.data.PreferenceCollator` makes them.
    """

    def __init__(self, with_flipped: bool = False) -> None:
        self.with_flipped = with_flipped

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        keys = ["latent_mean", "latent_std", "time_ids", "prompt_embeds"]
        if "pooled_prompt_embeds" in rows[0]:
            keys.append("pooled_prompt_embeds")
        if "source_latents" in rows[0]:
            counts = {len(row["source_latents"]) for row in rows}
            if len(counts) > 1:
                raise ValueError(
                    f"cached editing rows with {sorted(counts)} source images in one batch: every row of a batch "
                    "needs the same number (group the rows by their number of sources)"
                )
            keys.append("source_latents")
            if self.with_flipped:
                keys.append("source_latents_flipped")
        if self.with_flipped:
            keys += ["latent_mean_flipped", "latent_std_flipped", "time_ids_flipped"]
        if "loss_mask" in rows[0]:
            keys.append("loss_mask")
        batch = {key: torch.stack([row[key] for row in rows]) for key in keys}
        batch["num_skipped"] = torch.tensor(0.0)
        if "scores" in rows[0]:
            batch["pair_scores"] = pair_scores([[float(s) for s in row["scores"]] for row in rows])
        return batch


def cached_moments(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached posterior mean and std of a batch as ``[2B, C, h, w]`` (winners then losers), float32."""
    mean, std = inputs["latent_mean"], inputs["latent_std"]
    batch = mean.shape[0]
    mean = mean.transpose(0, 1).reshape(2 * batch, *mean.shape[2:]).float()
    std = std.transpose(0, 1).reshape(2 * batch, *std.shape[2:]).float()
    return mean, std


def cached_prompt_embeds(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> PromptEmbeddings:
    """The cached prompt embeddings of a batch (one per pair), in ``dtype``, with an editing batch's source latents
    (float32, as the uncached path's VAE gives them)."""
    pooled = inputs.get("pooled_prompt_embeds")
    return PromptEmbeddings(
        inputs["prompt_embeds"].to(dtype), None if pooled is None else pooled.to(dtype), inputs.get("source_latents")
    )


def cached_time_ids(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``time_ids`` of a batch as ``[2B, 6]`` (winners then losers)."""
    time_ids = inputs["time_ids"]
    return time_ids.transpose(0, 1).reshape(2 * time_ids.shape[0], -1)


def latent_cache_for(
    dataset: Dataset, columns: PreferenceColumns, args: Any, family: ModelFamily, split: str
) -> LatentCache:
    """:func:`build_latent_cache` of ``dataset``'s ``split`` with the settings of the run's config ``args``
    (``cache_latents``), the main process first."""
    # Without a shared filesystem (save_on_each_node) every node encodes its own copy.
    with args.main_process_first(local=args.save_on_each_node, desc=f"{split} latent cache"):
        return build_latent_cache(
            dataset,
            columns,
            family,
            resolution=args.resolution,
            random_flip=args.random_flip and split == "train",
            random_crop=args.random_crop,
            cache_dir=args.latent_cache_dir,
            device=args.device,
            batch_size=max(args.per_device_train_batch_size, 1),
            split=split,
            progress=not args.disable_tqdm,
        )
