"""The family registry: :func:`register_family` adds a :class:`~.base.ModelFamily` subclass, and
:func:`family_for_pipeline` picks the family of a pipeline by walking the registered families in order.

The built-in families register in the order specific before general (SD3, FLUX.1, SDXL, SD 1.x/2.x, then
Qwen-Image and Z-Image, see :mod:`trl_diffusion_sdpo.families`), and their :meth:`~.base.ModelFamily.matches` are
disjoint; a family registered later is tried after them, so it handles pipelines that none of them claims (a new
transformer class, say).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, TypeVar

from .base import ModelFamily

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = ["family_for_pipeline", "register_family", "registered_families"]

FamilyType = TypeVar("FamilyType", bound=type[ModelFamily])

_FAMILIES: list[type[ModelFamily]] = []


def register_family(family: FamilyType) -> FamilyType:
    """Class decorator: make ``family`` one of the families :func:`family_for_pipeline` picks from.

    The class must be a concrete :class:`~.base.ModelFamily` with a ``name`` no other registered family has and the
    ``pipeline_classes`` it handles. Registering the same class again is a no-op.
    """
    if not (isinstance(family, type) and issubclass(family, ModelFamily)):
        raise TypeError(f"register_family takes a ModelFamily subclass, got {family!r}")
    if inspect.isabstract(family):
        missing = ", ".join(sorted(family.__abstractmethods__))
        raise TypeError(f"{family.__name__} cannot be registered: it does not define {missing}")
    if not getattr(family, "name", None) or not getattr(family, "pipeline_classes", None):
        raise TypeError(f"{family.__name__} must set `name` and `pipeline_classes` (the pipelines it handles)")
    if family in _FAMILIES:
        return family
    for other in _FAMILIES:
        if other.name == family.name:
            raise ValueError(f"a family named {family.name!r} is already registered ({other.__qualname__})")
    _FAMILIES.append(family)
    return family


def registered_families() -> tuple[type[ModelFamily], ...]:
    """The registered families, in the order :func:`family_for_pipeline` tries them."""
    return tuple(_FAMILIES)


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
