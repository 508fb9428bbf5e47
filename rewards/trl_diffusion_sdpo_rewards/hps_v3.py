"""HPSv3 (Ma et al., 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score", arXiv:2508.03789): a reward head
on the last hidden state of Qwen2-VL-7B-Instruct, read at a special ``<|Reward|>`` token placed after the prompt.

The reference (github.com/MizzenAI/HPSv3: ``hpsv3/model/qwen2vl_trainer.py`` ``Qwen2VLRewardModelBT``,
``hpsv3/inference.py``, ``hpsv3/dataset/data_collator_qwen.py``, config ``HPSv3_7B.yaml``) computes, per (image,
prompt):

* input: one user turn of Qwen2-VL's chat template holding the image, then ``INSTRUCTION.format(text_prompt=prompt)``
  followed by ``"\\nPlease provide the overall ratings of this image: <|Reward|>\\n\\nEND\\n"``, with the generation
  prompt; ``<|Reward|>`` is added to the tokenizer as a special token (the embedding matrix is resized to the
  tokenizer's length); right padding;
* image: resized by qwen-vl-utils' ``smart_resize`` with ``min_pixels = max_pixels = 256 * 28 * 28`` (a 1024x1024
  image becomes 448x448, 256 merged image tokens; PIL's default bicubic resize), then Qwen2-VL's image processor
  (rescale, CLIP mean/std, 14-pixel patches) with the base's own pixel range, as the reference's ``AutoProcessor``,
  so an image whose resize overshot ``max_pixels`` (a small one, through the ``min_pixels`` branch) is not resized
  again;
* backbone: the image embeddings are scattered into the ``<|image_pad|>`` positions and the language model runs with
  **sequential text positions** ``0..L-1`` on all three M-RoPE axes (the reference calls the decoder without
  ``image_grid_thw``, so Qwen2-VL's 3-D image positions are never computed; its checkpoint was trained that way);
* head (``rm_head_type: ranknet``, no ``rm_head_kwargs``), in float32 on the final-norm hidden state ``h``:
  ``Linear(d, 1024) -> ReLU -> Dropout(0.05) -> Linear(1024, 16) -> ReLU -> Linear(16, 2)``;
* output ``(mu, sigma)`` at the ``<|Reward|>`` position, from the uncertainty-aware ranking loss; the score is ``mu``
  (the reference's ``rewards[i][0]``).

This module rebuilds that forward on transformers' `Qwen2VLModel` (no ``trust_remote_code``, no torchvision: images
go through PIL and `Qwen2VLImageProcessorPil`; the chat template is the base tokenizer's own). Weights: the published
``HPSv3.safetensors`` (``MizzenAI/HPSv3``) holds the whole reward model's ``state_dict()``; both key layouts
transformers has used for Qwen2-VL are mapped (``visual.*`` / ``model.*`` before 4.52, ``model.visual.*`` /
``model.language_model.*`` after), ``lm_head`` is dropped (unused), and an unknown key raises. Only safetensors is
read: re-save a ``.pt``/``.pth`` training checkpoint once as safetensors (see docs/evaluation.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from PIL import Image

from .qwen_vl_reward import (
    REWARD_TOKEN,
    QwenVLRewardModel,
    QwenVLRewardScorer,
    RewardModelSpec,
    checkpoint_files,
    load_state,
    qwen_vl_resize,
    reward_head,
    to_transformers_keys,
)

__all__ = ["HPSV3_INSTRUCTION", "HPSv3Scorer", "hpsv3_to_transformers"]

HPSV3_REPO = "MizzenAI/HPSv3"
HPSV3_FILE = "HPSv3.safetensors"
HPSV3_BASE = "Qwen/Qwen2-VL-7B-Instruct"
# min_pixels = max_pixels = 256 * 28 * 28 (HPSv3_7B.yaml, inference.py): every image becomes about 200704 pixels.
HPSV3_PIXELS = 256 * 28 * 28

# The reference's prompt text (hpsv3/dataset/data_collator_qwen.py, INSTRUCTION and prompt_with_special_token, as
# its QWen2VLDataCollator sends them), verbatim: the trailing spaces and blank lines are part of what the checkpoint
# was trained on. Both the Visual Quality and the Text Alignment paragraphs precede the prompt.
HPSV3_INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 "
    "being the best. \n\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, "
    "but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.\n"
    "Textual prompt - {text_prompt}\n\n\n"
)
HPSV3_REWARD_SUFFIX = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"


def hps_v3_resize(image: Image.Image, min_pixels: int = HPSV3_PIXELS, max_pixels: int = HPSV3_PIXELS) -> Image.Image:
    """HPSv3's image preprocessing: :func:`~.qwen_vl_reward.qwen_vl_resize` (qwen-vl-utils' ``fetch_image``) into
    ``[min_pixels, max_pixels]``, 256 * 28 * 28 pixels by default."""
    return qwen_vl_resize(image, min_pixels, max_pixels)


_SPEC = RewardModelSpec(
    name="HPSv3",
    family="Qwen2-VL",
    config="Qwen2VLConfig",
    file=HPSV3_FILE,
    pickle_hint=".pt/.pth",
    save_as=HPSV3_FILE,
    missing_hint=f"expected {HPSV3_FILE}",
)
# The reference's head keys (rm_head.<index>.weight/bias); the backbone's are mapped by `to_transformers_keys`.
_HEAD_RULE = (re.compile(r"^rm_head\.(\d+\.(?:weight|bias))$"), r"head.\1")


def hpsv3_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the reference's ``Qwen2VLRewardModelBT.state_dict()`` keys to `HPSv3RewardModel`'s.

    Accepts both transformers layouts of Qwen2-VL (``visual.*``, ``model.layers.*`` before 4.52; ``model.visual.*``,
    ``model.language_model.*`` after) and a ``module.`` prefix; drops ``lm_head.weight`` (the reward never reads the
    LM head); raises ``KeyError`` on any other key, so another architecture fails loudly instead of loading partly.
    """
    return to_transformers_keys(state, _HEAD_RULE, _SPEC, "Qwen2-VL reward model")


