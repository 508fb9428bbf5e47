"""EditReward scorer: inputs, weight mapping and score checked against the reference model's forward (TIGER-AI-Lab
EditReward ``Qwen2_5_VLRewardModelBT_MultiHead``, ``ranknet_multi_head`` with ``mean`` pooling), re-written here from
its math on a tiny random Qwen2.5-VL (nothing is downloaded)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from trl_diffusion_sdpo.rewards.scorers import available_scorers, build_scorer, scores_edits
from trl_diffusion_sdpo.testing.tokenizers import _bytes_to_unicode

pytest.importorskip("trl_diffusion_sdpo_rewards")  # the reward-model ports ship apart (rewards/)

from trl_diffusion_sdpo_rewards.edit_reward import (  # noqa: E402
    EDITREWARD_FOLLOWING,
    EDITREWARD_QUALITY,
    EditRewardScorer,
    editreward_to_transformers,
)

torch.set_num_threads(1)
PIXELS = 4 * 28 * 28  # 4 merged image tokens per image (the real scorer uses 256 * 28 * 28)
SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"

# Qwen2.5-VL-7B-Instruct's chat template, reduced to the image and text parts EditReward uses.
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def head_module() -> torch.nn.Sequential:
    """The reference's head, its weights scaled up so that the tiny model's score moves visibly with its inputs (a
    default-initialised head maps the tiny decoder's states to nearly one value, hiding wrong inputs in rounding)."""
    head = torch.nn.Sequential(
        torch.nn.Linear(16, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05), torch.nn.Linear(1024, 16),
        torch.nn.ReLU(), torch.nn.Linear(16, 2),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for layer in (head[0], head[3], head[5]):
            layer.weight.mul_(6.0)
    return head


@pytest.fixture(scope="module")
def tiny_editreward(tmp_path_factory):
    """A Qwen2.5-VL base folder (config, byte-level tokenizer with the chat template, PIL image processor) and a
    random reward model in the reference's class layout: Qwen2_5_VLForConditionalGeneration + ``rm_heads``."""
    base = str(tmp_path_factory.mktemp("qwen2.5-vl-base"))
    vocab = {symbol: index for index, symbol in enumerate(dict.fromkeys(_bytes_to_unicode()))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=16384)
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    tokenizer.save_pretrained(base)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280).save_pretrained(base)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
            pad_token_id=tokenizer.pad_token_id, rope_theta=50.0,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
    )  # fmt: skip
    config.save_pretrained(base)

    torch.manual_seed(0)
    config.text_config.vocab_size = len(tokenizer) + 1  # the reference resizes for <|Reward|>
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # sharper attention, so that positions and image order move the score visibly
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    heads = [head_module(), head_module()]
    state = dict(model.state_dict())
    for i, head in enumerate(heads):
        state |= {f"rm_heads.head_{i}.{k}": v for k, v in head.state_dict().items()}
    assert "lm_head.weight" in state and "model.language_model.layers.0.mlp.up_proj.weight" in state
    return {"base": base, "model": model, "heads": heads, "state": state, "reward_id": len(tokenizer)}


def legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under transformers < 4.52's names (``visual.*``, ``model.layers.*``)."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.visual."):
            key = key.removeprefix("model.")
        elif key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        out[key] = value.clone()
    return out


def smart_resized(image: Image.Image) -> Image.Image:
    """qwen-vl-utils' resize by hand for these small sizes: area up to PIXELS, sides multiples of 28."""
    w, h = image.size
    beta = math.sqrt(PIXELS / (h * w))
    return image.convert("RGB").resize((math.ceil(w * beta / 28) * 28, math.ceil(h * beta / 28) * 28), Image.BICUBIC)


def reference_scores(fixture, sources, images, prompts) -> torch.Tensor:
    """The score as the reference computes it: per head, its message (source image, edited image, the head's
    instruction with the special-token suffix), both images resized, Qwen2-VL's image processor, embeddings with the
    image features scattered in, the decoder with positions 0..L-1, the head in float32 at ``<|Reward|>``; then the
    mean of the two heads' ``(mu, sigma)``, component 0."""
    model = fixture["model"]
    tokenizer = Qwen2Tokenizer.from_pretrained(fixture["base"], padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    processor = Qwen2VLImageProcessorPil.from_pretrained(fixture["base"])
    resized = [r for source, image in zip(sources, images) for r in (smart_resized(source), smart_resized(image))]
    vision = processor(images=resized, return_tensors="pt")
    outputs = []
    for head, instruction in zip(fixture["heads"], (EDITREWARD_FOLLOWING, EDITREWARD_QUALITY)):
        texts = []
        for row, prompt in enumerate(prompts):
            pads = [r.size[0] * r.size[1] // (28 * 28) for r in resized[2 * row : 2 * row + 2]]
            texts.append(
                "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                + "".join("<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" for n in pads)
                + instruction.format(text_prompt=prompt)
                + SUFFIX
                + "<|im_end|>\n<|im_start|>assistant\n"
            )
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        ids = tokens["input_ids"]
        with torch.no_grad():
            embeds = model.model.language_model.embed_tokens(ids)
            features = model.model.visual(vision["pixel_values"], grid_thw=vision["image_grid_thw"]).pooler_output
            mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, features)
            positions = torch.arange(ids.shape[1]).expand(3, ids.shape[0], -1)
            hidden = model.model.language_model(
                inputs_embeds=embeds, attention_mask=tokens["attention_mask"], position_ids=positions
            )[0]
            logits = head(hidden.float())
        outputs.append(logits[ids == fixture["reward_id"]].view(len(prompts), -1))
    return torch.stack(outputs).mean(0)[:, 0]


def random_images(sizes, seed: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy()) for w, h in sizes
    ]


