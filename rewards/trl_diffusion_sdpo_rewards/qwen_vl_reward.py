"""Shared plumbing of the Qwen-VL reward scorers (HPSv3 on Qwen2-VL, EditReward on Qwen2.5-VL): a reward model is a
Qwen-VL backbone whose final-norm hidden state at a special ``<|Reward|>`` token feeds small float32 heads.

What is the same for both: the checkpoint's safetensors files, its keys renamed to transformers' layout, the
tokenizer with ``<|Reward|>`` added, the base's image processor, the backbone built without random initialisation
and filled from the checkpoint, the images resized as qwen-vl-utils does, the chat-formatted texts, the prompts'
``<|image_pad|>`` expanded to each image's grid, the hidden state read at ``<|Reward|>`` by a head, the batches and
the models a scorer names (:class:`QwenVLRewardModel`, :class:`QwenVLRewardScorer`). What differs (backbone class,
heads, prompts, positions, how ``mu`` is aggregated) stays in each scorer's module.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from trl_diffusion_sdpo.rewards.scorers.base import Scorer, arguments_with_defaults, resolve_device

__all__: list[str] = []  # nothing here is imported by users; the package imports its names directly

REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
_EXPANDED_PAD = "<|placeholder|>"  # stands in for an expanded <|image_pad|> until every placeholder is expanded
EMBEDDINGS_KEY = "backbone.language_model.embed_tokens.weight"

# (pattern, replacement) over the references' backbone keys, both transformers layouts of Qwen2-VL and Qwen2.5-VL.
_BACKBONE_KEY_RULES = (
    (re.compile(r"^model\.visual\.(.*)"), r"backbone.visual.\1"),
    (re.compile(r"^model\.language_model\.(.*)"), r"backbone.language_model.\1"),
    (re.compile(r"^visual\.(.*)"), r"backbone.visual.\1"),  # transformers < 4.52
    (re.compile(r"^model\.(embed_tokens|layers|norm|rotary_emb)(.*)"), r"backbone.language_model.\1\2"),  # < 4.52
)
_DROPPED = {"lm_head.weight"}


@dataclass(frozen=True)
class RewardModelSpec:
    """What tells one Qwen-VL reward model's loading apart from another's.

    Args:
        name: the model's name in messages (``"HPSv3"``).
        family: the backbone's name in messages (``"Qwen2-VL"``).
        config: the transformers config class of the backbone, by name (``"Qwen2VLConfig"``).
        file: the checkpoint's file name, preferred in a folder and the only file fetched from a Hub id; ``None``:
            every ``*.safetensors``.
        pickle_hint, save_as: the pickle files a user may hold and the name to save them as safetensors.
        missing_hint: what a folder without any ``.safetensors`` file should have held.
    """

    name: str
    family: str
    config: str
    file: str | None
    pickle_hint: str
    save_as: str
    missing_hint: str


def reward_head(hidden_size: int) -> nn.Sequential:
    """The reference's default ``ranknet`` head (indices 0, 3, 5 hold the weights, as in its state dict)."""
    return nn.Sequential(
        nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
    )


def to_transformers_keys(
    state: dict[str, torch.Tensor], head_rule: tuple[re.Pattern[str], str], spec: RewardModelSpec, what: str
) -> dict[str, torch.Tensor]:
    """Rename a reference reward model's ``state_dict()`` keys to the scorer's (``backbone.*`` and the heads by
    ``head_rule``), first matching rule wins; strips a ``module.`` prefix, drops ``lm_head.weight`` and raises
    ``KeyError`` naming the model and ``what`` it expected on any other key."""
    rules = (*_BACKBONE_KEY_RULES, head_rule)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in _DROPPED:
            continue
        for pattern, replacement in rules:
            if pattern.match(key):
                out[pattern.sub(replacement, key)] = value
                break
        else:
            raise KeyError(f"Unexpected {spec.name} checkpoint key {key!r}: not a {what} this scorer can map.")
    return out


