"""The CPU demo's settings: :class:`DemoRecipe`, every knob of a run (base recipe, seeds, methods, pairs, evaluation,
preference tuning, machine), with the default demo, the full comparison (``--full``) and a quick smoke-run variant, and
the work each plans (:meth:`DemoRecipe.planned_work`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config.checks import Choice, Range
from .methods import DEFAULT_GUARDS, DEFAULT_METHODS, GUARDS, METHODS, resolve_methods
from .pretrain import PretrainRecipe
from .shapes import all_captions

__all__ = ["BreakingRegime", "DemoRecipe"]

LAST_FRACTION = 0.1  # "final" figures average the last 10% of optimizer steps


@dataclass(frozen=True)
class BreakingRegime:
    """The demo's second stage: the setting where Diffusion-DPO's held-out reward falls, with each guard beside it.

    Where the shipped base's own comparison found Diffusion-DPO's held-out reward falling
    (``benchmarks/results/safeguard-comparison/cpu-safeguard-comparison-shipped-base-runs.json``, lr 2e-4, 2 pairs a
    step: -0.093 [-0.130, -0.055] over 10 seeds after 50 steps): the demo's base, pairs, beta and warmup, with these
    fields replacing the demo's. One training seed; every row trains on its batches, timesteps and
    noise, and is sampled at ``eval_steps`` with the same noise as the base.

    learning_rate, batch_size, max_steps: the optimizer's learning rate, pairs per step and steps.
    eval_steps: the optimizer steps after which the held-out prompts are sampled (the last is the end of training).
    eval_seeds_per_prompt: samples per held-out prompt for the reward; the figure shows the first.
    seed: the training seed. methods: keys of :data:`~trl_diffusion_sdpo.demo.methods.GUARDS`, in row order (by
    default :data:`~trl_diffusion_sdpo.demo.methods.DEFAULT_GUARDS`; :meth:`full`: every guard).
    """

    learning_rate: float = 2e-4
    batch_size: int = 2
    max_steps: int = 50
    eval_steps: tuple[int, ...] = (25, 50)
    eval_seeds_per_prompt: int = 4
    seed: int = 0
    methods: tuple[str, ...] = DEFAULT_GUARDS

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "eval_seeds_per_prompt"):
            Range(1, integer=True).check(name, getattr(self, name))
        object.__setattr__(self, "eval_steps", tuple(sorted({int(s) for s in self.eval_steps})))
        object.__setattr__(self, "methods", tuple(self.methods))
        if not self.eval_steps or self.eval_steps[0] < 1 or self.eval_steps[-1] != self.max_steps:
            raise ValueError(
                f"eval_steps must lie in [1, max_steps] and end at max_steps, got {list(self.eval_steps)}"
            )
        resolve_methods(self.methods, GUARDS)

    @classmethod
    def full(cls) -> BreakingRegime:
        """Every guard of :data:`~.methods.GUARDS` beside Diffusion-DPO (``--full``), in the same setting."""
        return cls(methods=tuple(GUARDS))

    @classmethod
    def quick(cls) -> BreakingRegime:
        """Four steps, sampled after two and four with one sample per prompt, every guard: the same stage for
        tests, its images mean nothing."""
        return cls(max_steps=4, eval_steps=(2, 4), eval_seeds_per_prompt=1, methods=tuple(GUARDS))

    def recipe(self, demo: DemoRecipe) -> DemoRecipe:
        """``demo`` with this regime's training and evaluation fields."""
        return dataclasses.replace(
            demo,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            max_steps=self.max_steps,
            eval_seeds_per_prompt=self.eval_seeds_per_prompt,
            seeds=(self.seed,),
        )


