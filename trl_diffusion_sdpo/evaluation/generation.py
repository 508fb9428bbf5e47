"""Image generation for evaluation: a base model and its variants sampled with the SDPO authors' protocol, cached on
disk as PNG so an interrupted run resumes and a new metric needs no regeneration.

Protocol defaults (SDPO ``test_sd15.py`` / ``test_sdxl.py``): Euler sampler built from the model's scheduler config,
50 steps, the family's native resolution (``unet.config.sample_size * vae_scale_factor``: 512 for SD1.5, 768 for
SD2.x-768, 1024 for SDXL), negative prompt ``""`` (encoded, for both SDXL encoders; SDXL's zeroed negative embedding
is used only when no negative prompt is given, so we always pass one), the same noise for every prompt (each
prompt's generator is re-seeded with the seed), and guidance ``8.5`` in diffusers' convention
``eps_u + g (eps_c - eps_u)``: the authors write ``eps_c + 7.5 (eps_c - eps_u)``, which is ``g = 7.5 + 1``.
The noise is drawn by a CPU generator, so it is the same on every device, but not bit-identical to the authors'
bf16 CUDA draw.

Variants (`ModelSpec`): the base itself, a LoRA folder or file (``pipe.load_lora_weights``, unloaded afterwards), a
full-tuning checkpoint of any family (a folder with ``unet/`` for SD1.x/2.x and SDXL, ``transformer/`` for SD3/SD3.5
and FLUX.1, or such a model folder itself), a whole pipeline folder, a Hub id of any of these, or the SDPO authors'
``unet.pth`` state dict (read with ``torch.load(weights_only=True)``). SD3 and FLUX sample with their own
flow-matching Euler scheduler.

Edits (a prompt set of `~.prompts.EditPrompt`): the source image(s) go to the editing pipeline's ``image`` argument
(FLUX.1 Kontext, Qwen-Image-Edit and its Plus version, FLUX.2 with reference images): one source as a PIL image,
several as a list. Whether a pipeline edits is read from its ``__call__`` signature (an ``image`` parameter, and no
``mask_image``: inpainting needs a mask these sets do not have). The edited image has the configured size, else the
(first) source's size rounded down to the pipeline's latent multiple (``2 * vae_scale_factor``). Each sample's
generator is seeded with its own seed, as for text-to-image; the samples of one edit are drawn in one call
(``num_images_per_prompt``, one generator each), never two edits in one call, because the pipelines read a list of
images as reference images (Qwen-Image-Edit Plus, FLUX.2) or as a batch (Kontext, Qwen-Image-Edit), not both.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..config.checks import Choice
from ..config.messages import advice
from ..families.loading import dtype_keyword, resolve_model_name
from ..families.preparation import cast_module
from ..rewards.scorers.base import resolve_device
from .progress import Progress, note
from .prompts import EditPrompt

__all__ = [
    "SINGLE_SOURCE_PIPELINES",
    "GenerationSettings",
    "ImageCache",
    "ModelSpec",
    "generate_images",
    "native_resolution",
    "sample_images",
]

SCHEDULERS = ("euler", "model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
# The pipeline component a full-tuning output replaces: SD1.x/2.x and SDXL train a UNet, SD3 and FLUX a transformer.
DENOISER_FOLDERS = ("unet", "transformer")
# Editing pipelines whose ``image`` takes one source per prompt: they read a list of images as a batch, not as
# several references. Their ``__call__`` signatures cannot tell (Kontext, Qwen-Image-Edit and Qwen-Image-Edit Plus
# all annotate ``image: PipelineImageInput``), so these are named; an edit with several sources is refused for them.
SINGLE_SOURCE_PIPELINES = ("FluxKontextPipeline", "QwenImageEditPipeline")


@dataclass(frozen=True)
class GenerationSettings:
    """How images are sampled. ``height``/``width`` None means the model's native resolution. ``scheduler`` is
    ``"euler"`` (the authors' protocol) or ``"model"`` (keep the pipeline's own). ``true_cfg_scale``: the
    classifier-free guidance of pipelines that take it (Qwen-Image, FLUX.1); None keeps the pipeline's default
    (Qwen-Image 4.0, applied because a negative prompt is passed; FLUX.1 1.0, no guidance)."""

    num_inference_steps: int = 50
    guidance_scale: float = 8.5
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""
    scheduler: str = "euler"
    dtype: str = "float32"
    true_cfg_scale: float | None = None

    def __post_init__(self) -> None:
        Choice(SCHEDULERS).check("scheduler", self.scheduler)
        Choice(tuple(DTYPES)).check("dtype", self.dtype)
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be at least 1.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def key(self) -> str:
        """A short hash of every setting that changes the pixels (the batch size does not, by design). An unset
        ``true_cfg_scale`` is left out, so images cached before it existed keep their names."""
        values = asdict(self)
        if values["true_cfg_scale"] is None:
            del values["true_cfg_scale"]
        return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate. ``path`` None is the base model. ``kind`` is ``auto`` (detected), ``base``, ``lora``,
    ``unet`` (a folder with ``unet/`` or a UNet folder), ``transformer`` (a folder with ``transformer/`` or an SD3 /
    FLUX transformer folder), ``pipeline`` or ``unet_state_dict`` (a ``.pth``)."""

    name: str
    path: str | None = None
    kind: str = "auto"
    fingerprint: str = field(default="", compare=False)

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``NAME=PATH`` (or a bare ``PATH``, named after its last component)."""
        name, sep, path = text.partition("=")
        if not sep:
            path, name = text, os.path.basename(os.path.normpath(text)) or text
        if not name or not path:
            raise ValueError(f"Model {text!r} should read NAME=PATH.")
        return cls(name=name, path=path)

    def identity(self, base: str) -> str:
        """What the cache is keyed on: base, path, kind and, for local files, their sizes and times."""
        payload = {"base": base, "path": self.path, "kind": self.kind, "files": _local_fingerprint(self.path)}
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _local_fingerprint(path: str | None) -> list[tuple[str, int, int]]:
    if path is None or not os.path.exists(path):
        return []
    if os.path.isfile(path):
        stat = os.stat(path)
        return [(os.path.basename(path), stat.st_size, stat.st_mtime_ns)]
    entries = []
    for root, _, files in os.walk(path):
        for name in files:
            if name.endswith((".safetensors", ".bin", ".pth", ".pt", ".json")):
                full = os.path.join(root, name)
                stat = os.stat(full)
                entries.append((os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns))
    return sorted(entries)


def _hub_file_exists(repo: str, filename: str) -> bool:
    from huggingface_hub import file_exists

    try:
        return file_exists(repo, filename)
    except Exception:  # offline, private or malformed ids: not this kind
        return False


def _hub_candidates() -> list[tuple[str, str]]:
    """(kind, file) pairs whose file on the Hub says what a Hub repository holds, in the order looked for."""
    candidates = [("pipeline", "model_index.json"), ("lora", _LORA_FILES[0])]
    return candidates + [(denoiser, f"{denoiser}/config.json") for denoiser in DENOISER_FOLDERS]


def check_model_names(base: str, models: Sequence[ModelSpec]) -> None:
    """Refuse in one line, before anything loads, a base or variant name that leads nowhere: no local path, not in
    the Hugging Face cache, and the Hub not asked (offline), unreachable or without it
    (:func:`~trl_diffusion_sdpo.data.model_names.check_model_exists`)."""
    # lazy: data.model_names loads the data formats (datasets); the commands check names, validation images do not
    from ..data.model_names import check_model_exists

    check_model_exists(base, advice("--base", "base"))
    for spec in models:
        if spec.path is not None and spec.kind in ("auto", "lora", "pipeline", *DENOISER_FOLDERS):
            option = advice("--model", f"model {spec.name!r}:")
            expected = "a LoRA, full-tuning output or pipeline folder or file, or a Hub id NAMESPACE/NAME"
            check_model_exists(spec.path, option, expected, files=[name for _, name in _hub_candidates()])


def detect_kind(path: str) -> str:
    """The kind of a local folder/file or a Hub id (see `ModelSpec`)."""
    if os.path.isfile(path):
        if path.endswith((".pth", ".pt")):
            return "unet_state_dict"
        if path.endswith(".safetensors"):
            return "lora"
        raise ValueError(f"Cannot tell what {path} holds: expected a .safetensors LoRA or a .pth UNet state dict.")
    if os.path.isdir(path):
        files = set(os.listdir(path))
        if "model_index.json" in files:
            return "pipeline"
        if files & set(_LORA_FILES):
            return "lora"
        for denoiser in DENOISER_FOLDERS:
            if os.path.isfile(os.path.join(path, denoiser, "config.json")):
                return denoiser
        denoiser = _denoiser_folder_kind(path)
        if denoiser:
            return denoiser
        raise ValueError(
            f"{path} holds no model_index.json, {' or '.join(_LORA_FILES)}, unet/ or transformer/ config.json, or a "
            "UNet / transformer config.json."
        )
    for kind, filename in _hub_candidates():
        if _hub_file_exists(path, filename):
            return kind
    raise ValueError(
        f"{path!r} is neither a local path nor a Hub repository with a pipeline, LoRA, UNet or transformer."
    )


def native_resolution(pipe) -> int:
    """The resolution the UNet was trained at: ``unet.config.sample_size * vae_scale_factor`` (for transformer
    pipelines such as SD3 and FLUX, their ``default_sample_size * vae_scale_factor``)."""
    if getattr(pipe, "unet", None) is None:
        sample_size = getattr(pipe, "default_sample_size", None)
        if sample_size is None:  # ZImagePipeline keeps none: its __call__ samples 1024 x 1024 by default
            return 1024
        return int(sample_size * pipe.vae_scale_factor)
    sample_size = pipe.unet.config.sample_size
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return int(sample_size * pipe.vae_scale_factor)


def _prepare(pipe, settings: GenerationSettings, device: torch.device):
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    flow = isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)  # SD3, FLUX: already a (flow) Euler sampler
    if settings.scheduler == "euler" and not flow and not isinstance(pipe.scheduler, EulerDiscreteScheduler):
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # the authors decode without it; a blacked-out image would corrupt the scores
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_base_pipeline(base: str, settings: GenerationSettings, device: torch.device):
    """``DiffusionPipeline.from_pretrained(base)`` in the settings' dtype, on ``device``, with the Euler sampler."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(resolve_model_name(base), **dtype_keyword(settings.torch_dtype))
    return _prepare(pipe, settings, device)


