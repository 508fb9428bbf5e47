"""How much memory a run takes: the estimate ``estimate-memory`` prints (:mod:`.estimate`, with the known models'
sizes in :mod:`.models`), and the measurement of a step's peak on the CPU that tests and benchmarks hold it against
(:mod:`.measure`)."""

from .estimate import *  # noqa: F403
from .estimate import __all__ as __all__
