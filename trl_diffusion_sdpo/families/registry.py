"""The family registry: :func:`register_family` adds a :class:`~.base.ModelFamily` subclass, and
:func:`family_for_pipeline` picks the family of a pipeline.

A family is registered with its identity, as peft's ``register_peft_method(name=...)`` and transformers'
``AutoConfig.register(name, ...)`` take theirs: ``@register_family("qwen-image", pipelines=("QwenImagePipeline",))``
sets the class's ``name`` and ``pipeline_classes``. The bare ``@register_family`` registers a class that sets both
itself.

The built-in families are known by name before their modules are imported (:data:`BUILT_IN_FAMILIES`: the family's
``"module:class"`` and the pipeline classes it handles, as diffusers' lazy modules name theirs): a pipeline's family
is looked up by the names of its class and its bases, and only that family's module is imported, so an SD run never
loads the video families. A pipeline whose class names no family (a pipeline assembled by hand) is matched from its
components: every family is then imported and tried in order, specific before general (SD3, FLUX.1, SDXL, SD
1.x/2.x, then the transformers no other claims), their :meth:`~.base.ModelFamily.matches` being disjoint; a family
registered by user code is tried after them, so it handles pipelines that none of them claims (a new transformer
class, say).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar, overload

from ..config._lazy import import_target
from .base import ModelFamily

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "BUILT_IN_FAMILIES",
    "UNTRAINABLE_PIPELINES",
    "check_trainable",
    "family_for_pipeline",
    "pipeline_is",
    "register_family",
    "registered_families",
]

FamilyType = TypeVar("FamilyType", bound=type[ModelFamily])

_FAMILIES: list[type[ModelFamily]] = []

# Built-in family name -> (``"module:class"``, the diffusers pipeline classes it handles), in the order
# family_for_pipeline tries them: specific before general. Each module registers its class under the same name and
# pipelines with ``@register_family`` (checked when it does).
_HERE = __name__.rpartition(".")[0]
BUILT_IN_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "stable-diffusion-3": (f"{_HERE}.sd3:StableDiffusion3Family", ("StableDiffusion3Pipeline",)),
    "flux": (f"{_HERE}.flux:FluxFamily", ("FluxPipeline",)),
    # FLUX.1's components: told apart from FLUX.1 by the pipeline class
    "flux-kontext": (f"{_HERE}.flux_kontext:FluxKontextFamily", ("FluxKontextPipeline",)),
    "stable-diffusion-xl": (f"{_HERE}.sdxl:StableDiffusionXLFamily", ("StableDiffusionXLPipeline",)),
    "stable-diffusion": (f"{_HERE}.sd:StableDiffusionFamily", ("StableDiffusionPipeline",)),
    # transformers no family above claims (their matches are disjoint from the others'): their place does not matter
    "qwen-image": (f"{_HERE}.qwen_image:QwenImageFamily", ("QwenImagePipeline",)),
    "qwen-image-edit": (f"{_HERE}.qwen_image_edit:QwenImageEditFamily", ("QwenImageEditPipeline",)),
    "qwen-image-edit-plus": (f"{_HERE}.qwen_image_edit:QwenImageEditPlusFamily", ("QwenImageEditPlusPipeline",)),
    "qwen-image-2.1": (f"{_HERE}.qwen_image21:QwenImage21Family", ("QwenImage21Pipeline",)),
    "z-image": (f"{_HERE}.z_image:ZImageFamily", ("ZImagePipeline",)),
    "wan": (f"{_HERE}.wan:WanFamily", ("WanPipeline",)),
    "flux2": (f"{_HERE}.flux2:Flux2Family", ("Flux2Pipeline",)),
    "flux2-klein": (f"{_HERE}.flux2:Flux2KleinFamily", ("Flux2KleinPipeline",)),
    "hunyuan-video-1.5": (f"{_HERE}.hunyuan_video15:HunyuanVideo15Family", ("HunyuanVideo15Pipeline",)),
}


@overload
def register_family(family: FamilyType, /) -> FamilyType: ...


@overload
def register_family(name: str, /, *, pipelines: Sequence[str]) -> Callable[[FamilyType], FamilyType]: ...


def register_family(
    family_or_name: FamilyType | str, /, *, pipelines: Sequence[str] | None = None
) -> FamilyType | Callable[[FamilyType], FamilyType]:
    """Class decorator: make a family one of the families :func:`family_for_pipeline` picks from.

    ``@register_family(name, pipelines=(...))`` sets the class's ``name`` and ``pipeline_classes`` (the diffusers
    pipeline classes it handles, by name) in the class's own namespace, so a subclass of a registered family gets its
    own and leaves its parent's alone. Bare ``@register_family`` registers a class that sets both itself.

    The class must be a concrete :class:`~.base.ModelFamily` whose name no other registered family has. Registering
    the same class again is a no-op; registering a class under another name or pipelines than it states is refused.
    """
    if isinstance(family_or_name, str):
        name = family_or_name
        if not name:
            raise ValueError("register_family needs a non-empty family name")
        if isinstance(pipelines, str) or not pipelines or not all(isinstance(p, str) and p for p in pipelines):
            raise TypeError(
                f"register_family({name!r}, pipelines=...) takes a non-empty sequence of pipeline class names, got "
                f"{pipelines!r}"
            )
        return lambda family: _register(family, name, tuple(pipelines))
    if pipelines is not None:
        raise TypeError("`pipelines` goes with the family's name: @register_family(name, pipelines=(...))")
    family = family_or_name
    _check_concrete(family)
    if not getattr(family, "name", None) or not getattr(family, "pipeline_classes", None):
        raise TypeError(
            f"{family.__name__} must set `name` and `pipeline_classes` (the pipelines it handles), or be registered "
            "with them: @register_family(name, pipelines=(...))"
        )
    _check_name_free(family, family.name, tuple(family.pipeline_classes))
    return _append(family)


def _register(family: FamilyType, name: str, pipeline_classes: tuple[str, ...]) -> FamilyType:
    """The named form: check ``family``, then set its identity (on the class itself) and register it."""
    _check_concrete(family)
    own = vars(family)  # not inherited: a subclass of a registered family states nothing yet
    stated = (own.get("name", name), tuple(own.get("pipeline_classes", pipeline_classes)))
    if stated != (name, pipeline_classes):
        raise ValueError(
            f"{family.__name__} states name={stated[0]!r}, pipeline_classes={stated[1]!r} and is registered as "
            f"{name!r} with {pipeline_classes!r}: give them in register_family only"
        )
    _check_name_free(family, name, pipeline_classes)
    family.name = name
    family.pipeline_classes = pipeline_classes
    return _append(family)


def _check_concrete(family: object) -> None:
    if not (isinstance(family, type) and issubclass(family, ModelFamily)):
        raise TypeError(f"register_family takes a ModelFamily subclass or a family name, got {family!r}")
    if inspect.isabstract(family):
        missing = ", ".join(sorted(family.__abstractmethods__))
        raise TypeError(f"{family.__name__} cannot be registered: it does not define {missing}")


def _check_name_free(family: type[ModelFamily], name: str, pipeline_classes: tuple[str, ...]) -> None:
    """Refuse a name another family has, a built-in one whose module is not imported yet included; a built-in
    family registers with the pipelines :data:`BUILT_IN_FAMILIES` names for it (their lookup reads the table)."""
    if name in BUILT_IN_FAMILIES:
        target, pipelines = BUILT_IN_FAMILIES[name]
        if target != f"{family.__module__}:{family.__qualname__}":
            raise ValueError(f"a family named {name!r} is already registered ({target.partition(':')[2]}, built in)")
        if pipeline_classes != pipelines:
            raise ValueError(
                f"{family.__qualname__} registers pipelines {pipeline_classes!r}, but BUILT_IN_FAMILIES gives "
                f"{name!r} {pipelines!r}: state the same in both"
            )
    for other in _FAMILIES:
        if other is not family and other.name == name:
            raise ValueError(f"a family named {name!r} is already registered ({other.__qualname__})")


def _append(family: FamilyType) -> FamilyType:
    if family not in _FAMILIES:
        _FAMILIES.append(family)
    return family


def pipeline_is(pipeline: object, *names: str) -> bool:
    """Whether ``pipeline`` is an instance of one of the diffusers pipeline classes ``names`` (or of a subclass):
    for pipelines whose components are the same and only the class tells them apart (FLUX.1 and FLUX.1 Kontext)."""
    return any(cls.__name__ in names for cls in type(pipeline).__mro__)


def registered_families() -> tuple[type[ModelFamily], ...]:
    """Every registered family, the built-in ones imported, in the order :func:`family_for_pipeline` tries them on a
    pipeline whose class names none: the built-in families in :data:`BUILT_IN_FAMILIES`' order, then the others in
    the order they were registered."""
    for name in BUILT_IN_FAMILIES:
        _built_in(name)
    return tuple(sorted(_FAMILIES, key=_order))


def _built_in(name: str) -> type[ModelFamily]:
    """The built-in family ``name``, its module imported (which registers it)."""
    return import_target(BUILT_IN_FAMILIES[name][0])


def _order(family: type[ModelFamily]) -> int:
    """Where ``family`` is tried: a built-in family at its place in the table, the others after them."""
    names = list(BUILT_IN_FAMILIES)
    return names.index(family.name) if family.name in BUILT_IN_FAMILIES else len(names) + _FAMILIES.index(family)


def _named_families(pipeline: object) -> list[type[ModelFamily]]:
    """The families that name ``pipeline``'s class or one of its bases among their pipeline classes (a built-in
    one's module imported), in the order they are tried."""
    classes = {cls.__name__ for cls in type(pipeline).__mro__}
    for name, (_, pipelines) in BUILT_IN_FAMILIES.items():
        if classes.intersection(pipelines):
            _built_in(name)
    return [family for family in sorted(_FAMILIES, key=_order) if classes.intersection(family.pipeline_classes)]


