"""Model cards and Hub uploads for trained UNets and LoRA adapters."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

__all__ = ["CITATIONS", "build_model_card", "upload_folder_to_hub"]

CITATIONS = """```bibtex
@inproceedings{wallace2024diffusion,
  title     = {Diffusion Model Alignment Using Direct Preference Optimization},
  author    = {Wallace, Bram and Dang, Meihua and Rafailov, Rafael and Zhou, Linqi and Lou, Aaron and Purushwalkam,
               Senthil and Ermon, Stefano and Xiong, Caiming and Joty, Shafiq and Naik, Nikhil},
  booktitle = {CVPR},
  year      = {2024},
  note      = {arXiv:2311.12908}
}

@article{fu2025diffusionsdpo,
  title   = {Diffusion-SDPO: Safeguarded Direct Preference Optimization for Diffusion Models},
  author  = {Fu, Minghao and Wang, Guo-Hua and Cui, Tianyu and Chen, Qing-Guo and Xu, Zhao and Luo, Weihua
             and Zhang, Kaifu},
  journal = {arXiv preprint arXiv:2511.03317},
  year    = {2025}
}
```"""


def build_model_card(
    *,
    base_model: str | None,
    is_lora: bool,
    method: str,
    hyperparameters: dict[str, Any],
    tags: list[str],
    model_family: str,
    sample_grid: str | None = None,
    denoiser: tuple[str, str] = ("unet", "UNet2DConditionModel"),
) -> ModelCard:
    """A model card naming the base model, method, key hyperparameters and the papers to cite; ``sample_grid``, a
    path relative to the card, shows the last validation grid. ``denoiser`` is the trained network's pipeline name
    and class (``("transformer", "FluxTransformer2DModel")`` for FLUX)."""
    name, cls = denoiser
    label = "UNet" if name == "unet" else "transformer"
    all_tags = ["diffusers", "trl", "diffusion-sdpo", "text-to-image", model_family]
    if is_lora:
        all_tags.append("lora")
    all_tags += [t for t in tags if t not in all_tags]
    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        tags=all_tags,
        pipeline_tag="text-to-image",
    )
    kind = f"LoRA adapters for the {label}" if is_lora else f"a fully fine-tuned {label}"
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in hyperparameters.items())
    if is_lora:
        usage = (
            "```python\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained({base_model!r})\n"
            'pipe.load_lora_weights("<this repo>")\nimage = pipe("a photo of a cat").images[0]\n```'
        )
    else:
        usage = (
            f"```python\nfrom diffusers import DiffusionPipeline, {cls}\n\n"
            f'{name} = {cls}.from_pretrained("<this repo>", subfolder="{name}")\n'
            f"pipe = DiffusionPipeline.from_pretrained({base_model!r}, {name}={name})\n"
            'image = pipe("a photo of a cat").images[0]\n```'
        )
    samples = ""
    if sample_grid:
        step = os.path.splitext(os.path.basename(sample_grid))[0].removeprefix("step-").lstrip("0") or "0"
        samples = f"## Samples\n\nValidation prompts at step {step}:\n\n![validation samples]({sample_grid})\n\n"
    content = f"""---
{data.to_yaml()}
---

# {method} fine-tune of {base_model or "a Stable Diffusion model"}

This repository holds {kind}, trained with **{method}** using
`trl-diffusion-sdpo` on preference pairs (winner and loser images per prompt).

{method_description(method)}

## Usage

{usage}

{samples}## Training hyperparameters

| parameter | value |
|---|---|
{rows}

## Citations

{CITATIONS}
"""
    return ModelCard(content)


def method_description(method: str) -> str:
    if method == "Diffusion-SDPO":
        return (
            "Diffusion-SDPO is Diffusion-DPO with a winner-preserving safeguard: the gradient of the loser's "
            "denoising error is scaled by a closed-form `lambda` so that, to first order, the winner's error does not "
            "increase (Fu et al., 2025)."
        )
    return (
        "Diffusion-DPO optimises a DPO objective on the denoising errors of the policy and a frozen reference model "
        "(Wallace et al., 2024)."
    )


def upload_folder_to_hub(
    folder: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload trained model",
    ignore_patterns: list[str] | None = None,
    api: HfApi | None = None,
):
    """Create the model repo if needed and upload ``folder`` (checkpoints and private files excluded)."""
    api = api or HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=commit_message,
        revision=revision,
        ignore_patterns=ignore_patterns or ["checkpoint-*", "_*", "runs/*"],
        repo_type="model",
    )
