"""The key layouts ``trl-diffusion-sdpo export`` writes (see :mod:`trl_diffusion_sdpo.io.export`): reading a
diffusers-format LoRA into modules with their PEFT scales, and rewriting them for each tool.

* ``kohya`` (SD1.x/2.x, SDXL): kohya-ss sd-scripts' key layout ``lora_unet_<module with _>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``, named by diffusers' ``convert_state_dict_to_kohya``; the one format that
  AUTOMATIC1111/Forge (``extensions-builtin/Lora``), ComfyUI, SD.Next, InvokeAI and diffusers' own kohya loader
  all read for these models. The alpha is written so that ``alpha / rank`` equals the adapter's PEFT scale
  (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA): ``convert_state_dict_to_kohya`` alone writes
  ``alpha = rank``, right only when ``lora_alpha == r``. Metadata: ``ss_network_dim``, ``ss_network_alpha``,
  ``ss_network_module``, and ``ss_base_model_version``/``ss_v2``, from which the webui's ``network.py`` decides
  which model a LoRA belongs to (``sdxl_*`` is SDXL, ``ss_v2 == "True"`` SD2, else SD1).
* ``kohya`` (FLUX.1, SD3/3.5): sd-scripts' ``networks/lora_flux.py``/``lora_sd3.py`` layout, ``lora_unet_`` plus
  the original model's layer names (``double_blocks_N_img_attn_qkv``, ``single_blocks_N_linear1``,
  ``joint_blocks_N_x_block_attn_qkv``...), in which q, k and v (and FLUX's single-block MLP input) are one fused
  layer. The separate q/k/v LoRAs are fused exactly (:func:`fuse_lora_modules`): ``lora_down`` stacks their
  ``A``, ``lora_up`` is block-diagonal in their ``B``, rank ``n r``, zero blocks for a part without a LoRA; this
  is sd-scripts' own ``networks/convert_flux_lora.py`` layout, which diffusers' kohya FLUX loader splits back
  exactly, and ComfyUI maps ``lora_unet_`` plus every original weight name of its FLUX and MMDiT models
  (``comfy/lora.py``, ``model_lora_keys_unet``). ``ss_network_module`` is ``networks.lora_flux``/``lora_sd3``,
  ``ss_base_model_version`` ``flux1`` (sd-scripts' ``MODEL_VERSION_FLUX_V1``) or ``sd3``.
  Qwen-Image, Z-Image and Wan are refused: sd-scripts has no LoRA module for them (``_KOHYA_REFUSALS``).
* ``kohya`` (FLUX.2 [dev], [klein]): the layout diffusers' ``_convert_kohya_flux2_lora_to_diffusers`` reads (that of
  kohya-ss musubi-tuner's ``networks.lora_flux_2``), ``lora_unet_`` plus BFL's original FLUX.2 layer names: the
  double blocks' fused ``img_attn_qkv``/``txt_attn_qkv`` (:func:`fuse_lora_modules` again), ``img_attn_proj``,
  ``txt_attn_proj``, ``img_mlp_0/2``, ``txt_mlp_0/2``, the single blocks' ``linear1`` (diffusers' ``to_qkv_mlp_proj``,
  already fused) and ``linear2``, and ``img_in``, ``txt_in``, ``time_in_in_layer``/``out_layer``,
  ``final_layer_linear``. That converter names no modulation, guidance or final-modulation layer, so a LoRA on one is
  refused. ComfyUI's generic ``lora_unet_<weight name>`` mapping covers the same names (not run here).
  ``ss_network_module`` ``networks.lora_flux_2``, ``ss_base_model_version`` musubi-tuner's architecture name
  (``flux_2_dev``, ``flux_2_klein_4b``/``_9b`` by width; ``flux_2_klein``, our label, for other widths).
* ``comfyui``: for SD1.x/2.x and SDXL the kohya file (ComfyUI's ``comfy/lora.py`` maps ``lora_unet_`` plus the
  diffusers module name for UNet models). For SD3, FLUX.1, Qwen-Image and Z-Image the diffusers keys
  (``transformer.<module>.lora_A/B.weight``), which ``comfy/lora.py`` maps for each of these models; for Wan the
  original Wan names under ``diffusion_model.`` (``blocks.N.self_attn.q``...), the only ones ComfyUI maps for Wan.
  ComfyUI ignores the file's metadata and scales a LoRA without ``.alpha`` keys by 1, so the adapter's scale is
  multiplied into ``lora_B``: the file then loads at the trained strength everywhere, diffusers included. For
  FLUX.2 the kohya file: ComfyUI's diffusers-key mapping lacks FLUX.2's single-block names (Comfy-Org/ComfyUI#11926).
* ``diffusers``: the file as diffusers loads it (one ``.safetensors`` file, metadata kept), after the same checks.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from .saving import LORA_WEIGHTS_NAME

__all__ = [
    "LoraFile",
    "LoraModule",
    "comfyui_flow_state_dict",
    "fuse_lora_modules",
    "kohya_fused_state_dict",
    "kohya_state_dict",
    "read_lora",
    "tool_state_dict",
]

_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY (loaders/lora_base.py)

# Family name -> (ss_base_model_version as sd-scripts writes it, the family's kohya/ComfyUI layout).
_UNET_FAMILIES = {"stable-diffusion", "stable-diffusion-xl"}
_WAN = "wan"

# Why --format kohya is refused for the other transformer families (kohya-ss sd-scripts' networks/ folder has LoRA
# modules for SD1.x/2.x/SDXL, FLUX.1 and SD3 among these families, musubi-tuner's one for FLUX.2, none for the rest).
_NO_SD_SCRIPTS = "kohya-ss sd-scripts has no {model} LoRA module, so there is no sd-scripts layout to match"
_KOHYA_REFUSALS = {
    "qwen-image": f"--format kohya is not written for Qwen-Image: {_NO_SD_SCRIPTS.format(model='Qwen-Image')}, and "
    "ComfyUI maps Qwen-Image LoRAs by diffusers' layer names, the ones the comfyui export writes.",
    "z-image": f"--format kohya is not written for Z-Image: {_NO_SD_SCRIPTS.format(model='Z-Image')}, and ComfyUI "
    "maps Z-Image LoRAs from diffusers' names (z_image_to_diffusers), the ones the comfyui export writes.",
    "wan": f"--format kohya is not written for Wan: {_NO_SD_SCRIPTS.format(model='Wan')}, and ComfyUI maps Wan "
    "LoRAs by the original Wan layer names, the ones the comfyui export writes.",
}
_USE_COMFYUI = " Use --format comfyui (or --format diffusers for diffusers' load_lora_weights)."
_NOT_MAPPED = (
    "neither sd-scripts nor ComfyUI's LoRA key mapping was checked for {family}, so no file is written that a tool "
    "might misread. Use --format diffusers (diffusers' load_lora_weights reads it), or merge the LoRA into the "
    "base (trl-diffusion-sdpo export --merge)."
)
# The transformer families whose LoRA key mapping in ComfyUI's comfy/lora.py (model_lora_keys_unet) was read:
# diffusers' names under ``transformer.`` (Wan: its original names under ``diffusion_model.``). FLUX.1 Kontext and
# Qwen-Image-Edit run on FLUX.1's and Qwen-Image's model classes there, with the same mapping. Any other family is
# refused by name.
COMFYUI_FLOW_FAMILIES = frozenset(
    {"stable-diffusion-3", "flux", "flux-kontext", "qwen-image", "qwen-image-edit", "qwen-image-edit-plus", "z-image",
     "wan"}
)  # fmt: skip

# diffusers' Wan attention names -> the original Wan names ComfyUI's Wan model uses; the inverse of what
# diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers`` maps (self_attn -> attn1, cross_attn -> attn2,
# q/k/v/o -> to_q/to_k/to_v/to_out.0, k_img/v_img -> add_k_proj/add_v_proj).
_WAN_ATTENTIONS = {"attn1": "self_attn", "attn2": "cross_attn"}
_WAN_PROJECTIONS = {
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "o",
    "add_k_proj": "k_img",
    "add_v_proj": "v_img",
}


# kohya-ss sd-scripts' names for the FLUX.1 and SD3 transformers: the original (BFL / Stability) layer names, in
# which q, k and v (and, in FLUX's single blocks, the MLP input) are one fused Linear. Each entry maps the original
# layer (without ``lora_unet_`` and the block prefix) to the diffusers modules stacked in its output, in row order:
# the layout of diffusers' own converters (``_convert_kohya_flux_lora_to_diffusers`` for FLUX, the single-file
# ``convert_sd3_transformer_checkpoint_to_diffusers`` for SD3) read backwards.
def _joint_block(image: str, text: str, mlp_in: str, mlp_out: str) -> dict[str, tuple[str, ...]]:
    """The attention and MLP layers of an MMDiT joint block, which FLUX.1's double blocks and SD3's joint blocks lay
    out alike in diffusers: the original names are ``{stream}attn_qkv``, ``{stream}attn_proj``, ``{stream}{mlp_in}``
    and ``{stream}{mlp_out}`` for the ``image`` and ``text`` stream prefixes."""
    return {
        f"{image}attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        f"{image}attn_proj": ("attn.to_out.0",),
        f"{text}attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        f"{text}attn_proj": ("attn.to_add_out",),
        f"{image}{mlp_in}": ("ff.net.0.proj",),
        f"{image}{mlp_out}": ("ff.net.2",),
        f"{text}{mlp_in}": ("ff_context.net.0.proj",),
        f"{text}{mlp_out}": ("ff_context.net.2",),
    }


_FLUX_DOUBLE = _joint_block("img_", "txt_", "mlp_0", "mlp_2") | {
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
_FLUX_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
_SD3_JOINT = _joint_block("x_block_", "context_block_", "mlp_fc1", "mlp_fc2") | {
    "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # SD3.5's second image attention (MMDiT-X)
    "x_block_attn2_proj": ("attn2.to_out.0",),
}
# FLUX.2: the layers diffusers' ``_convert_kohya_flux2_lora_to_diffusers`` maps (its tables read backwards; the
# original names are those of diffusers' single-file ``convert_flux2_transformer_checkpoint_to_diffusers``). The
# attention layers are FLUX.1's; the MLPs are diffusers' ``linear_in``/``linear_out``; the single block's ``linear1``
# is one diffusers module (``to_qkv_mlp_proj``). No modulation layer: that converter maps none.
_FLUX2_DOUBLE = {name: members for name, members in _FLUX_DOUBLE.items() if "_attn_" in name} | {
    "img_mlp_0": ("ff.linear_in",),
    "img_mlp_2": ("ff.linear_out",),
    "txt_mlp_0": ("ff_context.linear_in",),
    "txt_mlp_2": ("ff_context.linear_out",),
}
_FLUX2_SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
_FLUX2_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "final_layer_linear": "proj_out",
}
_FLUX2_LAYOUT = (
    (
        ("transformer_blocks", "double_blocks", _FLUX2_DOUBLE),
        ("single_transformer_blocks", "single_blocks", _FLUX2_SINGLE),
    ),
    _FLUX2_TOP,
)
# Per family: (diffusers block prefix, original block prefix, the block's table), and the top-level layers.
_FUSED_LAYOUTS: dict[str, tuple[tuple[tuple[str, str, dict[str, tuple[str, ...]]], ...], dict[str, str]]] = {
    "flux": (
        (
            ("transformer_blocks", "double_blocks", _FLUX_DOUBLE),
            ("single_transformer_blocks", "single_blocks", _FLUX_SINGLE),
        ),
        _FLUX_TOP,
    ),
    "stable-diffusion-3": ((("transformer_blocks", "joint_blocks", _SD3_JOINT),), {}),
    "flux2": _FLUX2_LAYOUT,
    "flux2-klein": _FLUX2_LAYOUT,
}
# FLUX.1 Kontext's transformer is FLUX.1's (BFL's flux code runs both): the same original names, the same tools.
_FUSED_LAYOUTS["flux-kontext"] = _FUSED_LAYOUTS["flux"]
_FLUX2_FAMILIES = {"flux2", "flux2-klein"}
# ss_base_model_version: "flux1" is sd-scripts' MODEL_VERSION_FLUX_V1 (library/flux_utils.py); "sd3" names the family;
# "flux_2_dev" is musubi-tuner's name for FLUX.2 [dev] ([klein] depends on the width: _KLEIN_VERSIONS).
_FUSED_VERSIONS = {"flux": "flux1", "flux-kontext": "flux1", "stable-diffusion-3": "sd3", "flux2": "flux_2_dev"}
# ss_network_module: sd-scripts' FLUX.1/SD3 modules, musubi-tuner's FLUX.2 one.
_FUSED_MODULES = {
    "flux": "networks.lora_flux",
    "flux-kontext": "networks.lora_flux",
    "stable-diffusion-3": "networks.lora_sd3",
    "flux2": "networks.lora_flux_2",
    "flux2-klein": "networks.lora_flux_2",
}
# FLUX.2 [klein] by transformer width (BFL's Klein4BParams/Klein9BParams hidden_size) -> musubi-tuner's
# ss_base_model_version (its architecture_full_name); [dev] is "flux_2_dev".
_KLEIN_VERSIONS = {3072: "flux_2_klein_4b", 4096: "flux_2_klein_9b"}


@dataclass
class LoraModule:
    """One adapted module: ``down`` ``[r, in(, kh, kw)]``, ``up`` ``[out, r(, 1, 1)]`` and the PEFT scale, so the
    module's weight moves by ``scale * up @ down`` at strength 1."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraFile:
    """A diffusers-format LoRA as read by :func:`read_lora`: the denoiser it adapts (``"unet"`` or
    ``"transformer"``), its modules by name inside the denoiser, the adapter config, and the file's metadata."""

    path: str
    prefix: str
    modules: dict[str, LoraModule]
    config: dict[str, Any] | None
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]


