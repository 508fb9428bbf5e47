"""``python -m trl_diffusion_sdpo demo --output-dir DIR``."""

import sys

from .cli.main import main

sys.exit(main())
