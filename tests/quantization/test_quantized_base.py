"""LoRA on a quantized frozen base (optimum-quanto and torchao weight-only int8, both on CPU), from Python and from the
``train`` command.

Each training is checked against consumers and independent computations: the first step's policy errors equal the
reference's bit for bit; after training, the reference predicts what a freshly loaded quantized base predicts (the
adapters are off in it); the base's quantized weights are unchanged and the optimizer holds the adapters only; the
one-pass safeguard ran; the saved file holds LoRA keys only and diffusers' ``load_lora_weights`` loads the same
adapters into the unquantized pipeline (and into the quantized one, whose predictions then equal the trained
policy's). The default suite trains the tiny SD once per route; the family matrix (SD, SDXL, FLUX.2 [klein],
Qwen-Image, Wan x quanto / torchao x Python / command line) and two DDP processes are marked slow.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from tests.helpers.common import LORA_TARGETS, fast_config_values, pickapic_rows
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.families.loading import dtype_keyword
from trl_diffusion_sdpo.families.quantization import (
    BaseQuantization,
    check_engine_supports_quantized_base,
    is_quantized,
    quantized_parameters,
)
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

pytest.importorskip("optimum.quanto")
pytest.importorskip("torchao")

ROOT = Path(__file__).resolve().parents[2]
# an adapter weight in diffusers' LoRA files: peft's names (transformers) or the UNet's converted ones
LORA_KEY = re.compile(r"\.lora(_A|_B|\.down|\.up)\.weight$")


def diffusers_config(backend: str):
    """diffusers' own loading config for a torchao ``backend``, written as a user writes it."""
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return TorchAoConfig(Float8WeightOnlyConfig() if backend == "torchao-float8" else Int8WeightOnlyConfig())


def quanto_int8(module: torch.nn.Module) -> torch.nn.Module:
    """``module``'s linear layers quantized with optimum-quanto's own API (diffusers deprecates its QuantoConfig)."""
    from optimum.quanto import freeze, qint8, quantize

    quantize(module, weights=qint8, include=[n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)])
    freeze(module)
    return module


def quantized_denoiser(cls, folder, subfolder: str, backend: str, **kwargs) -> torch.nn.Module:
    """``cls.from_pretrained(folder, subfolder=...)`` with its weights quantized as ``backend`` says."""
    if backend.startswith("quanto"):
        return quanto_int8(cls.from_pretrained(folder, subfolder=subfolder, **kwargs))
    return cls.from_pretrained(folder, subfolder=subfolder, quantization_config=diffusers_config(backend), **kwargs)


def quantized_pipeline(folder, denoiser_name: str, backend: str, dtype: torch.dtype):
    """The pipeline at ``folder`` with its denoiser quantized as ``backend`` says."""
    from diffusers import DiffusionPipeline

    class_name = DiffusionPipeline.load_config(str(folder))[denoiser_name][1]
    denoiser = quantized_denoiser(getattr(__import__("diffusers"), class_name), folder, denoiser_name, backend,
                                  **dtype_keyword(dtype))  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(folder, **{denoiser_name: denoiser}, **dtype_keyword(dtype))
    # diffusers loads an optional component from the folder even when one is passed (WanPipeline's transformer)
    if getattr(pipe, denoiser_name) is not denoiser:
        pipe.register_modules(**{denoiser_name: denoiser})
    assert getattr(pipe, denoiser_name) is denoiser
    return pipe


@dataclass
class Case:
    """A family's tiny pipeline, its training config values, data and LoRA targets."""

    build: Any
    targets: tuple[str, ...] = tuple(LORA_TARGETS)
    config_values: dict[str, Any] = field(default_factory=dict)
    rows: Any = pickapic_rows
    sample_shape: tuple[int, ...] | None = None  # [N, C, ...] of the probe's latents; None: [2, C, 4, 4]
    time_ids: bool = False  # SDXL's micro-conditioning

    def command_flags(self) -> list[str]:
        return [f"--{k}={v}" for k, v in self.config_values.items()]


