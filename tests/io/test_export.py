"""`trl-diffusion-sdpo export`: the exported LoRAs load in diffusers' own loaders (its kohya and non-diffusers
converters) and predict what the trained diffusers-format LoRA predicts; `--merge` writes a pipeline that predicts
what the base with the LoRA at that strength predicts; bad inputs are refused clearly."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from safetensors import safe_open

from tests.helpers.lora_files import ALPHA, RANK, write_base_and_lora
from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.families import FluxKontextFamily, family_for_pipeline
from trl_diffusion_sdpo.io.export import export_lora, merge_lora
from trl_diffusion_sdpo.io.lora_formats import (
    LoraFile,
    LoraModule,
    fuse_lora_modules,
    kohya_fused_state_dict,
    read_lora,
)
from trl_diffusion_sdpo.io.saving import save_lora_adapters
from trl_diffusion_sdpo.testing import build_tiny_flux_pipeline, build_tiny_sd_pipeline


@torch.no_grad()
def prediction(pipe) -> torch.Tensor:
    """The denoiser's prediction on fixed latents and prompts, through the family's own call."""
    family = family_for_pipeline(pipe)
    gen = torch.Generator().manual_seed(3)
    shape = family.latent_shape(32, num_frames=5) if family.video else family.latent_shape(32)
    sample = torch.randn((2, *shape), generator=gen)
    tokenize, prompts = family.prompt_tokenizer(), ["a red square", "two blue circles"]
    if getattr(tokenize, "reads_sources", False):  # the prompt encoding reads the source too (Qwen-Image-Edit)
        from PIL import Image

        embeds = family.encode_prompts(tokenize(prompts, [[Image.new("RGB", (32, 32), (200, 30, 30))]] * 2))
    else:
        embeds = family.encode_prompts(tokenize(prompts))
    if family.edits:  # an editing family: a source image's latents as well
        embeds.source_latents = torch.randn((2, 1, *shape), generator=gen)
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)
    timesteps = torch.tensor([300.0, 700.0]) if family.flow_matching else torch.tensor([300, 700])
    return family.call_denoiser(family.denoiser, sample, timesteps, family.denoiser_conditioning(embeds, time_ids))


def loaded(base: str, lora_file: str | None = None, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(base)
    if lora_file is not None:
        pipe.load_lora_weights(lora_file, **kwargs)
    return pipe


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = write_base_and_lora(name, tmp_path_factory.mktemp(name))
        return made[name]

    return get


@pytest.fixture(scope="module")
def sd_case(cases):
    return cases("sd")


# (base, lora) -> the predictions of the base with that LoRA and without it, computed once per process: the tests'
# bases and LoRAs are written once per module (``cases``) and never changed
_REFERENCE_PREDICTIONS: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def check_reloads_like_the_trained_lora(base: str, lora: str, exported: str) -> None:
    if (base, lora) not in _REFERENCE_PREDICTIONS:
        _REFERENCE_PREDICTIONS[base, lora] = prediction(loaded(base, lora)), prediction(loaded(base))
    reference, untouched = _REFERENCE_PREDICTIONS[base, lora]
    assert (reference - untouched).abs().max() > 1e-3, "the LoRA changes nothing: the test could not fail"
    torch.testing.assert_close(prediction(loaded(base, exported)), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_kohya_export_loads_with_diffusers_kohya_loader_and_predicts_like_the_lora(name, cases, tmp_path):
    base, lora = cases(name)
    out = str(tmp_path / "lora_kohya.safetensors")
    export_lora(lora, base, "kohya", out)
    with safe_open(out, framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
        alphas = [handle.get_tensor(k).item() for k in keys if k.endswith(".alpha")]
    assert all(k.startswith("lora_unet_") for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys if k.endswith(".weight")} == {"lora_down", "lora_up"}
    assert len(alphas) == len(keys) // 3 and set(alphas) == {ALPHA}
    assert metadata["ss_network_dim"] == str(RANK) and metadata["ss_network_alpha"] == str(ALPHA)
    assert metadata["ss_base_model_version"] == {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}[name]
    check_reloads_like_the_trained_lora(base, lora, out)


def test_comfyui_export_of_a_unet_model_is_the_kohya_file(cases, tmp_path):
    base, lora = cases("sd")
    export_lora(lora, base, "kohya", str(tmp_path / "k.safetensors"))
    export_lora(lora, base, "comfyui", str(tmp_path / "c.safetensors"))
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as k, safe_open(str(tmp_path / "c.safetensors"), "pt") as c:
        assert sorted(k.keys()) == sorted(c.keys())
        assert all(torch.equal(k.get_tensor(key), c.get_tensor(key)) for key in k.keys())


def test_flux_comfyui_export_bakes_the_scale_and_loads_back_in_diffusers(cases, tmp_path):
    base, lora = cases("flux")
    out = str(tmp_path / "flux_comfy.safetensors")
    export_lora(lora, base, "comfyui", out)
    with safe_open(out, framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    check_reloads_like_the_trained_lora(base, lora, out)


@pytest.mark.slow  # ~1 s each on an idle CPU; FLUX stands for the flow families in the default suite
@pytest.mark.parametrize("name", ["sd3", "qwen-image", "z-image", "wan"])
def test_comfyui_export_of_other_flow_families_loads_back_in_diffusers(name, cases, tmp_path):
    base, lora = cases(name)
    out = str(tmp_path / "comfy.safetensors")
    export_lora(lora, base, "comfyui", out)
    with safe_open(out, framework="pt") as handle:
        prefixes = {k.split(".", 1)[0] for k in handle.keys()}
    assert prefixes == ({"diffusion_model"} if name == "wan" else {"transformer"})
    check_reloads_like_the_trained_lora(base, lora, out)


# strength 1.0 (the default) in the slow tier: 0.5 runs the same fuse and tells a strength passed on from one ignored
@pytest.mark.parametrize("strength", [0.5, pytest.param(1.0, marks=pytest.mark.slow)])
def test_merge_predicts_like_the_lora_at_that_strength(strength, sd_case, tmp_path):
    base, lora = sd_case
    merged = merge_lora(lora, base, str(tmp_path / "merged"), strength=strength)
    files = [f for _, _, fs in os.walk(merged) for f in fs]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))], files
    merged_pipe = DiffusionPipeline.from_pretrained(merged)
    assert not any("lora" in name for name, _ in merged_pipe.unet.named_parameters())
    reference = loaded(base, lora, adapter_name="trained")
    reference.set_adapters(["trained"], adapter_weights=[strength])
    torch.testing.assert_close(prediction(merged_pipe), prediction(reference), rtol=1e-5, atol=1e-5)


def test_cli_exports_and_merges(sd_case, tmp_path, capsys):
    base, lora = sd_case
    out = str(tmp_path / "cli.safetensors")
    assert main(["export", "--lora", lora, "--base", base, "--format", "kohya", "--output", out]) == 0
    assert os.path.isfile(out) and not os.path.exists(out + ".partial")
    assert "kohya" in capsys.readouterr().out
    merged = str(tmp_path / "merged")
    assert main(["export", "--lora", lora, "--base", base, "--merge", "--strength", "0.5", "--output", merged]) == 0
    assert os.path.isfile(os.path.join(merged, "model_index.json"))
    assert main(["export", "--lora", lora, "--base", base, "--merge", "--format", "kohya", "--output", out]) == 2
    assert "--format applies to a LoRA export only" in capsys.readouterr().err


def test_bad_inputs_are_refused_clearly(sd_case, cases, tmp_path, capsys):
    base, lora = sd_case
    out = str(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        export_lora(str(tmp_path / "missing"), base, "kohya", out)
    with pytest.raises(FileNotFoundError, match="without pytorch_lora_weights"):
        export_lora(str(tmp_path), base, "kohya", out)
    with pytest.raises(ValueError, match="--format 'lycoris'"):
        export_lora(lora, base, "lycoris", out)
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["export", "--lora", lora, "--base", base, "--format", "lycoris", "--output", out])
    assert "invalid choice: 'lycoris'" in capsys.readouterr().err
    sdxl_base, _ = cases("sdxl")
    with pytest.raises(ValueError, match="does not fit the unet"):  # another UNet family: sizes differ
        export_lora(lora, sdxl_base, "kohya", out)
    flux_base, flux_lora = cases("flux")
    with pytest.raises(ValueError, match="adapts a `unet`.*flux"):
        export_lora(lora, flux_base, "kohya", out)
    qwen_base, qwen_lora = cases("qwen-image")
    with pytest.raises(ValueError, match="not written for Qwen-Image: kohya-ss sd-scripts has no Qwen-Image"):
        export_lora(qwen_lora, qwen_base, "kohya", out)
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        export_lora(lora, str(tmp_path), "kohya", out)
    kohya = str(tmp_path / "k.safetensors")
    export_lora(lora, base, "kohya", kohya)
    with pytest.raises(ValueError, match="kohya/ComfyUI file already"):
        export_lora(kohya, base, "comfyui", out)
    missing = str(tmp_path / "missing")
    assert main(["export", "--lora", missing, "--base", base, "--format", "kohya", "--output", out]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_diffusers_export_keeps_the_adapter_config(sd_case, tmp_path):
    base, lora = sd_case
    out = str(tmp_path / "d.safetensors")
    export_lora(lora, base, "diffusers", out)
    with safe_open(out, "pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert config["unet.lora_alpha"] == ALPHA and config["unet.r"] == RANK
    check_reloads_like_the_trained_lora(base, lora, out)


def test_rslora_scale_is_the_one_peft_applies(tmp_path):
    pipe = build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tokenizers"))
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, use_rslora=True, target_modules=["to_q", "to_v"])
    pipe.unet.add_adapter(config)
    save_lora_adapters(pipe.unet, str(tmp_path / "lora"), type(pipe))
    read = read_lora(str(tmp_path / "lora"))
    layers = dict(pipe.unet.named_modules())
    assert read.modules and {name: m.scale for name, m in read.modules.items()} == {
        name: layers[name].scaling["default"] for name in read.modules
    }


def _linear_names(transformer: torch.nn.Module) -> list[str]:
    """Every Linear layer of the transformer, by its full name."""
    return [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]


def test_flux_kohya_export_loads_with_diffusers_kohya_loader_and_predicts_like_the_lora(tmp_path):
    """A LoRA on every layer of FLUX.1's blocks that diffusers' kohya loader maps at any size: the double blocks'
    fused img/txt qkv (rank 3r, block-diagonal up), projections, MLPs and modulations, and the single blocks'
    linear2 and modulation. (linear1 is split by that loader at FLUX.1's own sizes only, and the top-level layers
    it converts but does not load: the next test.)"""
    pipe = build_tiny_flux_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tokenizers"))
    targets = [
        name
        for name in _linear_names(pipe.transformer)
        if name.startswith("transformer_blocks.") or name.endswith(("proj_out", "norm.linear")) and "single" in name
    ]
    base, lora = write_base_and_lora("flux", tmp_path, targets=targets)
    out = str(tmp_path / "flux_kohya.safetensors")
    export_lora(lora, base, "kohya", out)
    with safe_open(out, framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        qkv_down = handle.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")
        qkv_alpha = handle.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha").item()
    assert all(k.startswith("lora_unet_") for k in keys)
    assert {"lora_unet_single_blocks_0_linear2.alpha", "lora_unet_double_blocks_0_txt_mod_lin.alpha"} <= keys
    assert qkv_down.shape[0] == 3 * RANK and qkv_alpha == pytest.approx(ALPHA / RANK * 3 * RANK)
    assert metadata["ss_base_model_version"] == "flux1" and metadata["ss_network_module"] == "networks.lora_flux"
    assert metadata["ss_network_dim"] == str(RANK) and metadata["ss_network_alpha"] == str(ALPHA)
    reference = prediction(loaded(base, lora))
    assert (reference - prediction(loaded(base))).abs().max() > 1e-3, "the LoRA changes nothing"
    exported = prediction(loaded(base, out))
    print(f"FLUX kohya round trip: max |difference| {(exported - reference).abs().max().item():.3g}")
    torch.testing.assert_close(exported, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("export_format", ["kohya", "comfyui"])
def test_flux_kontext_exports_in_flux1s_layouts_and_reloads_into_the_kontext_pipeline(tmp_path, export_format):
    """Kontext's transformer is FLUX.1's: its LoRA is written in FLUX.1's kohya and ComfyUI layouts (sd-scripts'
    metadata names flux1), and FluxKontextPipeline.load_lora_weights of the exported file predicts as the LoRA. The
    double blocks' layers: diffusers' kohya loader splits the single blocks' fused linear1 at FLUX.1's sizes only."""
    targets = [f"transformer_blocks.0.attn.{name}" for name in FluxKontextFamily.lora_target_modules]
    base, lora = write_base_and_lora("flux-kontext", tmp_path, targets=targets)
    out = str(tmp_path / f"kontext_{export_format}.safetensors")
    result = export_lora(lora, base, export_format, out)
    assert result.family == "flux-kontext"
    with safe_open(out, framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata() or {}
    prefix = "lora_unet_double_blocks_0_" if export_format == "kohya" else "transformer.transformer_blocks.0."
    assert any(k.startswith(prefix) for k in keys)
    if export_format == "kohya":
        assert metadata["ss_base_model_version"] == "flux1" and metadata["ss_network_module"] == "networks.lora_flux"
    reference = prediction(loaded(base, lora))
    assert (reference - prediction(loaded(base))).abs().max() > 1e-3, "the LoRA changes nothing"
    torch.testing.assert_close(prediction(loaded(base, out)), reference, rtol=1e-5, atol=1e-5)


def test_qwen_image_edit_comfyui_export_is_qwen_images_layout_and_reloads_into_the_edit_pipeline(cases, tmp_path):
    """Qwen-Image-Edit's transformer is Qwen-Image's: ComfyUI maps its LoRA by the same diffusers names, and
    QwenImageEditPipeline.load_lora_weights of the exported file predicts as the LoRA."""
    base, lora = cases("qwen-image-edit")
    out = str(tmp_path / "edit_comfy.safetensors")
    assert export_lora(lora, base, "comfyui", out).family == "qwen-image-edit"
    with safe_open(out, framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)
    reference = prediction(loaded(base, lora))
    assert (reference - prediction(loaded(base))).abs().max() > 1e-3, "the LoRA changes nothing"
    torch.testing.assert_close(prediction(loaded(base, out)), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="--format kohya is not written for qwen-image-edit"):
        export_lora(lora, base, "kohya", str(tmp_path / "k.safetensors"))


def test_flux_linear1_at_flux1_sizes_and_top_level_layers_convert_back_in_diffusers_kohya_converter():
    """diffusers' kohya FLUX converter splits ``single_blocks_N_linear1`` into FLUX.1's q/k/v/proj_mlp sizes
    (3072, 3072, 3072, 12288): a LoRA of those sizes on q, k and v (proj_mlp and the double block's k without
    one) and on the top-level layers (embedders, final layer) is exported and converted back by it, and each
    module's change ``scale * B A`` comes back exactly. The converter names the top-level layers without the
    ``transformer.`` prefix, so ``load_lora_weights`` drops them (diffusers 0.42); ComfyUI loads them."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    gen = torch.Generator().manual_seed(5)
    hidden, mlp = 3072, 12288
    sizes = {f"single_transformer_blocks.0.attn.to_{p}": (hidden, hidden) for p in "qkv"}
    sizes |= {"transformer_blocks.0.attn.to_q": (hidden, hidden), "transformer_blocks.0.attn.to_v": (hidden, hidden)}
    top = {"x_embedder": (16, 64), "context_embedder": (16, 32), "proj_out": (64, 16), "norm_out.linear": (32, 16)}
    top |= {
        f"time_text_embed.{e}_embedder.linear_{i}": (16, 16) for e in ("timestep", "guidance", "text") for i in (1, 2)
    }
    modules = {
        name: LoraModule(torch.randn(RANK, fan_in, generator=gen), torch.randn(out, RANK, generator=gen), 0.5)
        for name, (out, fan_in) in (sizes | top).items()
    }
    lora = LoraFile("synthetic", "transformer", modules, None, {}, {})
    out_features = {name: out for name, (out, _) in sizes.items()}
    out_features |= {"single_transformer_blocks.0.proj_mlp": mlp, "transformer_blocks.0.attn.to_k": hidden}
    state = kohya_fused_state_dict(lora, "flux", out_features)
    assert state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * hidden + mlp, 4 * RANK)
    back = _convert_kohya_flux_lora_to_diffusers(dict(state))
    for name, module in modules.items():
        key = name if name in top else f"transformer.{name}"
        a, b = back[f"{key}.lora_A.weight"], back[f"{key}.lora_B.weight"]
        assert a.shape[0] == RANK  # split back at the part's rank: the block-diagonal ("sparse") path
        torch.testing.assert_close(b @ a, module.scale * module.up @ module.down, rtol=1e-5, atol=1e-4)
    for empty in ("single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.attn.to_k"):
        assert not back[f"transformer.{empty}.lora_B.weight"].any()


