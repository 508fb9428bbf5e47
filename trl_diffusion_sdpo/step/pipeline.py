"""One micro-batch from a collated batch to predictions: batch -> latents -> noised pair -> predictions.

The noised pair is forward noising, or, with an inverting noiser (``noising="inversion"``, SmPO's default), the
ReNoise inversion of the clean latents by the policy or the reference (:meth:`MicroBatchStages.inverting_network`),
made without gradient before the predictions.

:class:`MicroBatchStages` holds what the stages need (the family, its noiser, the reference, the keyed draws and the
augmentation settings) and runs them in order; each stage is a public method, so tests can run or replace one alone.
The errors, objective, safeguard and backward that follow are the trainer's to call (:mod:`.predictions`,
:mod:`trl_diffusion_sdpo.objectives`, :mod:`.safeguard`, :mod:`.parameter_space`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..families import ModelFamily, NoisedPair, PromptEmbeddings
from ..objectives import PreferencePredictions
from .batch import EncodedBatch, crop_pairs, drop_prompts, encode_batch, fixed_time_ids
from .draws import MicroBatchDraws
from .predictions import predict_pairs

__all__ = ["Augmentation", "MicroBatchStages", "NoisedMicroBatch", "select_prompts"]


def select_prompts(prompt_embeds: PromptEmbeddings, index: torch.Tensor) -> PromptEmbeddings:
    """The rows ``index`` of every tensor field of ``prompt_embeds`` (a family's embeddings may carry more fields)."""
    values = {
        field.name: value[index] if isinstance(value := getattr(prompt_embeds, field.name), torch.Tensor) else value
        for field in dataclasses.fields(prompt_embeds)
    }
    return type(prompt_embeds)(**values)


@dataclass(frozen=True)
class Augmentation:
    """The training-time augmentation settings (see the fields of the same names in ``DiffusionSDPOConfig``)."""

    resolution: int
    random_flip: bool = False
    random_crop: bool = False
    independent_augmentation: bool = False
    proportion_empty_prompts: float = 0.0
    fixed_time_ids: bool = False

    @classmethod
    def from_config(cls, args) -> Augmentation:
        """The config's fields of the same names."""
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


@dataclass
class NoisedMicroBatch:
    """A micro-batch up to the noised pair: what the predictions need."""

    noised: NoisedPair
    prompt_embeds: PromptEmbeddings
    time_ids: torch.Tensor | None

    @property
    def num_pairs(self) -> int:
        return self.noised.noisy.shape[0] // 2


class MicroBatchStages:
    """The stages of a micro-batch up to the predictions, with its keyed draws.

    Args:
        family: the model family (encoding, conditioning, the denoiser's call).
        noiser: the family's noiser (``draw`` and ``noise_pairs``; DDPM or flow matching).
        draws: where each micro-batch's random draws come from.
        reference: the reference's ``predict``, or ``None`` for reference-free objectives.
        augmentation: flips, crops, prompt dropout and SDXL's time ids.
        dtype: the compute dtype of the prompt embeddings.
        tokenize: the family's prompt tokenizer (for the empty prompt of prompt dropout).
        device: where the empty prompt's tokens go to be encoded.
        empty_prompt: the empty prompt's embeddings if known (a latent cache stores them), else encoded at first use.
    """

    def __init__(
        self,
        family: ModelFamily,
        noiser,
        draws: MicroBatchDraws,
        reference: Callable[..., torch.Tensor] | None,
        augmentation: Augmentation,
        dtype: torch.dtype,
        tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
        device: torch.device | str,
        empty_prompt: PromptEmbeddings | None = None,
    ) -> None:
        self.family, self.noiser, self.draws, self.reference = family, noiser, draws, reference
        self.augmentation, self.dtype, self.tokenize = augmentation, dtype, tokenize
        self.device, self.empty_prompt = device, empty_prompt
        settings = getattr(noiser, "settings", None) if getattr(noiser, "inverts", False) else None
        if settings is not None and settings.network == "reference" and reference is None:
            raise ValueError(
                "inversion_network='reference' needs a reference model, and this objective uses none; set "
                "inversion_network='policy' (as SmPO does) or noising='forward'."
            )

    def predict(
        self, policy: torch.nn.Module, inputs: dict[str, torch.Tensor], mode: str, step: int, separate_branches: bool
    ) -> PreferencePredictions:
        """batch -> latents -> noised pair -> predictions of ``policy`` (and the reference) for optimizer step
        ``step``; ``separate_branches``: one forward pass per branch (the parameter-space safeguard's two passes)."""
        return self.predict_noised(policy, self.noised_pair(policy, inputs, mode, step), separate_branches)

    def noised_pair(
        self, policy: torch.nn.Module, inputs: dict[str, torch.Tensor], mode: str, step: int
    ) -> NoisedMicroBatch:
        """batch -> latents -> noised pair (by forward noising, or by inverting with ``policy`` or the reference):
        the micro-batch's draws, and any inversion, are taken here, once."""
        generator = self.draws.generator(mode, step)
        encoded, time_ids = self.encode(inputs, generator, mode)
        inverting = self.inverting_network(policy, encoded.prompt_embeds, time_ids)
        # Forward noising calls the stage as (generator, mode, encoded): a replaced stage of that form keeps working.
        noised = (
            self.noise(generator, mode, encoded)
            if inverting is None
            else self.noise(generator, mode, encoded, inverting)
        )
        return NoisedMicroBatch(noised, encoded.prompt_embeds, time_ids)

    def predict_noised(
        self, policy: torch.nn.Module, batch: NoisedMicroBatch, separate_branches: bool
    ) -> PreferencePredictions:
        """The predictions of ``policy`` (and the reference) on a noised pair (may run twice on the same one)."""
        return predict_pairs(
            policy, self.reference, self.family, batch.noised, batch.prompt_embeds, batch.time_ids, separate_branches
        )

    def encode(
        self, inputs: dict[str, torch.Tensor], generator: torch.Generator, mode: str
    ) -> tuple[EncodedBatch, torch.Tensor | None]:
        """batch and latents: flips (per pair, or per image), random crops and prompt dropout (training only), then
        the VAE moments and prompt embeddings (or the cached ones); the denoiser's time ids where it takes them."""
        aug, train = self.augmentation, mode == "train"
        flip, drop, crop = self.draws.augmentation(
            generator,
            mode,
            inputs["time_ids"].shape[0],
            independent=aug.independent_augmentation,
            cropping=aug.random_crop and train,
        )
        if "crop_sizes" in inputs:  # resized, not yet cropped, by the collator (random_crop)
            inputs = crop_pairs(inputs, crop, aug.resolution)
        encoded = encode_batch(inputs, self.family, flip if train and aug.random_flip else None, self.dtype)
        if train and aug.proportion_empty_prompts > 0:
            encoded.prompt_embeds = drop_prompts(
                encoded.prompt_embeds, drop < aug.proportion_empty_prompts, self.empty_prompt_embeds()
            )
        time_ids = None
        if self.family.needs_time_ids:
            time_ids = encoded.time_ids
            if aug.fixed_time_ids:
                time_ids = fixed_time_ids(aug.resolution, time_ids.shape[0], time_ids.device)
        return encoded, time_ids

    def noise(
        self,
        generator: torch.Generator,
        mode: str,
        encoded: EncodedBatch,
        inverting: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        """The noised pair: one noise level and one noise per pair (shared by winner and loser) and one posterior
        sample per image, drawn for the global micro-batch; this process keeps its rows. An inverting noiser
        (ReNoise inversion) then inverts the clean latents with ``inverting`` (:meth:`inverting_network`), walking
        the grid up to the largest level of the global micro-batch (every process calls the network equally often)."""
        shape = tuple(encoded.mean.shape[1:])
        noiser = self.noiser
        drawn: dict[str, torch.Tensor] = {}

        def draw(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
            levels, noise = noiser.draw(n, shape, generator, device)
            drawn["levels"] = levels
            return levels, noise, torch.randn((n, 2, *shape), generator=generator, device=device)

        levels, noise, eps = self.draws.rows(generator, mode, encoded.num_pairs, draw)
        noised = noiser.noise_pairs(encoded.mean, encoded.std, levels, noise, eps, self.family.latents_config())
        if getattr(noiser, "inverts", False):
            if inverting is None:
                raise ValueError("an inverting noiser needs its network (see MicroBatchStages.inverting_network)")
            noised = noiser.invert(noised, inverting, drawn["levels"].max().item())
        return noised

    def inverting_network(
        self, policy: torch.nn.Module, prompt_embeds: PromptEmbeddings, time_ids: torch.Tensor | None
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """The network that inverts (``None`` under forward noising): ``(sample, timestep, rows) -> output`` on rows
        of the ``2B``-row batch (winners, then losers), each with its pair's prompt and its own time ids, without
        autograd; the policy (SmPO's code) or the reference, as the noiser's settings say."""
        if not getattr(self.noiser, "inverts", False):
            return None
        family, batch = self.family, prompt_embeds.encoder_hidden_states.shape[0]
        use_reference = self.noiser.settings.network == "reference"

        def predict(sample: torch.Tensor, timestep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            pairs = (rows % batch).to(prompt_embeds.encoder_hidden_states.device)
            conditioning = family.denoiser_conditioning(
                select_prompts(prompt_embeds, pairs), None if time_ids is None else time_ids[rows.to(time_ids.device)]
            )
            if use_reference:
                return self.reference(sample, timestep, **conditioning)
            with torch.no_grad():
                return family.call_denoiser(policy, sample, timestep, conditioning)

        return predict

    def empty_prompt_embeds(self) -> PromptEmbeddings:
        """The empty prompt's embeddings (prompt dropout), encoded once."""
        if self.empty_prompt is None:
            tokens = {k: v.to(self.device) for k, v in self.tokenize([""]).items()}
            self.empty_prompt = self.family.encode_prompts(tokens)
        return self.empty_prompt