@contextlib.contextmanager
def variant_pipeline(base_pipe, spec: ModelSpec, settings: GenerationSettings, device: torch.device) -> Iterator:
    """The pipeline of ``spec`` built from ``base_pipe``; a LoRA is loaded into the base and unloaded on exit."""
    kind = spec.kind if spec.kind != "auto" else ("base" if spec.path is None else detect_kind(spec.path))
    dtype = settings.torch_dtype
    if kind == "base":
        yield base_pipe
    elif kind == "lora":
        path, weight_name = spec.path, None
        if os.path.isfile(spec.path):
            path, weight_name = os.path.dirname(spec.path) or ".", os.path.basename(spec.path)
        kwargs = {"weight_name": weight_name} if weight_name else {}
        base_pipe.load_lora_weights(path, adapter_name="evaluation", **kwargs)
        try:
            yield base_pipe
        finally:
            base_pipe.unload_lora_weights()
    elif kind == "unet_state_dict":
        unet = copy.deepcopy(base_pipe.unet)
        unet.load_state_dict(torch.load(spec.path, map_location="cpu", weights_only=True))
        pipe = type(base_pipe)(**{**base_pipe.components, "unet": unet.to(device, dtype)})
        yield _prepare(pipe, settings, device)
    elif kind in DENOISER_FOLDERS:
        from diffusers import AutoModel

        if kind not in base_pipe.components:
            raise ValueError(f"{spec.name} holds a {kind}, which {type(base_pipe).__name__} (the base) does not use.")
        subfolder = None if _denoiser_folder_kind(spec.path) == kind else kind
        denoiser = AutoModel.from_pretrained(spec.path, subfolder=subfolder, **dtype_keyword(dtype))
        cast_module(denoiser, dtype, device)
        pipe = type(base_pipe)(**{**base_pipe.components, kind: denoiser})
        yield _prepare(pipe, settings, device)
    elif kind == "pipeline":
        from diffusers import DiffusionPipeline

        yield _prepare(DiffusionPipeline.from_pretrained(spec.path, **dtype_keyword(dtype)), settings, device)
    else:
        raise ValueError(f"Unknown model kind {kind!r} for {spec.name}.")


