"""``benchmarks/speed/quantized_base_memory.py``: its recorded CPU run shows an int8 base below the bf16 base by at
least half the weights' saving with the estimate within a tenth of each peak, and docs/quantization.md's table is the
result file's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULT = ROOT / "benchmarks" / "results" / "memory" / "cpu-quantized-base-memory.json"
_spec = importlib.util.spec_from_file_location(
    "quantized_base_memory", ROOT / "benchmarks/speed/quantized_base_memory.py"
)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def test_the_recorded_cpu_run_saves_memory_and_its_estimate_is_within_a_tenth() -> None:
    report = json.loads(RESULT.read_text())
    bf16 = report["runs"]["none"]["measured_bytes"]
    for base in ("quanto-int8", "torchao-int8"):
        run = report["runs"][base]
        saved = bf16["resident"] - run["measured_bytes"]["resident"]
        assert run["measured_bytes"]["peak"] <= bf16["peak"] - saved / 2, base
    for run in report["runs"].values():
        assert abs(run["estimate_error"]) <= 0.10
        assert run["estimate_error"] == pytest.approx(
            run["estimate_mib"] / (run["measured_bytes"]["peak"] / 2**20) - 1, abs=1e-3
        )


def test_docs_quantization_table_is_the_result_files() -> None:
    text = (ROOT / "docs" / "quantization.md").read_text()
    block = text.split(script.BEGIN, 1)[1].split(script.END, 1)[0].strip()
    assert block == script.table_markdown(json.loads(RESULT.read_text())), (
        "docs/quantization.md is stale: python benchmarks/speed/quantized_base_memory.py --table "
        "benchmarks/results/memory/cpu-quantized-base-memory.json --write docs/quantization.md"
    )
