"""Model families: what differs between pipelines (text encoders, the denoiser and its call, the noising).

A family wraps a diffusers pipeline behind :class:`ModelFamily` (see :mod:`.base` for the interface) and registers
itself with :func:`register_family`; :func:`family_for_pipeline` picks the registered family whose ``matches``
accepts a pipeline. Adding a family is one module: a :class:`ModelFamily` subclass (a :class:`FlowMatchingFamily`
for rectified-flow transformers, stating only the defaults where its model differs from the flow base's) decorated
with ``@register_family("name", pipelines=("SomePipeline",))``, imported below. UNet families: SD 1.x/2.x
(:mod:`.sd`), SDXL (:mod:`.sdxl`), noised by :class:`DDPMNoiser`. Flow-matching transformer families: SD3/SD3.5
(:mod:`.sd3`), FLUX.1 (:mod:`.flux`), Qwen-Image (:mod:`.qwen_image`), Z-Image (:mod:`.z_image`), Wan
text-to-video (:mod:`.wan`), FLUX.2 [dev] and [klein] (:mod:`.flux2`), noised by :class:`FlowNoiser` (:mod:`.flow`).
Editing families (``edits``: the denoiser also reads source images, see docs/editing.md): FLUX.1 Kontext
(:mod:`.flux_kontext`).
HunyuanVideo 1.5 text-to-video (:mod:`.hunyuan_video15`), a video flow family as Wan (:mod:`.video`).
Qwen-Image-Edit and Qwen-Image-Edit-Plus (:mod:`.qwen_image_edit`).
Qwen-Image 2.1 (:mod:`.qwen_image21`) is a flow family too, a subclass of the Qwen-Image family.

Importing this package imports no diffusers pipeline module: each family imports what it uses when it runs.
"""

from __future__ import annotations

from .base import ModelFamily, PromptEmbeddings, PromptTokenizer, scale_latents
from .flow import FlowMatchingFamily, FlowNoiser, FlowTimestepSampling
from .noising import DDPMNoiser, NoisedPair, Noiser
from .registry import family_for_pipeline, register_family, registered_families

# Registration order is the order family_for_pipeline tries them: specific before general.
from .sd3 import StableDiffusion3Family  # isort: skip
from .flux import FluxFamily  # isort: skip
from .flux_kontext import FluxKontextFamily  # isort: skip  (FLUX.1's components: told apart by the pipeline class)
from .sdxl import StableDiffusionXLFamily  # isort: skip
from .sd import StableDiffusionFamily  # isort: skip

# Transformers no family above claims (their matches are disjoint from the others'), so their place does not matter.
from .qwen_image import QwenImageFamily  # isort: skip
from .qwen_image_edit import QwenImageEditFamily, QwenImageEditPlusFamily  # isort: skip
from .qwen_image21 import QwenImage21Family  # isort: skip
from .z_image import ZImageFamily  # isort: skip
from .wan import WanFamily  # isort: skip
from .flux2 import Flux2Family, Flux2KleinFamily  # isort: skip
from .hunyuan_video15 import HunyuanVideo15Family  # isort: skip

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
    "family_for_pipeline",
    "register_family",
    "registered_families",
    "scale_latents",
]
