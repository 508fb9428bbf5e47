"""How much memory a run takes: the estimate ``estimate-memory`` prints (:mod:`.estimate`, with the known models'
sizes in :mod:`.models`), the error it was measured with on a GPU, which its fits verdict plans with
(:mod:`.measured`), and the measurement of a step's peak on the CPU that tests and benchmarks hold it against
(:mod:`.measure`)."""

from .estimate import *  # noqa: F403
from .estimate import __all__ as _estimate_all
from .measured import MEASURED_ERRORS, PlanningError, planning_error

__all__ = [*_estimate_all, "MEASURED_ERRORS", "PlanningError", "planning_error"]
