"""The tiny pipelines: RoPE axes that do not split the head width are refused when the pipeline is built, naming the
arguments, instead of failing later inside diffusers' first forward pass; and every builder builds the same
components (configs, weights, tokenizers) it was recorded building."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import torch

from trl_diffusion_sdpo.testing import (
    build_tiny_flux2_klein_pipeline,
    build_tiny_flux2_pipeline,
    build_tiny_flux_kontext_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_hunyuan_video15_pipeline,
    build_tiny_qwen_image21_pipeline,
    build_tiny_qwen_image_edit_pipeline,
    build_tiny_qwen_image_edit_plus_pipeline,
    build_tiny_qwen_image_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sd_pipeline,
    build_tiny_sdxl_pipeline,
    build_tiny_wan_pipeline,
    build_tiny_z_image_pipeline,
)
from trl_diffusion_sdpo.testing.components import rope_axes, two_rope_heads


@pytest.mark.parametrize(
    "build, widths, message",
    [
        (build_tiny_flux_pipeline, {"attention_head_dim": 16}, r"head_dim=16, axes_dims_rope=\(2, 2, 4\).*16"),
        (build_tiny_qwen_image_pipeline, {"axes_dims_rope": (4, 4, 4)}, r"axes_dims_rope=\(4, 4, 4\).*sum to 12"),
        (build_tiny_flux2_pipeline, {"axes_dims_rope": (2, 2, 2)}, r"axes_dims_rope=\(2, 2, 2\).*head width 8"),
        (build_tiny_flux2_klein_pipeline, {"attention_head_dim": 12}, r"attention_head_dim=12.*head width 12"),
        (build_tiny_z_image_pipeline, {"dim": 64}, r"dim=64, axes_dims=\(4, 6, 6\).*sum to 16.*head width 32"),
        (build_tiny_qwen_image21_pipeline, {"attention_head_dim": 12}, r"attention_head_dim=12.*head width 12"),
    ],
    ids=["flux", "qwen-image", "flux2", "flux2-klein", "z-image", "qwen-image-2.1"],
)
def test_rope_axes_that_do_not_split_the_head_are_refused_naming_the_arguments(build, widths, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build(seed=0, tokenizer_dir=str(tmp_path), **widths)


def test_the_width_keywords_are_two_heads_of_the_given_width():
    assert two_rope_heads(96, [24, 36, 36]) == {
        "attention_head_dim": 96,
        "num_attention_heads": 2,
        "axes_dims_rope": (24, 36, 36),
    }
    assert rope_axes((32, 40, 40), 112, "dim=224") == (32, 40, 40)


# -- the builders build the same pipelines ----------------------------------------------------------------------------

# (builder, keyword arguments): every builder at its defaults, and the options that change which modules are built.
BUILDS = {
    "sd": (build_tiny_sd_pipeline, {}),
    "sd-seed-3-v-prediction": (build_tiny_sd_pipeline, {"seed": 3, "prediction_type": "v_prediction"}),
    "sdxl": (build_tiny_sdxl_pipeline, {}),
    "sd3": (build_tiny_sd3_pipeline, {}),
    "sd3-without-t5": (build_tiny_sd3_pipeline, {"with_t5": False}),
    "flux": (build_tiny_flux_pipeline, {}),
    "flux-schnell": (build_tiny_flux_pipeline, {"guidance_embeds": False}),
    "flux-kontext": (build_tiny_flux_kontext_pipeline, {}),
    "qwen-image": (build_tiny_qwen_image_pipeline, {}),
    "qwen-image-edit": (build_tiny_qwen_image_edit_pipeline, {}),
    "qwen-image-edit-plus": (build_tiny_qwen_image_edit_plus_pipeline, {}),
    "qwen-image-2.1": (build_tiny_qwen_image21_pipeline, {}),
    "z-image": (build_tiny_z_image_pipeline, {}),
    "flux2": (build_tiny_flux2_pipeline, {}),
    "flux2-klein": (build_tiny_flux2_klein_pipeline, {"is_distilled": True}),
    "hunyuan-video-1.5": (build_tiny_hunyuan_video15_pipeline, {}),
    "wan": (build_tiny_wan_pipeline, {}),
}


def _config(component: Any) -> dict:
    """A component's config without the library's bookkeeping (class name, versions, where it was loaded from)."""
    config = getattr(component, "config", None)
    if config is None:
        return {}
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: value for key, value in config.items() if not key.startswith("_") and key != "transformers_version"}


def pipeline_fingerprint(pipeline: Any) -> dict[str, str]:
    """Per component, a SHA-256 (first 16 hex digits) of its config, every state-dict entry's name, dtype, shape and
    bytes (modules), and the vocabulary and chat template (tokenizers and processors)."""
    prints = {}
    for name, component in sorted(pipeline.components.items()):
        if component is None:
            continue
        digest = hashlib.sha256(json.dumps(_config(component), sort_keys=True, default=repr).encode())
        if isinstance(component, torch.nn.Module):
            for key, tensor in sorted(component.state_dict().items()):
                digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        tokenizer = getattr(component, "tokenizer", component)
        if hasattr(tokenizer, "get_vocab"):
            digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
            digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
        prints[name] = digest.hexdigest()[:16]
    return prints


# Computed with the builders as they were before they shared their configs' helpers (``python
# tests/test_tiny_models.py`` prints this table): a change that alters a config, a seed or the order of random draws
# changes a digest.
FINGERPRINTS = {
    "flux": {
        "scheduler": "fcfba5467bac378a",
        "text_encoder": "e41c4ab3c4f09360",
        "text_encoder_2": "4a7857c1482b437e",
        "tokenizer": "702f2d859238fbc5",
        "tokenizer_2": "93f7593d27c1fd6c",
        "transformer": "f049ab89a005600b",
        "vae": "27b7b802c8d0a5a6",
    },
    "flux-kontext": {
        "scheduler": "fcfba5467bac378a",
        "text_encoder": "e41c4ab3c4f09360",
        "text_encoder_2": "4a7857c1482b437e",
        "tokenizer": "702f2d859238fbc5",
        "tokenizer_2": "93f7593d27c1fd6c",
        "transformer": "f049ab89a005600b",
        "vae": "27b7b802c8d0a5a6",
    },
    "flux-schnell": {
        "scheduler": "fcfba5467bac378a",
        "text_encoder": "521676b38558e9b2",
        "text_encoder_2": "817e203a10a9680e",
        "tokenizer": "702f2d859238fbc5",
        "tokenizer_2": "93f7593d27c1fd6c",
        "transformer": "70dfef4921463b14",
        "vae": "adeea731562974dd",
    },
    "flux2": {
        "scheduler": "fcfba5467bac378a",
        "text_encoder": "650ec4059718b28b",
        "tokenizer": "c176c6df645e8491",
        "transformer": "4a2c4ac40ad60e93",
        "vae": "cf7728b4ec6e804c",
    },
    "flux2-klein": {
        "scheduler": "fcfba5467bac378a",
        "text_encoder": "098d957ad7aa3bc4",
        "tokenizer": "be1ccb85edb52ffc",
        "transformer": "2dd90a2467f2a7b9",
        "vae": "4254fa3dc62fa716",
    },
    "hunyuan-video-1.5": {
        "guider": "7baef882683ce4b6",
        "scheduler": "701f54766be1f000",
        "text_encoder": "f9d32e873b638869",
        "text_encoder_2": "327e9c238d9138a9",
        "tokenizer": "63229062352e4405",
        "tokenizer_2": "c4795298baf1834f",
        "transformer": "0c276f366f52b592",
        "vae": "996c5786425a1c1f",
    },
    "qwen-image": {
        "scheduler": "a5b5fdf3ef7be35d",
        "text_encoder": "22cee6407cd1fed4",
        "tokenizer": "be1ccb85edb52ffc",
        "transformer": "a12ab720ca0f1c23",
        "vae": "ecca30dbdcad225b",
    },
    "qwen-image-2.1": {
        "processor": "02618e7402d06f55",
        "scheduler": "a5b5fdf3ef7be35d",
        "text_encoder": "2f0eeceac93724f1",
        "transformer": "26995211048b3642",
        "vae": "ee3c9f72aa837492",
    },
    "qwen-image-edit": {
        "processor": "b1c83305a88b0ccf",
        "scheduler": "a5b5fdf3ef7be35d",
        "text_encoder": "7960a3cb5fbca2f6",
        "tokenizer": "b1c83305a88b0ccf",
        "transformer": "a12ab720ca0f1c23",
        "vae": "ecca30dbdcad225b",
    },
    "qwen-image-edit-plus": {
        "processor": "b1c83305a88b0ccf",
        "scheduler": "a5b5fdf3ef7be35d",
        "text_encoder": "7960a3cb5fbca2f6",
        "tokenizer": "b1c83305a88b0ccf",
        "transformer": "a12ab720ca0f1c23",
        "vae": "ecca30dbdcad225b",
    },
    "sd": {
        "scheduler": "7b3b8a14cc9b9928",
        "text_encoder": "f87fb74273bcd29e",
        "tokenizer": "702f2d859238fbc5",
        "unet": "40bf476074576494",
        "vae": "31afe927d0884993",
    },
    "sd-seed-3-v-prediction": {
        "scheduler": "daa09f21eeb5831c",
        "text_encoder": "ec51b62bb053ec3b",
        "tokenizer": "702f2d859238fbc5",
        "unet": "ae65d1e854385210",
        "vae": "809fbd8a65dbb706",
    },
    "sd3": {
        "scheduler": "a63b40d76d729371",
        "text_encoder": "d641de076201065e",
        "text_encoder_2": "7b24d5bd1fe0603a",
        "text_encoder_3": "6608f31c24c37c78",
        "tokenizer": "702f2d859238fbc5",
        "tokenizer_2": "702f2d859238fbc5",
        "tokenizer_3": "93f7593d27c1fd6c",
        "transformer": "2fab306fadd76ea2",
        "vae": "e1abaf6cd2483d2b",
    },
    "sd3-without-t5": {
        "scheduler": "a63b40d76d729371",
        "text_encoder": "d641de076201065e",
        "text_encoder_2": "7b24d5bd1fe0603a",
        "tokenizer": "702f2d859238fbc5",
        "tokenizer_2": "702f2d859238fbc5",
        "transformer": "2fab306fadd76ea2",
        "vae": "e1abaf6cd2483d2b",
    },
    "sdxl": {
        "scheduler": "ddd856fc3704dd48",
        "text_encoder": "75cca215e7b7c73d",
        "text_encoder_2": "d237d00f6792739d",
        "tokenizer": "702f2d859238fbc5",
        "tokenizer_2": "702f2d859238fbc5",
        "unet": "3c9447de165c30ff",
        "vae": "279e89a49c61b1c3",
    },
    "wan": {
        "scheduler": "a63b40d76d729371",
        "text_encoder": "166865064f78ec1c",
        "tokenizer": "93f7593d27c1fd6c",
        "transformer": "380657406eee431a",
        "vae": "b36090718b9d008e",
    },
    "z-image": {
        "scheduler": "a63b40d76d729371",
        "text_encoder": "222a68779392c6d1",
        "tokenizer": "be1ccb85edb52ffc",
        "transformer": "197c3b25a3ebe104",
        "vae": "c5d3472c3cecfd23",
    },
}


@pytest.mark.parametrize("case", sorted(BUILDS))
def test_each_builder_builds_the_pipeline_it_always_built(case: str, tmp_path) -> None:
    build, options = BUILDS[case]
    pipeline = build(**{"seed": 0, **options}, tokenizer_dir=str(tmp_path))
    assert pipeline_fingerprint(pipeline) == FINGERPRINTS[case]


if __name__ == "__main__":  # print the table above for the builders as they are now
    import tempfile

    table = {}
    for case, (build, options) in sorted(BUILDS.items()):
        with tempfile.TemporaryDirectory() as folder:
            table[case] = pipeline_fingerprint(build(**{"seed": 0, **options}, tokenizer_dir=folder))
    print(json.dumps(table, indent=4))