def checkpoint_files(checkpoint: str, spec: RewardModelSpec) -> list[str]:
    """The safetensors file(s) ``checkpoint`` names: a file, a folder, or a Hub repository id.

    With ``spec.file``, a folder's ``spec.file`` is preferred and a Hub id downloads it alone; otherwise (and in a
    folder without it) every ``*.safetensors`` is read, sorted, and a Hub id downloads them all. A non-safetensors
    file is refused with how to convert it, an empty folder with ``spec.missing_hint``.
    """
    if os.path.isfile(checkpoint):
        if not checkpoint.endswith(".safetensors"):
            raise ValueError(
                f"{checkpoint}: {spec.name} weights are read from safetensors only. Convert a trusted "
                f"{spec.pickle_hint} once with safetensors.torch.save_file(torch.load(path, weights_only=True), "
                f"'{spec.save_as}')."
            )
        return [checkpoint]
    folder = checkpoint
    if not os.path.isdir(checkpoint):
        if checkpoint.count("/") != 1 or os.path.exists(checkpoint):
            raise FileNotFoundError(
                f"{spec.name} checkpoint {checkpoint!r} is neither a file, a folder nor a Hub repository id."
            )
        if spec.file is not None:
            from huggingface_hub import hf_hub_download

            return [hf_hub_download(checkpoint, spec.file)]
        from huggingface_hub import snapshot_download

        folder = snapshot_download(checkpoint, allow_patterns=["*.safetensors"])
    if spec.file is not None and os.path.isfile(os.path.join(folder, spec.file)):
        return [os.path.join(folder, spec.file)]
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint} holds no .safetensors file ({spec.missing_hint}).")
    return files


def load_state(files: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors of all ``files`` (safetensors) in one state dict."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    return state


def token_embeddings(state: dict[str, torch.Tensor], checkpoint: str, spec: RewardModelSpec) -> torch.Tensor:
    """The mapped checkpoint's token embedding matrix; a checkpoint without one is not a reward model."""
    embeddings = state.get(EMBEDDINGS_KEY)
    if embeddings is None:
        raise ValueError(f"{checkpoint} has no token embedding (model.embed_tokens.weight); not an {spec.name} model.")
    return embeddings


def qwen_vl_resize(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
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


class QwenVLRewardModel(nn.Module):
    """A Qwen-VL ``backbone`` read at the ``<|Reward|>`` token by float32 ``heads``; subclasses build both, set
    ``name`` (for messages) and give the reference's :meth:`positions`."""

    name: str
    backbone: nn.Module
    heads: Sequence[nn.Module]

    def positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reference's position ids, shape ``(B, L)``, the same on every M-RoPE axis."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        reward_token_id: int,
        head: int = 0,
    ) -> torch.Tensor:
        """``(mu, sigma)`` of head ``head`` per row, shape ``(B, 2)``: the head on the backbone's last hidden state (in
        float32) at each row's single ``<|Reward|>`` token, the backbone run at the reference's :meth:`positions`."""
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            position_ids=self.positions(attention_mask),
            use_cache=False,
        ).last_hidden_state
        is_reward = input_ids == reward_token_id
        counts = is_reward.sum(-1)
        if not bool((counts == 1).all()):
            raise ValueError(
                f"Each {self.name} input must hold exactly one {REWARD_TOKEN} token; counts {counts.tolist()}."
            )
        return self.heads[head](hidden[is_reward].float())


