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
  (rescale, CLIP mean/std, 14-pixel patches);
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

import math
import os
import re
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from .base import Scorer, resolve_device

__all__ = ["HPSV3_INSTRUCTION", "HPSV3_REWARD_SUFFIX", "HPSv3Scorer", "hps_v3_resize", "hpsv3_to_transformers"]

HPSV3_REPO = "MizzenAI/HPSv3"
HPSV3_FILE = "HPSv3.safetensors"
HPSV3_BASE = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
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
    """qwen-vl-utils' ``fetch_image``: RGB, then resize (PIL's default bicubic) to ``smart_resize``'s size, whose sides
    are multiples of 28 and whose area lies in ``[min_pixels, max_pixels]`` at about the image's aspect ratio:

    ``h, w = max(28, round(H/28)*28), max(28, round(W/28)*28)``; if ``h*w > max_pixels``:
    ``b = sqrt(H*W/max_pixels)``, ``h, w = floor(H/b/28)*28, floor(W/b/28)*28``; if ``h*w < min_pixels``:
    ``b = sqrt(min_pixels/(H*W))``, ``h, w = ceil(H*b/28)*28, ceil(W*b/28)*28``.
    """
    factor = 28
    image = image.convert("RGB")
    width, height = image.size
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return image.resize((w_bar, h_bar), Image.Resampling.BICUBIC)


def reward_head(hidden_size: int) -> nn.Sequential:
    """The reference's default ``ranknet`` head (indices 0, 3, 5 hold the weights, as in its state dict)."""
    return nn.Sequential(
        nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
    )


# (pattern, replacement) over the reference's state-dict keys, first match wins.
_KEY_RULES = (
    (re.compile(r"^model\.visual\.(.*)"), r"backbone.visual.\1"),
    (re.compile(r"^model\.language_model\.(.*)"), r"backbone.language_model.\1"),
    (re.compile(r"^visual\.(.*)"), r"backbone.visual.\1"),  # transformers < 4.52
    (re.compile(r"^model\.(embed_tokens|layers|norm|rotary_emb)(.*)"), r"backbone.language_model.\1\2"),  # < 4.52
    (re.compile(r"^rm_head\.(\d+\.(?:weight|bias))$"), r"head.\1"),
)
_DROPPED = {"lm_head.weight"}


def hpsv3_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the reference's ``Qwen2VLRewardModelBT.state_dict()`` keys to `HPSv3RewardModel`'s.

    Accepts both transformers layouts of Qwen2-VL (``visual.*``, ``model.layers.*`` before 4.52; ``model.visual.*``,
    ``model.language_model.*`` after) and a ``module.`` prefix; drops ``lm_head.weight`` (the reward never reads the
    LM head); raises ``KeyError`` on any other key, so another architecture fails loudly instead of loading partly.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in _DROPPED:
            continue
        for pattern, replacement in _KEY_RULES:
            if pattern.match(key):
                out[pattern.sub(replacement, key)] = value
                break
        else:
            raise KeyError(
                f"Unexpected HPSv3 checkpoint key {key!r}: not a Qwen2-VL reward model this scorer can map."
            )
    return out


class HPSv3RewardModel(nn.Module):
    """`Qwen2VLModel` (vision tower + language model) and the float32 ``(mu, sigma)`` head."""

    def __init__(self, config) -> None:
        from transformers import Qwen2VLModel

        super().__init__()
        self.config = config
        self.backbone = Qwen2VLModel(config)
        self.head = reward_head(config.text_config.hidden_size).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        reward_token_id: int,
    ) -> torch.Tensor:
        """``(mu, sigma)`` per row, shape ``(B, 2)``, read at each row's single ``<|Reward|>`` token."""
        # Sequential positions 0..L-1 on every M-RoPE axis, as the reference's forward produces (see module doc).
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            position_ids=positions,
            use_cache=False,
        ).last_hidden_state
        is_reward = input_ids == reward_token_id
        counts = is_reward.sum(-1)
        if not bool((counts == 1).all()):
            raise ValueError(f"Each HPSv3 input must hold exactly one {REWARD_TOKEN} token; counts {counts.tolist()}.")
        return self.head(hidden[is_reward].float())