def _denoiser_folder_kind(path: str) -> str | None:
    """``"unet"`` or ``"transformer"`` when ``path`` is itself a saved denoiser (its ``config.json`` names a UNet or
    a transformer class), else ``None``."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        class_name = json.load(f).get("_class_name", "")
    if "UNet" in class_name:
        return "unet"
    if "Transformer" in class_name:
        return "transformer"
    return None


def source_argument(pipe, num_sources: int = 1) -> str:
    """The ``__call__`` keyword that takes an edit's source image(s) (``image``); a ``ValueError`` naming the pipeline
    when it takes none, needs a mask (inpainting), or takes one source and an edit has ``num_sources``."""
    name = type(pipe).__name__
    parameters = inspect.signature(pipe.__call__).parameters
    if "image" not in parameters:
        raise ValueError(
            f"{name} takes no source image (its __call__ has no `image` argument), so it cannot sample edits; use an "
            "editing pipeline (FluxKontextPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline, Flux2Pipeline, "
            "Flux2KleinPipeline) or a prompt set without source_image/source_images."
        )
    if "mask_image" in parameters:
        raise ValueError(f"{name} inpaints: it needs a mask_image, which a prompt set of edits does not give.")
    if num_sources > 1 and any(cls.__name__ in SINGLE_SOURCE_PIPELINES for cls in type(pipe).__mro__):
        raise ValueError(
            f"{name} edits one source image per instruction, but an edit has {num_sources} (source_images); use a "
            "multi-image pipeline (QwenImageEditPlusPipeline, Flux2Pipeline, Flux2KleinPipeline)."
        )
    return "image"


def _edit_size(pipe, settings: GenerationSettings, source: Image.Image) -> tuple[int, int]:
    """``(height, width)`` of an edit: the settings', else the source's rounded down to the latent multiple."""
    if settings.height and settings.width:
        return settings.height, settings.width
    multiple = 2 * int(getattr(pipe, "vae_scale_factor", 8))
    width, height = source.size
    height = settings.height or max(multiple, height // multiple * multiple)
    width = settings.width or max(multiple, width // multiple * multiple)
    return height, width


@torch.no_grad()
def sample_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: GenerationSettings,
    batch_size: int = 1,
    progress: bool = False,
    description: str = "sampling",
    sources: Sequence[Sequence[Image.Image]] | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, in order; each image's generator is seeded with its own seed, so equal
    seeds give every prompt the same initial noise whatever the batch size.

    ``sources`` (edits): per pair, the source image(s) the editing pipeline's ``image`` receives (see the module
    docstring); consecutive pairs with the same instruction and sources are sampled together, up to ``batch_size``.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts and {len(seeds)} seeds; they are paired.")
    if sources is not None and len(sources) != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts and {len(sources)} source lists; they are paired.")
    parameters = inspect.signature(pipe.__call__).parameters
    keywords: dict[str, Any] = {}
    if settings.true_cfg_scale is not None:
        if "true_cfg_scale" not in parameters:
            raise ValueError(f"true_cfg_scale is set, but {type(pipe).__name__} takes none; leave it unset.")
        keywords["true_cfg_scale"] = settings.true_cfg_scale
    if "guidance_scale" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        keywords["guidance_scale"] = settings.guidance_scale
    elif settings.guidance_scale not in (None, 1.0):  # 1: no guidance, whichever kind a pipeline has
        raise ValueError(
            f"guidance_scale={settings.guidance_scale} is set, but {type(pipe).__name__} takes none (it guides with "
            "true_cfg_scale and a negative prompt): leave it unset or 1, or set true_cfg_scale."
        )
    # FLUX.2's pipelines take no negative prompt (FLUX.2 [klein] guides against an empty prompt itself).
    negative = "negative_prompt" in parameters
    if sources is not None:
        return _sample_edits(pipe, prompts, seeds, settings, batch_size, progress, description, sources, keywords)
    size = native_resolution(pipe)
    height, width = settings.height or size, settings.width or size
    images: list[Image.Image] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=description, unit="batch", disable=not progress):
        batch_prompts = list(prompts[start : start + batch_size])
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        if negative:
            keywords["negative_prompt"] = [settings.negative_prompt] * len(batch_prompts)
        output = pipe(
            prompt=batch_prompts,
            **keywords,
            num_inference_steps=settings.num_inference_steps,
            height=height,
            width=width,
            generator=generators,
            output_type="pil",
        )
        images += output.images
    return images


def _sample_edits(pipe, prompts, seeds, settings, batch_size, progress, description, sources, keywords):
    """`sample_images` for edits: one pipeline call per run of consecutive pairs sharing instruction and sources."""
    argument = source_argument(pipe, max(len(s) for s in sources))
    parameters = inspect.signature(pipe.__call__).parameters
    if "negative_prompt" in parameters:
        keywords["negative_prompt"] = settings.negative_prompt
    groups, start = [], 0
    while start < len(prompts):
        end = start + 1
        while (
            end < len(prompts)
            and end - start < batch_size
            and prompts[end] == prompts[start]
            and tuple(sources[end]) == tuple(sources[start])
        ):
            end += 1
        groups.append((start, end))
        start = end
    images: list[Image.Image] = []
    for start, end in tqdm(groups, desc=description, unit="edit", disable=not progress):
        edit_sources = list(sources[start])
        if not edit_sources:
            raise ValueError(f"The edit {prompts[start]!r} has no source image.")
        height, width = _edit_size(pipe, settings, edit_sources[0])
        if "max_area" in parameters:  # Kontext rescales height x width to max_area (1024^2) unless told this size
            keywords["max_area"] = height * width
        output = pipe(
            prompt=prompts[start],
            **{argument: edit_sources[0] if len(edit_sources) == 1 else edit_sources},
            **keywords,
            num_images_per_prompt=end - start,
            num_inference_steps=settings.num_inference_steps,
            height=height,
            width=width,
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:end]],
            output_type="pil",
        )
        images += output.images
    return images


class ImageCache:
    """PNG files under ``root/<model name>-<model identity>/<hash(prompt, seed, settings)>.png``, written atomically
    (a temporary file renamed into place) so an interrupted run never leaves a truncated image."""

    def __init__(self, root: str) -> None:
        self.root = root

    def folder(self, spec: ModelSpec, base: str) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.name)
        return os.path.join(self.root, f"{safe}-{spec.identity(base)}")

    def path(
        self,
        spec: ModelSpec,
        base: str,
        prompt: str,
        seed: int,
        settings: GenerationSettings,
        source_digest: str | None = None,
    ) -> str:
        """The PNG of one sample; an edit's name also hashes its sources' pixels (``source_digest``), so two sources
        with one instruction are two images (text-to-image names are unchanged)."""
        key = [prompt, int(seed), settings.key()] + ([source_digest] if source_digest else [])
        digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:20]
        return os.path.join(self.folder(spec, base), f"{digest}.png")

    def put(self, path: str, image: Image.Image) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        image.save(tmp, format="PNG")
        os.replace(tmp, path)

    def record(self, spec: ModelSpec, base: str, settings: GenerationSettings) -> None:
        """A human-readable ``model.json`` describing what the folder holds."""
        folder = self.folder(spec, base)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "model.json"), "w") as f:
            json.dump(
                {"name": spec.name, "base": base, "path": spec.path, "kind": spec.kind, "settings": asdict(settings)},
                f,
                indent=2,
            )


def split_edits(prompts: Sequence[str | EditPrompt]) -> tuple[list[str], list[EditPrompt] | None]:
    """The instructions of a prompt set and its edits (None for text-to-image); a set mixing both is refused."""
    edits = [p for p in prompts if isinstance(p, EditPrompt)]
    if edits and len(edits) != len(prompts):
        raise ValueError("A prompt set holds prompts (text-to-image) or edits (EditPrompt), not both.")
    if edits:
        return [e.prompt for e in edits], edits
    return [str(p) for p in prompts], None


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def generate_images(
    base: str,
    models: Sequence[ModelSpec],
    prompts: Sequence[str | EditPrompt],
    seeds: Sequence[int] = (0,),
    settings: GenerationSettings | None = None,
    cache_dir: str = "evaluation-images",
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Generate (or find in the cache) one image per (model, prompt, seed).

    Returns ``(paths, generated)``: ``paths[name]`` lists the PNG files in (prompt, seed) order, prompts outer;
    ``generated[name]`` counts the images made in this call. The base pipeline is loaded only if some image is
    missing, and a variant only if one of its own is. ``prompts`` may be edits (`~.prompts.EditPrompt`): their
    sources go to the editing pipeline (see the module docstring), which is checked before the first sample.
    ``progress``: tqdm bars, else a log line per model and per batch (:mod:`.progress`).
    """
    settings = settings or GenerationSettings()
    device = resolve_device(device)
    cache = ImageCache(cache_dir)
    texts, edits = split_edits(prompts)
    pairs = [(i, int(s)) for i in range(len(texts)) for s in seeds]
    names = [spec.name for spec in models]
    if len(set(names)) != len(names):
        raise ValueError(f"Model names must be unique, got {names}.")

    def digest(i: int) -> str | None:
        return edits[i].digest if edits else None

    paths = {
        spec.name: [cache.path(spec, base, texts[i], s, settings, digest(i)) for i, s in pairs] for spec in models
    }
    generated = dict.fromkeys(names, 0)
    most_sources = max((len(e.sources) for e in edits), default=1) if edits else 0
    needed = [spec for spec in models if not all(os.path.isfile(path) for path in paths[spec.name])]
    if needed:  # every name that will load, before the first (minutes for a large base) loads
        check_model_names(base, [spec for spec in needed if spec.kind != "base"])
    missing_total = sum(not os.path.isfile(path) for spec in models for path in paths[spec.name])
    note(
        f"{_count(len(models), 'model')} x {_count(len(texts), 'prompt')} x {_count(len(seeds), 'seed')} = "
        f"{_count(len(models) * len(pairs), 'image')}, "
        f"{missing_total} to generate ({len(models) * len(pairs) - missing_total} in {cache_dir})",
        progress,
    )
    base_pipe = None
    model_bar = tqdm(models, desc="models", unit="model", disable=not progress)
    for number, spec in enumerate(model_bar, start=1):
        missing = [k for k, path in enumerate(paths[spec.name]) if not os.path.isfile(path)]
        if not missing:
            note(f"model {number}/{len(models)} {spec.name}: its {len(pairs)} images are in the cache", progress)
            continue
        if base_pipe is None:
            note(f"loading the base pipeline {base}", progress)
            base_pipe = load_base_pipeline(base, settings, device)
            if edits:
                source_argument(base_pipe, most_sources)  # before any sample: can this pipeline edit these?
        cache.record(spec, base, settings)
        note(f"model {number}/{len(models)} {spec.name}: generating {len(missing)} of {len(pairs)} images", progress)
        with (
            variant_pipeline(base_pipe, spec, settings, device) as pipe,
            Progress(
                f"generating {spec.name}", len(missing), "images", progress, -(-len(missing) // batch_size)
            ) as bar,
        ):
            decoded: dict[int, list[Image.Image]] = {}
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                sources = None
                if edits:
                    decoded = {i: decoded.get(i) or edits[i].images() for i in {pairs[k][0] for k in chunk}}
                    sources = [decoded[pairs[k][0]] for k in chunk]
                images = sample_images(
                    pipe,
                    [texts[pairs[k][0]] for k in chunk],
                    [pairs[k][1] for k in chunk],
                    settings,
                    batch_size=len(chunk),
                    sources=sources,
                )
                for k, image in zip(chunk, images):
                    cache.put(paths[spec.name][k], image)
                generated[spec.name] += len(chunk)
                bar.update(len(chunk))
    return paths, generated
