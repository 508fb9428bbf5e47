"""The family registry: :func:`register_family` adds a :class:`~.base.ModelFamily` subclass, and
:func:`family_for_pipeline` picks the family of a pipeline by walking the registered families in order.

A family is registered with its identity, as peft's ``register_peft_method(name=...)`` and transformers'
``AutoConfig.register(name, ...)`` take theirs: ``@register_family("qwen-image", pipelines=("QwenImagePipeline",))``
sets the class's ``name`` and ``pipeline_classes``. The bare ``@register_family`` registers a class that sets both
itself.

The built-in families register in the order specific before general (SD3, FLUX.1, SDXL, SD 1.x/2.x, then
Qwen-Image and Z-Image, see :mod:`trl_diffusion_sdpo.families`), and their :meth:`~.base.ModelFamily.matches` are
disjoint; a family registered later is tried after them, so it handles pipelines that none of them claims (a new
transformer class, say).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar, overload

from .base import ModelFamily

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "UNTRAINABLE_PIPELINES",
    "check_trainable",
    "family_for_pipeline",
    "pipeline_is",
    "register_family",
    "registered_families",
]

FamilyType = TypeVar("FamilyType", bound=type[ModelFamily])

_FAMILIES: list[type[ModelFamily]] = []


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
    _check_name_free(family, family.name)
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
    _check_name_free(family, name)
    family.name = name
    family.pipeline_classes = pipeline_classes
    return _append(family)


def _check_concrete(family: object) -> None:
    if not (isinstance(family, type) and issubclass(family, ModelFamily)):
        raise TypeError(f"register_family takes a ModelFamily subclass or a family name, got {family!r}")
    if inspect.isabstract(family):
        missing = ", ".join(sorted(family.__abstractmethods__))
        raise TypeError(f"{family.__name__} cannot be registered: it does not define {missing}")


def _check_name_free(family: type[ModelFamily], name: str) -> None:
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
    """The registered families, in the order :func:`family_for_pipeline` tries them."""
    return tuple(_FAMILIES)


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
    """The family of ``pipeline``: the first registered family whose ``matches`` accepts it (decided from the
    pipeline's components, not its class name, so subclasses work), after its own checks.

    ``max_sequence_length`` (T5 tokens) and ``guidance_scale`` (FLUX.1-dev's guidance embedding) apply to the flow
    families only; ``None`` keeps each family's default. A pipeline no family matches is refused with a ValueError
    listing every registered family and the pipelines it handles.
    """
    check_trainable(pipeline)
    for family in _FAMILIES:
        if family.matches(pipeline):
            family.check_pipeline(pipeline)
            return family.from_pipeline(
                pipeline, max_sequence_length=max_sequence_length, guidance_scale=guidance_scale
            )
    components = ", ".join(
        f"{name}={type(getattr(pipeline, name)).__name__}"
        for name in ("unet", "transformer")
        if getattr(pipeline, name, None) is not None
    )
    supported = "; ".join(f"{family.name}: {', '.join(family.pipeline_classes)}" for family in _FAMILIES)
    raise ValueError(
        f"{type(pipeline).__name__} ({components or 'no `unet` or `transformer`'}) is not a pipeline of any "
        f"registered family. Supported: {supported}. A new model family is a ModelFamily subclass registered with "
        "trl_diffusion_sdpo.families.register_family."
    )
