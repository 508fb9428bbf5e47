"""What a LoRA step's forward keeps for its backward under bf16 autocast, with peft's input casting on (each LoRA
layer's input cast to the adapters' float32) and off (the trainer's choice under autocast), beside full tuning and
``estimate-memory``'s count for the same shape.

Not part of the test suite. CPU. SD1.5's UNet from its real config with random weights, its base in bf16, LoRA r8 in
float32 on the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), one pair (2 rows) of ``--latent``
x ``--latent`` latents and 77 prompt tokens, one forward under ``torch.autocast("cpu", torch.bfloat16)``: the bytes of
the distinct storages autograd saves (``saved_tensors_hooks``), the weights left out. Full tuning: the same forward
with every weight trained and no adapters. The estimate: :func:`~trl_diffusion_sdpo.engines.memory.
unet_activation_bytes` on the meta device (every weight trained, in bf16, no autocast).

    python benchmarks/speed/lora_autocast_activations.py \
        --json benchmarks/results/memory/cpu-lora-autocast-activations.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402


def saved_bytes(unet: torch.nn.Module, inputs: dict) -> int:
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        address = t.untyped_storage().data_ptr()
        if address not in weights:
            kept[address] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        unet(**inputs)
    return sum(kept.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting

    from trl_diffusion_sdpo.engines.memory import unet_activation_bytes

    torch.manual_seed(0)
    base = UNet2DConditionModel.from_config(harness.SD15_UNET).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn(2, 4, args.latent, args.latent, generator=g).bfloat16(),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 77, 768, generator=g).bfloat16(),
    }
    rows = {}
    full = copy.deepcopy(base)
    rows["full"] = saved_bytes(full, inputs)
    del full
    for p in base.parameters():
        p.requires_grad_(False)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules=harness.LORA_TARGETS))
    rows["lora_cast_on"] = saved_bytes(lora, inputs)
    with disable_input_dtype_casting(lora):
        rows["lora_cast_off"] = saved_bytes(lora, inputs)
    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(harness.SD15_UNET)
    rows["estimate"] = unet_activation_bytes(meta, 2, args.latent, 77, torch.bfloat16, checkpointing=False)
    result = {
        "machine": harness.machine_description("cpu", 0),
        "settings": vars(args) | {"json": str(args.json)},
        "saved_bytes": rows,
        "estimate_relative_error": {k: rows["estimate"] / v - 1 for k, v in rows.items() if k != "estimate"},
    }
    print(json.dumps(result["saved_bytes"]), json.dumps(result["estimate_relative_error"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
