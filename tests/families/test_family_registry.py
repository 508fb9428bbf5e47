"""The family registry: a pipeline is matched by its components (so subclasses work), a pipeline no family handles is
refused with every registered family and its pipelines named, and a family registered with ``register_family`` is
picked for its pipelines without touching the package."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline

from trl_diffusion_sdpo.families import (
    Flux2Family,
    Flux2KleinFamily,
    FluxFamily,
    FluxKontextFamily,
    ModelFamily,
    PromptEmbeddings,
    PromptTokenizer,
    QwenImage21Family,
    QwenImageFamily,
    StableDiffusion3Family,
    StableDiffusionFamily,
    StableDiffusionXLFamily,
    family_for_pipeline,
    register_family,
    registered_families,
)
from trl_diffusion_sdpo.families import registry as registry_module
from trl_diffusion_sdpo.families.noising import DDPMNoiser


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in the test are dropped afterwards."""
    monkeypatch.setattr(registry_module, "_FAMILIES", list(registry_module._FAMILIES))


class PixelSpaceFamily(ModelFamily):
    """A family for a made-up pipeline whose denoiser works on pixels (a ``pixel_denoiser`` component)."""

    name = "pixel-space"
    pipeline_classes = ("PixelSpacePipeline",)
    denoiser_name = "pixel_denoiser"

    @classmethod
    def matches(cls, pipeline) -> bool:
        return getattr(pipeline, "pixel_denoiser", None) is not None

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.pipeline.text_encoder}

    def noiser(self, args) -> DDPMNoiser:
        return DDPMNoiser.from_config(self.pipeline.scheduler, args)

    def prompt_tokenizer(self) -> PromptTokenizer:
        return PromptTokenizer({"input_ids": self.pipeline.tokenizer})

    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        return PromptEmbeddings(self.pipeline.text_encoder(tokens["input_ids"]))


def test_built_in_families_are_tried_specific_before_general() -> None:
    assert registered_families()[:5] == (
        StableDiffusion3Family,
        FluxFamily,
        FluxKontextFamily,
        StableDiffusionXLFamily,
        StableDiffusionFamily,
    )


def test_a_subclass_of_a_supported_pipeline_is_matched_by_its_components(make_pipeline) -> None:
    class HouseStylePipeline(StableDiffusionPipeline):
        """A user's pipeline subclass: same components, another class name."""

    base = make_pipeline()
    pipe = HouseStylePipeline(**base.components)
    family = family_for_pipeline(pipe)
    assert type(family) is StableDiffusionFamily
    assert family.denoiser is base.unet and family.frozen_modules()["text_encoder"] is base.text_encoder


@pytest.mark.parametrize(
    "builder, kwargs, frozen",
    [
        ("build_tiny_sd_pipeline", {}, {"vae", "text_encoder"}),
        ("build_tiny_sdxl_pipeline", {}, {"vae", "text_encoder", "text_encoder_2"}),
        ("build_tiny_sd3_pipeline", {}, {"vae", "text_encoder", "text_encoder_2", "text_encoder_3"}),
        ("build_tiny_sd3_pipeline", {"with_t5": False}, {"vae", "text_encoder", "text_encoder_2"}),
        ("build_tiny_flux_pipeline", {}, {"vae", "text_encoder", "text_encoder_2"}),
        ("build_tiny_hunyuan_video15_pipeline", {}, {"vae", "text_encoder", "text_encoder_2"}),
    ],
)
def test_frozen_modules_are_every_text_encoder_and_the_vae_the_pipeline_holds(builder, kwargs, frozen, tmp_path):
    from trl_diffusion_sdpo import testing

    pipe = getattr(testing, builder)(tokenizer_dir=str(tmp_path), **kwargs)
    modules = family_for_pipeline(pipe).frozen_modules()
    assert set(modules) == frozen
    assert all(module is getattr(pipe, name) for name, module in modules.items())


def test_an_unknown_pipeline_is_refused_listing_every_registered_family(scratch_registry) -> None:
    register_family(PixelSpaceFamily)
    pipeline = SimpleNamespace(transformer=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError) as error:
        family_for_pipeline(pipeline)
    message = str(error.value)
    assert "transformer=Linear" in message  # what the pipeline has
    for name, pipeline_class in [
        ("stable-diffusion-3", "StableDiffusion3Pipeline"),
        ("flux", "FluxPipeline"),
        ("stable-diffusion-xl", "StableDiffusionXLPipeline"),
        ("stable-diffusion", "StableDiffusionPipeline"),
        ("pixel-space", "PixelSpacePipeline"),
    ]:
        assert f"{name}: {pipeline_class}" in message
    assert "register_family" in message