def _lora_file_path(path: str) -> str:
    if os.path.isdir(path):
        candidate = os.path.join(path, LORA_WEIGHTS_NAME)
        if not os.path.isfile(candidate):
            raise FileNotFoundError(
                f"--lora {path} is a folder without {LORA_WEIGHTS_NAME}: give a LoRA output folder of "
                "`trl-diffusion-sdpo train` (or a checkpoint-N folder), or the .safetensors file itself."
            )
        return candidate
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--lora {path}: no such file or folder.")
    if not path.endswith(".safetensors"):
        raise ValueError(f"--lora {path}: only .safetensors LoRA files are read (never pickles).")
    return path


def _peft_scale(config: dict[str, Any] | None, module: str, rank: int) -> float:
    """PEFT's scale of ``module``: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA, peft ``LoraLayer.update_layer``).
    Without an adapter config diffusers' loader takes ``lora_alpha = r``, scale 1; so do we."""
    if not config:
        return 1.0
    if config.get("use_dora"):
        raise ValueError("DoRA adapters (use_dora) have no kohya/ComfyUI LoRA equivalent here; export refused.")
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith(f".{pattern}"):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_lora(path: str) -> LoraFile:
    """Read a diffusers-format LoRA (a file, or a folder holding ``pytorch_lora_weights.safetensors``) into
    :class:`LoraModule` entries with their PEFT scales (from the adapter config diffusers stores in the file)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = _lora_file_path(path)
    state = load_file(file)
    with safe_open(file, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    prefixes = {key.split(".", 1)[0] for key in state}
    if len(prefixes) != 1 or not prefixes <= {"unet", "transformer"}:
        kohya = any(key.startswith(("lora_unet_", "lora_te", "diffusion_model.")) for key in state)
        hint = " It looks like a kohya/ComfyUI file already." if kohya else ""
        raise ValueError(
            f"{file} is not a diffusers-format denoiser LoRA as `train` writes it: expected every key under one of "
            f"'unet.' or 'transformer.', found prefixes {sorted(prefixes)[:5]}.{hint}"
        )
    prefix = prefixes.pop()
    inner = {key[len(prefix) + 1 :]: value for key, value in state.items()}
    if prefix == "unet":  # diffusers' UNet files use the old ``.lora.down``/``.lora.up`` names
        inner = convert_unet_state_dict_to_peft(inner)
    config = None
    if metadata.get(_METADATA_KEY):
        raw = json.loads(metadata[_METADATA_KEY])
        config = {key[len(prefix) + 1 :]: value for key, value in raw.items() if key.startswith(f"{prefix}.")}
    modules: dict[str, LoraModule] = {}
    for key, down in inner.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ValueError(f"{file}: key {prefix}.{key} is not a LoRA A/B weight (biases, DoRA: unsupported).")
            continue
        name = key[: -len(".lora_A.weight")]
        up = inner.get(f"{name}.lora_B.weight")
        if up is None:
            raise ValueError(f"{file}: {prefix}.{name} has lora_A but no lora_B.")
        modules[name] = LoraModule(down=down, up=up, scale=_peft_scale(config, name, down.shape[0]))
    if not modules:
        raise ValueError(f"{file} holds no LoRA weights.")
    return LoraFile(file, prefix, modules, config, state, metadata)


def _ss_metadata(lora: LoraFile, family: str, denoiser: torch.nn.Module, output: str) -> dict[str, str]:
    """kohya-ss metadata as sd-scripts writes it, for the fields the tools read (see the module docstring). The
    dim and alpha are the trained adapter's (a fused FLUX/SD3 layer's own ``.alpha`` and rank are in its keys)."""
    ranks = {module.rank for module in lora.modules.values()}
    alphas = {module.scale * module.rank for module in lora.modules.values()}
    metadata = {
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "dynamic",
        "ss_network_alpha": f"{alphas.pop():g}" if len(alphas) == 1 else "dynamic",
        "ss_output_name": os.path.splitext(os.path.basename(output))[0],
    }
    if family in _FUSED_LAYOUTS:
        if family == "flux2-klein":  # "flux_2_klein" (our label) for a width that is neither released model's
            width = denoiser.config.num_attention_heads * denoiser.config.attention_head_dim
            version = _KLEIN_VERSIONS.get(width, "flux_2_klein")
        else:
            version = _FUSED_VERSIONS[family]
        return {"ss_network_module": _FUSED_MODULES[family], "ss_base_model_version": version, **metadata}
    sd2 = family == "stable-diffusion" and getattr(denoiser.config, "cross_attention_dim", 768) == 1024
    version = {"stable-diffusion-xl": "sdxl_base_v1-0", "stable-diffusion": "sd_v2" if sd2 else "sd_v1"}[family]
    return {"ss_network_module": "networks.lora", "ss_base_model_version": version, "ss_v2": str(sd2), **metadata}


def kohya_state_dict(lora: LoraFile) -> dict[str, torch.Tensor]:
    """UNet LoRA in kohya's layout: keys named by diffusers' ``convert_state_dict_to_kohya``, each ``.alpha`` set
    to ``scale * rank`` so that the tools' ``alpha / rank`` is the adapter's PEFT scale."""
    from diffusers.utils import convert_state_dict_to_kohya

    peft_state = {}
    for name, module in lora.modules.items():
        peft_state[f"{lora.prefix}.{name}.lora_A.weight"] = module.down
        peft_state[f"{lora.prefix}.{name}.lora_B.weight"] = module.up
    kohya = convert_state_dict_to_kohya(peft_state)
    for name, module in lora.modules.items():
        alpha_key = f"lora_{lora.prefix}_{name.replace('.', '_')}.alpha"
        if alpha_key not in kohya:
            raise RuntimeError(f"convert_state_dict_to_kohya named {name} unexpectedly (no {alpha_key}).")
        kohya[alpha_key] = torch.tensor(module.scale * module.rank, dtype=torch.float32)
    return kohya


def fuse_lora_modules(parts: list[LoraModule | None], out_features: list[int]) -> LoraModule:
    """One LoRA on a fused layer whose output rows stack those of ``parts`` (``None``: a part without a LoRA, whose
    rows stay unchanged), moving the fused weight exactly as the parts move theirs.

    With ``n`` parts of rank at most ``r``, part ``j`` having ``A_j`` (``r_j x in``), ``B_j`` (``out_j x r_j``) and
    scale ``s_j``: ``down = [A_1; ...; A_n]`` with each ``A_j`` padded to ``r`` rows by zeros (all zeros for a
    missing part), ``up = blockdiag(c_1 B_1, ..., c_n B_n)`` (``B_j`` padded to ``r`` columns), rank ``n r``,
    and scale ``s`` = the first part's, ``c_j = s_j / s``. Then ``s * up @ down = [s_1 B_1 A_1; ...; s_n B_n A_n]``.
    The equal-width diagonal blocks are what diffusers' kohya FLUX loader recognises as "sparse" and splits back
    into the parts exactly (sd-scripts' ``networks/convert_flux_lora.py`` writes the same layout)."""
    present = [part for part in parts if part is not None]
    if not present:
        raise ValueError("fuse_lora_modules: no part has a LoRA.")
    rank = max(part.rank for part in present)
    scale = present[0].scale
    reference = present[0].down
    down = reference.new_zeros((len(parts) * rank, reference.shape[1]))
    up = reference.new_zeros((sum(out_features), len(parts) * rank))
    row = 0
    for index, (part, out) in enumerate(zip(parts, out_features, strict=True)):
        if part is not None:
            if part.up.shape[0] != out or part.down.shape[1] != reference.shape[1]:
                raise ValueError(f"fuse_lora_modules: part {index} maps {part.down.shape[1]} -> {part.up.shape[0]}.")
            down[index * rank : index * rank + part.rank] = part.down
            up[row : row + out, index * rank : index * rank + part.rank] = part.up * (part.scale / scale)
        row += out
    return LoraModule(down=down, up=up, scale=scale)


def _fused_groups(lora: LoraFile, family: str) -> dict[str, tuple[str, ...]]:
    """The kohya (original) layer of every adapted module: ``{lora_unet_<layer>: diffusers modules in its rows}``."""
    blocks, top = _FUSED_LAYOUTS[family]
    top_names = {diffusers_name: original for original, diffusers_name in top.items()}
    groups: dict[str, tuple[str, ...]] = {}
    unknown = []
    for name in lora.modules:
        found = None
        if name in top_names:
            found = (f"lora_unet_{top_names[name]}", (name,))
        for diffusers_prefix, original_prefix, table in blocks:
            match = re.fullmatch(rf"{diffusers_prefix}\.(\d+)\.(.+)", name)
            if match is None:
                continue
            block, inner = match.groups()
            for original, members in table.items():
                if inner in members:
                    parts = tuple(f"{diffusers_prefix}.{block}.{member}" for member in members)
                    found = (f"lora_unet_{original_prefix}_{block}_{original}", parts)
        if found is None:
            unknown.append(name)
        else:
            groups[found[0]] = found[1]
    if unknown:
        listed = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        mapped = {
            "flux": ", modulation and the embedders/final layer",
            "flux2": ", the img/txt/time embedders and final linear layer (diffusers' kohya FLUX.2 converter maps "
            "no modulation or guidance layer)",
        }.get("flux2" if family in _FLUX2_FAMILIES else family, "")
        # FLUX.2's comfyui export is this same kohya file: only the diffusers format names every layer.
        other = "--format diffusers" if family in _FLUX2_FAMILIES else "--format comfyui, which names every layer"
        raise ValueError(
            f"--format kohya for {family}: no kohya-ss layer name is known for {listed} (mapped: the blocks' "
            f"attention, feed-forward{mapped}). Use {other}."
        )
    return groups


def kohya_fused_state_dict(lora: LoraFile, family: str, out_features: dict[str, int]) -> dict[str, torch.Tensor]:
    """FLUX.1/SD3/FLUX.2 LoRA in kohya-ss's layout: ``lora_unet_<original layer>``, the separate q/k/v (and
    FLUX.1's single-block MLP input) LoRAs fused by :func:`fuse_lora_modules` onto the original fused layer,
    ``.alpha = scale * rank`` so that the tools' ``alpha / rank`` is the scale. ``out_features`` gives every
    module's output size (the rows of parts without a LoRA). FLUX.1's final layer is written with ``alpha = rank``
    and the scale in ``lora_up``, since diffusers' kohya FLUX.1 loader does not read the final layer's alpha, and its
    modulation rows swapped back to the original (shift, scale) order (diffusers' ``swap_scale_shift``, its own
    inverse)."""
    from diffusers.loaders.lora_conversion_utils import swap_scale_shift

    state = {}
    for key, members in _fused_groups(lora, family).items():
        parts = [lora.modules.get(member) for member in members]
        fused = parts[0] if len(parts) == 1 else fuse_lora_modules(parts, [out_features[m] for m in members])
        up, scale = fused.up, fused.scale
        if family == "flux" and key.startswith("lora_unet_final_layer"):
            up, scale = up * scale, 1.0
        if key == "lora_unet_final_layer_adaLN_modulation_1":
            up = swap_scale_shift(up)
        state[f"{key}.lora_down.weight"] = fused.down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(scale * fused.rank, dtype=torch.float32)
    return state


def _wan_name(name: str) -> str:
    parts = name.split(".")
    # blocks.N.attn1.to_q | blocks.N.attn1.to_out.0
    if len(parts) >= 4 and parts[0] == "blocks" and parts[2] in _WAN_ATTENTIONS:
        projection = ".".join(parts[3:])
        if projection in _WAN_PROJECTIONS:
            return f"blocks.{parts[1]}.{_WAN_ATTENTIONS[parts[2]]}.{_WAN_PROJECTIONS[projection]}"
    raise ValueError(
        f"Wan module {name} has no confirmed name in ComfyUI's Wan model (only the blocks' attn1/attn2 "
        f"projections {', '.join(_WAN_PROJECTIONS)} are exported); train with the default LoRA targets."
    )


def comfyui_flow_state_dict(lora: LoraFile, family: str) -> dict[str, torch.Tensor]:
    """Transformer LoRA as ComfyUI maps it: ``transformer.<diffusers name>`` (SD3, FLUX.1 and Kontext, Qwen-Image,
    Z-Image) or
    ``diffusion_model.<Wan name>`` (Wan), PEFT ``lora_A``/``lora_B`` names, the scale multiplied into ``lora_B``
    (no ``.alpha``: ComfyUI and diffusers then both apply scale 1 to the product)."""
    state = {}
    for name, module in lora.modules.items():
        key = f"diffusion_model.{_wan_name(name)}" if family == _WAN else f"transformer.{name}"
        state[f"{key}.lora_A.weight"] = module.down
        state[f"{key}.lora_B.weight"] = module.up * module.scale
    return state


def tool_state_dict(
    lora: LoraFile, family: str, export_format: str, denoiser: torch.nn.Module, output: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``lora`` (of ``family``, checked against its base's ``denoiser``) as the tensors and metadata of
    ``export_format``: ``kohya``, ``comfyui`` or ``diffusers``. ``output`` names the file (sd-scripts' metadata
    records it). Raises ``ValueError`` where the format has no layout for the family."""
    metadata: dict[str, str] = {}
    if export_format == "diffusers":
        state = dict(lora.state_dict)
        metadata = {k: v for k, v in lora.metadata.items() if k != "format"}
    elif family in _UNET_FAMILIES:  # kohya, and ComfyUI reads the same file for UNet models
        state = kohya_state_dict(lora)
        metadata = _ss_metadata(lora, family, denoiser, output)
    elif family in _FUSED_LAYOUTS and (export_format == "kohya" or family in _FLUX2_FAMILIES):
        # ComfyUI gets FLUX.2's kohya file too: its diffusers-key mapping lacks FLUX.2's single-block names
        # (Comfy-Org/ComfyUI#11926), while lora_unet_<original name> maps every weight of every model.
        modules = dict(denoiser.named_modules())
        out_features = {
            name: module.weight.shape[0] for name, module in modules.items() if isinstance(module, torch.nn.Linear)
        }
        state = kohya_fused_state_dict(lora, family, out_features)
        metadata = _ss_metadata(lora, family, denoiser, output)
    elif export_format == "kohya":
        if family not in COMFYUI_FLOW_FAMILIES:
            raise ValueError(f"--format kohya is not written for {family}: {_NOT_MAPPED.format(family=family)}")
        raise ValueError(_KOHYA_REFUSALS.get(family, f"--format kohya is not written for {family}.") + _USE_COMFYUI)
    elif family not in COMFYUI_FLOW_FAMILIES:
        raise ValueError(f"--format comfyui is not written for {family}: {_NOT_MAPPED.format(family=family)}")
    else:
        state = comfyui_flow_state_dict(lora, family)
    return state, metadata
