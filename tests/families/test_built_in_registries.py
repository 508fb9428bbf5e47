"""The registries that name the built-in families, objectives and engines before their modules are imported: each
entry is the class its module registers under that name, and a built-in name cannot be taken by another class
(before the family's module is imported too: ``tests/docs/test_imports.py``)."""

from __future__ import annotations

import pytest

from trl_diffusion_sdpo.config._lazy import import_target
from trl_diffusion_sdpo.engines import BUILT_IN_ENGINES, Engine
from trl_diffusion_sdpo.families import ModelFamily, registered_families
from trl_diffusion_sdpo.families.registry import BUILT_IN_FAMILIES
from trl_diffusion_sdpo.objectives import (
    BUILT_IN_OBJECTIVES,
    OBJECTIVES,
    PreferenceObjective,
    objective_class,
    register_objective,
    registered_objectives,
)


def test_each_built_in_family_entry_is_the_class_its_module_registers_under_that_name() -> None:
    for name, (target, pipelines) in BUILT_IN_FAMILIES.items():
        family = import_target(target)
        assert issubclass(family, ModelFamily), name
        assert (family.name, family.pipeline_classes) == (name, pipelines)
    # every built-in family is registered, in the table's order, before any family user code registers
    assert [family.name for family in registered_families()][: len(BUILT_IN_FAMILIES)] == list(BUILT_IN_FAMILIES)


def test_each_built_in_objective_entry_is_the_class_registered_under_its_loss_type() -> None:
    assert OBJECTIVES == tuple(BUILT_IN_OBJECTIVES) == registered_objectives()[: len(BUILT_IN_OBJECTIVES)]
    for loss_type, target in BUILT_IN_OBJECTIVES.items():
        cls = import_target(target)
        assert objective_class(loss_type) is cls and cls.name == loss_type
    with pytest.raises(ValueError, match="loss_type"):
        objective_class("not-an-objective")


def test_a_built_in_objectives_name_cannot_be_registered_by_another_class(objective_registry) -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class MyMaPO(PreferenceObjective):
        name = "mapo"

        def loss(self, predictions, errors):
            raise NotImplementedError

    with pytest.raises(ValueError, match="'mapo' is already registered"):
        register_objective(MyMaPO)


def test_each_engine_entry_is_an_engine() -> None:
    for name, target in BUILT_IN_ENGINES.items():
        assert issubclass(import_target(target), Engine), name


def test_a_lazy_target_names_its_module_and_attribute() -> None:
    assert import_target("trl_diffusion_sdpo.families.registry:BUILT_IN_FAMILIES") is BUILT_IN_FAMILIES
    with pytest.raises(ValueError, match="package.module:attribute"):
        import_target("trl_diffusion_sdpo.families.registry")