def test_a_registered_family_is_picked_for_its_pipelines(scratch_registry, make_pipeline) -> None:
    sd = make_pipeline()
    pipeline = SimpleNamespace(
        pixel_denoiser=sd.unet, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, scheduler=sd.scheduler
    )
    with pytest.raises(ValueError, match="not a pipeline of any registered family"):
        family_for_pipeline(pipeline)
    assert register_family(PixelSpaceFamily) is PixelSpaceFamily  # usable as a decorator
    family = family_for_pipeline(pipeline)
    assert type(family) is PixelSpaceFamily and family.denoiser is sd.unet
    # The family's own choices reach the caller: the noiser, and the default LoRA targets of the base class.
    noiser = family.noiser(SimpleNamespace(min_timestep=0, max_timestep=None))
    assert isinstance(noiser, DDPMNoiser) and noiser.num_train_timesteps == sd.scheduler.config.num_train_timesteps
    assert family.lora_target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    # Registering it again changes nothing; the built-in families still get their own pipelines.
    register_family(PixelSpaceFamily)
    assert registered_families().count(PixelSpaceFamily) == 1
    assert type(family_for_pipeline(sd)) is StableDiffusionFamily


def test_register_family_refuses_incomplete_or_clashing_families(scratch_registry) -> None:
    class NoEncoding(ModelFamily):
        name = "no-encoding"
        pipeline_classes = ("NoEncodingPipeline",)

        @classmethod
        def matches(cls, pipeline) -> bool:
            return False

    with pytest.raises(TypeError, match="encode_prompts") as error:
        register_family(NoEncoding)
    assert "prompt_tokenizer" in str(error.value) and "noiser" in str(error.value)

    class AnotherSD(PixelSpaceFamily):
        name = "stable-diffusion"

    with pytest.raises(ValueError, match="'stable-diffusion' is already registered"):
        register_family(AnotherSD)
    with pytest.raises(TypeError, match="ModelFamily subclass"):
        register_family(object)


class _PixelSpaceMethods(ModelFamily):
    """PixelSpaceFamily's behaviour without its identity, for registering with a name."""

    denoiser_name = "pixel_denoiser"
    matches = PixelSpaceFamily.matches
    noiser = PixelSpaceFamily.noiser
    prompt_tokenizer = PixelSpaceFamily.prompt_tokenizer
    encode_prompts = PixelSpaceFamily.encode_prompts


def test_register_family_with_a_name_sets_the_identity_and_picks_the_family(scratch_registry, make_pipeline) -> None:
    class Pixels(_PixelSpaceMethods):
        pass

    decorate = register_family("pixels", pipelines=["PixelPipeline", "PixelXLPipeline"])
    assert decorate(Pixels) is Pixels and registered_families()[-1] is Pixels
    assert Pixels.name == "pixels" and Pixels.pipeline_classes == ("PixelPipeline", "PixelXLPipeline")
    assert vars(Pixels)["name"] == "pixels"  # on the class itself, not on the shared base
    assert "name" not in vars(_PixelSpaceMethods) and "name" not in vars(ModelFamily)
    sd = make_pipeline()
    pipeline = SimpleNamespace(pixel_denoiser=sd.unet, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer)
    assert type(family_for_pipeline(pipeline)) is Pixels
    with pytest.raises(ValueError, match="not a pipeline of any registered family") as error:  # lists the new family
        family_for_pipeline(SimpleNamespace(transformer=torch.nn.Linear(2, 2)))
    assert "pixels: PixelPipeline, PixelXLPipeline" in str(error.value)
    # Registering it again under its own name changes nothing.
    register_family("pixels", pipelines=("PixelPipeline", "PixelXLPipeline"))(Pixels)
    assert registered_families().count(Pixels) == 1


def test_a_subclass_registered_with_a_name_leaves_its_parents_identity(scratch_registry) -> None:
    @register_family("pixels", pipelines=("PixelPipeline",))
    class Pixels(_PixelSpaceMethods):
        pass

    @register_family("pixels-hd", pipelines=("PixelHDPipeline",))
    class PixelsHD(Pixels):
        pass

    assert (PixelsHD.name, PixelsHD.pipeline_classes) == ("pixels-hd", ("PixelHDPipeline",))
    assert (Pixels.name, Pixels.pipeline_classes) == ("pixels", ("PixelPipeline",))
    assert registered_families()[-2:] == (Pixels, PixelsHD)


def test_the_built_in_subclass_family_has_its_own_identity() -> None:
    assert (Flux2Family.name, Flux2Family.pipeline_classes) == ("flux2", ("Flux2Pipeline",))
    assert (Flux2KleinFamily.name, Flux2KleinFamily.pipeline_classes) == ("flux2-klein", ("Flux2KleinPipeline",))
    assert (QwenImageFamily.name, QwenImageFamily.pipeline_classes) == ("qwen-image", ("QwenImagePipeline",))
    assert (QwenImage21Family.name, QwenImage21Family.pipeline_classes) == ("qwen-image-2.1", ("QwenImage21Pipeline",))
    order = registered_families()
    assert order.index(QwenImage21Family) > order.index(QwenImageFamily)  # tried after Qwen-Image (disjoint anyway)
    names = [family.name for family in registered_families()]
    assert len(names) == len(set(names)) and all(family.pipeline_classes for family in registered_families())


