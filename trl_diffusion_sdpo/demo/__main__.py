"""``python -m trl_diffusion_sdpo.demo``: the demo with all its options (see :mod:`.cli`)."""

import sys

from ..cli.demo import command

sys.exit(command())
