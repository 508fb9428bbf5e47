"""``python -m trl_diffusion_sdpo demo --output-dir DIR``."""

import sys

from .cli import main

sys.exit(main())
