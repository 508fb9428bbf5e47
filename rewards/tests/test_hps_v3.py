"""HPSv3 scorer: inputs, weight mapping and score checked against the reference model's forward (MizzenAI/HPSv3
``Qwen2VLRewardModelBT``), re-written here from its math on a tiny random Qwen2-VL (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import math
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from trl_diffusion_sdpo.rewards.scorers import available_scorers, build_scorer
from trl_diffusion_sdpo.testing.tokenizers import _bytes_to_unicode

pytest.importorskip("trl_diffusion_sdpo_rewards")  # the reward-model ports ship apart (rewards/)

from trl_diffusion_sdpo_rewards.hps_v3 import (  # noqa: E402
    HPSV3_INSTRUCTION,
    HPSV3_REWARD_SUFFIX,
    HPSv3Scorer,
    hps_v3_resize,
    hpsv3_to_transformers,
)

PIXELS = 4 * 28 * 28  # 4 merged image tokens per image (the real scorer uses 256 * 28 * 28)

# Qwen2-VL-7B-Instruct's chat template (its tokenizer_config.json), reduced to the image and text parts HPSv3 uses.
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_hpsv3(tmp_path_factory):
    """A Qwen2-VL base folder (config, byte-level tokenizer with the chat template, PIL image processor) and a random
    reward model in the reference's class layout: Qwen2VLForConditionalGeneration + ``rm_head``."""
    base = str(tmp_path_factory.mktemp("qwen2-vl-base"))
    vocab = {symbol: index for index, symbol in enumerate(dict.fromkeys(_bytes_to_unicode()))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=8192)
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = QWEN2_VL_TEMPLATE
    tokenizer.save_pretrained(base)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280).save_pretrained(base)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
    )  # fmt: skip
    config.save_pretrained(base)

    torch.manual_seed(0)
    config.text_config.vocab_size = len(tokenizer) + 1  # the reference resizes for <|Reward|>
    model = Qwen2VLForConditionalGeneration(config).eval()
    head = torch.nn.Sequential(
        torch.nn.Linear(16, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05), torch.nn.Linear(1024, 16),
        torch.nn.ReLU(), torch.nn.Linear(16, 2),
    ).eval()  # fmt: skip
    state = dict(model.state_dict()) | {f"rm_head.{k}": v for k, v in head.state_dict().items()}
    assert "lm_head.weight" in state and "model.language_model.layers.0.mlp.up_proj.weight" in state
    return {"base": base, "model": model, "head": head, "state": state, "reward_id": len(tokenizer)}


def legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under transformers < 4.52's Qwen2-VL names (``visual.*``, ``model.layers.*``)."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.visual."):
            key = key.removeprefix("model.")
        elif key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        out[key] = value.clone()
    return out


def reference_mu(fixture, images, prompts) -> torch.Tensor:
    """``mu`` as the reference computes it: its message (instruction + special-token suffix in one chat turn),
    qwen-vl-utils' resize to 4 * 28 * 28 pixels, Qwen2-VL's image processor, embeddings with the image features
    scattered in, the decoder with positions 0..L-1 (no image grid reaches it), ``rm_head`` in float32 at the
    ``<|Reward|>`` token, component 0."""
    model, head = fixture["model"], fixture["head"]
    tokenizer = Qwen2Tokenizer.from_pretrained(fixture["base"], padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    processor = Qwen2VLImageProcessorPil.from_pretrained(fixture["base"])
    resized = []
    for image in images:  # smart_resize by hand for these sizes: area 3136, sides multiples of 28
        w, h = image.size
        beta = math.sqrt(PIXELS / (h * w))
        resized.append(image.resize((math.ceil(w * beta / 28) * 28, math.ceil(h * beta / 28) * 28), Image.BICUBIC))
    vision = processor(images=resized, return_tensors="pt")
    texts = []
    for prompt, image in zip(prompts, resized):
        n_tokens = image.size[0] * image.size[1] // (28 * 28)
        body = HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_REWARD_SUFFIX
        texts.append(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * n_tokens
            + "<|vision_end|>"
            + body
            + "<|im_end|>\n<|im_start|>assistant\n"
        )
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    ids = tokens["input_ids"]
    with torch.no_grad():
        embeds = model.model.language_model.embed_tokens(ids)
        features = model.model.visual(vision["pixel_values"], grid_thw=vision["image_grid_thw"]).pooler_output
        mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, features)
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=tokens["attention_mask"])[0]
        logits = head(hidden.float())
    return logits[ids == fixture["reward_id"]].view(len(prompts), -1)[:, 0]