def family_cases() -> dict[str, Case]:
    """The family matrix's cases, from the families' own test modules (their sequence lengths and clips)."""
    from tests.helpers.flux2 import CASES as FLUX2
    from tests.helpers.qwen_image import CASE as QWEN
    from tests.helpers.video import CASE as WAN
    from tests.helpers.video import video_rows

    def flow(case, **more) -> Case:
        values = {"beta": 100.0, "max_sequence_length": case.sequence_length, **case.config_values}
        return Case(case.build, tuple(case.lora_targets), values, sample_shape=case.sample_shape, **more)

    return {
        "sd": Case(build_tiny_sd_pipeline),
        "sdxl": Case(build_tiny_sdxl_pipeline, time_ids=True),
        "flux2-klein": flow(FLUX2["klein"]),
        "qwen-image": flow(QWEN),
        "wan": flow(WAN, rows=video_rows),
    }


def base_weights(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen weight of ``denoiser`` (peft's ``base_layer`` names folded back), the quantized ones as their
    dequantized values."""
    weights = {}
    quantized = set(quantized_parameters(denoiser))
    with torch.no_grad():
        for name, parameter in denoiser.named_parameters():
            if "lora_" in name:
                continue
            value = parameter.detach()
            weights[name.replace("base_layer.", "")] = (value.dequantize() if name in quantized else value).clone()
    return weights


def adapter_weights(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's names (whatever the adapter is called: the trainer's ``default``, the
    loader's ``default_0``)."""
    (name,) = denoiser.peft_config
    return get_peft_model_state_dict(denoiser, adapter_name=name)


def probe(case: Case, family, call) -> torch.Tensor:
    """``call(sample, timestep, conditioning)`` on fixed latents and two prompts through ``family``'s conditioning."""
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(case.sample_shape or (2, family.latent_shape(32)[0], 4, 4), generator=gen)
    embeds = family.encode_prompts(family.prompt_tokenizer()(["a red square", "two blue circles"]))
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2) if case.time_ids else None
    with torch.no_grad():
        return call(sample, torch.tensor([300.0, 700.0]), family.denoiser_conditioning(embeds, time_ids))


def lora_config(case: Case) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, init_lora_weights=True, target_modules=list(case.targets))


def save_base(case: Case, root: Path) -> Path:
    """The family's tiny pipeline saved under ``root`` (the unquantized base every route loads)."""
    folder = root / "pipeline"
    if not folder.exists():
        case.build(seed=0, tokenizer_dir=str(root / "tokenizers")).save_pretrained(folder)
        Dataset.from_list(case.rows(4)).save_to_disk(str(root / "pairs"))
    return folder


def train_from_python(case: Case, backend: str, root: Path, **overrides) -> tuple[DiffusionSDPOTrainer, dict]:
    """A pipeline whose denoiser is quantized (diffusers' TorchAoConfig, or optimum-quanto's API), trained 2 steps
    with the one-pass parameter-space safeguard; the base's weights as they were before training."""
    folder = save_base(case, root)
    denoiser_name = "unet" if (folder / "unet").exists() else "transformer"
    # torchao loads in bfloat16 unless told otherwise; the tests compare float32 runs
    pipe = quantized_pipeline(folder, denoiser_name, backend, torch.float32)
    before = base_weights(getattr(pipe, denoiser_name))
    values = {**fast_config_values(str(root / "out")), "max_steps": 2, **case.config_values}
    config = DiffusionSDPOConfig(**{**values, "safeguard_space": "parameter", **overrides})
    trainer = DiffusionSDPOTrainer(
        pipe, args=config, train_dataset=Dataset.load_from_disk(str(root / "pairs")), peft_config=lora_config(case)
    )
    trainer.train()
    trainer.save_model(str(root / "out"))
    return trainer, before


def train_from_command_line(case: Case, backend: str, root: Path) -> tuple[DiffusionSDPOTrainer, dict]:
    """The ``train`` command (in this process) with ``--base_quantization``; the base's weights before training are
    read from a second quantized load, which quantizes the same checkpoint the same way."""
    from diffusers import DiffusionPipeline

    from trl_diffusion_sdpo.cli.train import main

    folder = save_base(case, root)
    out = root / "out"
    trainer = main(
        ["--model_name_or_path", str(folder), "--dataset_name", str(root / "pairs"), "--output_dir", str(out),
         "--base_quantization", backend, "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
         "--lora_target_modules", *case.targets, "--resolution", "32", "--per_device_train_batch_size", "2",
         "--max_steps", "2", "--learning_rate", "1e-3", "--scale_lr", "false", "--warmup_steps", "0",
         "--logging_steps", "1", "--safeguard_space", "output", "--safeguard_space", "parameter", "--use_cpu",
         "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
         "--seed", "0", *case.command_flags()]
    )  # fmt: skip
    denoiser_name = trainer.family.denoiser_name
    fresh = DiffusionPipeline.load_config(str(folder))  # the denoiser's class, as the command loaded it
    return trainer, base_weights(fresh_denoiser(folder, denoiser_name, fresh[denoiser_name][1], backend))


