"""benchmarks/tools/loaded_modules.py's timing of the trainer's import: the checkouts take turns, one interpreter each
per round, and each checkout's median is of its own readings."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("loaded_modules", ROOT / "benchmarks/tools/loaded_modules.py")
loaded_modules = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loaded_modules)


def test_the_import_is_timed_on_each_checkout_in_turn_and_each_median_is_its_own(monkeypatch, tmp_path):
    calls: list[Path] = []
    seconds = {Path("/this"): iter([3.0, 1.0, 2.0]), Path("/against"): iter([9.0, 7.0, 8.0])}

    def fresh(root: Path, script: str, args: list[str], work: Path) -> str:
        assert script == loaded_modules.IMPORT_TIME and work == tmp_path
        calls.append(root)
        return f"some output\nSECONDS {next(seconds[root]):.4f}\n"

    monkeypatch.setattr(loaded_modules, "run_fresh", fresh)
    timed = loaded_modules.trainer_import_seconds({"this": Path("/this"), "against": Path("/against")}, 3, tmp_path)
    assert calls == [Path("/this"), Path("/against")] * 3  # in turn, never one checkout's readings in a row
    assert timed["this"] == {"median": statistics.median([3.0, 1.0, 2.0]), "readings": [3.0, 1.0, 2.0]}
    assert timed["against"] == {"median": 8.0, "readings": [9.0, 7.0, 8.0]}