# Pipelines whose denoiser takes conditioning the families do not build (source-image, mask or control latents beside
# the noisy ones): a family's ``matches`` accepts them by their components, and their first forward pass would fail.
UNTRAINABLE_PIPELINES: dict[str, str] = {
    "FluxKontextInpaintPipeline": "an editing pipeline (source image and mask latents beside the target's)",
    "FluxFillPipeline": "an inpainting pipeline: its transformer takes masked-image and mask latents as channels",
    "FluxControlPipeline": "a control pipeline: its transformer takes control-image latents as extra channels",
    "FluxControlImg2ImgPipeline": "a control pipeline (control-image latents as extra channels)",
    "FluxControlInpaintPipeline": "a control pipeline (control-image and mask latents as extra channels)",
    "QwenImageEditInpaintPipeline": "an editing pipeline (source image and mask)",
    "HunyuanVideo15ImageToVideoPipeline": "an image-to-video pipeline: its transformer reads the first frame's "
    "latents and SigLIP image embeddings beside the text (text-to-video weights train as HunyuanVideo15Pipeline)",
}


def check_trainable(pipeline: DiffusionPipeline) -> None:
    """Refuse, by name and reason, a pipeline whose denoiser takes inputs the families do not build: the editing,
    fill and control pipelines of :data:`UNTRAINABLE_PIPELINES` (and their subclasses), and a UNet with more input
    channels than the VAE's latents (SD inpainting's 9-channel UNet: latents, mask, masked-image latents)."""
    for cls in type(pipeline).__mro__:
        if cls.__name__ in UNTRAINABLE_PIPELINES:
            raise ValueError(
                f"{type(pipeline).__name__} is {UNTRAINABLE_PIPELINES[cls.__name__]}; preference tuning of such "
                "pipelines is not supported. Instruction editing trains with the editing pipelines (e.g. "
                "FluxKontextPipeline, see docs/editing.md); to tune the text-to-image behaviour of the same weights, "
                "load them with the text-to-image pipeline (e.g. FluxPipeline, QwenImagePipeline)."
            )
    unet, vae = getattr(pipeline, "unet", None), getattr(pipeline, "vae", None)
    if unet is not None and vae is not None:
        channels, latent = unet.config.in_channels, getattr(vae.config, "latent_channels", None)
        if latent is not None and channels != latent:
            raise ValueError(
                f"{type(pipeline).__name__}'s UNet takes {channels} input channels but the VAE's latents have "
                f"{latent}: an inpainting or conditioned UNet (mask and masked-image latents beside the noisy ones), "
                "which this trainer does not build inputs for. Use a text-to-image checkpoint."
            )