@dataclass(frozen=True)
class DemoRecipe:
    """Every knob of the demo. ``DemoRecipe()`` is the default demo (:data:`~.methods.DEFAULT_METHODS`),
    ``DemoRecipe.full()`` the full comparison (every row of :data:`~.methods.METHODS`, ``--full``),
    ``DemoRecipe.quick()`` a smoke run.

    > Base model

    pretrain: the base's recipe (:class:`PretrainRecipe`); the default one ships with the package, any other is
        pretrained on first use and cached.

    > Seeds and methods

    seed: data seed: which captions are held out, the preference pairs' sampling noise and the evaluation noise.
    seeds: training seeds; every method trains once per seed (batches, timesteps, noise, prompt dropout, flips).
    methods: keys of :data:`~trl_diffusion_sdpo.demo.methods.METHODS`, in table order (by default
        :data:`~trl_diffusion_sdpo.demo.methods.DEFAULT_METHODS`).

    > Prompts, pairs and evaluation

    num_held_out_prompts: captions kept out of the preference pairs; rewards are measured on these.
    pairs_per_prompt: pairs sampled for each remaining caption (two samples each, ranked by the colour reward).
    min_reward_margin: pairs whose rewards differ by less are dropped as ties.
    num_inference_steps, guidance_scale: DDIM sampling for pairs and evaluation.
    eval_seeds_per_prompt: samples per held-out prompt for the reward (same seeds for every model).

    > Preference tuning (identical for every method)

    tuning: ``"full"`` (all UNet weights, frozen-copy reference) or ``"lora"`` (adapters of rank ``lora_rank``).
    beta: Diffusion-DPO beta (the official launchers' 5000).
    learning_rate: AdamW learning rate, used as given (no per-pair scaling), constant after a linear warmup.
    weight_decay: AdamW weight decay (pinned here so the demo does not follow the config's default).
    batch_size: preference pairs per optimizer step. max_steps, warmup_steps: optimizer steps.
    proportion_empty_prompts, random_flip: prompt dropout and flip augmentation.
    cache_latents: encode the pairs with the VAE once (shared by every run) instead of at every step.

    > Machine

    threads: torch intra-op threads during the demo (``None``: leave torch's setting).

    > The breaking regime

    breaking: the stage where Diffusion-DPO breaks, each guard beside it (:class:`BreakingRegime`); ``None`` skips it.
    """

    pretrain: PretrainRecipe = field(default_factory=PretrainRecipe)
    seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = DEFAULT_METHODS
    # prompts, pairs, evaluation
    num_held_out_prompts: int = 6
    pairs_per_prompt: int = 6
    min_reward_margin: float = 0.01
    num_inference_steps: int = 8
    guidance_scale: float = 5.0
    eval_seeds_per_prompt: int = 16
    # preference tuning
    tuning: str = "full"
    lora_rank: int = 8
    beta: float = 5000.0
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    batch_size: int = 8
    max_steps: int = 50
    warmup_steps: int = 5
    proportion_empty_prompts: float = 0.2
    random_flip: bool = True
    cache_latents: bool = True
    # machine
    threads: int | None = 1
    breaking: BreakingRegime | None = field(default_factory=BreakingRegime)

    def __post_init__(self) -> None:
        Choice(("full", "lora")).check("tuning", self.tuning)
        for name in ("max_steps", "batch_size", "eval_seeds_per_prompt"):
            Range(1, integer=True).check(name, getattr(self, name))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "methods", tuple(self.methods))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        resolve_methods(self.methods)  # fails early on unknown keys

    @classmethod
    def full(cls, seed: int = 0, **overrides: Any) -> DemoRecipe:
        """The default demo with every row of :data:`~.methods.METHODS` and every guard in the breaking regime
        (``--full``): the same seeds, pairs, steps and settings, so the default's rows are trained exactly as here."""
        return cls(**{"seed": seed, "methods": tuple(METHODS), "breaking": BreakingRegime.full(), **overrides})

    @classmethod
    def quick(cls, seed: int = 0, **overrides: Any) -> DemoRecipe:
        """The same pipeline end to end in well under a minute: two seeds, every method, a few steps. For tests and
        a first look, not for conclusions."""
        values: dict[str, Any] = {
            "seed": seed,
            "methods": tuple(METHODS),
            "seeds": (0, 1),
            "pairs_per_prompt": 1,
            "min_reward_margin": 0.0,
            "num_inference_steps": 3,
            "eval_seeds_per_prompt": 2,
            "max_steps": 4,
            "warmup_steps": 1,
            "batch_size": 4,
            "breaking": BreakingRegime.quick(),
        }
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def planned_work(self) -> dict[str, int]:
        """What a run of this recipe trains and samples, counted from its fields: the work its time follows.

        ``training_runs``: the comparison's runs (methods x seeds) and the breaking regime's rows.
        ``optimizer_steps`` and ``pair_steps`` (pairs through the denoiser: steps x pairs a step) over those runs.
        ``sampled_images``: the base's samples for the preference pairs (two a pair) and, where a row probes, its
        probe's pairs, then every evaluation (the base and each run on the held-out prompts; the breaking regime at
        each of its evaluation steps), each a sampling of ``num_inference_steps`` DDIM steps. A row that stops early
        is sampled once more where it stops, which this leaves out; methods the installed trainer cannot run are
        counted.
        """
        captions = len(all_captions())
        pair_captions, held_out = captions - self.num_held_out_prompts, self.num_held_out_prompts
        runs = len(self.methods) * len(self.seeds)
        evaluations = (1 + runs) * held_out * self.eval_seeds_per_prompt  # the base's, then each run's
        work = {
            "training_runs": runs,
            "optimizer_steps": runs * self.max_steps,
            "pair_steps": runs * self.max_steps * self.batch_size,
            "sampled_images": 2 * self.pairs_per_prompt * pair_captions + evaluations,
        }
        regime = self.breaking
        if regime is not None:
            rows = len(regime.methods)
            probes = any(GUARDS[key].probes for key in regime.methods)
            work["training_runs"] += rows
            work["optimizer_steps"] += rows * regime.max_steps
            work["pair_steps"] += rows * regime.max_steps * regime.batch_size
            samplings = 1 + rows * len(regime.eval_steps)  # the base's, then each row's at each evaluation step
            work["sampled_images"] += 2 * pair_captions * probes + samplings * held_out * regime.eval_seeds_per_prompt
        return work


# ---------------------------------------------------------------------------------------------------- helpers
