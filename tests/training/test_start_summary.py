"""The start summary says what a run will do (effective learning rate and how scale_lr made it, schedule, pairs per
step, safeguard, engine, precision), and warns on the settings that quietly defeat a run."""

from __future__ import annotations

import logging
import re

import pytest

from trl_diffusion_sdpo.config.defaults import LEARNING_RATE_RANGES, recommended_learning_rate, resolve_default
from trl_diffusion_sdpo.families import FluxFamily
from trl_diffusion_sdpo.families.registry import registered_families
from trl_diffusion_sdpo.families.sd import StableDiffusionFamily
from trl_diffusion_sdpo.families.sdxl import StableDiffusionXLFamily

LOGGER = "trl_diffusion_sdpo.io.run_summary"
#: the start summary's first line (io/run_summary.py's start_summary)
START = re.compile(r"Training \S+ \((LoRA|full tuning)\) for \d+ optimizer steps:\n")


def train_and_capture(make_trainer, caplog, **overrides):
    """A run of ``overrides``: the trainer, its start summaries (INFO; the end-of-run summary, logged where the run
    warned, is left out) and its start warnings."""
    trainer = make_trainer(**overrides)
    caplog.clear()  # this run's records only
    with caplog.at_level(logging.INFO, logger=LOGGER):
        trainer.train()
    records = [r for r in caplog.records if r.name == LOGGER]
    info = [r.getMessage() for r in records if r.levelno == logging.INFO and START.match(r.getMessage())]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    return trainer, info, warnings


def logged_rates(trainer) -> list[float]:
    return [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]


def test_the_summary_spells_out_the_scaled_rate_the_optimizer_uses(make_trainer, caplog):
    trainer, info, _ = train_and_capture(
        make_trainer, caplog, learning_rate=1e-5, scale_lr=True, gradient_accumulation_steps=2, max_steps=1
    )
    assert len(info) == 1, info
    summary = info[0]
    pairs = 2 * 2  # per-device batch 2 x 2 accumulation steps, one process
    peak = 1e-5 * pairs
    assert logged_rates(trainer) == [pytest.approx(peak)]  # what the scheduler applied (warmup 0, constant)
    assert f"{peak:.3g} = 1e-05 x {pairs} pairs per optimizer step" in summary
    assert "1 process(es) x 2 per device x 2 accumulation; scale_lr" in summary
    assert "schedule constant_with_warmup, no warmup" in summary
    assert f"Diffusion-SDPO: safeguard mu={trainer.args.safeguard_mu:g}, output space" in summary
    assert "stable-diffusion (LoRA)" in summary and "float32" in summary and "processes=1" in summary


def test_the_summary_names_diffusion_dpo_and_an_unscaled_rate(make_trainer, caplog):
    _, info, _ = train_and_capture(make_trainer, caplog, safeguard_space="none", learning_rate=5e-5, max_steps=1)
    assert "objective Diffusion-DPO (no safeguard)" in info[0]
    assert "5e-05 (as given; scale_lr=False)" in info[0]


def test_a_warmup_longer_than_half_the_run_warns_with_the_rate_it_reaches(make_trainer, caplog):
    trainer, _, warnings = train_and_capture(make_trainer, caplog, learning_rate=5e-5, warmup_steps=500, max_steps=2)
    warmup = [w for w in warnings if "warmup_steps=500" in w]
    assert len(warmup) == 1, warnings
    last = logged_rates(trainer)[-1]
    assert last == pytest.approx(5e-5 * 1 / 500)  # the trap: the second step of a 500-step warmup
    assert f"the last step runs at {last:.3g}" in warmup[0]


def test_a_short_warmup_and_a_recommended_rate_give_no_warning(make_trainer, caplog):
    _, _, warnings = train_and_capture(make_trainer, caplog, learning_rate=5e-5, warmup_steps=1, max_steps=2)
    assert warnings == []


def test_a_rate_outside_the_familys_range_warns_naming_the_range_and_source(make_trainer, caplog):
    _, _, warnings = train_and_capture(make_trainer, caplog, learning_rate=1e-3, max_steps=1)
    assert len(warnings) == 1, warnings
    assert "outside the range recommended for stable-diffusion LoRA: 1e-05 to 0.0001" in warnings[0]
    assert "docs/usage.md" in warnings[0]


def test_the_default_rate_is_the_rate_trained_at_and_in_the_lora_range(make_trainer, caplog):
    """scale_lr is off by default and learning_rate unset is the family's rate: the optimizer runs at it, the summary
    states it with its source, unwarned."""
    default = resolve_default("learning_rate", StableDiffusionFamily, lora=True)
    trainer, info, warnings = train_and_capture(
        make_trainer, caplog, max_steps=1, gradient_accumulation_steps=2, learning_rate=None, scale_lr=False
    )
    assert trainer.args_as_given.learning_rate is None
    assert logged_rates(trainer) == [pytest.approx(default.value)]
    assert f"{default.value:.3g} (unset: the default below; scale_lr=False)" in info[0]
    assert f"learning_rate={default.value:g} (package default: {default.source})" in info[0]
    assert warnings == []


def test_a_python_runs_summary_states_no_choice_for_the_machine(make_trainer, caplog):
    """A trainer built from Python chooses nothing for the machine (the command line does, and its summary says so:
    tests/training/test_machine_choices.py)."""
    _, info, _ = train_and_capture(make_trainer, caplog, max_steps=1, dataloader_num_workers=None)
    assert "this machine" not in info[0] and "dataloader_num_workers=" not in info[0]


@pytest.mark.parametrize(
    ("scope", "text"),
    [("global", "one process, so local and global scope agree"), ("pair", "one lambda per pair")],
)
def test_the_summary_says_which_lambda_the_scope_computes(make_trainer, caplog, scope, text):
    space = {"safeguard_space": "parameter"} if scope == "pair" else {}
    _, info, _ = train_and_capture(make_trainer, caplog, safeguard_scope=scope, max_steps=1, **space)
    assert f"{scope} scope (" in info[0] and text in info[0]


def test_every_registered_family_has_a_recommended_lora_range_that_holds_its_own_rate():
    for family in registered_families():
        name = family.name
        recommended = recommended_learning_rate(family, lora=True)
        assert recommended is not None, name
        assert recommended.low < recommended.high and recommended.source
        assert recommended.contains(resolve_default("learning_rate", family, lora=True).value), name
    assert all(entry.contains(1e-5) or key[1] == "full" for key, entry in LEARNING_RATE_RANGES.items())


@pytest.mark.parametrize(
    ("family", "lora", "rate"),
    [
        (StableDiffusionFamily, True, 1e-5),
        (StableDiffusionFamily, False, 2.048e-5),  # the authors' 1e-8 per pair x 2048 pairs
        (StableDiffusionXLFamily, False, 2.048e-6),  # 1e-9 x 2048
        (FluxFamily, True, FluxFamily.default_learning_rate),
        (FluxFamily, False, 1e-5),  # no published full-tuning rate: the package's, and no recommended range
    ],
)
def test_the_learning_rate_resolves_per_family_and_tuning_within_its_range(family, lora, rate):
    resolved = resolve_default("learning_rate", family, lora=lora)
    assert resolved.value == rate and resolved.source
    recommended = recommended_learning_rate(family, lora)
    published = LEARNING_RATE_RANGES.get((family.name, "lora" if lora else "full"))
    if published is not None:
        assert recommended == published and published.contains(rate)
    elif resolved.scope == "*":  # the package's fallback recommends nothing
        assert recommended is None
    else:  # the band around the family's own rate
        assert recommended.contains(rate) and resolved.source in recommended.source
