"""EditReward (Wu et al., 2025, "EditReward: A Human-Aligned Reward Model for Instruction-Guided Image Editing",
arXiv:2509.26346): a reward model of edits on Qwen2.5-VL-7B-Instruct (or MiMo-VL-7B, the same architecture), built
on HPSv3's recipe, which reads the source image and the edited image together.

The reference (github.com/TIGER-AI-Lab/EditReward: ``EditReward/model/qwen2_5_vl_trainer.py``
``Qwen2_5_VLRewardModelBT_MultiHead``, ``EditReward/inference_edit.py`` ``EditRewardInferencer``,
``EditReward/dataset/data_collator_qwen_edit.py``, configs ``EditReward-Qwen2.5-7B-VL.yaml`` and
``EditReward-MiMo-VL-7B-SFT-2508.yaml``: ``rm_head_type: ranknet_multi_head``, ``pooling_strategy: mean``,
``output_dim: 2``, ``use_special_tokens: true``, ``reward_token: special``, min = max pixels ``256 * 28 * 28``,
transformers 4.56.1) computes, per (source, edited image, instruction):

* two inputs, one per head, each one user turn of the chat template holding the source image, the edited image and
  a text: ``head_0`` reads ``EDITREWARD_FOLLOWING`` (instruction following), ``head_1`` ``EDITREWARD_QUALITY``
  (visual quality), each formatted with the instruction and followed by HPSv3's
  ``"\\nPlease provide the overall ratings of this image: <|Reward|>\\n\\nEND\\n"``; ``<|Reward|>`` is added to the
  tokenizer as a special token; right padding;
* images: both resized by qwen-vl-utils' ``smart_resize`` to ``256 * 28 * 28`` pixels (as HPSv3), then Qwen2-VL's
  image processor (Qwen2.5-VL uses it) with the base's own pixel range, so an image whose resize overshot
  ``max_pixels`` (a small one, through the ``min_pixels`` branch) is not resized again;
* backbone: the image features scattered into the ``<|image_pad|>`` positions, the language model run with
  **sequential text positions** (the reference calls the decoder with ``input_ids=None`` and no image grid, so
  transformers 4.56's ``get_rope_index`` falls back to ``cumsum(attention_mask) - 1`` on all three M-RoPE axes);
* each head, ``Linear(d, 1024) -> ReLU -> Dropout(0.05) -> Linear(1024, 16) -> ReLU -> Linear(16, 2)`` in float32,
  read at the ``<|Reward|>`` token, gives ``(mu, sigma)``; the two heads' outputs are averaged (``mean`` pooling) and
  the score is the averaged ``mu`` (the reference's ``rewards[i][0]``).

This module rebuilds that forward on transformers' `Qwen2_5_VLModel` (no ``trust_remote_code``, no torchvision, no
qwen-vl-utils). Weights: a safetensors file, or a folder of them, holding the reward model's ``state_dict()`` (both
transformers key layouts are mapped, ``lm_head`` dropped, an unknown key refused). Only safetensors is read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from trl_diffusion_sdpo.rewards.scorers.base import EditScorer

from .hps_v3 import HPSV3_PIXELS, HPSV3_REWARD_SUFFIX
from .qwen_vl_reward import (
    QwenVLRewardModel,
    QwenVLRewardScorer,
    RewardModelSpec,
    checkpoint_files,
    load_state,
    reward_head,
    to_transformers_keys,
    token_embeddings,
)

__all__ = ["EditRewardScorer", "editreward_to_transformers"]

EDITREWARD_BASE = "Qwen/Qwen2.5-VL-7B-Instruct"
EDITREWARD_PIXELS = HPSV3_PIXELS

# The reference's per-head instructions (EditReward/dataset/prompts.py, INSTRUCTION_EDIT_FOLLOWING and
# INSTRUCTION_EDIT_QUALITY, as its inferencer sends them for reward_dim dim1 and dim2), verbatim: the two trailing
# spaces ending many lines (Markdown line breaks) are part of what the checkpoint was trained on.
EDITREWARD_FOLLOWING = (
    "\nYou are tasked with evaluating an edited image **in comparison with the original source image** based on "
    "**Instruction Following & Semantic Fidelity**, and assigning a score from 1 to 4, with 1 being the worst and 4 "
    "being the best.  \n"
    "This dimension focuses on how accurately, completely, and exclusively the model executed the given text "
    "instruction.\n\n"
    "**Inputs Provided:**  \n"
    "- Source Image (before editing)  \n"
    "- Edited Image (after applying the instruction)  \n"
    "- Text Instruction  \n\n"
    "**Sub-Dimensions to Evaluate:**\n\n"
    "- **Semantic Accuracy:**  \n"
    "  Assess whether the edited content accurately captures the semantics of the instruction. The edited result "
    'should precisely match the intended meaning. For example, if the instruction is "replace apples with oranges," '
    "the object must clearly be oranges, not other fruits.\n\n"
    "- **Completeness of Editing:**  \n"
    '  Check whether **all parts** of the instruction are fully executed. For multi-step edits (e.g., "replace a red '
    'car with a blue bicycle"), both the color change and the object replacement must be done without omissions.\n\n'
    "- **Exclusivity of Edit (No Over-Editing):**  \n"
    "  Ensure that only the requested parts are changed. The rest of the image (as seen in the source) should remain "
    "unaltered. For example, if the instruction only involves replacing an object, the background, lighting, and "
    "unrelated objects should not be unnecessarily modified.\n\n"
    "**Scoring Criteria:**\n"
    "- **4 (Very Good):** Perfectly accurate, complete, and exclusive execution of the instruction.  \n"
    "- **3 (Relatively Good):** Largely correct, but with minor omissions or slight over-editing.  \n"
    "- **2 (Relatively Poor):** Major misinterpretation, incomplete edits, or noticeable unintended changes.  \n"
    "- **1 (Very Poor):** Instruction ignored or completely wrong execution.\n\n"
    "Text instruction - {text_prompt}\n"
)
EDITREWARD_QUALITY = (
    "\nYou are tasked with evaluating an edited image **in comparison with the original source image** based on "
    "**Visual Quality & Realism**, and assigning a score from 1 to 4, with 1 being the worst and 4 being the best.  \n"
    "This dimension focuses on how realistic, artifact-free, and aesthetically appealing the edited image is, while "
    "remaining consistent with the source image.\n\n"
    "**Inputs Provided:**  \n"
    "- Source Image (before editing)  \n"
    "- Edited Image (after applying the instruction)  \n"
    "- Text Instruction  \n\n"
    "**Sub-Dimensions to Evaluate:**\n\n"
    "- **Plausibility & Physical Consistency:**  \n"
    "  Check whether the edit aligns with the laws of physics and the scene context. Lighting, shadows, reflections, "
    "perspective, size, and interactions with the environment should all appear natural compared to the source "
    "image.\n\n"
    "- **Artifact-Free Quality:**  \n"
    "  Look for technical flaws such as blur, distortions, pixel misalignment, unnatural textures, or seams around "
    "edited regions. High-quality results should be free from such visible artifacts.\n\n"
    "- **Aesthetic Quality:**  \n"
    "  Evaluate the overall harmony and visual appeal. The image should look natural, balanced, and pleasant. Colors, "
    "composition, and atmosphere should enhance the image rather than degrade it.\n\n"
    "**Scoring Criteria:**\n"
    "- **4 (Very Good):** Perfectly realistic, artifact-free, seamless, and aesthetically pleasing.  \n"
    "- **3 (Relatively Good):** Mostly realistic and clean, with only minor flaws that do not significantly "
    "distract.  \n"
    "- **2 (Relatively Poor):** Noticeable physical inconsistencies or visible artifacts that make the edit "
    "unnatural.  \n"
    "- **1 (Very Poor):** Severe artifacts, incoherent composition, or visually unusable result.\n\n"
    "Text instruction - {text_prompt}\n"
)
# head_i reads INSTRUCTIONS[i] (the reference's batch_dim1 -> head_0, batch_dim2 -> head_1).
EDITREWARD_INSTRUCTIONS = (EDITREWARD_FOLLOWING, EDITREWARD_QUALITY)

_SPEC = RewardModelSpec(
    name="EditReward",
    family="Qwen2.5-VL",
    config="Qwen2_5_VLConfig",
    file=None,
    pickle_hint=".pth",
    save_as="model.safetensors",
    missing_hint="the reference saves model.pth: convert it once, see docs/evaluation.md",
)
# The reference's head keys (rm_heads.head_<i>.<index>.weight/bias); the backbone's are mapped by
# `to_transformers_keys`.
_HEAD_RULE = (re.compile(r"^rm_heads\.head_(\d+)\.(\d+\.(?:weight|bias))$"), r"heads.\1.\2")


def editreward_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the reference's ``Qwen2_5_VLRewardModelBT_MultiHead.state_dict()`` keys to `EditRewardModel`'s.

    Accepts both transformers layouts of Qwen2.5-VL and a ``module.`` prefix; drops ``lm_head.weight``; raises
    ``KeyError`` on any other key (a single-head ``rm_head`` checkpoint included: the released configs are
    multi-head), so another architecture fails loudly instead of loading partly.
    """
    what = "multi-head Qwen2.5-VL reward model (rm_heads.head_0/head_1)"
    return to_transformers_keys(state, _HEAD_RULE, _SPEC, what)


