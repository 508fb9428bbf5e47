"""A family's training mechanics that a user may set (noise-level sampling and shift, prompt length, the guidance
embedding's value, the inversion grid) are defaults of the one table: a family declares them as data, the table
holds them beside the package's entries, and the family reads them back through the table's one function."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from trl_diffusion_sdpo.config import defaults
from trl_diffusion_sdpo.config.defaults import FAMILY_MECHANICS, DefaultEntry, resolve_default
from trl_diffusion_sdpo.families.registry import BUILT_IN_FAMILIES
from trl_diffusion_sdpo.testing import build_tiny_flux_pipeline


def _family_classes() -> list[type]:
    classes = []
    for target, _pipelines in BUILT_IN_FAMILIES.values():
        module, name = target.split(":")
        classes.append(getattr(importlib.import_module(module), name))
    return classes


@pytest.mark.parametrize("family", _family_classes(), ids=lambda cls: cls.name)
def test_each_familys_declared_mechanics_are_its_entries_in_the_table(family):
    declared = {field: getattr(family, attribute) for field, attribute in FAMILY_MECHANICS.items()
                if hasattr(family, attribute)}  # fmt: skip
    assert "inversion_steps" in declared  # every family can invert (noising="inversion")
    for field, value in declared.items():
        resolved = resolve_default(field, family)
        assert resolved.value == value and resolved.scope == f"family {family.name}", field
        assert FAMILY_MECHANICS[field] in resolved.source
        assert family.resolve(field) == value


def test_the_flow_noiser_and_prompt_length_follow_the_table(tmp_path, monkeypatch, make_config):
    """An entry more specific than the family's own (one naming the objective) decides: the family asks the table."""
    from trl_diffusion_sdpo.families import family_for_pipeline

    pipeline = build_tiny_flux_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"), max_length=16)
    family = family_for_pipeline(pipeline)
    noiser = family.noiser(make_config(resolution=32, beta=100.0))
    assert noiser.sampling.weighting_scheme == family.default_weighting_scheme == "logit_normal"
    assert noiser.sampling.shift == family.default_flow_shift == "resolution"
    assert family.max_sequence_length == family.default_max_sequence_length

    scope = f"family {family.name}"
    overriding = (
        DefaultEntry("flow_weighting_scheme", "mode", "a test's entry", scope, objective="dpo"),
        DefaultEntry("flow_shift", "scheduler", "a test's entry", scope, objective="dpo"),
        DefaultEntry("max_sequence_length", 8, "a test's entry", scope, objective="dpo"),
    )
    monkeypatch.setattr(defaults, "PACKAGE_DEFAULTS", defaults.PACKAGE_DEFAULTS + overriding)
    noiser = family.noiser(make_config(resolution=32, beta=100.0))
    assert (noiser.sampling.weighting_scheme, noiser.sampling.shift) == ("mode", "scheduler")
    assert family_for_pipeline(pipeline).max_sequence_length == 8
    # a value set in the config still wins over any entry
    noiser = family.noiser(make_config(resolution=32, beta=100.0, flow_weighting_scheme="none"))
    assert noiser.sampling.weighting_scheme == "none"
    assert dataclasses.is_dataclass(noiser.sampling)