def fresh_denoiser(folder: Path, denoiser_name: str, class_name: str, backend: str) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, class_name)
    return quantized_denoiser(cls, folder, denoiser_name, backend, **dtype_keyword(torch.float32))


def check_training(case: Case, backend: str, root: Path, trainer: DiffusionSDPOTrainer, before: dict) -> None:
    """Everything a LoRA run on a quantized base promises (see the module docstring)."""
    from diffusers import DiffusionPipeline

    family, denoiser = trainer.family, trainer.family.denoiser
    assert is_quantized(denoiser) and quantized_parameters(denoiser)
    first = trainer.state.log_history[0]
    assert first["mse/policy_winner"] == first["mse/ref_winner"]
    assert first["mse/policy_loser"] == first["mse/ref_loser"]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # the one pass ran: no fallback to per-branch passes
    stage = trainer.safeguard.backward_stage
    assert stage.one_pass is not None and stage.two_pass_reason is None
    # the base never changed; the adapters did
    after = base_weights(denoiser)
    assert after.keys() == before.keys()
    assert not [name for name, value in after.items() if not torch.equal(value, before[name])]
    adapters = {n: p for n, p in denoiser.named_parameters() if "lora_B" in n}
    assert adapters and any(p.abs().sum() > 0 for p in adapters.values())
    # the optimizer holds the adapters, nothing else
    names = {id(p): n for n, p in denoiser.named_parameters()}
    optimized = [names.get(id(p), "?") for group in trainer.optimizer.param_groups for p in group["params"]]
    assert optimized and all("lora_" in n for n in optimized), [n for n in optimized if "lora_" not in n][:3]
    # the reference is the quantized base with the adapters off: a fresh quantized load predicts the same
    class_name = DiffusionPipeline.load_config(str(root / "pipeline"))[family.denoiser_name][1]
    fresh = fresh_denoiser(root / "pipeline", family.denoiser_name, class_name, backend).train(denoiser.training)
    reference = probe(case, family, lambda s, t, c: trainer.reference.predict(s, t, **c))
    expected = probe(case, family, lambda s, t, c: family.call_denoiser(fresh, s, t, c))
    assert torch.equal(reference, expected)
    # the saved file holds the adapters only, and loads into the unquantized pipeline as they were trained
    saved = load_file(root / "out" / "pytorch_lora_weights.safetensors")
    assert saved and all(LORA_KEY.search(k) for k in saved), [k for k in saved if not LORA_KEY.search(k)][:3]
    plain = DiffusionPipeline.from_pretrained(root / "pipeline")
    plain.load_lora_weights(str(root / "out"))
    loaded = adapter_weights(getattr(plain, family.denoiser_name))
    trained = adapter_weights(denoiser)
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k].detach().cpu()) for k in trained)


# ---------------------------------------------------------------------------------------------- the default suite


