"""``OnlineDiffusionSDPOConfig``: the offline config's fields plus those of the generation stage (what is sampled,
how it is scored and paired, how often the reference moves), in the names TRL's ``OnlineDPOConfig`` and
``GRPOConfig`` use where they have one (``num_generations``, ``reward_weights``, ``num_iterations``,
``generation_batch_size``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import DiffusionSDPOConfig
from ..config._lazy import LazyDocstring
from ..config.checks import Choice, Range
from ..config.defaults import DefaultEntry
from ..config.fields import option
from . import defaults as online_defaults

__all__ = ["PAIR_LATENTS", "PAIR_MODES", "OnlineDiffusionSDPOConfig", "check_online_config"]

#: How a prompt's K scored samples become pairs (as ``trl-diffusion-sdpo pairs`` pairs them).
PAIR_MODES = ("best-worst", "all")
#: What a pair's images are trained as: the sampler's latents, or the VAE encoding of the decoded images.
PAIR_LATENTS = ("sampled", "encoded")


_SUMMARY = r"""
Configuration class for [`OnlineDiffusionSDPOTrainer`]: every field of [`DiffusionSDPOConfig`] (objective, safeguard,
family and data settings apply unchanged to the generated pairs) and the generation stage's fields below.
"""


@dataclass
class OnlineDiffusionSDPOConfig(DiffusionSDPOConfig):
    # The docstring is written from the fields' helps when first read (config.docs.config_docstring, below the class).

    # Rewards
    reward_funcs: list[str] | None = option(
        None,
        "Registered scorer names that score the generated images (`pickscore`, `hpsv3`, `imagereward`, "
        "`editreward`, `clip`, the demo's `colour`, ...; `trl-diffusion-sdpo evaluate --help` lists them), or "
        "reward server URLs (`http://host:8000/v1/score`, e.g. `trl-diffusion-sdpo reward-server`; protocol in "
        "docs/reward-server.md). The trainer's `reward_funcs=` argument also takes callables "
        "`(prompts, images, **columns) -> list[float]` and replaces this list.",
    )
    reward_weights: list[float] | None = option(
        None,
        "One weight per reward function; the reward is the weighted sum of their scores (None: weight 1 "
        "each, as in TRL's GRPO).",
    )
    reward_timeout: float = option(
        60.0, "Seconds a reward server has to answer one request before the request is retried."
    )
    reward_retries: int = option(
        5,
        "Retries of a reward server request that failed (no connection, a timeout, HTTP 408, 429 or 5xx), with "
        "exponential backoff (waits of 0, 2, 4, 8, 16, ... seconds). After the last the run saves a checkpoint and "
        "stops with the error; no sample is trained on a missing score.",
    )
    async_rewards: bool = option(
        False,
        "Score in a background thread while the next images are sampled: a sampling call's images "
        "(`generation_batch_size`) or a micro-batch's, against the next call of the same optimizer step. The "
        "policy does not change within an optimizer step, so the pairs are those of `async_rewards=False` for "
        "rewards that score each image on its own (each function is called per sampling call); only the time "
        "differs (time saving not measured).",
    )
    video_reward_frames: int | None = option(
        4,
        "Video families: a clip's reward is the mean of the reward functions' scores of this many of its frames, "
        "spaced uniformly from the first to the last (None: every frame). The functions score each frame as an image, "
        "with the clip's prompt and columns.",
    )
    # Generation
    num_generations: int = option(4, "Images sampled per prompt (K), from which the pairs are chosen.")
    pair_mode: str = option(
        "best-worst",
        "How a prompt's K samples become pairs: `best-worst` (one pair, the highest against the lowest "
        "reward) or `all` (every two samples whose rewards differ by more than `reward_margin`).",
        choices=list(PAIR_MODES),
    )
    reward_margin: float = option(
        0.0,
        "A pair's reward gap must exceed this. A prompt with no such pair (ties included) gives none, "
        "and is counted in `online/prompts_without_pair`.",
    )
    pair_latents: str = option(
        "sampled",
        "What a pair trains on: `sampled`, the sampler's own final latents where the family's pipeline ends in the "
        "denoiser's latent space (SD, SDXL, SD3; other families encode their images), or `encoded`, the VAE "
        "encoding of the decoded images, as offline pairs are. On the toy demo the parameter-space safeguard lost "
        "less held-out shape accuracy with `encoded` (docs/online.md).",
        choices=list(PAIR_LATENTS),
    )
    generation_batch_size: int | None = option(
        None,
        "Images per sampling call (a memory setting: the samples do not depend on it). None: a "
        "micro-batch's prompts times `num_generations`, in one call.",
    )
    num_iterations: int = option(
        1,
        "Optimizer steps that train on one generation batch (GRPO's `num_iterations`): the prompts of an "
        "optimizer step are repeated this many times and sampled once.",
    )
    sample_steps: int | None = option(None, "Sampling steps of the generation (None: the pipeline's default).")
    sample_guidance_scale: float | None = option(
        None,
        "Classifier-free guidance scale of the generation (None: the family's sampling default, else the pipeline's).",
    )
    ref_update_steps: int | None = option(
        None,
        "Refresh the reference to the policy's current weights every this many optimizer steps (None: "
        "the reference stays the initial model). With LoRA the reference becomes a frozen copy of the denoiser "
        "with the adapters merged at each refresh (one more copy of the denoiser in memory, sharded as the policy "
        "under ZeRO-3 and FSDP2).",
    )
    # The generated pairs are not augmented: a flipped or cropped latent is not the latent of the flipped image.
    random_flip: bool = option(
        False, "Not used by online training (the generated latents are trained as sampled); must be False."
    )

    # What an online run decides from the online evidence (.defaults), in place of the offline config's answers
    def defaults_table(self, family: Any = None) -> tuple[DefaultEntry, ...]:
        """The offline table with the online entries (:func:`~.defaults.online_table`: an unset ``safeguard_space``
        is ``none``, except that a ``safeguard_mu`` or ``on_pathology="escalate"`` asks for a safeguard: then the
        offline default)."""
        asks = self.on_pathology == "escalate" or self.safeguard_mu is not None
        return online_defaults.online_table(super().defaults_table(family), safeguard_asked=asks)

    def data_loading_defaults(self, *, cuda: bool, cpus: int, processes: int = 1) -> dict[str, Any]:
        """:data:`~.defaults.ONLINE_DATA_LOADING` on every machine (the batches are prompts)."""
        return dict(online_defaults.ONLINE_DATA_LOADING)

    def pathology_switch(self) -> tuple[dict[str, Any] | None, str]:
        """:data:`~.defaults.ONLINE_SWITCH_TO` (none) and :data:`~.defaults.NO_ONLINE_SWITCH`."""
        target = online_defaults.ONLINE_SWITCH_TO
        return (None if target is None else dict(target)), online_defaults.NO_ONLINE_SWITCH

    def pathology_remedies(self) -> list[str]:
        """:func:`~.defaults.online_remedies`: never a safeguard."""
        return online_defaults.online_remedies(self)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_online_config(self)


_GROUPS = {
    "Parameters that control the rewards": (
        "",
        ("reward_funcs", "reward_weights", "reward_timeout", "reward_retries", "async_rewards", "video_reward_frames"),
    ),
    "Parameters that control the generation": (
        "Each micro-batch's prompts (an editing family's with their source images) are sampled `num_generations` "
        "times by the policy through its pipeline (eval mode, no gradient, adapters on), scored, and paired; the "
        "pairs' latents are the micro-batch's images.",
        (
            "num_generations",
            "pair_mode",
            "reward_margin",
            "pair_latents",
            "generation_batch_size",
            "num_iterations",
            "sample_steps",
            "sample_guidance_scale",
            "random_flip",
        ),
    ),
    "Parameters that control the reference": ("", ("ref_update_steps",)),
}
OnlineDiffusionSDPOConfig.__doc__ = LazyDocstring(
    OnlineDiffusionSDPOConfig, "trl_diffusion_sdpo.config.docs:config_docstring", _SUMMARY, _GROUPS
)

_RULES: dict[str, Range | Choice] = {
    "num_generations": Range(2, integer=True, hint="A pair needs two samples of the prompt."),
    "reward_timeout": Range(0, low_open=True),
    "reward_retries": Range(0, integer=True),
    "pair_mode": Choice(PAIR_MODES),
    "pair_latents": Choice(PAIR_LATENTS),
    "reward_margin": Range(0),
    "generation_batch_size": Range(1, integer=True, optional=True),
    "num_iterations": Range(1, integer=True),
    "sample_steps": Range(1, integer=True, optional=True),
    "ref_update_steps": Range(1, integer=True, optional=True),
    "video_reward_frames": Range(1, integer=True, optional=True),
}


def check_online_config(config) -> None:
    """The generation stage's rules: each field's range, weights matching the reward functions, no augmentation of
    generated latents. Run when the config is made and again when the trainer is built; an offline config has none
    of these fields to check."""
    if not isinstance(config, OnlineDiffusionSDPOConfig):
        return
    for name, rule in _RULES.items():
        rule.check(name, getattr(config, name))
    if config.reward_weights is not None and config.reward_funcs is not None:
        if len(config.reward_weights) != len(config.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(config.reward_weights)} weights but reward_funcs names "
                f"{len(config.reward_funcs)} functions ({config.reward_funcs}); give one weight per function."
            )
    for name in ("random_flip", "random_crop", "independent_augmentation"):
        if getattr(config, name, False):
            raise ValueError(f"{name}=True: online training trains the sampled latents as they are; set {name}=False.")
    target, why = config.pathology_switch()
    if config.on_pathology == "safeguard" and target is None:
        raise ValueError(f"on_pathology='safeguard': {why}; use on_pathology='warn' or 'stop'.")
    if config.cache_latents:
        raise ValueError("cache_latents=True: online training has no dataset of images to cache; set it to False.")
    if config.loss_mask:
        raise ValueError(
            "loss_mask=True: sampled pairs carry no loss mask yet (docs/masked-loss.md); set it to False."
        )
