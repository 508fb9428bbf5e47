"""The ports load through their real loading code from local folders and files, and compute what their papers
define: the LAION aesthetic head, HPSv2's open_clip mapping and ImageReward's BLIP layout."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertTokenizer, BlipTextModel, BlipVisionModel, CLIPModel, CLIPProcessor, CLIPTokenizer

from tests.helpers.evaluation import ImageProcessor, clip_config, coloured_images, save_tiny_clip

pytest.importorskip("trl_diffusion_sdpo_rewards")  # the reward-model ports ship apart (rewards/)

from trl_diffusion_sdpo_rewards import AestheticScorer, HPSv2Scorer, ImageRewardModel, ImageRewardScorer, image_reward  # noqa: E402
from trl_diffusion_sdpo_rewards._weights import load_weights_file  # noqa: E402
from trl_diffusion_sdpo_rewards.image_reward import image_reward_configs, text_config_from_med  # noqa: E402

# The published normalisation, not the package's copy (THUDM/ImageReward, ImageReward/ImageReward.py, class
# ImageReward.__init__ at commit c0b90804: self.mean = 0.16717362830052426, self.std = 1.0333394966054072, and
# ``rewards = (rewards - self.mean) / self.std`` in score() and inference_rank()).
IMAGE_REWARD_MEAN, IMAGE_REWARD_STD = 0.16717362830052426, 1.0333394966054072
DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return save_tiny_clip(str(tmp_path_factory.mktemp("clip")))


def test_image_reward_normalisation_is_the_published_one():
    assert (image_reward.IMAGE_REWARD_MEAN, image_reward.IMAGE_REWARD_STD) == (IMAGE_REWARD_MEAN, IMAGE_REWARD_STD)


def test_aesthetic_head_reads_pth_and_safetensors_and_scores_normalised_embeddings(tmp_path, tiny_clip):
    torch.manual_seed(1)
    head = torch.nn.Sequential(
        torch.nn.Linear(24, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()
    state = {f"layers.{k}": v for k, v in head.state_dict().items()}
    torch.save(state, tmp_path / "head.pth")
    save_file(state, str(tmp_path / "head.safetensors"))
    images = coloured_images(3)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        expected = head(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
    for weights in ("head.pth", "head.safetensors"):
        scorer = AestheticScorer(clip_model=tiny_clip, weights=str(tmp_path / weights), device="cpu")
        torch.testing.assert_close(scorer(images, ["ignored"] * 3), expected, atol=1e-5, rtol=1e-5)


def test_aesthetic_head_refuses_a_clip_with_another_embedding_size(tmp_path, tiny_clip):
    state = {f"layers.{i}.{p}": torch.zeros(1) for i in (0,) for p in ("weight",)}
    state["layers.0.weight"] = torch.zeros(1024, 768)
    torch.save(state, tmp_path / "head.pth")
    with pytest.raises(ValueError, match="768-d embeddings.*projects to 24"):
        AestheticScorer(clip_model=tiny_clip, weights=str(tmp_path / "head.pth"), device="cpu")


@pytest.fixture(scope="module")
def hps_architecture(tmp_path_factory) -> str:
    """transformers config and processor of the golden open_clip model's architecture (see data/README.md)."""
    folder = str(tmp_path_factory.mktemp("hps-arch"))
    # A 100-entry BPE vocabulary like the golden model's: letters, word-final letters, filler, start 98, end 99.
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [f"{c}</w>" for c in letters]
    vocab = {t: i for i, t in enumerate(tokens + [f"<filler{i}>" for i in range(98 - len(tokens))])}
    vocab.update({"<|startoftext|>": 98, "<|endoftext|>": 99})
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        os.path.join(folder, "vocab.json"),
        os.path.join(folder, "merges.txt"),
        model_max_length=16,
        pad_token="<|endoftext|>",
    )
    processor = CLIPProcessor(
        image_processor=ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    config = clip_config(vocab_size=100, eos=99, projection_dim=24)
    config.save_pretrained(folder)
    return folder


def test_hps_mapping_reproduces_open_clip_embeddings(tmp_path, hps_architecture):
    golden = load_file(os.path.join(DATA, "open_clip_tiny_vit.safetensors"))
    state = {k.removeprefix("state_dict."): v for k, v in golden.items() if k.startswith("state_dict.")}
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "HPS_v2_compressed.pt")
    scorer = HPSv2Scorer(
        checkpoint=str(tmp_path / "HPS_v2_compressed.pt"), architecture=hps_architecture, device="cpu"
    )
    model = scorer.embedder.model
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=golden["inputs.pixel_values"]).pooler_output)
        text = model.text_projection(model.text_model(input_ids=golden["inputs.input_ids"]).pooler_output)
    torch.testing.assert_close(
        torch.nn.functional.normalize(image, dim=-1), golden["expected.image_embeds"], atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        torch.nn.functional.normalize(text, dim=-1), golden["expected.text_embeds"], atol=1e-5, rtol=1e-4
    )
    assert scorer.name == "hpsv2" and scorer.scale == "raw cosine"
    images = coloured_images(2)
    tokens = scorer.embedder.processor.tokenizer(["ab", "cd"], padding=True, return_tensors="pt")
    assert tokens["input_ids"][:, 0].tolist() == [98, 98] and tokens["input_ids"].max() == 99
    expected = (scorer.embedder.image_embeddings(images) * scorer.embedder.text_embeddings(["ab", "cd"])).sum(-1)
    torch.testing.assert_close(scorer(images, ["ab", "cd"]), expected)