@pytest.fixture(scope="module")
def quanto_sd(tmp_path_factory):
    """The tiny SD trained from Python on a quanto int8 UNet (optimum-quanto's quantize and freeze)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    root = tmp_path_factory.mktemp("quanto-sd")
    case = Case(build_tiny_sd_pipeline)
    folder = save_base(case, root)
    unet = quanto_int8(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, unet=unet)
    before = base_weights(unet)
    values = {**fast_config_values(str(root / "out")), "max_steps": 2}
    config = DiffusionSDPOConfig(**values, safeguard_space="parameter", safeguard_scope="pair")
    trainer = DiffusionSDPOTrainer(
        pipe, args=config, train_dataset=Dataset.load_from_disk(str(root / "pairs")), peft_config=lora_config(case)
    )
    trainer.train()
    trainer.save_model(str(root / "out"))
    return SimpleNamespace(case=case, root=root, trainer=trainer, before=before)


def test_lora_trains_on_a_quanto_int8_unet_from_python(quanto_sd) -> None:
    check_training(quanto_sd.case, "quanto-int8", quanto_sd.root, quanto_sd.trainer, quanto_sd.before)


def test_saved_lora_loads_into_the_quantized_pipeline_and_predicts_as_the_policy(quanto_sd) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    folder, trainer = quanto_sd.root / "pipeline", quanto_sd.trainer
    unet = quanto_int8(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, unet=unet)
    pipe.load_lora_weights(str(quanto_sd.root / "out"))
    policy, family = trainer.family.denoiser, trainer.family
    unet.train(policy.training)
    ours = probe(quanto_sd.case, family, lambda s, t, c: family.call_denoiser(policy, s, t, c))
    theirs = probe(quanto_sd.case, family, lambda s, t, c: family.call_denoiser(unet, s, t, c))
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_lora_trained_on_a_quantized_base_exports_and_merges_into_the_unquantized_base(quanto_sd, tmp_path) -> None:
    from diffusers import DiffusionPipeline

    from trl_diffusion_sdpo.io.export import export_lora, merge_lora

    base, lora = str(quanto_sd.root / "pipeline"), str(quanto_sd.root / "out")
    exported = export_lora(lora, base, "kohya", str(tmp_path / "kohya.safetensors"))
    assert exported is not None and (tmp_path / "kohya.safetensors").exists()
    merged = DiffusionPipeline.from_pretrained(merge_lora(lora, base, str(tmp_path / "merged")))
    with_lora = DiffusionPipeline.from_pretrained(base)
    with_lora.load_lora_weights(lora)
    family = quanto_sd.trainer.family
    ours = probe(quanto_sd.case, family, lambda s, t, c: family.call_denoiser(merged.unet, s, t, c))
    theirs = probe(quanto_sd.case, family, lambda s, t, c: family.call_denoiser(with_lora.unet, s, t, c))
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_lora_trains_on_a_torchao_int8_base_from_the_command_line(tmp_path) -> None:
    case = Case(build_tiny_sd_pipeline)
    trainer, before = train_from_command_line(case, "torchao-int8", tmp_path)
    check_training(case, "torchao-int8", tmp_path, trainer, before)
    # the text encoder was quantized too (training encodes prompts with it), and stayed frozen
    assert is_quantized(trainer.pipeline.text_encoder)
    assert not any(p.requires_grad for p in trainer.pipeline.text_encoder.parameters())


def test_an_untappable_adapter_on_a_quantized_base_falls_back_to_two_passes_saying_why_once(quanto_sd, caplog) -> None:
    """DoRA's magnitude vectors sit in no layer a tap covers: the step runs one pass per branch, logged once."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    folder, root = quanto_sd.root / "pipeline", quanto_sd.root
    unet = quanto_int8(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, unet=unet)
    config = DiffusionSDPOConfig(
        **{**fast_config_values(str(root / "dora")), "max_steps": 2}, safeguard_space="parameter"
    )
    dora = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=list(LORA_TARGETS))
    trainer = DiffusionSDPOTrainer(
        pipe, args=config, train_dataset=Dataset.load_from_disk(str(root / "pairs")), peft_config=dora
    )
    with caplog.at_level("WARNING", logger="trl_diffusion_sdpo"):
        trainer.train()
    said = [r.getMessage() for r in caplog.records if "one forward and backward pass per branch" in r.getMessage()]
    assert len(said) == 1 and "lora_magnitude_vector" in said[0]
    assert trainer.safeguard.backward_stage.one_pass is None
    first = trainer.state.log_history[0]
    assert first["mse/policy_winner"] == first["mse/ref_winner"] and "safeguard/lambda_mean" in first


