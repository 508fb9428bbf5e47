"""How much memory a run takes: the estimate ``estimate-memory`` prints (:mod:`.estimate`, with the known models'
sizes in :mod:`.models`), the error it was measured with on a GPU, which its fits verdict plans with
(:mod:`.measured`), and the measurement of a step's peak on the CPU that tests and benchmarks hold it against
(:mod:`.measure`).

The estimate's names resolve on first use: the exact safeguard's one pass reads the memory model of its pieces
(:mod:`.pieces`) and loads no estimate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...config._lazy import lazy_attributes

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from .estimate import (
        ENGINES,
        GIB,
        GPUS_GB,
        KNOWN_MODELS,
        USABLE_SHARE,
        CardVerdict,
        KnownModel,
        MemoryEstimate,
        ModelSizes,
        RunShape,
        card_verdict,
        estimate_memory,
        family_lora_targets,
        model_sizes,
        model_sizes_of_pipeline,
        smallest_card,
        unet_activation_bytes,
    )
    from .measured import MEASURED_ERRORS, MEASUREMENTS_FILE, MeasuredError, PlanningError, planning_error

# The estimate's public names (estimate.__all__, which a test compares) and the measured errors', each imported when
# first used.
__all__ = [
    "GIB",
    "ENGINES",
    "GPUS_GB",
    "USABLE_SHARE",
    "CardVerdict",
    "card_verdict",
    "smallest_card",
    "KNOWN_MODELS",
    "KnownModel",
    "MemoryEstimate",
    "ModelSizes",
    "RunShape",
    "estimate_memory",
    "family_lora_targets",
    "model_sizes",
    "model_sizes_of_pipeline",
    "unet_activation_bytes",
    "MEASURED_ERRORS",
    "MEASUREMENTS_FILE",
    "MeasuredError",
    "PlanningError",
    "planning_error",
]
_ESTIMATE = __all__[: __all__.index("MEASURED_ERRORS")]

_EXPORTS = {**dict.fromkeys(_ESTIMATE, ".estimate"), **dict.fromkeys(__all__[len(_ESTIMATE) :], ".measured")}
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
