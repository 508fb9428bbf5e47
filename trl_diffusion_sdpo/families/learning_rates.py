"""The learning rates the docs recommend per model family: one table, with where each figure comes from.

The start summary (:mod:`trl_diffusion_sdpo.io.run_summary`) warns when the effective (scaled) learning rate is outside
the family's range. The UNet families publish ranges in the docs; a flow family publishes one LoRA rate
(``default_learning_rate`` with its ``learning_rate_source``, ``docs/families.md#defaults``), and so does the
authors' full tuning of SD1.5 and SDXL: for a single published rate the range is that rate divided and multiplied by
:data:`POINT_BAND`, a band wide enough for the usual adjustments to batch size and data, narrow enough that a
rate left at another recipe's value (the per-pair ``1e-8`` without ``scale_lr``) stands out.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import ModelFamily

__all__ = ["LEARNING_RATE_RANGES", "POINT_BAND", "LearningRateRange", "recommended_learning_rate"]

# A single published rate r recommends [r / POINT_BAND, r * POINT_BAND].
POINT_BAND = 10.0


@dataclass(frozen=True)
class LearningRateRange:
    """A recommended range of the effective learning rate (after ``scale_lr``), inclusive, and its source."""

    low: float
    high: float
    source: str

    @classmethod
    def around(cls, rate: float, source: str) -> LearningRateRange:
        """The band ``[rate / POINT_BAND, rate * POINT_BAND]`` around one published rate."""
        return cls(rate / POINT_BAND, rate * POINT_BAND, f"{source} ({rate:g}, within a factor {POINT_BAND:g})")

    def contains(self, rate: float) -> bool:
        return self.low <= rate <= self.high


_LORA_UNET = LearningRateRange(
    1e-5,
    1e-4,
    "docs/usage.md and docs/faq.md: 1e-5 to 1e-4 is typical for LoRA (sd15_lora.yaml and sdxl_lora.yaml use 1e-5)",
)

# (family name, "lora" | "full") -> range. The families without a published range of their own; a flow family's LoRA
# range comes from its default_learning_rate (see recommended_learning_rate).
LEARNING_RATE_RANGES: dict[tuple[str, str], LearningRateRange] = {
    ("stable-diffusion", "lora"): _LORA_UNET,
    ("stable-diffusion-xl", "lora"): _LORA_UNET,
    ("stable-diffusion", "full"): LearningRateRange.around(
        2.048e-5, "Diffusion-DPO's SD1.5 recipe, 1e-8 per pair x 2048 pairs (docs/sd.md, docs/recipe.md)"
    ),
    ("stable-diffusion-xl", "full"): LearningRateRange.around(
        2.048e-6, "Diffusion-DPO's SDXL recipe, 1e-9 per pair x 2048 pairs (docs/sdxl.md, docs/recipe.md)"
    ),
}


def recommended_learning_rate(family: ModelFamily | type[ModelFamily], lora: bool) -> LearningRateRange | None:
    """The range the docs recommend for ``family`` trained with LoRA (``lora``) or in full; ``None`` where they
    recommend none (a flow family's full tuning, a family registered outside the package without a rate)."""
    entry = LEARNING_RATE_RANGES.get((family.name, "lora" if lora else "full"))
    if entry is not None:
        return entry
    rate = getattr(family, "default_learning_rate", None)
    if lora and rate is not None:
        return LearningRateRange.around(rate, getattr(family, "learning_rate_source", f"{family.name}'s LoRA rate"))
    return None