# quanto-int8 in the slow tier: by default torchao's int8 and float8 layers, which compute in their input's dtype,
# take the bf16 inputs, and test_lora_trains_on_a_quanto_int8_unet_from_python trains LoRA on quanto's layers
@pytest.mark.parametrize(
    "backend", ["torchao-int8", pytest.param("quanto-int8", marks=pytest.mark.slow), "torchao-float8"]
)
def test_bf16_training_on_a_quantized_base_starts_equal_and_stays_finite(quanto_sd, backend, tmp_path) -> None:
    """Under a bf16 autocast the unquantized norms are bf16; torchao's int8 layers, which compute in their input's
    dtype, must get bf16 inputs (else: ``mixed dtype (CPU)``)."""
    pipe = quantized_pipeline(quanto_sd.root / "pipeline", "unet", backend, torch.bfloat16)
    config = DiffusionSDPOConfig(**{**fast_config_values(str(tmp_path)), "max_steps": 2}, bf16=True)
    trainer = DiffusionSDPOTrainer(
        pipe,
        args=config,
        train_dataset=Dataset.load_from_disk(str(quanto_sd.root / "pairs")),
        peft_config=lora_config(quanto_sd.case),
    )
    trainer.train()
    first, losses = trainer.state.log_history[0], [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert first["mse/policy_winner"] == first["mse/ref_winner"] and all(math.isfinite(x) for x in losses)
    dtypes = {p.dtype for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32}


def test_full_tuning_of_a_quantized_base_is_refused_naming_lora(quanto_sd, make_config, pickapic_dataset) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    folder = quanto_sd.root / "pipeline"
    unet = quanto_int8(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, unet=unet)
    with pytest.raises(ValueError, match=r"unet is quantized \(quanto\).*LoRA.*peft_config"):
        DiffusionSDPOTrainer(pipe, args=make_config(), train_dataset=pickapic_dataset)


# ------------------------------------------------------------------------------- options, refusals, engines


def test_trl_bitsandbytes_switches_translate_to_diffusers_configs() -> None:
    nf4 = BaseQuantization.from_arguments(load_in_4bit=True, use_bnb_nested_quant=True, compute_dtype=torch.bfloat16)
    assert nf4.name == "bnb-nf4"
    assert nf4.config_kwargs("diffusers") == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.bfloat16,
    }
    fp4 = BaseQuantization.from_arguments(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_quant_storage="uint8")
    assert fp4.config_kwargs("transformers")["bnb_4bit_quant_type"] == "fp4"
    assert fp4.config_kwargs("transformers")["bnb_4bit_quant_storage"] == "uint8"
    assert BaseQuantization.from_arguments(load_in_8bit=True).config_kwargs("diffusers") == {"load_in_8bit": True}
    assert BaseQuantization.from_arguments("bnb-int8", load_in_8bit=True).name == "bnb-int8"
    # quanto quantizes once loaded, with its own API: no (deprecated) loading config
    with pytest.raises(ValueError, match="quanto-int4 is applied once loaded"):
        BaseQuantization.from_arguments("quanto-int4").config_kwargs("diffusers")
    assert type(BaseQuantization("torchao-float8").config_kwargs("diffusers")["quant_type"]).__name__ == (
        "Float8WeightOnlyConfig"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"load_in_4bit": True, "load_in_8bit": True}, "--load_in_4bit and --load_in_8bit exclude each other"),
        ({"base_quantization": "quanto-int8", "load_in_4bit": True}, "--load_in_4bit and --base_quantization"),
        ({"base_quantization": "torchao-int8", "bnb_4bit_quant_type": "fp4"}, "--bnb_4bit_quant_type applies"),
        ({"base_quantization": "bnb-int8", "use_bnb_nested_quant": True}, "--use_bnb_nested_quant"),
        ({"base_quantization": "int3"}, "--base_quantization must be one of none, bnb-nf4"),
    ],
)
def test_conflicting_quantization_options_are_refused_naming_the_flags(arguments, message) -> None:
    with pytest.raises(ValueError, match=message):
        BaseQuantization.from_arguments(**arguments)


def test_command_line_parses_the_trl_switches_it_used_to_refuse(tmp_path) -> None:
    from trl_diffusion_sdpo.cli.train import (
        base_quantization_for,
        check_supported_model,
        make_parser,
        parse_args,
    )

    _, _, model_args, diffusion_args = parse_args(
        ["--model_name_or_path", "x", "--output_dir", str(tmp_path), "--load_in_4bit", "--bnb_4bit_quant_type",
         "fp4", "--use_bnb_nested_quant", "--dtype", "bfloat16"]
    )  # fmt: skip
    check_supported_model(model_args)  # no longer refused
    quantization = base_quantization_for(model_args, diffusion_args)
    assert (quantization.name, quantization.bnb_4bit_quant_type, quantization.bnb_nested_quant) == (
        "bnb-nf4",
        "fp4",
        True,
    )
    assert quantization.compute_dtype == torch.bfloat16
    every_option = make_parser(show_all=True).format_help()  # --help_all: the plain --help lists a first run's only
    assert "--base_quantization" in every_option and "--load_in_4bit" in every_option