class QwenVLRewardScorer(Scorer):
    """A scorer on a Qwen-VL reward model: what HPSv3's and EditReward's share once the checkpoint is read (the
    model loaded, the chat-formatted texts, the inputs of the resized images, the batches, the models it names).
    Subclasses give the prompts and turn the heads' ``(mu, sigma)`` into scores."""

    def __init__(
        self,
        spec: RewardModelSpec,
        state: dict[str, torch.Tensor],
        checkpoint: str,
        base: str,
        make_model: Callable[[object], QwenVLRewardModel],
        dtype: torch.dtype | str,
        device: str | torch.device | None,
        batch_size: int,
        min_pixels: int,
        max_pixels: int,
    ) -> None:
        """Tokenizer, image processor and reward model from the mapped checkpoint ``state`` and the ``base`` folder.

        The tokenizer (right padding, the base's chat template) gets ``<|Reward|>`` as a new special token, as the
        references add it; the embedding count is read from the checkpoint (the references resized it for that
        token). The image processor keeps the base's own pixel range, as the references' ``AutoProcessor``: each
        image is resized beforehand (:func:`qwen_vl_resize`, into ``[min_pixels, max_pixels]``), and an image that
        resize grew past ``max_pixels`` (a small one, through its ``min_pixels`` branch, which rounds its sides up) is
        kept as it is, not resized a second time. The model, ``make_model(config)`` with a ``backbone`` and float32
        heads, is built without random initialisation and filled from ``state`` (nothing missing, nothing left over);
        the backbone runs in ``dtype`` (a ``torch.dtype`` or its name), the heads in float32, on ``device``
        (`resolve_device`), ``batch_size`` rows at a time.
        """
        import transformers
        from accelerate import init_empty_weights
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        embeddings = token_embeddings(state, checkpoint, spec)
        tokenizer = transformers.AutoTokenizer.from_pretrained(base, padding_side="right")
        if tokenizer.chat_template is None:
            raise ValueError(
                f"The tokenizer in {base} has no chat template; {spec.name} reads {spec.family}'s chat format."
            )
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(base)

        config = getattr(transformers, spec.config).from_pretrained(base)
        config.text_config.vocab_size = embeddings.shape[0]
        if reward_token_id >= embeddings.shape[0]:
            raise ValueError(
                f"{REWARD_TOKEN} gets id {reward_token_id} from {base}'s tokenizer, outside the checkpoint's "
                f"{embeddings.shape[0]} embeddings: the tokenizer is not the one {spec.name} was trained with."
            )
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if image_token_id != config.image_token_id:
            raise ValueError(f"{base}: tokenizer's {IMAGE_PAD} is {image_token_id}, config's {config.image_token_id}.")
        with init_empty_weights(include_buffers=False):  # no 7B random initialisation: the checkpoint fills it
            model = make_model(config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint} does not match {base}'s {spec.family} architecture: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}."
            )
        for child_name, child in model.named_children():
            if child_name == "backbone":
                child.to(dtype)
            else:
                child.float()  # the heads, in whatever dtype the checkpoint stored them
        self.device = resolve_device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer, self.reward_token_id, self.image_processor = tokenizer, reward_token_id, image_processor
        self.batch_size = batch_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels

    @classmethod
    def model_sources(cls, **kwargs) -> dict[str, str]:
        values = arguments_with_defaults(cls, kwargs)
        return {name: values[name] for name in ("checkpoint", "base") if values.get(name)}

    def chat_text(self, images: int, text: str) -> str:
        """One user turn of the base's chat template, with the generation prompt: ``images`` images (one
        ``<|image_pad|>`` each, before expansion), then ``text``."""
        content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
        message = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)

    def model_inputs(self, images: Sequence[Image.Image], texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids, attention mask, pixel patches and image grids, as the Qwen-VL processors build them: ``images``
        (the same number per text, each resized by :func:`qwen_vl_resize`) in the order of the texts'
        ``<|image_pad|>`` placeholders, each placeholder repeated ``t*h*w / merge_size**2`` times for its image's
        grid."""
        resized = [qwen_vl_resize(image, self.min_pixels, self.max_pixels) for image in images]
        vision = self.image_processor(images=resized, return_tensors="pt")
        merge = self.image_processor.merge_size**2
        counts = [int(grid.prod()) // merge for grid in vision["image_grid_thw"]]
        per_text = len(counts) // len(texts)
        expanded = []
        for row, text in enumerate(texts):
            for count in counts[per_text * row : per_text * (row + 1)]:  # the first placeholder not yet expanded
                text = text.replace(IMAGE_PAD, _EXPANDED_PAD * count, 1)
            expanded.append(text.replace(_EXPANDED_PAD, IMAGE_PAD))
        tokens = self.tokenizer(expanded, padding=True, return_tensors="pt")
        return {
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }

    def run_batches(
        self, inputs: Callable[[int, int], dict[str, torch.Tensor]], count: int, **forward
    ) -> torch.Tensor:
        """``model(**inputs(start, end), reward_token_id=..., **forward)`` over ``count`` rows in batches of
        ``batch_size`` on the scorer's device (the pixels in the backbone's dtype), concatenated as float32 on the
        CPU."""
        dtype = next(self.model.backbone.parameters()).dtype
        outputs = []
        for start in range(0, count, self.batch_size):
            batch = {k: v.to(self.device) for k, v in inputs(start, start + self.batch_size).items()}
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            outputs.append(self.model(**batch, reward_token_id=self.reward_token_id, **forward).float().cpu())
        return torch.cat(outputs)
