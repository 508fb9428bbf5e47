"""``benchmarks/speed/gpu_suite.py``: every section's report under its name, each comparison a cell's own numbers
over the same model's same cell in the other section, the estimate beside every measured peak, and a budget that
runs out recorded as not measured. The tiny run (slow tier) is the command a GPU runs, on the tiny pipelines."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "speed" / "gpu_suite.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _report(steps: dict[tuple[str, str], float], device: str = "cuda") -> dict:
    cells: dict = {}
    for (model, key), step in steps.items():
        cells.setdefault(model, {})[key] = {
            "status": "measured", "step_s": step, "floor_s": step / 2, "ratio_to_floor": 2.0,
            "ratio_to_dpo": step / steps[(model, "dpo")], "peak_memory_bytes": int(step * 2**30),
            "estimate_bytes": int(step * 2**30 * 0.9),
        }  # fmt: skip
    return {"status": "measured", "device_type": device, "settings": {"cache_latents": False}, "cells": cells}


def test_comparisons_pair_each_cell_with_the_same_model_and_cell_of_the_other_section():
    module = _module()
    encode = _report({("sd15", "dpo"): 1.0, ("sd15", "sdpo_param"): 1.2, ("sdxl", "dpo"): 3.0})
    cache = _report({("sd15", "dpo"): 0.8, ("sd15", "sdpo_param"): 0.9, ("sdxl", "dpo"): 2.0})
    rows = module.compare({"encode": encode, "cache": cache}, "cache")
    assert rows["sd15/sdpo_param"]["step_ratio"] == pytest.approx(0.9 / 1.2)
    assert rows["sdxl/dpo"]["step_ratio"] == pytest.approx(2.0 / 3.0)
    assert rows["sd15/sdpo_param"]["cache_ratio_to_dpo"] == pytest.approx(0.9 / 0.8)
    # a cell the other section did not measure has no ratio
    del encode["cells"]["sdxl"]
    assert module.compare({"encode": encode, "cache": cache}, "cache")["sdxl/dpo"]["step_ratio"] is None
    rows = module.cell_rows({"encode": encode})
    assert {(r["model"], r["cell"]) for r in rows} == {("sd15", "dpo"), ("sd15", "sdpo_param")}
    assert all(r["estimate_relative_error"] == pytest.approx(-0.1, abs=1e-3) for r in rows)
    # on a CPU the peak is the process's resident set: no relative error
    assert module.cell_rows({"cpu": _report({("sd15", "dpo"): 1.0}, "cpu")})[0]["estimate_relative_error"] is None


def test_assembled_runs_keep_every_report_and_one_row_per_measured_cell(tmp_path):
    module = _module()
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(_report({("sd15", "dpo"): 1.0, ("sd15", "sdpo_param"): 1.3})))
    second.write_text(json.dumps({"reports": {"encode": _report({("sdxl", "dpo"): 2.0})}}))
    result = module.assemble([f"sd15={first}", f"suite={second}"])
    assert set(result["reports"]) == {"sd15", "suite/encode"}
    rows = {(r["run"], r["model"], r["cell"]): r for r in result["cells"]}
    assert set(rows) == {("sd15", "sd15", "dpo"), ("sd15", "sd15", "sdpo_param"), ("suite/encode", "sdxl", "dpo")}
    assert rows[("sd15", "sd15", "sdpo_param")]["ratio_to_dpo"] == 1.3


def test_a_spent_budget_records_every_section_as_not_measured(tmp_path):
    module = _module()
    output = tmp_path / "suite.json"
    module.main(["--device", "cpu", "--tiny", "--budget-s", "0", "--output", str(output)])
    result = json.loads(output.read_text())
    assert set(result["reports"]) == {s.name for s in module.SECTIONS}
    assert {r["status"] for r in result["reports"].values()} == {"not measured"}
    assert result["cells_measured"] == []


@pytest.mark.slow
def test_the_tiny_suite_measures_every_section(tmp_path):
    output = tmp_path / "suite.json"
    # the earlier checkout is this one: the section runs the same way from any tree holding the matrix script
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--before", str(ROOT), "--budget-s", "900",
               "--output", str(output)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=1500, cwd=ROOT, env=env)
    result = json.loads(output.read_text())
    module = _module()
    assert {name: r["status"] for name, r in result["reports"].items()} == {
        s.name: "measured" for s in module.SECTIONS
    }
    measured = {(r["run"], r["model"], r["cell"]) for r in result["cells_measured"]}
    assert ("encode", "sd15", "sdpo_param") in measured and ("cache", "flux2-klein", "dpo") in measured
    assert ("quantized", "sd15", "dpo@quanto-int8") in measured and ("before", "sd15", "sdpo_update") in measured
    assert result["rerun_against_first"]["sd15/dpo"]["step_ratio"] > 0
    assert result["workers_against_encode"]["sd15/dpo"]["step_ratio"] > 0  # 4 data-loading workers beside none
    # bitsandbytes needs a CUDA GPU: on the CPU its cells are the package's refusal
    bnb = result["reports"]["quantized"]["cells"]["sd15"]["dpo@bnb-nf4"]
    assert bnb["status"] == "error" and bnb["error_kind"] == "refused"
    # estimate-memory beside every peak (a tiny FLUX.2 [klein]'s estimate rounds to 0.00 GiB in the rows)
    assert all(r["estimate_gib"] is not None for r in result["cells_measured"])
    cells = [c for r in result["reports"].values() for m in r.get("cells", {}).values() for c in m.values()]
    assert all(c["estimate_bytes"] > 0 for c in cells if c.get("status") == "measured")
