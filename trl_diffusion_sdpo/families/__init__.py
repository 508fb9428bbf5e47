"""Model families: what differs between pipelines (text encoders, the denoiser and its call, the noising).

A family wraps a diffusers pipeline behind :class:`ModelFamily` (see :mod:`.base` for the interface) and registers
itself with :func:`register_family`; :func:`family_for_pipeline` picks the family of a pipeline (:mod:`.registry`).
Adding a family is one module: a :class:`ModelFamily` subclass (a :class:`FlowMatchingFamily` for rectified-flow
transformers, stating only the defaults where its model differs from the flow base's) decorated with
``@register_family("name", pipelines=("SomePipeline",))``; a built-in one is also named in
:data:`~.registry.BUILT_IN_FAMILIES`, which imports its module when a pipeline of its class is trained. UNet
families: SD 1.x/2.x (:mod:`.sd`), SDXL (:mod:`.sdxl`), noised by :class:`DDPMNoiser`. Flow-matching transformer
families: SD3/SD3.5 (:mod:`.sd3`), FLUX.1 (:mod:`.flux`), Qwen-Image (:mod:`.qwen_image`), Z-Image (:mod:`.z_image`),
Wan text-to-video (:mod:`.wan`), FLUX.2 [dev] and [klein] (:mod:`.flux2`), noised by :class:`FlowNoiser`
(:mod:`.flow`). Editing families (``edits``: the denoiser also reads source images, see docs/editing.md; what they
share in :mod:`.editing`): FLUX.1 Kontext (:mod:`.flux_kontext`), Qwen-Image-Edit and Qwen-Image-Edit-Plus
(:mod:`.qwen_image_edit`), and FLUX.2 with reference images. HunyuanVideo 1.5 text-to-video (:mod:`.hunyuan_video15`),
a video flow family as Wan (:mod:`.video`). Qwen-Image 2.1 (:mod:`.qwen_image21`) is a flow family too, a subclass
of the Qwen-Image family.

Importing this package imports the interface, the DDPM noising and the registry; each family's module (and the flow
base, and :mod:`.quantization` for a quantized base) is imported when it is used, a family's class here resolving on
first access, and each family imports the diffusers modules it uses when it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config._lazy import lazy_attributes
from .base import ModelFamily, PromptEmbeddings, PromptTokenizer, is_quantized, scale_latents
from .noising import DDPMNoiser, NoisedPair, Noiser
from .registry import BUILT_IN_FAMILIES, family_for_pipeline, register_family, registered_families

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from .flow import FlowMatchingFamily, FlowNoiser, FlowTimestepSampling
    from .flux import FluxFamily
    from .flux2 import Flux2Family, Flux2KleinFamily
    from .flux_kontext import FluxKontextFamily
    from .hunyuan_video15 import HunyuanVideo15Family
    from .quantization import cast_unquantized, check_engine_supports_quantized_base, check_quantized_base_training
    from .qwen_image import QwenImageFamily
    from .qwen_image21 import QwenImage21Family
    from .qwen_image_edit import QwenImageEditFamily, QwenImageEditPlusFamily
    from .sd import StableDiffusionFamily
    from .sd3 import StableDiffusion3Family
    from .sdxl import StableDiffusionXLFamily
    from .wan import WanFamily
    from .z_image import ZImageFamily

# Public name -> the module that defines it, imported when the name is first used: the flow base, what only a
# quantized base needs, and each built-in family's class by its module in the registry's table.
_EXPORTS = {
    "FlowMatchingFamily": ".flow",
    "FlowNoiser": ".flow",
    "FlowTimestepSampling": ".flow",
    "cast_unquantized": ".quantization",
    "check_engine_supports_quantized_base": ".quantization",
    "check_quantized_base_training": ".quantization",
    **{target.partition(":")[2]: target.partition(":")[0] for target, _ in BUILT_IN_FAMILIES.values()},
}

__all__ = [
    "DDPMNoiser",
    "FlowMatchingFamily",
    "FlowNoiser",
    "FlowTimestepSampling",
    "Flux2Family",
    "Flux2KleinFamily",
    "FluxFamily",
    "FluxKontextFamily",
    "HunyuanVideo15Family",
    "ModelFamily",
    "NoisedPair",
    "Noiser",
    "PromptEmbeddings",
    "PromptTokenizer",
    "QwenImageEditFamily",
    "QwenImageEditPlusFamily",
    "QwenImage21Family",
    "QwenImageFamily",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "WanFamily",
    "ZImageFamily",
    "cast_unquantized",
    "check_engine_supports_quantized_base",
    "check_quantized_base_training",
    "family_for_pipeline",
    "is_quantized",
    "register_family",
    "registered_families",
    "scale_latents",
]

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
