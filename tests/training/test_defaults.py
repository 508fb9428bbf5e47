"""The defaults that depend on the run come from one table (trl_diffusion_sdpo/config/defaults.py): an unset
learning_rate resolves per model family and tuning, beta and safeguard_mu per model family and objective, the
safeguard space per mode, the shipped tiny base has an entry of its own; the trainer trains at the resolved values and
the start summary states each with its source."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from datasets import Dataset

from tests.helpers.common import fast_config_values, pickapic_rows
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.config.defaults import (
    PACKAGE_DEFAULTS,
    TINY_BASE,
    TINY_BASE_DIR,
    default_table,
    resolve_default,
    resolve_defaults,
)
from trl_diffusion_sdpo.demo.pretrain import PretrainRecipe, recipe_hash
from trl_diffusion_sdpo.families import FluxFamily, StableDiffusion3Family
from trl_diffusion_sdpo.families.registry import registered_families
from trl_diffusion_sdpo.families.sd import StableDiffusionFamily
from trl_diffusion_sdpo.families.sdxl import StableDiffusionXLFamily
from trl_diffusion_sdpo.online.config import OnlineDiffusionSDPOConfig
from trl_diffusion_sdpo.online.defaults import online_table
from trl_diffusion_sdpo.testing import build_tiny_flux_pipeline

ROOT = Path(__file__).resolve().parents[2]
METHODS_05_09 = ("sdpo-output-mu0.5", "sdpo-output")  # the output space at mu 0.5 and at 0.9
SEQ = 16


def test_every_family_resolves_the_beta_it_declares_with_its_source():
    for family in registered_families():
        resolved = resolve_default("beta", family)
        assert resolved.value == family.default_beta, family.name
        assert resolved.scope == f"family {family.name}" and resolved.source == family.beta_source
    assert resolve_default("beta", FluxFamily).value == 100.0
    assert resolve_default("beta", StableDiffusionFamily).value == resolve_default("beta").value == 5000.0


def test_every_family_resolves_the_lora_learning_rate_it_declares_with_its_source():
    for family in registered_families():
        resolved = resolve_default("learning_rate", family, lora=True)
        declared = getattr(family, "default_learning_rate", None)
        if declared is None:  # the UNet families: the package's LoRA rate
            assert (resolved.value, resolved.scope) == (1e-5, "*"), family.name
        else:
            assert (resolved.value, resolved.source) == (declared, family.learning_rate_source), family.name
    # a family's LoRA rate is not its full-tuning rate
    assert resolve_default("learning_rate", FluxFamily, lora=False).scope == "*"


@pytest.mark.parametrize(
    ("family", "loss_type", "mu"),
    [
        (StableDiffusionFamily, "dpo", 0.9),
        (StableDiffusionFamily, "dmpo", 0.9),
        (StableDiffusionFamily, "dspo", 0.2),
        (StableDiffusionFamily, "smpo", 0.5),  # not measured by the authors: the package's value
        (StableDiffusionXLFamily, "dspo", 0.6),
        (StableDiffusion3Family, "dpo", 0.5),
        (FluxFamily, "dpo", 0.5),
    ],
)
def test_the_safeguard_margin_resolves_per_family_and_objective(family, loss_type, mu):
    assert resolve_default("safeguard_mu", family, loss_type).value == mu


@pytest.mark.parametrize("base", [TINY_BASE, str(TINY_BASE_DIR)])
def test_the_tiny_base_has_its_own_margin_resting_on_the_toys_results(base):
    """Classified as Stable Diffusion, the tiny base takes the toy's own evidence (mu 0.5), not SD1.5's 0.9; its
    source quotes the toy's result file, whose figures it states."""
    resolved = resolve_default("safeguard_mu", StableDiffusionFamily, "dpo", base=base)
    assert (resolved.value, resolved.scope) == (0.5, f"base {TINY_BASE}")
    assert resolve_default("safeguard_mu", StableDiffusionFamily, "dpo", base="other/sd15").value == 0.9
    cited = re.search(r"benchmarks/results/[\w./-]+\.json", resolved.source)[0]
    stored = json.loads((ROOT / cited).read_text())
    settings = stored["settings"]

    def gain(setting: str, method: str) -> float:
        return settings[setting]["methods"][method]["minus_dpo"]["reward_change"]["mean"]

    pathological, demo_lr = "lr0.0002-beta5000-200steps", "lr2e-05-beta5000-200steps"
    figures = [
        gain(pathological, "sdpo-output-mu0.5"),
        gain(pathological, "sdpo-output"),  # mu 0.9
        gain(demo_lr, "sdpo-output-mu0.5"),
        gain(demo_lr, "sdpo-output"),
        settings[demo_lr]["methods"]["dpo"]["reward_change"]["mean"],
    ]
    assert [f"{value:+.3f}" for value in figures] == re.findall(r"[+-]0\.\d{3}", resolved.source)
    assert figures[2] > figures[3]  # mu 0.5 pays at least as much as 0.9 at the demo's lr: the evidence for 0.5
    accuracy = [settings[demo_lr]["methods"][m]["minus_dpo"]["implicit_acc"]["ci95"] for m in METHODS_05_09]
    assert accuracy[0][0] < 0 < accuracy[0][1] and accuracy[1][1] < 0  # 0.5 keeps it, 0.9 gives it up
    # measured on the base that ships, the one this entry names
    assert {source["base"]["recipe_hash"] for source in stored["sources"].values()} == {recipe_hash(PretrainRecipe())}