class _ZerosForMissing(dict):
    """A checkpoint in which every tensor the converter asks for and the LoRA does not change is zero."""

    def pop(self, key, *default):
        return super().pop(key) if key in self else torch.zeros(6)


# Every attention and MLP layer of SD3's joint blocks (the last block's context stream has no MLP or output
# projection; PEFT adapts the names that exist).
SD3_JOINT_BLOCK_LAYERS = [
    *("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj"),
    *("attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
]


@pytest.mark.parametrize("targets", [None, SD3_JOINT_BLOCK_LAYERS], ids=["default-targets", "every-joint-layer"])
def test_sd3_kohya_export_converts_back_through_diffusers_sd3_single_file_names(targets, cases, tmp_path):
    """No diffusers LoRA loader reads kohya SD3 files (ComfyUI does: `lora_unet_` plus its MMDiT's original names).
    Each exported layer's change ``alpha / rank * up @ down`` is placed at its original MMDiT name and converted by
    diffusers' own single-file SD3 converter to diffusers' names; it must equal the trained LoRA's changes. On the
    default (attention) targets and on every attention and MLP layer of the joint blocks."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    base, lora = cases("sd3") if targets is None else write_base_and_lora("sd3", tmp_path, targets=targets)
    out = str(tmp_path / "sd3_kohya.safetensors")
    export_lora(lora, base, "kohya", out)
    checkpoint = _ZerosForMissing({"context_embedder.weight": torch.zeros(16, 32)})
    with safe_open(out, framework="pt") as handle:
        metadata = handle.metadata()
        for key in {k.split(".", 1)[0] for k in handle.keys()}:
            down, up = handle.get_tensor(f"{key}.lora_down.weight"), handle.get_tensor(f"{key}.lora_up.weight")
            alpha = handle.get_tensor(f"{key}.alpha").item()
            name = key.removeprefix("lora_unet_").replace("_", ".")
            for fused in ("joint.blocks", "x.block", "context.block", "adaLN.modulation"):
                name = name.replace(fused, fused.replace(".", "_"))
            checkpoint[f"{name}.weight"] = alpha / down.shape[0] * up @ down
    assert metadata["ss_network_module"] == "networks.lora_sd3"
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    trained = read_lora(lora)
    assert trained.modules
    if targets is not None:  # the MLPs of both streams are adapted, so their original names are checked too
        assert any(name.endswith("ff.net.2") for name in trained.modules)
        assert any(name.endswith("ff_context.net.0.proj") for name in trained.modules)
    for name, module in trained.modules.items():
        expected = module.scale * module.up @ module.down
        torch.testing.assert_close(converted[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)


def test_fusing_keeps_each_part_change_and_zero_rows_for_parts_without_a_lora():
    """fuse_lora_modules against the definition: ``scale * up @ down`` stacks ``s_j B_j A_j`` (different ranks and
    scales per part), zero rows for a part without a LoRA, and the off-diagonal blocks of ``up`` are zero."""
    gen = torch.Generator().manual_seed(0)
    q = LoraModule(torch.randn(2, 6, generator=gen), torch.randn(4, 2, generator=gen), 1.5)
    v = LoraModule(torch.randn(3, 6, generator=gen), torch.randn(5, 3, generator=gen), 0.25)
    fused = fuse_lora_modules([q, None, v], [4, 7, 5])
    assert fused.rank == 9
    expected = torch.cat([q.scale * q.up @ q.down, torch.zeros(7, 6), v.scale * v.up @ v.down])
    torch.testing.assert_close(fused.scale * fused.up @ fused.down, expected)
    assert not fused.up[:4, 3:].any() and not fused.up[4:11].any() and not fused.up[11:, :6].any()


def test_kohya_refuses_a_layer_without_a_known_kohya_name():
    module = LoraModule(torch.ones(1, 4), torch.ones(8, 1), 1.0)
    lora = LoraFile("synthetic", "transformer", {"transformer_blocks.0.norm1.linear": module}, None, {}, {})
    with pytest.raises(ValueError, match=r"no kohya-ss layer name is known for transformer_blocks.0.norm1.linear"):
        kohya_fused_state_dict(lora, "stable-diffusion-3", {})


@torch.no_grad()
def flux2_transformer_output(pipe) -> torch.Tensor:
    """The FLUX.2 transformer's prediction through the family's call, on fixed latents and fixed random prompt
    embeddings (the text encoder is not what an export changes)."""
    family = family_for_pipeline(pipe)
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn((2, *family.latent_shape(32)), generator=gen)
    hidden = torch.randn((2, 7, pipe.transformer.config.joint_attention_dim), generator=gen)
    timesteps = torch.tensor([300.0, 700.0])
    return family.call_denoiser(pipe.transformer, sample, timesteps, {"encoder_hidden_states": hidden})


def check_flux2_kohya_round_trip(name: str, tmp_path, targets=None):
    """Export a FLUX.2 LoRA as kohya, load it with the pipeline's own ``load_lora_weights`` (diffusers' kohya FLUX.2
    converter) and compare the transformer's output with the diffusers-format LoRA's, both loaded in one pipeline in
    turn; returns the file and the pipeline holding the kohya file as adapter ``exported``."""
    base, lora = write_base_and_lora(name, tmp_path, targets=targets)
    out = str(tmp_path / f"{name}_kohya.safetensors")
    export_lora(lora, base, "kohya", out)
    pipe = DiffusionPipeline.from_pretrained(base)
    untouched = flux2_transformer_output(pipe)
    pipe.load_lora_weights(lora, adapter_name="trained")
    reference = flux2_transformer_output(pipe)
    assert (reference - untouched).abs().max() > 1e-3, "the LoRA changes nothing: the test could not fail"
    pipe.delete_adapters("trained")
    pipe.load_lora_weights(out, adapter_name="exported")
    exported = flux2_transformer_output(pipe)
    print(f"{name} kohya round trip: max |difference| {(exported - reference).abs().max().item():.3g}")
    torch.testing.assert_close(exported, reference, rtol=1e-5, atol=1e-5)
    return out, pipe


@pytest.mark.parametrize("name", ["flux2", "flux2-klein"])
def test_flux2_kohya_export_of_the_default_targets_loads_in_diffusers_and_predicts_like_the_lora(name, tmp_path):
    """The default targets (the double blocks' image attention, the single blocks' fused QKV+MLP input and output)
    in the layout of diffusers' ``_convert_kohya_flux2_lora_to_diffusers``: q/k/v fused onto ``img_attn_qkv`` at
    rank 3r (block-diagonal up), ``linear1``/``linear2`` as they are, ``alpha / rank`` the trained scale."""
    out, pipe = check_flux2_kohya_round_trip(name, tmp_path)
    # split back at the part's rank r, not 3r: diffusers took the block-diagonal ("sparse") path
    assert pipe.transformer.transformer_blocks[0].attn.to_k.lora_A["exported"].weight.shape[0] == RANK
    with safe_open(out, framework="pt") as handle:
        keys, metadata = {k.rsplit(".", 2)[0] for k in handle.keys()}, handle.metadata()
        qkv_up = handle.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight")
        qkv_alpha = handle.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha").item()
        linear1_alpha = handle.get_tensor("lora_unet_single_blocks_0_linear1.alpha").item()
    assert {k.removesuffix(".lora_down").removesuffix(".lora_up") for k in keys} == {
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_single_blocks_0_linear1",
        "lora_unet_single_blocks_0_linear2",
    }
    assert qkv_up.shape[1] == 3 * RANK and qkv_alpha == pytest.approx(ALPHA / RANK * 3 * RANK)
    assert linear1_alpha == pytest.approx(ALPHA)
    assert metadata["ss_network_module"] == "networks.lora_flux_2"
    assert metadata["ss_base_model_version"] == {"flux2": "flux_2_dev", "flux2-klein": "flux_2_klein"}[name]
    assert metadata["ss_network_dim"] == str(RANK) and metadata["ss_network_alpha"] == str(ALPHA)
    # For ComfyUI, FLUX.2's comfyui file is this kohya file: its diffusers-key mapping lacks FLUX.2's single blocks.
    comfy = str(tmp_path / f"{name}_comfyui.safetensors")
    export_lora(str(tmp_path / "lora"), str(tmp_path / "base"), "comfyui", comfy)
    with safe_open(out, framework="pt") as kohya, safe_open(comfy, framework="pt") as comfyui:
        named = {k: v for k, v in comfyui.metadata().items() if k != "ss_output_name"}  # the file's own name
        assert set(comfyui.keys()) == set(kohya.keys())
        assert named == {k: v for k, v in kohya.metadata().items() if k != "ss_output_name"}
        for key in kohya.keys():
            assert torch.equal(comfyui.get_tensor(key), kohya.get_tensor(key)), key


def test_flux2_kohya_export_of_every_mapped_layer_loads_in_diffusers_and_predicts_like_the_lora(tmp_path):
    """Every layer the FLUX.2 kohya converter maps, top-level ones included: the double blocks' img and txt
    attention (the txt qkv with add_k_proj left out, a zero block), projections and both MLPs, the single blocks,
    the embedders and the final linear layer. diffusers' converter names the top-level layers under
    ``transformer.`` (unlike its FLUX.1 one), so ``load_lora_weights`` loads them: checked on the module too."""
    targets = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_v_proj",
        "to_add_out",
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
        "to_qkv_mlp_proj",
        "single_transformer_blocks.0.attn.to_out",
        "x_embedder",
        "context_embedder",
        "timestep_embedder.linear_1",
        "timestep_embedder.linear_2",
        "proj_out",
    ]
    out, pipe = check_flux2_kohya_round_trip("flux2-klein", tmp_path, targets=targets)
    with safe_open(out, framework="pt") as handle:
        keys = {k.rsplit(".", 2)[0].removesuffix(".lora_down").removesuffix(".lora_up") for k in handle.keys()}
    top = {"img_in", "txt_in", "time_in_in_layer", "time_in_out_layer", "final_layer_linear"}
    double = {f"{s}_{layer}" for s in ("img", "txt") for layer in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2")}
    assert keys == {f"lora_unet_{n}" for n in top} | {f"lora_unet_double_blocks_0_{n}" for n in double} | {
        "lora_unet_single_blocks_0_linear1",
        "lora_unet_single_blocks_0_linear2",
    }
    for name in ("x_embedder", "context_embedder", "proj_out"):
        assert "exported" in getattr(pipe.transformer, name).lora_A, f"{name} was not loaded"


def test_flux2_kohya_refuses_a_modulation_layer_and_points_to_diffusers():
    module = LoraModule(torch.ones(1, 4), torch.ones(8, 1), 1.0)
    lora = LoraFile("synthetic", "transformer", {"double_stream_modulation_img.linear": module}, None, {}, {})
    with pytest.raises(ValueError, match=r"known for double_stream_modulation_img.linear .*Use --format diffusers"):
        kohya_fused_state_dict(lora, "flux2", {})


def test_flux2_kohya_names_are_bfl_original_names_by_diffusers_single_file_converter():
    """The exported names are BFL's original FLUX.2 layer names (what ComfyUI's generic ``lora_unet_`` mapping and
    musubi-tuner address): each layer's change ``alpha / rank * up @ down`` is placed at its original weight name and
    converted by diffusers' single-file FLUX.2 converter (which splits the fused qkv); every module's change must
    come back at its diffusers name, and the txt qkv's k part, without a LoRA, as zeros."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    gen = torch.Generator().manual_seed(7)
    sizes = {f"transformer_blocks.0.attn.{p}": (16, 16) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    sizes |= {f"transformer_blocks.0.attn.{p}": (16, 16) for p in ("add_q_proj", "add_v_proj", "to_add_out")}
    for ff in ("ff", "ff_context"):
        sizes |= {f"transformer_blocks.0.{ff}.linear_in": (96, 16), f"transformer_blocks.0.{ff}.linear_out": (16, 48)}
    sizes |= {"single_transformer_blocks.0.attn.to_qkv_mlp_proj": (144, 16)}
    sizes |= {"single_transformer_blocks.0.attn.to_out": (16, 64), "x_embedder": (16, 16), "proj_out": (16, 16)}
    sizes |= {"context_embedder": (16, 48), "time_guidance_embed.timestep_embedder.linear_1": (16, 32)}
    sizes |= {"time_guidance_embed.timestep_embedder.linear_2": (16, 16)}
    modules = {
        name: LoraModule(
            torch.randn(RANK, fan_in, generator=gen), torch.randn(out, RANK, generator=gen), 0.5 + index / 8
        )
        for index, (name, (out, fan_in)) in enumerate(sizes.items())
    }
    lora = LoraFile("synthetic", "transformer", modules, None, {}, {})
    out_features = {name: out for name, (out, _) in sizes.items()} | {"transformer_blocks.0.attn.add_k_proj": 16}
    state = kohya_fused_state_dict(lora, "flux2", out_features)
    checkpoint = {}
    for key in {k.split(".", 1)[0] for k in state}:
        down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
        name = key.removeprefix("lora_unet_").replace("_", ".")
        for joined in ("double_blocks", "single_blocks", "time_in", "in_layer", "out_layer", "final_layer"):
            name = name.replace(joined.replace("_", "."), joined)
        for joined in ("img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_in", "txt_in"):
            name = name.replace(joined.replace("_", "."), joined)
        checkpoint[f"{name}.weight"] = state[f"{key}.alpha"].item() / down.shape[0] * up @ down
    converted = convert_flux2_transformer_checkpoint_to_diffusers(checkpoint)
    assert set(converted) == {f"{name}.weight" for name in out_features}
    for name, module in modules.items():
        torch.testing.assert_close(converted[f"{name}.weight"], module.scale * module.up @ module.down)
    assert not converted["transformer_blocks.0.attn.add_k_proj.weight"].any()


@pytest.mark.parametrize("export_format", ["comfyui", "kohya"])
@pytest.mark.parametrize("name", ["hunyuan-video-1.5", "qwen-image-2.1"])
def test_a_family_whose_tool_mapping_was_not_read_is_refused_by_name(tmp_path, export_format, name):
    """HunyuanVideo 1.5 and Qwen-Image 2.1: neither sd-scripts' nor ComfyUI's LoRA key mapping was checked, so
    nothing is written; the diffusers file and merging stay available."""
    base, lora = write_base_and_lora(name, tmp_path, targets=["to_q"])
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=f"--format {export_format} is not written for {name}: neither"):
        export_lora(lora, base, export_format, str(out))
    assert not out.exists()
    export_lora(lora, base, "diffusers", str(out))
    assert out.exists()
