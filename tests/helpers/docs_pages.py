"""How the docs checks read result-file names."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Where a figure comes from: a result file (benchmarks/results/ or the demo's docs/images/, named in full or by its
# file name), a test, or a statement that it was computed (arithmetic) or observed without a file (not recorded).
RESULT_FILE = re.compile(r"[\w{},*./-]*[\w}*]\.json")


def _expand(name: str) -> list[str]:
    """``cpu-small-{8,2}pairs.json`` -> both names."""
    match = re.search(r"\{([^}]*)\}", name)
    if not match:
        return [name]
    return [n for option in match.group(1).split(",") for n in _expand(name.replace(match.group(0), option, 1))]


def result_folders() -> list[Path]:
    """The folders of ``benchmarks/results/``: one per study, and ``history/``."""
    return sorted(p for p in (ROOT / "benchmarks" / "results").iterdir() if p.is_dir())