class HPSv3RewardModel(QwenVLRewardModel):
    """`Qwen2VLModel` (vision tower + language model) and the float32 ``(mu, sigma)`` head."""

    name = _SPEC.name

    def __init__(self, config) -> None:
        from transformers import Qwen2VLModel

        super().__init__()
        self.config = config
        self.backbone = Qwen2VLModel(config)
        self.head = reward_head(config.text_config.hidden_size).float()

    @property
    def heads(self) -> tuple[torch.nn.Module]:
        """The one head (the checkpoint's ``rm_head``)."""
        return (self.head,)

    def positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sequential positions 0..L-1 on every M-RoPE axis, as the reference's forward produces (see module doc)."""
        rows, length = attention_mask.shape
        return torch.arange(length, device=attention_mask.device).expand(rows, -1)


class HPSv3Scorer(QwenVLRewardScorer):
    """HPSv3 score: ``mu`` of the reward head at the ``<|Reward|>`` token (see the module docstring).

    Args:
        checkpoint: ``HPSv3.safetensors`` (a file), a folder holding it (or sharded ``*.safetensors``), or a Hub
            repository id whose ``HPSv3.safetensors`` is downloaded (default ``MizzenAI/HPSv3``).
        base: folder or Hub id of ``Qwen/Qwen2-VL-7B-Instruct``: its ``config.json``, tokenizer (with its chat
            template) and ``preprocessor_config.json`` are read; its weights are not.
        dtype: backbone dtype (bfloat16 by default, as the reference); the head always runs in float32.
        min_pixels, max_pixels: the image area range (both 256 * 28 * 28 in the reference).
    """

    name = "hpsv3"
    scale = "mu of HPSv3's (mu, sigma) head, unbounded"

    def __init__(
        self,
        checkpoint: str = HPSV3_REPO,
        base: str = HPSV3_BASE,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.bfloat16,
        batch_size: int = 8,
        min_pixels: int = HPSV3_PIXELS,
        max_pixels: int = HPSV3_PIXELS,
    ) -> None:
        state = hpsv3_to_transformers(load_state(checkpoint_files(checkpoint, _SPEC)))
        super().__init__(
            _SPEC, state, checkpoint, base, HPSv3RewardModel, dtype, device, batch_size, min_pixels, max_pixels
        )

    def prompt_text(self, prompt: str) -> str:
        """The chat-formatted text for one prompt (one ``<|image_pad|>`` placeholder, before expansion)."""
        return self.chat_text(1, HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_REWARD_SUFFIX)

    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids, attention mask, pixel patches and image grids, as Qwen2-VL's processor builds them: the single
        ``<|image_pad|>`` is repeated ``t*h*w / merge_size**2`` times for its image's grid."""
        return self.model_inputs(images, [self.prompt_text(prompt) for prompt in prompts])

    @torch.no_grad()
    def mu_sigma(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """The head's ``(mu, sigma)`` per pair, shape ``(N, 2)``, float32 on the CPU."""
        return self.run_batches(lambda start, end: self.inputs(images[start:end], prompts[start:end]), len(images))

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return self.mu_sigma(images, prompts)[:, 0]
