"""A family registered by user code is tried after the built-in ones: one whose ``matches`` accepts SD pipelines (a
user's variant of the SD family, naming SD's pipeline class among its own) does not capture an SD pipeline, by its
class or assembled by hand, and still gets the pipelines no built-in family claims."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trl_diffusion_sdpo.config._lazy import import_target
from trl_diffusion_sdpo.families import StableDiffusionFamily, family_for_pipeline, register_family
from trl_diffusion_sdpo.families import registry as registry_module
from trl_diffusion_sdpo.families.registry import BUILT_IN_FAMILIES


@pytest.fixture(params=["before", "after"], ids=["registered-before-the-built-ins", "registered-after-them"])
def house_family(request, monkeypatch) -> type[StableDiffusionFamily]:
    """A user's SD variant registered for the test only: it accepts every pipeline SD's family accepts. Registered
    before the built-in families (in a fresh process user code registers its family at import, and a built-in one
    registers when its module is first imported, at the first lookup) or after them."""
    built_in = [import_target(target) for target, _ in BUILT_IN_FAMILIES.values()]
    monkeypatch.setattr(registry_module, "_FAMILIES", [] if request.param == "before" else list(built_in))

    @register_family("house-unet", pipelines=("HouseUNetPipeline", "StableDiffusionPipeline"))
    class HouseUNetFamily(StableDiffusionFamily):
        pass

    for family in built_in:  # as their modules' imports register them (again: a no-op)
        register_family(family)
    return HouseUNetFamily


class HouseUNetPipeline:
    """A user's own pipeline class (no diffusers base): only the user's family names it."""

    def __init__(self, **components) -> None:
        vars(self).update(components)


def test_a_user_family_that_matches_sd_pipelines_does_not_capture_them(house_family, make_pipeline):
    sd = make_pipeline()
    assert house_family.matches(sd)  # it would take the pipeline if it were asked first
    assert type(family_for_pipeline(sd)) is StableDiffusionFamily  # by the pipeline's class
    assembled = SimpleNamespace(**sd.components)  # by hand: every family is asked, in order
    assert type(family_for_pipeline(assembled)) is StableDiffusionFamily
    own = family_for_pipeline(HouseUNetPipeline(**sd.components))  # what no built-in family names: the user's
    assert type(own) is house_family and own.denoiser is sd.unet