def test_the_most_specific_entry_wins_and_online_runs_without_a_safeguard():
    assert resolve_default("safeguard_space").value == "output"
    assert resolve_default("safeguard_space", table=online_table(default_table())).value == "none"
    assert len([e for e in PACKAGE_DEFAULTS if e.field == "safeguard_mu" and e.scope == "*"]) == 1
    # a family entry naming the objective outranks one that does not ("*"), and both outrank the package's
    entries = [e for e in default_table(StableDiffusionXLFamily) if e.field == "safeguard_mu"]
    assert {e.scope for e in entries} == {"*", "family stable-diffusion-xl", f"base {TINY_BASE}"}


@pytest.mark.parametrize(
    ("given", "space"),
    [({}, "none"), ({"safeguard_mu": 0.5}, "output"), ({"on_pathology": "escalate"}, "output")],
)
def test_the_online_config_resolves_its_space_from_the_table(tmp_path, given, space):
    config = OnlineDiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, **given)
    assert config.safeguard_space == space
    resolved = resolve_defaults(config)["safeguard_space"]
    assert (resolved.value, resolved.given) == (space, False)


def test_a_given_value_wins_and_says_so(tmp_path):
    config = DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, beta=2000.0, safeguard_space="parameter")
    resolved = resolve_defaults(config, FluxFamily)
    assert resolved["beta"].text() == "beta=2000 (as given)"
    assert resolved["safeguard_space"].text() == "safeguard_space=parameter (as given)"
    assert resolved["safeguard_mu"].text().startswith("safeguard_mu=0.5 (package default: ")


def test_a_flow_trainer_with_the_default_config_trains_at_its_familys_beta_and_rate(tmp_path, caplog):
    """A FLUX LoRA trainer built from Python with beta and learning_rate unset: trainer.beta is the family's 100 and
    the optimizer runs at the family's LoRA rate; the objective and the start summary use them, and the caller's
    config stays as given."""
    from peft import LoraConfig

    pipe = build_tiny_flux_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"), max_length=SEQ)
    values = {**fast_config_values(str(tmp_path / "out")), "max_sequence_length": SEQ, "learning_rate": None}
    config = DiffusionSDPOConfig(**values)
    config.max_steps = 1
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=list(FluxFamily.lora_target_modules))
    trainer = DiffusionSDPOTrainer(
        pipe, args=config, train_dataset=Dataset.from_list(pickapic_rows(4)), peft_config=lora
    )
    assert trainer.beta == FluxFamily.default_beta == 100.0
    assert trainer.objective.beta == trainer.beta == trainer.args.beta
    assert trainer.args.learning_rate == FluxFamily.default_learning_rate
    assert config.beta is None and config.learning_rate is None  # training_config.json keeps what was given
    with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo.io.run_summary"):
        trainer.train()
    assert [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h] == [
        pytest.approx(FluxFamily.default_learning_rate)
    ]
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Training flux"))
    assert "beta 100" in summary
    assert f"beta=100 (family flux: {FluxFamily.beta_source})" in summary
    rate = FluxFamily.default_learning_rate
    assert f"learning_rate={rate:g} (family flux: {FluxFamily.learning_rate_source})" in summary
    trainer.create_model_card()  # the card states the rate the run trained at
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| `learning_rate` | `{rate}` |" in card and f"| `beta` | `{FluxFamily.default_beta}` |" in card


def test_a_unet_scale_beta_on_a_flow_family_warns_with_the_actual_factor(tmp_path, caplog):
    pipe = build_tiny_flux_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"), max_length=SEQ)
    from trl_diffusion_sdpo.families import family_for_pipeline

    config = DiffusionSDPOConfig(
        **{**fast_config_values(str(tmp_path / "out")), "max_sequence_length": SEQ, "beta": 5000.0}
    )
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.families.flow"):
        family_for_pipeline(pipe).noiser(config)
    assert "beta is 50 times smaller" in caplog.text and "order of magnitude" not in caplog.text