class EditRewardModel(QwenVLRewardModel):
    """`Qwen2_5_VLModel` (vision tower + language model) and the float32 ``(mu, sigma)`` heads."""

    name = _SPEC.name

    def __init__(self, config, num_heads: int = 2) -> None:
        from transformers import Qwen2_5_VLModel

        super().__init__()
        self.config = config
        self.backbone = Qwen2_5_VLModel(config)
        self.heads = nn.ModuleList([reward_head(config.text_config.hidden_size).float() for _ in range(num_heads)])

    def positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """``cumsum(mask) - 1``, padding at 1, on every M-RoPE axis: the reference's positions (see the module doc)."""
        return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


class EditRewardScorer(QwenVLRewardScorer, EditScorer):
    """EditReward score of an edit: the mean over its two heads of ``mu`` (see the module docstring).

    Args:
        checkpoint: the reward model's weights: a ``.safetensors`` file, a folder of them (sharded files are merged),
            or a Hub repository id whose ``*.safetensors`` are downloaded. Required: no default repository is
            assumed (the released files' names were not checked here).
        base: folder or Hub id of the backbone the checkpoint was trained from, ``Qwen/Qwen2.5-VL-7B-Instruct``
            (default) or ``XiaomiMiMo/MiMo-VL-7B-SFT-2508``: its ``config.json``, tokenizer (with its chat template)
            and ``preprocessor_config.json`` are read; its weights are not.
        dtype: backbone dtype (bfloat16 by default, as the reference); the heads always run in float32.
        min_pixels, max_pixels: each image's area range (both 256 * 28 * 28 in the reference).
    """

    name = "editreward"
    scale = "mean over EditReward's two heads of mu, unbounded"

    def __init__(
        self,
        checkpoint: str,
        base: str = EDITREWARD_BASE,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.bfloat16,
        batch_size: int = 4,
        min_pixels: int = EDITREWARD_PIXELS,
        max_pixels: int = EDITREWARD_PIXELS,
    ) -> None:
        state = editreward_to_transformers(load_state(checkpoint_files(checkpoint, _SPEC)))
        token_embeddings(state, checkpoint, _SPEC)
        heads = sorted({int(k.split(".")[1]) for k in state if k.startswith("heads.")})
        if heads != [0, 1]:
            raise ValueError(f"{checkpoint} has reward heads {heads}; EditReward's released models have two (0, 1).")
        super().__init__(
            _SPEC,
            state,
            checkpoint,
            base,
            lambda config: EditRewardModel(config, num_heads=len(heads)),
            dtype,
            device,
            batch_size,
            min_pixels,
            max_pixels,
        )

    def prompt_text(self, instruction: str, head: int) -> str:
        """The chat-formatted text of one edit for head ``head``: the source image, the edited image, then the head's
        instruction text (one ``<|image_pad|>`` per image, before expansion)."""
        return self.chat_text(2, EDITREWARD_INSTRUCTIONS[head].format(text_prompt=instruction) + HPSV3_REWARD_SUFFIX)

    def inputs(
        self, sources: Sequence[Image.Image], images: Sequence[Image.Image], prompts: Sequence[str], head: int
    ) -> dict[str, torch.Tensor]:
        """Token ids, attention mask, pixel patches and image grids for one head, as Qwen2.5-VL's processor builds
        them: per row the source's then the edit's ``<|image_pad|>`` repeated ``t*h*w / merge_size**2`` times."""
        pictures = [picture for source, image in zip(sources, images) for picture in (source, image)]
        return self.model_inputs(pictures, [self.prompt_text(prompt, head) for prompt in prompts])

    @torch.no_grad()
    def mu_sigma(
        self, images: Sequence[Image.Image], prompts: Sequence[str], sources: Sequence[Image.Image]
    ) -> torch.Tensor:
        """Per head, the ``(mu, sigma)`` of each edit, shape ``(heads, N, 2)``, float32 on the CPU."""
        per_head = [
            self.run_batches(
                lambda start, end, head=head: self.inputs(
                    sources[start:end], images[start:end], prompts[start:end], head
                ),
                len(images),
                head=head,
            )
            for head in range(len(self.model.heads))
        ]
        return torch.stack(per_head)

    def score(self, images, prompts, sources) -> torch.Tensor:
        """The mean over the heads of ``mu`` (the reference's ``mean`` pooling of ``(mu, sigma)``, component 0)."""
        for row, group in enumerate(sources):
            if len(group) != 1:
                raise ValueError(
                    f"EditReward compares an edit with one source image; edit {row} ({prompts[row]!r}) has "
                    f"{len(group)} (source_images): score multi-image edits with another scorer."
                )
        return self.mu_sigma(images, prompts, [group[0] for group in sources]).mean(0)[:, 0]