def test_register_family_with_a_name_refuses_clashes_and_bad_arguments(scratch_registry) -> None:
    class Pixels(_PixelSpaceMethods):
        pass

    with pytest.raises(ValueError, match="'flux' is already registered"):
        register_family("flux", pipelines=("PixelPipeline",))(Pixels)
    assert "name" not in vars(Pixels) and Pixels not in registered_families()  # a refusal leaves the class as it was
    with pytest.raises(TypeError, match="non-empty sequence of pipeline class names"):
        register_family("pixels", pipelines="PixelPipeline")  # a string, not a sequence of names
    with pytest.raises(TypeError, match="non-empty sequence of pipeline class names"):
        register_family("pixels", pipelines=())
    with pytest.raises(TypeError, match="non-empty sequence of pipeline class names"):
        register_family("pixels")
    with pytest.raises(ValueError, match="non-empty family name"):
        register_family("", pipelines=("PixelPipeline",))
    with pytest.raises(TypeError, match="goes with the family's name"):
        register_family(PixelSpaceFamily, pipelines=("PixelPipeline",))
    with pytest.raises(TypeError, match="ModelFamily subclass or a family name"):
        register_family("pixels", pipelines=("PixelPipeline",))(object)

    class Stated(_PixelSpaceMethods):
        name = "stated"
        pipeline_classes = ("StatedPipeline",)

    with pytest.raises(ValueError, match="states name='stated'"):
        register_family("pixels", pipelines=("PixelPipeline",))(Stated)

    class Abstract(ModelFamily):
        @classmethod
        def matches(cls, pipeline) -> bool:
            return False

    with pytest.raises(TypeError, match="encode_prompts"):
        register_family("abstract", pipelines=("AbstractPipeline",))(Abstract)
    assert "name" not in vars(Abstract)


def test_the_train_script_takes_lora_targets_from_the_family(make_pipeline) -> None:
    from trl import ModelConfig

    from trl_diffusion_sdpo.cli.train import peft_config_for

    peft_config = peft_config_for(ModelConfig(use_peft=True, lora_r=4), make_pipeline())
    assert peft_config.target_modules == set(StableDiffusionFamily.lora_target_modules)
    # The flow transformers' defaults add the text stream's projections (one source: FlowMatchingFamily).
    assert set(FluxFamily.lora_target_modules) - set(StableDiffusionFamily.lora_target_modules) == {
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    }
    assert StableDiffusion3Family.lora_target_modules == FluxFamily.lora_target_modules


def test_a_matched_pipeline_the_family_cannot_train_is_refused_saying_why() -> None:
    # SD-shaped (a UNet, one text encoder slot) but without its text encoder and tokenizer
    with pytest.raises(ValueError, match="needs a `text_encoder` and a `tokenizer`"):
        family_for_pipeline(SimpleNamespace(unet=torch.nn.Linear(2, 2), text_encoder=None, tokenizer=None))
    # SDXL-shaped (two text encoders) but refiner-like: no first text encoder
    refiner = SimpleNamespace(
        unet=SimpleNamespace(config=SimpleNamespace(addition_embed_type="text_time")),
        text_encoder=None,
        text_encoder_2=torch.nn.Linear(2, 2),
    )
    with pytest.raises(ValueError, match="not an SDXL base pipeline"):
        family_for_pipeline(refiner)


@pytest.mark.parametrize(
    "name", ["FluxKontextInpaintPipeline", "FluxFillPipeline", "FluxControlPipeline", "FluxControlImg2ImgPipeline"]
)
def test_inpainting_fill_and_control_pipelines_are_refused_by_name(name, tmp_path):
    """FLUX's Kontext inpainting, Fill and Control pipelines have FLUX's components (the family's ``matches`` accepts
    them) but their transformer reads mask or control latents no family builds: refused at construction, naming the
    pipeline."""
    import diffusers

    from trl_diffusion_sdpo.testing import build_tiny_flux_pipeline

    flux = build_tiny_flux_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"))
    cls = getattr(diffusers, name)
    components = {k: v for k, v in flux.components.items() if k in cls._get_signature_keys(cls)[0]}
    pipeline = cls(**components)
    with pytest.raises(ValueError, match=f"{name} is an? .*not supported"):
        family_for_pipeline(pipeline)


def test_a_nine_channel_inpainting_unet_is_refused(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    sd = build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"))
    unet = UNet2DConditionModel(**{**sd.unet.config, "in_channels": 9})
    pipeline = StableDiffusionInpaintPipeline(**{**sd.components, "unet": unet})
    with pytest.raises(ValueError, match="UNet takes 9 input channels but the VAE's latents have 4"):
        family_for_pipeline(pipeline)
    # the same pipeline class around a 4-channel UNet (inpainting by blending) trains: only the inputs matter
    assert family_for_pipeline(StableDiffusionInpaintPipeline(**sd.components)).name