def test_editreward_instructions_are_the_references():
    for text, dimension in ((EDITREWARD_FOLLOWING, "Instruction Following & Semantic Fidelity"),
                            (EDITREWARD_QUALITY, "Visual Quality & Realism")):  # fmt: skip
        assert text.startswith(
            "\nYou are tasked with evaluating an edited image **in comparison with the original source image** based "
            f"on **{dimension}**, and assigning a score from 1 to 4, with 1 being the worst and 4 being the best.  \n"
        )
        assert "**Inputs Provided:**  \n- Source Image (before editing)  \n" in text
        assert "- Text Instruction  \n\n**Sub-Dimensions to Evaluate:**\n\n" in text
        assert text.endswith(".\n\nText instruction - {text_prompt}\n") and text.count("{") == 1
    assert "(as seen in the source) should remain unaltered" in EDITREWARD_FOLLOWING
    assert "- **1 (Very Poor):** Instruction ignored or completely wrong execution.\n" in EDITREWARD_FOLLOWING
    assert "appear natural compared to the source image.\n\n- **Artifact-Free Quality:**  \n" in EDITREWARD_QUALITY
    # The lengths are those of the strings in two stored public copies of EditReward/dataset/prompts.py (both agree,
    # offsets of several passages checked too); the digests pin this transcription (see docs/evaluation.md).
    texts = (EDITREWARD_FOLLOWING, EDITREWARD_QUALITY)
    pinned = [(len(t), hashlib.sha256(t.encode()).hexdigest()[:16]) for t in texts]
    assert pinned == [(1820, "da5bfc26898cc8e0"), (1724, "89bbc5c2ac1bbea9")]


@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_editreward_scores_equal_the_reference_forward_and_read_the_source(tmp_path, tiny_editreward, layout):
    state = tiny_editreward["state"] if layout == "current" else legacy_names(tiny_editreward["state"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    scorer = EditRewardScorer(checkpoint=str(tmp_path), base=tiny_editreward["base"], device="cpu", dtype="float32",
                              batch_size=2, min_pixels=PIXELS, max_pixels=PIXELS)  # fmt: skip
    sources = random_images([(72, 40), (56, 56), (40, 72)], seed=1)
    edits = random_images([(56, 56), (72, 40), (40, 72)], seed=2)
    prompts = ["make the sky purple", "x", "remove the dog from the sofa"]  # unequal lengths: right padding
    expected = reference_scores(tiny_editreward, sources, edits, prompts)
    scores = scorer(edits, prompts, [[s] for s in sources])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    assert scores.std() > 0 and scorer.mu_sigma(edits[:1], prompts[:1], sources[:1]).shape == (2, 1, 2)
    other = scorer(edits[:1], prompts[:1], [[sources[1]]])  # the same edit against another source
    assert abs(float(other[0]) - float(scores[0])) > 1e-6
    torch.testing.assert_close(other, reference_scores(tiny_editreward, sources[1:2], edits[:1], prompts[:1]),
                               atol=1e-4, rtol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="EditReward compares an edit with one source image; edit 0"):
        scorer(edits[:1], prompts[:1], [sources[:2]])
    with pytest.raises(ValueError, match="editreward scores edits: it needs each image's source"):
        scorer(edits[:1], prompts[:1])


def test_editreward_mapping_refuses_unknown_keys_single_heads_and_pickles(tmp_path, tiny_editreward):
    one = torch.ones(1)
    mapped = editreward_to_transformers({"visual.merger.ln_q.weight": one, "model.norm.weight": one,
                                         "lm_head.weight": one, "rm_heads.head_1.5.bias": one})  # fmt: skip
    assert sorted(mapped) == [
        "backbone.language_model.norm.weight",
        "backbone.visual.merger.ln_q.weight",
        "heads.1.5.bias",
    ]
    with pytest.raises(KeyError, match="rm_head.0.weight"):
        editreward_to_transformers({"rm_head.0.weight": torch.ones(1)})
    torch.save({"model.norm.weight": torch.ones(1)}, tmp_path / "model.pth")
    with pytest.raises(ValueError, match="safetensors only"):
        EditRewardScorer(checkpoint=str(tmp_path / "model.pth"), base=tiny_editreward["base"], device="cpu")
    one_head = {k: v.contiguous() for k, v in tiny_editreward["state"].items() if "head_1" not in k}
    save_file(one_head, str(tmp_path / "one.safetensors"))
    with pytest.raises(ValueError, match=r"reward heads \[0\]"):
        EditRewardScorer(checkpoint=str(tmp_path / "one.safetensors"), base=tiny_editreward["base"], device="cpu")
    broken = {k: v.contiguous() for k, v in tiny_editreward["state"].items() if "head_0.3" not in k}
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="heads.0.3"):
        EditRewardScorer(checkpoint=str(tmp_path / "broken.safetensors"), base=tiny_editreward["base"], device="cpu")


def test_editreward_is_registered_as_an_editing_scorer(tmp_path, tiny_editreward):
    assert "editreward" in available_scorers() and scores_edits("editreward") and not scores_edits("pickscore")
    save_file({k: v.contiguous() for k, v in tiny_editreward["state"].items()}, str(tmp_path / "model.safetensors"))
    scorer = build_scorer("editreward", checkpoint=str(tmp_path / "model.safetensors"), base=tiny_editreward["base"],
                          device="cpu", dtype="float32")  # fmt: skip
    assert isinstance(scorer, EditRewardScorer) and scorer.edits
    assert scorer([Image.new("RGB", (64, 64))], ["a"], [[Image.new("RGB", (48, 64), "red")]]).shape == (1,)