def test_hps_refuses_a_checkpoint_it_cannot_map(tmp_path, hps_architecture):
    golden = load_file(os.path.join(DATA, "open_clip_tiny_vit.safetensors"))
    state = {k.removeprefix("state_dict."): v for k, v in golden.items() if k.startswith("state_dict.")}
    state["visual.attn_pool.query"] = torch.zeros(1)
    save_file(state, str(tmp_path / "odd.safetensors"))
    with pytest.raises(KeyError, match="visual.attn_pool.query"):
        HPSv2Scorer(checkpoint=str(tmp_path / "odd.safetensors"), architecture=hps_architecture)
    with pytest.raises(FileNotFoundError):
        HPSv2Scorer(checkpoint=str(tmp_path / "missing.pt"), architecture=hps_architecture)
    with pytest.raises(ValueError, match=re.escape("version must be one of ['v2.0', 'v2.1'], got 'v3'.")):
        HPSv2Scorer(version="v3", checkpoint=str(tmp_path / "odd.safetensors"), architecture=hps_architecture)


# BLIP's own parameter names (salesforce/BLIP models/vit.py), the layout ImageReward.pt stores.
def _to_blip_vision_name(name: str) -> str:
    renames = [
        ("embeddings.class_embedding", "cls_token"),
        ("embeddings.position_embedding", "pos_embed"),
        ("embeddings.patch_embedding", "patch_embed.proj"),
        ("encoder.layers.", "blocks."),
        ("self_attn.projection", "attn.proj"),
        ("self_attn.qkv", "attn.qkv"),
        ("layer_norm1", "norm1"),
        ("layer_norm2", "norm2"),
        ("post_layernorm", "norm"),
    ]
    for new, old in renames:
        name = name.replace(new, old)
    return name


def _bert_vocab(folder: str) -> str:
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "red",
        "cube",
        "two",
        "blue",
        "spheres",
        "green",
        "field",
        "an",
        "orange",
        "cat",
    ] + [f"[unused{i}]" for i in range(4)]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    return folder


# BLIP's configs/med_config.json (salesforce/BLIP), the text encoder's config ImageReward ships.
BLIP_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}