def test_hpsv3_text_and_resize_follow_the_reference():
    assert HPSV3_INSTRUCTION.startswith("\nYou are tasked with evaluating a generated image")
    assert "**Visual Quality:**  \n" in HPSV3_INSTRUCTION and "lowest possible. \n" in HPSV3_INSTRUCTION
    assert HPSV3_INSTRUCTION.endswith("Textual prompt - {text_prompt}\n\n\n")
    # Both paragraphs of hpsv3/dataset/data_collator_qwen.py's INSTRUCTION (MizzenAI/HPSv3), in its order: the
    # checkpoint was trained with Text Alignment's five criteria between Safety and the prompt.
    quality = HPSV3_INSTRUCTION.index("**Visual Quality:**  \n")
    alignment = HPSV3_INSTRUCTION.index("lowest possible. \n\n**Text Alignment:**  \n")
    assert quality < alignment < HPSV3_INSTRUCTION.index("Textual prompt - ")
    for criterion in ("**Subject Relevance** ", "**Style Relevance:** ", "**Contextual Consistency**: ",
                      "**Attribute Fidelity**: ", "**Semantic Coherence**: "):  # fmt: skip
        assert f"\n- {criterion}" in HPSV3_INSTRUCTION[alignment:]
    # The whole text: its length and SHA-256 as computed from the reference file's string (2523 characters).
    digest = hashlib.sha256(HPSV3_INSTRUCTION.encode()).hexdigest()
    assert (len(HPSV3_INSTRUCTION), digest) == (
        2523,
        "0393599dad45a971903d1d62a3acf9bad3ccccdafa7f40f680523419e1f68b7a",
    )
    assert HPSV3_REWARD_SUFFIX == "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
    # A 1024x1024 sample becomes 448x448 (256 merged tokens), 512x768 keeps its aspect ratio under the budget.
    assert hps_v3_resize(Image.new("RGB", (1024, 1024))).size == (448, 448)
    w, h = hps_v3_resize(Image.new("RGB", (512, 768))).size
    assert (w % 28, h % 28) == (0, 0) and w * h <= 256 * 28 * 28 and abs(h / w - 1.5) < 0.1
    assert hps_v3_resize(Image.new("L", (72, 40)), PIXELS, PIXELS).mode == "RGB"


