"""Make ``estimate-memory``'s stored option table (:data:`~.option_table.OPTION_FILE`) from its real parser:

    python -m trl_diffusion_sdpo.cli.stored_options   # rewrites trl_diffusion_sdpo/cli/estimate_options.json

``tests/memory/test_stored_option_table.py`` compares the file with :func:`generate`'s table."""

from __future__ import annotations

import json
from typing import Any

from ..config.fields import DiffusionSDPOConfig
from .memory_parser import make_estimate_parser
from .memory_report import EstimateArguments
from .option_table import OPTION_FILE, option_table
from .train_options import ARGUMENT_TYPES

__all__ = ["generate"]


def generate() -> dict[str, Any]:
    """The table of ``estimate-memory``'s real parser for ``train``'s YAML files, as :data:`OPTION_FILE` holds it."""
    argument_types = (*ARGUMENT_TYPES, EstimateArguments)
    return option_table(make_estimate_parser(False), argument_types, DiffusionSDPOConfig.regime)


if __name__ == "__main__":
    OPTION_FILE.write_text(json.dumps(generate(), indent=1) + "\n")
    print(f"wrote {OPTION_FILE}")