def test_bitsandbytes_without_its_package_is_refused_with_what_to_install() -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(ValueError, match=r"bnb-nf4 needs the bitsandbytes package: pip install bitsandbytes.*quanto"):
        BaseQuantization("bnb-nf4").config("diffusers")


def test_text_encoders_are_quantized_unless_training_reads_a_latent_cache(tmp_path) -> None:
    from trl_diffusion_sdpo.families.quantization import pipeline_quantization_config

    folder = save_base(Case(build_tiny_sdxl_pipeline), tmp_path)
    quantization = BaseQuantization("torchao-int8")
    everything = pipeline_quantization_config(quantization, folder).quant_mapping
    assert set(everything) == {"unet", "text_encoder", "text_encoder_2"}
    assert type(everything["unet"]).__module__.startswith("diffusers")
    assert type(everything["text_encoder"]).__module__.startswith("transformers")
    cached = pipeline_quantization_config(quantization, folder, quantize_text_encoders=False).quant_mapping
    assert set(cached) == {"unet"}
    assert pipeline_quantization_config(BaseQuantization("none"), folder) is None
    assert pipeline_quantization_config(BaseQuantization("quanto-int8"), folder) is None  # quantized once loaded


@pytest.mark.parametrize("cached", [False, True])
def test_a_quanto_base_is_quantized_once_loaded_without_deprecation_saying_what_it_does(tmp_path, caplog, cached):
    """quanto's own API, not diffusers' deprecated QuantoConfig: no deprecation warning; one log line before the
    quantization and one after it, with the time it took."""
    import warnings

    from diffusers import DiffusionPipeline

    from trl_diffusion_sdpo.families.quantization import load_quantized_pipeline

    folder = save_base(Case(build_tiny_sdxl_pipeline), tmp_path)
    with warnings.catch_warnings(), caplog.at_level("INFO", logger="trl_diffusion_sdpo"):
        warnings.filterwarnings("error", message=".*QuantoConfig.*")
        warnings.filterwarnings("error", category=FutureWarning, module="diffusers")
        pipe = load_quantized_pipeline(
            lambda **kw: DiffusionPipeline.from_pretrained(folder, **kw),
            folder, BaseQuantization("quanto-int8"), quantize_text_encoders=not cached,
        )  # fmt: skip
    quantized = {name for name in ("unet", "text_encoder", "text_encoder_2") if is_quantized(getattr(pipe, name))}
    assert quantized == ({"unet"} if cached else {"unet", "text_encoder", "text_encoder_2"})
    assert not is_quantized(pipe.vae)
    # only linear layers: a quantized convolution cannot follow autocast's cast
    assert {type(m).__name__ for m in pipe.unet.modules() if type(m).__name__.startswith("Q")} == {"QLinear"}
    said = [r.getMessage() for r in caplog.records if r.name == "trl_diffusion_sdpo.families.quantization"]
    assert len(said) == 2 and said[0].startswith(f"Loading {folder} and quantizing its base to quanto-int8")
    assert re.search(r"to quanto-int8 in \d+\.\d s \(the denoiser's weights: \d+\.\d\d GiB\)", said[1]), said


