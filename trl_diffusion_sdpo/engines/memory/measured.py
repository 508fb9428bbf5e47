"""How far the estimate fell short of the peaks measured on a GPU: the margin a fits verdict plans with.

Each row is one family and tuning (and whether the frozen base was quantized by bitsandbytes, whose peaks ran far
above the others'): the largest measured peak over the estimate among its cells, measured on one H200 in bf16 mixed
precision (``benchmarks/results/gpu/cuda-h200-gpu-suite-real.json``, its ``cells``' ``peak_gib`` against
``estimate_now_gib``; ``tests/memory/test_measured_error.py`` recomputes every row from that file). A family, tuning
or base with no GPU measurement plans with the largest ratio measured on a base of the same kind, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MEASURED_ERRORS", "MEASUREMENTS_FILE", "MeasuredError", "PlanningError", "planning_error"]

#: the result file the rows come from
MEASUREMENTS_FILE = "benchmarks/results/gpu/cuda-h200-gpu-suite-real.json"


@dataclass(frozen=True)
class MeasuredError:
    """The largest peak measured on a GPU over the estimate (``ratio``) for a family's runs of one tuning."""

    family: str
    lora: bool
    bitsandbytes: bool  # the frozen base quantized by bitsandbytes (NF4, int8)
    ratio: float
    runs: str  # what ran, for the verdict's sentence and the docs

    @property
    def tuning(self) -> str:
        return "LoRA" if self.lora else "full tuning"


MEASURED_ERRORS: tuple[MeasuredError, ...] = (
    MeasuredError(
        "stable-diffusion", False, False, 1.090,
        "SD1.5's UNet, full tuning, 4 pairs at 512 px: Diffusion-DPO, the one pass, two passes, the update space",
    ),
    MeasuredError(
        "stable-diffusion", True, False, 1.221, "SD1.5's UNet, LoRA r8, 4 pairs at 512 px, bf16 and 8-bit bases"
    ),
    MeasuredError(
        "stable-diffusion", True, True, 1.837, "SD1.5's UNet, LoRA r8, 4 pairs at 512 px, bitsandbytes bases"
    ),
    MeasuredError(
        "flux2-klein", True, False, 1.284,
        "FLUX.2 [klein] 4B, LoRA r8, 1 pair at 1024 px, encoding live and from a latent cache",
    ),
)  # fmt: skip


@dataclass(frozen=True)
class PlanningError:
    """What a verdict plans with: the peak is taken as the estimate times ``ratio``; ``measured`` holds the row of
    this family and tuning, or ``None`` where none was measured (``ratio`` is then the largest of its kind, that of
    the row ``largest``)."""

    ratio: float
    measured: MeasuredError | None
    largest: MeasuredError | None = None

    @property
    def percent(self) -> str:
        return f"{(self.ratio - 1) * 100:.0f} %"

    @property
    def source(self) -> MeasuredError | None:
        """The row the ratio was measured on: this family's and tuning's, or the one it is borrowed from."""
        return self.measured if self.measured is not None else self.largest

    def describe(self, family: str, lora: bool) -> str:
        """Where the ratio comes from, in a clause: the runs it was measured on and their result file, and, where it
        is borrowed from another family or tuning, which and that this one was not measured."""
        tuning = "LoRA" if lora else "full tuning"
        if self.measured is not None:
            return (
                f"the most a {family} {tuning} run's peak exceeded its estimate on a GPU ({self.measured.runs}; "
                f"{MEASUREMENTS_FILE})"
            )
        source = self.largest
        if source is None:  # pragma: no cover - every kind of base has a row
            return f"{family} {tuning} has not been measured on a GPU"
        base = " on a bitsandbytes base" if source.bitsandbytes else ""
        return (
            f"the largest error measured on a GPU, borrowed from {source.family} {source.tuning}{base} "
            f"({source.runs}; {MEASUREMENTS_FILE}): {family} {tuning} has not been measured on a GPU"
        )

    def as_dict(self) -> dict[str, object]:
        """The margin's source for ``--json``: the row's family, tuning, base, runs and result file, and whether it
        is borrowed (not the run's own family and tuning)."""
        source = self.source
        return {
            "percent": round((self.ratio - 1) * 100, 1),
            "borrowed": self.measured is None,
            "family": None if source is None else source.family,
            "tuning": None if source is None else source.tuning,
            "bitsandbytes_base": None if source is None else source.bitsandbytes,
            "runs": None if source is None else source.runs,
            "file": MEASUREMENTS_FILE,
        }


def planning_error(family: str, lora: bool, bitsandbytes: bool = False) -> PlanningError:
    """The measured error of ``family``'s runs of this tuning and base, else the largest measured on a base of the
    same kind (bitsandbytes or not)."""
    for row in MEASURED_ERRORS:
        if (row.family, row.lora, row.bitsandbytes) == (family, lora, bitsandbytes):
            return PlanningError(row.ratio, row)
    largest = max((row for row in MEASURED_ERRORS if row.bitsandbytes == bitsandbytes), key=lambda row: row.ratio)
    return PlanningError(largest.ratio, None, largest)