@pytest.mark.parametrize("med", [BLIP_MED_CONFIG, {}], ids=["published-med-config", "fields-left-out"])
def test_image_reward_builds_the_published_architecture(med):
    vision, text = image_reward_configs(med)
    # ImageReward's ViT (ImageReward.py: BLIP_Pretrain(image_size=224, vit='large'); BLIP's create_vit('large'):
    # VisionTransformer(patch_size=16, embed_dim=1024, depth=24, num_heads=16), mlp_ratio 4, LayerNorm eps 1e-6, GELU).
    size = (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads)
    assert size == (1024, 4096, 24, 16)
    assert (vision.image_size, vision.patch_size, vision.layer_norm_eps, vision.hidden_act) == (224, 16, 1e-6, "gelu")
    text_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    text_fields += ("max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
    assert {key: getattr(text, key) for key in text_fields} == {key: BLIP_MED_CONFIG[key] for key in text_fields}
    assert text.encoder_hidden_size == 1024  # the file's encoder_width (768, ViT-B) follows the ViT-L, as in BLIP
    assert text.hidden_dropout_prob == text.attention_probs_dropout_prob == 0.0


def test_image_reward_loads_the_original_blip_layout_and_standardises(tmp_path):
    tokenizer_dir = _bert_vocab(str(tmp_path / "bert"))
    vocab = len(BertTokenizer.from_pretrained(tokenizer_dir)) + 2  # + [DEC] + [ENC], as BLIP adds
    med = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=40,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        encoder_width=999,
    )
    with open(tmp_path / "med_config.json", "w") as f:
        json.dump(med, f)
    vision = dict(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    from transformers import BlipVisionConfig

    reference = ImageRewardModel(
        BlipVisionConfig(**{**vision, "layer_norm_eps": 1e-6}), text_config_from_med(med, encoder_hidden_size=24)
    ).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    state = {}
    for key, value in reference.state_dict().items():
        if key.startswith("vision_model."):
            state["blip.visual_encoder." + _to_blip_vision_name(key.removeprefix("vision_model."))] = value
        elif key.startswith("text_encoder."):
            state["blip." + key] = value
        else:
            state[key] = value
    state["blip.text_proj.weight"] = torch.zeros(3, 3)  # other BLIP heads in the file are ignored
    torch.save(state, tmp_path / "ImageReward.pt")

    scorer = ImageRewardScorer(
        checkpoint=str(tmp_path / "ImageReward.pt"),
        med_config=str(tmp_path / "med_config.json"),
        tokenizer=tokenizer_dir,
        vision_config=vision,
        device="cpu",
    )
    images, prompts = coloured_images(2), ["a red cube", "two blue spheres"]
    pixels = scorer.image_processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (2, 35)
    base_vocab = len(BertTokenizer.from_pretrained(tokenizer_dir))
    assert scorer.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [base_vocab, base_vocab + 1]  # as BLIP
    with torch.no_grad():
        vision_model: BlipVisionModel = reference.vision_model
        text_model: BlipTextModel = reference.text_encoder
        image_tokens = vision_model(pixel_values=pixels).last_hidden_state
        text = text_model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], encoder_hidden_states=image_tokens
        ).last_hidden_state[:, 0]
        expected = (reference.mlp(text).squeeze(-1) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD
    torch.testing.assert_close(scorer(images, prompts), expected, atol=1e-5, rtol=1e-5)
    assert scorer.model.text_encoder.config.encoder_hidden_size == 24  # encoder_width follows the ViT, as in BLIP

    del state["blip.visual_encoder.norm.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="post_layernorm.weight"):
        ImageRewardScorer(
            checkpoint=str(tmp_path / "broken.pt"), med_config=med, tokenizer=tokenizer_dir, vision_config=vision
        )


def test_checkpoints_with_arbitrary_pickled_objects_are_refused(tmp_path):
    import argparse

    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not unpickled here"):
        load_weights_file(str(tmp_path / "ckpt.pt"))
    torch.save({"module.w": torch.ones(2)}, tmp_path / "ddp.pt")
    assert list(load_weights_file(str(tmp_path / "ddp.pt"))) == ["w"]