def family_for_pipeline(
    pipeline: DiffusionPipeline,
    *,
    max_sequence_length: int | None = None,
    guidance_scale: float | None = None,
) -> ModelFamily:
    """The family of ``pipeline``: the first family whose ``matches`` accepts it (decided from the pipeline's
    components, so subclasses work), after its own checks. The families that name the pipeline's class (or a base)
    are asked first, importing no other family's module; a pipeline whose class names none is asked of every family
    in :func:`registered_families`' order.

    ``max_sequence_length`` (T5 tokens) and ``guidance_scale`` (FLUX.1-dev's guidance embedding) apply to the flow
    families only; ``None`` keeps each family's default. A pipeline no family matches is refused with a ValueError
    listing every registered family and the pipelines it handles.
    """
    check_trainable(pipeline)
    family = next((family for family in _named_families(pipeline) if family.matches(pipeline)), None)
    if family is None:  # a pipeline assembled under a class no family names: every family is asked
        family = next((family for family in registered_families() if family.matches(pipeline)), None)
    if family is not None:
        family.check_pipeline(pipeline)
        return family.from_pipeline(pipeline, max_sequence_length=max_sequence_length, guidance_scale=guidance_scale)
    components = ", ".join(
        f"{name}={type(getattr(pipeline, name)).__name__}"
        for name in ("unet", "transformer")
        if getattr(pipeline, name, None) is not None
    )
    supported = "; ".join(f"{family.name}: {', '.join(family.pipeline_classes)}" for family in registered_families())
    raise ValueError(
        f"{type(pipeline).__name__} ({components or 'no `unet` or `transformer`'}) is not a pipeline of any "
        f"registered family. Supported: {supported}. A new model family is a ModelFamily subclass registered with "
        "trl_diffusion_sdpo.families.register_family."
    )