# transformers < 4.52's layout by default: test_edit_reward.py's [legacy], renamed by the same backbone rules
# (qwen_vl_reward.to_transformers_keys); HPSv3's own legacy keys by test_hpsv3_mapping_refuses_unknown_keys_and_pickles
@pytest.mark.parametrize("layout", ["current", pytest.param("legacy", marks=pytest.mark.slow)])
def test_hpsv3_scores_equal_the_reference_forward_on_the_same_weights(tmp_path, tiny_hpsv3, layout):
    state = tiny_hpsv3["state"] if layout == "current" else legacy_names(tiny_hpsv3["state"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "HPSv3.safetensors"))
    scorer = HPSv3Scorer(checkpoint=str(tmp_path), base=tiny_hpsv3["base"], device="cpu", dtype="float32",
                         batch_size=2, min_pixels=PIXELS, max_pixels=PIXELS)  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    images = [
        Image.fromarray((torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy())
        for size in [(72, 40), (40, 72), (56, 56)]
    ]
    prompts = ["a red fox", "an astronaut riding a horse on the moon", "x"]  # unequal lengths: right padding
    expected = reference_mu(tiny_hpsv3, images, prompts)
    scores = scorer(images, prompts)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    assert scores.std() > 0  # the prompts and images reach the score
    assert scorer.name == "hpsv3" and scorer.mu_sigma(images[:1], prompts[:1]).shape == (1, 2)


def test_hpsv3_mapping_refuses_unknown_keys_and_pickles(tmp_path, tiny_hpsv3):
    mapped = hpsv3_to_transformers({"visual.merger.ln_q.weight": torch.ones(1), "model.norm.weight": torch.ones(1),
                                    "lm_head.weight": torch.ones(1), "rm_head.5.bias": torch.ones(1)})  # fmt: skip
    assert sorted(mapped) == [
        "backbone.language_model.norm.weight",
        "backbone.visual.merger.ln_q.weight",
        "head.5.bias",
    ]
    with pytest.raises(KeyError, match="value_head.weight"):
        hpsv3_to_transformers({"value_head.weight": torch.ones(1)})
    torch.save({"model.norm.weight": torch.ones(1)}, tmp_path / "HPSv3.pt")
    with pytest.raises(ValueError, match="safetensors only"):
        HPSv3Scorer(checkpoint=str(tmp_path / "HPSv3.pt"), base=tiny_hpsv3["base"], device="cpu")
    broken = {k: v.contiguous() for k, v in tiny_hpsv3["state"].items() if "rm_head.3" not in k}
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="head.3"):
        HPSv3Scorer(checkpoint=str(tmp_path / "broken.safetensors"), base=tiny_hpsv3["base"], device="cpu")
    assert not os.path.exists(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        HPSv3Scorer(checkpoint=str(tmp_path / "missing"), base=tiny_hpsv3["base"], device="cpu")


def test_hpsv3_is_registered_and_built_by_name(tmp_path, tiny_hpsv3):
    assert "hpsv3" in available_scorers()
    save_file({k: v.contiguous() for k, v in tiny_hpsv3["state"].items()}, str(tmp_path / "HPSv3.safetensors"))
    scorer = build_scorer("hpsv3", checkpoint=str(tmp_path / "HPSv3.safetensors"), base=tiny_hpsv3["base"],
                          device="cpu", dtype="float32")  # fmt: skip
    assert isinstance(scorer, HPSv3Scorer)
    assert scorer([Image.new("RGB", (64, 64))], ["a"]).shape == (1,)


def test_hpsv3_processor_keeps_an_image_the_resize_grew_past_max_pixels(tmp_path, tiny_hpsv3):
    """qwen-vl-utils' resize rounds a small image's sides up (its min_pixels branch), so the area can overshoot
    ``max_pixels`` (400x300 becomes 532x392 > 256*28*28); the reference's processor (``AutoProcessor`` with the base's
    own pixel range) keeps that image as it is, so the scorer's must not resize it a second time."""
    save_file({k: v.contiguous() for k, v in tiny_hpsv3["state"].items()}, str(tmp_path / "HPSv3.safetensors"))
    scorer = HPSv3Scorer(checkpoint=str(tmp_path), base=tiny_hpsv3["base"], device="cpu", dtype="float32")
    image = Image.fromarray((torch.rand(300, 400, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    resized = hps_v3_resize(image)
    assert resized.size == (532, 392) and 532 * 392 > 256 * 28 * 28
    reference = Qwen2VLImageProcessorPil.from_pretrained(tiny_hpsv3["base"])(images=[resized], return_tensors="pt")
    batch = scorer.inputs([image], ["a red fox"])
    assert batch["image_grid_thw"].tolist() == reference["image_grid_thw"].tolist() == [[1, 392 // 14, 532 // 14]]
    torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"], atol=0, rtol=0)
    image_pad = scorer.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_pad).sum()) == (392 // 28) * (532 // 28)
