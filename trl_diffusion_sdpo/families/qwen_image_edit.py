"""Qwen-Image-Edit and Qwen-Image-Edit-Plus (2509): Qwen-Image's transformer editing source images that condition it
twice, through the vision-language prompt encoding and as latents concatenated after the target's.

Followed: diffusers' ``QwenImageEditPipeline`` and ``QwenImageEditPlusPipeline``
(``pipelines/qwenimage/pipeline_qwenimage_edit.py`` and ``pipeline_qwenimage_edit_plus.py``, diffusers 0.42).

* Text and images, as ``_get_qwen_prompt_embeds``: each source is resized to the pipeline's condition size
  (``calculate_dimensions`` of the image's aspect ratio at 1024^2 pixels for Edit, ``CONDITION_IMAGE_SIZE`` = 384^2
  for Plus; the training sources are square, so 1024 x 1024 and 384 x 384), the instruction goes into the pipeline's
  template (``prompt_template_encode``: Edit's user turn opens with one image placeholder; Plus puts
  ``"Picture k: <|vision_start|><|image_pad|><|vision_end|>"`` for each of its images before the instruction), the
  pipeline's Qwen2-VL ``processor`` expands each placeholder into the image's vision tokens and makes its patches,
  and Qwen2.5-VL (vision tower included) runs with the attention mask. The LAST hidden state is kept without the
  template's first ``prompt_template_encode_start_idx`` (64) tokens: the kept sequence starts with the images' tokens,
  then the instruction. As for Qwen-Image (:mod:`.qwen_image`) it is zero-padded to a fixed length and the mask is
  recovered from the zero rows at the call.
* Sources: the VAE posterior's mode, normalised per channel as the targets (the pipelines' ``_encode_vae_image``
  with ``sample_mode="argmax"``; :meth:`~.base.ModelFamily.encode_sources` through Qwen-Image's frame axis).
* The call: the target's packed 2x2 patches, then each source's, in one sequence
  (``torch.cat([latents, image_latents], dim=1)``), ``img_shapes`` listing the target then each source, and the
  prediction cut to the target's tokens (``noise_pred[:, : latents.size(1)]``): :meth:`.QwenImageFamily.call_denoiser`.
* Noise levels: Qwen-Image's, shifted for the target's tokens only (the pipelines' ``image_seq_len``).

What differs from the pipelines, because training batches square crops at one resolution ``R``:

* the sources reach the VAE at ``R x R``, centre-cropped as the edited images, or at ``source_resolution``; the
  pipelines encode them at about 1024^2 pixels at their own aspect ratio (the same for a square source when
  ``R = 1024``), and have no setting that keeps another size: training warns at start where the sizes differ
  (:meth:`~.editing.SourceConditioning.configure_sources`);
* the vision encoder sees the same central square of each source, resized to the pipeline's condition size for a
  square; the pipelines resize the whole source at its aspect ratio.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image

from .base import PromptTokenizer
from .editing import SourceConditioning
from .qwen_image import QwenImageFamily
from .registry import pipeline_is, register_family

__all__ = ["QwenImageEditFamily", "QwenImageEditPlusFamily", "QwenImageEditPromptTokenizer"]

# The pixel area of the image the vision encoder reads: QwenImageEditPipeline.__call__ resizes its image to 1024^2
# pixels (for the VAE too); QwenImageEditPlusPipeline to CONDITION_IMAGE_SIZE, 384^2 (and to 1024^2 for the VAE).
_EDIT_CONDITION_AREA = 1024 * 1024
_PLUS_CONDITION_AREA = 384 * 384
# The pixel area of the image the VAE encodes, in both pipelines (Plus: VAE_IMAGE_SIZE).
_VAE_AREA = 1024 * 1024
# QwenImageEditPlusPipeline._get_qwen_prompt_embeds labels each image so in the user turn.
_PLUS_IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def central_square(image: Image.Image) -> Image.Image:
    """The central square of ``image``: the part of it the training crop keeps (resize the shorter side, then crop
    the centre)."""
    width, height = image.size
    side = min(width, height)
    left, top = round((width - side) / 2), round((height - side) / 2)
    return image if width == height else image.crop((left, top, left + side, top + side))


class QwenImageEditPromptTokenizer(PromptTokenizer):
    """Tokenises instructions with their source images as the edit pipelines' ``_get_qwen_prompt_embeds`` does:
    ``tokenize(prompts, sources)`` with ``sources`` the decoded images of each prompt (the same number per prompt).
    Its ``tokenizers`` and ``max_lengths`` (the longest, with the most sources) and :attr:`vision_settings` are what
    the latent cache's fingerprint reads.

    Returns ``input_ids [B, L]`` (the template's prefix, each image's vision tokens, then the instruction, padded to
    ``template_start + S * vision_tokens + max_sequence_length``), ``prompt_pixel_values [B, S * P, D]`` (each image's
    ``P`` patches) and ``prompt_image_grid_thw [B, S, 3]``. ``max_sequence_length`` counts the instruction and the
    text around the images; a longer instruction is cut at its end, as Qwen-Image's prompts are.
    """

    reads_sources = True

    def __init__(
        self,
        processor: Any,
        resize: Any,
        template: str,
        image_prompt: str,
        template_start: int,
        condition_size: tuple[int, int],
        vision_tokens: int,
        max_sequence_length: int,
        max_sources: int,
    ) -> None:
        length = template_start + max_sources * vision_tokens + max_sequence_length
        super().__init__({"input_ids": processor.tokenizer}, {"input_ids": length})
        self.processor = processor
        self.resize = resize  # the pipeline's VaeImageProcessor.resize (PIL, Lanczos)
        self.template, self.image_prompt = template, image_prompt
        self.template_start, self.condition_size = template_start, condition_size
        self.vision_tokens = vision_tokens
        self.max_sequence_length, self.max_sources = max_sequence_length, max_sources

    @property
    def vision_settings(self) -> dict[str, Any]:
        """What the encoding of the images depends on besides the encoder: the image processor's settings, the
        condition size and the prompt's template and image labels."""
        return {
            "image_processor": self.processor.image_processor.to_dict(),
            "condition_size": list(self.condition_size),
            "template": self.template,
            "image_prompt": self.image_prompt,
        }

    def condition_image(self, image: Image.Image) -> Image.Image:
        """What the vision encoder sees of a source: its central square at the pipeline's condition size."""
        height, width = self.condition_size
        return self.resize(central_square(image.convert("RGB")), height, width)

    def __call__(self, prompts: list[str], sources: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        counts = {len(images) for images in sources}
        if len(sources) != len(prompts) or len(counts) != 1:
            raise ValueError(
                f"{len(prompts)} prompts with source lists of {sorted(counts)} images: every prompt of a batch needs "
                "its sources, the same number for each"
            )
        (count,) = counts
        if not 1 <= count <= self.max_sources:
            raise ValueError(f"{count} source images per prompt; this pipeline takes 1 to {self.max_sources}")
        labels = "".join(self.image_prompt.format(k + 1) for k in range(count))
        out = self.processor(
            text=[self.template.format(labels + prompt) for prompt in prompts],
            images=[self.condition_image(image) for images in sources for image in images],
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        # Cut each row at its end (the instruction's last tokens, then the closing turn) or pad it to one length;
        # the processor's own truncation would refuse rows it cuts, as it checks the image tokens before cutting.
        length = self.template_start + count * self.vision_tokens + self.max_sequence_length
        ids = out["input_ids"][:, :length]
        ids = torch.nn.functional.pad(ids, (0, length - ids.shape[1]), value=self.processor.tokenizer.pad_token_id)
        kept = ids.eq(self.processor.image_token_id).sum(1)
        if bool(kept.ne(count * self.vision_tokens).any()):
            raise ValueError(
                f"max_sequence_length={self.max_sequence_length} leaves no room for the images' tokens: it counts the "
                "text around the images too (their labels and vision markers) and the instruction; raise it"
            )
        batch = len(prompts)
        return {
            "input_ids": ids,
            "prompt_pixel_values": out["pixel_values"].reshape(batch, -1, out["pixel_values"].shape[-1]),
            "prompt_image_grid_thw": out["image_grid_thw"].reshape(batch, count, 3),
        }


@register_family("qwen-image-edit", pipelines=("QwenImageEditPipeline",))
class QwenImageEditFamily(SourceConditioning, QwenImageFamily):
    """Qwen-Image-Edit (``QwenImageEditPipeline``): instruction editing of one source image."""

    edits = True
    max_sources = 1
    prompt_reads_sources = True
    # DiffSynth-Studio (the Qwen team's ModelScope trainer) trains Qwen-Image-Edit LoRAs at 1e-4.
    default_learning_rate = 1e-4
    learning_rate_source = (
        "DiffSynth-Studio's Qwen-Image-Edit LoRA script (examples/qwen_image/model_training/lora/Qwen-Image-Edit.sh, "
        "1e-4)"
    )
    # The pixel area the pipeline resizes each source to for the prompt encoding, and how it labels each image in the
    # user turn ("": the template holds the one image's placeholder).
    condition_area: ClassVar[int] = _EDIT_CONDITION_AREA
    image_prompt: ClassVar[str] = ""

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        """A Qwen-Image transformer in this family's pipeline class (or a subclass): the edit pipelines' components
        are the same, their class tells them apart."""
        return super(QwenImageFamily, cls).matches(pipeline) and pipeline_is(pipeline, *cls.pipeline_classes)

    @classmethod
    def check_pipeline(cls, pipeline: Any) -> None:
        missing = [name for name in ("text_encoder", "processor") if getattr(pipeline, name, None) is None]
        if missing:
            raise ValueError(
                f"{type(pipeline).__name__} needs its Qwen2.5-VL `text_encoder` and Qwen2-VL `processor` for "
                f"training (missing: {', '.join(missing)})"
            )

    # ------------------------------------------------------------------------------------------ the text and images

    def pipeline_source_size(self, width: int, height: int) -> tuple[int, int]:
        """As the edit pipelines size the image their VAE encodes: ``calculate_dimensions(1024 * 1024, width /
        height)`` (Plus: its ``VAE_IMAGE_SIZE``, the same area), sides rounded to 32."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        width, height = calculate_dimensions(_VAE_AREA, width / height)[:2]
        return int(width), int(height)

    @property
    def condition_size(self) -> tuple[int, int]:
        """``(height, width)`` of the image the vision encoder reads for a square source (the pipeline's
        ``calculate_dimensions(condition_area, 1.0)``)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        width, height = calculate_dimensions(self.condition_area, 1.0)[:2]
        return int(height), int(width)

    @property
    def vision_tokens(self) -> int:
        """The vision tokens of one condition image: the processor's patches, merged by ``merge_size`` squared."""
        image_processor = self.pipeline.processor.image_processor
        patches = image_processor.get_number_of_image_patches(*self.condition_size, {})
        return int(patches) // int(image_processor.merge_size) ** 2

    @property
    def prompt_length(self) -> int:
        """The kept tokens of the most sources a pair may have, plus ``max_sequence_length`` for the text: every
        batch's embeddings have this length (the latent cache stores them at one shape)."""
        return self.max_sources * self.vision_tokens + self.max_sequence_length

    def prompt_tokenizer(self) -> QwenImageEditPromptTokenizer:
        return QwenImageEditPromptTokenizer(
            self.pipeline.processor,
            self.pipeline.image_processor.resize,
            self.pipeline.prompt_template_encode,
            self.image_prompt,
            self._template_start,
            self.condition_size,
            self.vision_tokens,
            self.max_sequence_length,
            self.max_sources,
        )

    @property
    def pad_token_id(self) -> int:
        """The processor's tokenizer made the tokens."""
        return self.pipeline.processor.tokenizer.pad_token_id

    def _vision_inputs(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sources' patches and grids, flattened over the batch as the processor makes them for one call."""
        encoder = self.pipeline.text_encoder
        pixels = tokens["prompt_pixel_values"]
        return {
            "pixel_values": pixels.flatten(0, 1).to(device=encoder.device, dtype=encoder.dtype),
            "image_grid_thw": tokens["prompt_image_grid_thw"].flatten(0, 1).to(encoder.device),
        }

    # -------------------------------------------------------------------------------------------- the prediction


@register_family("qwen-image-edit-plus", pipelines=("QwenImageEditPlusPipeline",))
class QwenImageEditPlusFamily(QwenImageEditFamily):
    """Qwen-Image-Edit-Plus (``QwenImageEditPlusPipeline``, Qwen-Image-Edit-2509 and later): instruction editing of
    one to three source images, each labelled "Picture k" in the prompt."""

    # The pipeline takes any number; Qwen-Image-Edit-2509's model card gives its best results for 1 to 3 images.
    max_sources = 3
    learning_rate_source = (
        "DiffSynth-Studio's Qwen-Image-Edit-2509 LoRA script "
        "(examples/qwen_image/model_training/lora/Qwen-Image-Edit-2509.sh, 1e-4)"
    )
    condition_area = _PLUS_CONDITION_AREA
    image_prompt = _PLUS_IMAGE_PROMPT