def test_a_quantized_model_already_on_the_device_is_cast_without_being_moved() -> None:
    """diffusers and transformers refuse ``.to()`` on bitsandbytes' 8-bit models, which load onto their device."""
    from trl_diffusion_sdpo.families.quantization import cast_unquantized

    class RefusesTo(torch.nn.Linear):
        def to(self, *args, **kwargs):
            raise ValueError("`.to` is not supported for `8-bit` bitsandbytes models")

    layer = RefusesTo(2, 2)
    cast_unquantized(layer, torch.bfloat16, "cpu")
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="8-bit"):
        cast_unquantized(layer, torch.bfloat16, "meta")  # elsewhere: moved, which this model refuses


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2", "fsdp1"])
def test_sharding_engines_refuse_a_quantized_base_naming_ddp(quanto_sd, engine) -> None:
    denoiser = quanto_sd.trainer.family.denoiser
    with pytest.raises(ValueError, match=rf"does not train under {engine}: .*Launch with DDP instead"):
        check_engine_supports_quantized_base(engine, denoiser)
    check_engine_supports_quantized_base("ddp", denoiser)
    check_engine_supports_quantized_base(engine, torch.nn.Linear(2, 2))  # not quantized


# ------------------------------------------------------------------------------------------- slow: the matrix

FAMILIES = ["sd", "sdxl", "flux2-klein", "qwen-image", "wan"]


@pytest.mark.slow
@pytest.mark.parametrize("route", ["python", "command"])
@pytest.mark.parametrize("backend", ["quanto-int8", "torchao-int8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_lora_on_a_quantized_base(family, backend, route, tmp_path) -> None:
    case = family_cases()[family]
    train = train_from_python if route == "python" else train_from_command_line
    trainer, before = train(case, backend, tmp_path)
    check_training(case, backend, tmp_path, trainer, before)


@pytest.mark.slow
def test_ddp_trains_lora_on_a_quantized_base_in_two_processes(tmp_path) -> None:
    """``accelerate launch`` with the shipped multi_gpu config on two CPU processes (gloo), quanto int8 base, the
    one-pass safeguard with the global scope: the run ends, the saved adapters moved from their zero start and load
    into the unquantized pipeline."""
    from diffusers import DiffusionPipeline

    folder = save_base(Case(build_tiny_sd_pipeline), tmp_path)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "examples" / "accelerate_configs" / "multi_gpu.yaml"), "--num_processes", "2", "--cpu",
        "--mixed_precision", "no", "--main_process_port", "0", "-m", "trl_diffusion_sdpo", "train",
        "--model_name_or_path", str(folder), "--dataset_name", str(tmp_path / "pairs"), "--output_dir", str(out),
        "--base_quantization", "quanto-int8", "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
        "--resolution", "32", "--per_device_train_batch_size", "1", "--max_steps", "2", "--learning_rate", "1e-3",
        "--scale_lr", "false", "--warmup_steps", "0", "--safeguard_space", "output", "--safeguard_space", "parameter",
        "--safeguard_scope", "global", "--report_to", "none", "--save_strategy", "no",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert saved and all(LORA_KEY.search(k) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora.up." in k)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(out))
    assert adapter_weights(pipe.unet).keys()


# ------------------------------------------------------------------------------------------------ online training


def online_trainer(tmp_path, **overrides):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from tests.helpers.online import LORA, PROMPTS, online_config, red_minus_blue
    from trl_diffusion_sdpo.demo.pretrain import SHIPPED_BASE_DIR
    from trl_diffusion_sdpo.online import OnlineDiffusionSDPOTrainer

    unet = quanto_int8(UNet2DConditionModel.from_pretrained(str(SHIPPED_BASE_DIR), subfolder="unet"))
    pipe = StableDiffusionPipeline.from_pretrained(str(SHIPPED_BASE_DIR), unet=unet)
    return OnlineDiffusionSDPOTrainer(
        pipe,
        None,
        online_config(tmp_path, **overrides),
        Dataset.from_dict({"prompt": PROMPTS}),
        reward_funcs=[red_minus_blue],
        peft_config=LoraConfig(**LORA),
    )


def test_online_training_on_a_quantized_base_refuses_refreshing_the_reference(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"ref_update_steps copies the policy .* keep the initial reference"):
        online_trainer(tmp_path, ref_update_steps=1)


@pytest.mark.slow
def test_online_training_samples_and_trains_lora_on_a_quantized_base(tmp_path) -> None:
    trainer = online_trainer(tmp_path, safeguard_space="parameter")
    before = base_weights(trainer.family.denoiser)
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["mse/policy_winner"] == first["mse/ref_winner"]
    after = base_weights(trainer.family.denoiser)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert any(p.abs().sum() > 0 for n, p in trainer.family.denoiser.named_parameters() if "lora_B" in n)