def _checkpoint_file(checkpoint: str) -> list[str]:
    """The safetensors file(s) a checkpoint argument names: a file, a folder, or a Hub repository id."""
    if os.path.isfile(checkpoint):
        if not checkpoint.endswith(".safetensors"):
            raise ValueError(
                f"{checkpoint}: HPSv3 weights are read from safetensors only. Convert a trusted .pt/.pth once with "
                "safetensors.torch.save_file(torch.load(path, weights_only=True), 'HPSv3.safetensors')."
            )
        return [checkpoint]
    if os.path.isdir(checkpoint):
        named = os.path.join(checkpoint, HPSV3_FILE)
        if os.path.isfile(named):
            return [named]
        files = sorted(os.path.join(checkpoint, f) for f in os.listdir(checkpoint) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{checkpoint} holds no .safetensors file (expected {HPSV3_FILE}).")
        return files
    if checkpoint.count("/") == 1 and not os.path.exists(checkpoint):
        from huggingface_hub import hf_hub_download

        return [hf_hub_download(checkpoint, HPSV3_FILE)]
    raise FileNotFoundError(f"HPSv3 checkpoint {checkpoint!r} is neither a file, a folder nor a Hub repository id.")


def _load_state(files: Sequence[str]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    return state


class HPSv3Scorer(Scorer):
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
        from accelerate import init_empty_weights
        from transformers import AutoTokenizer, Qwen2VLConfig
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        state = hpsv3_to_transformers(_load_state(_checkpoint_file(checkpoint)))
        embeddings = state.get("backbone.language_model.embed_tokens.weight")
        if embeddings is None:
            raise ValueError(f"{checkpoint} has no token embedding (model.embed_tokens.weight); not an HPSv3 model.")

        self.tokenizer = AutoTokenizer.from_pretrained(base, padding_side="right")
        if self.tokenizer.chat_template is None:
            raise ValueError(f"The tokenizer in {base} has no chat template; HPSv3 reads Qwen2-VL's chat format.")
        # As the reference: <|Reward|> is a new special token right after the base vocabulary.
        self.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_token_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            base, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
        )

        config = Qwen2VLConfig.from_pretrained(base)
        # The reference resized the embeddings to len(tokenizer) with <|Reward|>; the weights say the size.
        config.text_config.vocab_size = embeddings.shape[0]
        if self.reward_token_id >= embeddings.shape[0]:
            raise ValueError(
                f"{REWARD_TOKEN} gets id {self.reward_token_id} from {base}'s tokenizer, outside the checkpoint's "
                f"{embeddings.shape[0]} embeddings: the tokenizer is not the one HPSv3 was trained with."
            )
        image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        if image_token_id != config.image_token_id:
            raise ValueError(
                f"{base}: tokenizer's <|image_pad|> is {image_token_id}, config's {config.image_token_id}."
            )
        with init_empty_weights(include_buffers=False):  # no 7B random initialisation: the checkpoint fills it
            model = HPSv3RewardModel(config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint} does not match {base}'s Qwen2-VL architecture: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}."
            )
        model.backbone.to(dtype)
        model.head.float()
        self.device = resolve_device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.batch_size = batch_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels

    def prompt_text(self, prompt: str) -> str:
        """The chat-formatted text for one prompt (one ``<|image_pad|>`` placeholder, before expansion)."""
        content = HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_REWARD_SUFFIX
        message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": content}]}]
        return self.tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)

    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids, attention mask, pixel patches and image grids, as Qwen2-VL's processor builds them: the single
        ``<|image_pad|>`` is repeated ``t*h*w / merge_size**2`` times for its image's grid."""
        resized = [hps_v3_resize(image, self.min_pixels, self.max_pixels) for image in images]
        vision = self.image_processor(images=resized, return_tensors="pt")
        merge = self.image_processor.merge_size**2
        texts = []
        for prompt, grid in zip(prompts, vision["image_grid_thw"]):
            text = self.prompt_text(prompt)
            texts.append(text.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // merge), 1))
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }

    @torch.no_grad()
    def mu_sigma(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """The head's ``(mu, sigma)`` per pair, shape ``(N, 2)``, float32 on the CPU."""
        outputs = []
        dtype = next(self.model.backbone.parameters()).dtype
        for start in range(0, len(images), self.batch_size):
            batch = self.inputs(images[start : start + self.batch_size], prompts[start : start + self.batch_size])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            outputs.append(self.model(**batch, reward_token_id=self.reward_token_id).float().cpu())
        return torch.cat(outputs)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return self.mu_sigma(images, prompts)[:, 0]
