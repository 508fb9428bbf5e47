"""``benchmarks/speed/gpu_matrix.py``: its result file holds every model x setting cell with a number or an error, the
ratios are the file's own step times over the same model's Diffusion-DPO step (a ratio taken against the wrong row is
caught), and the time guard records what it did not run as not measured. The tiny run is the command a GPU runs, on
the package's tiny pipelines."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "speed" / "gpu_matrix.py"
MODELS = ["sd15", "sdxl", "flux2-klein"]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves its module by name
    spec.loader.exec_module(module)  # it puts the repository root on sys.path for benchmarks.harness
    return module


def check_report(report: dict[str, Any], module) -> None:
    """The file's structure; every model x setting cell measured (with its numbers), an error (with its text) or not
    measured (with the reason, and listed); each ratio recomputed from the file's own numbers."""
    for key in ("command", "device", "device_type", "machine", "versions", "settings", "floor", "timing", "models"):
        assert report[key], key
    assert report["command"].startswith("python benchmarks/speed/gpu_matrix.py")
    assert report["wall_time_s"] > 0 and report["versions"]["torch"] == torch.__version__
    assert list(report["cells"]) == list(report["models"]) == MODELS
    not_measured = []
    for model, row in report["cells"].items():
        assert list(row) == list(module.SETTINGS), model
        dpo = row["dpo"]
        for setting, cell in row.items():
            where = f"{model}/{setting}"
            assert cell["status"] in module.STATUSES, where
            if cell["status"] == "measured":
                assert len(cell["step_times_s"]) == len(cell["floor_times_s"]) == report["settings"]["steps"] >= 3
                assert cell["step_s"] == statistics.median(cell["step_times_s"]), where
                assert cell["floor_s"] == statistics.median(cell["floor_times_s"]), where
                assert all(math.isfinite(t) and t > 0 for t in cell["step_times_s"] + cell["floor_times_s"]), where
                assert cell["peak_memory_bytes"] > 0 and cell["memory_measure"], where
                assert cell["ratio_to_floor"] == pytest.approx(cell["step_s"] / cell["floor_s"], rel=1e-12), where
                if dpo["status"] == "measured":
                    assert cell["ratio_to_dpo"] == pytest.approx(cell["step_s"] / dpo["step_s"], rel=1e-12), where
                else:
                    assert cell["ratio_to_dpo"] is None, where
            elif cell["status"] == "error":
                assert isinstance(cell["error"], str) and cell["error"], where
                assert cell["error_kind"] in ("out of memory", "refused", "failed"), where
                assert cell["ratio_to_dpo"] is None, where
            else:
                assert cell["reason"] and cell["ratio_to_dpo"] is None, where
                not_measured.append(where)
    assert report["not_measured"] == not_measured


def _synthetic_report(module) -> dict[str, Any]:
    """A report as the driver assembles it, with made-up cells (each model's steps differ, so a wrong row shows)."""
    cells: dict[str, dict[str, Any]] = {}
    for m, model in enumerate(MODELS):
        cells[model] = {}
        for s, setting in enumerate(module.SETTINGS):
            steps = [0.1 * (m + 1) * (1 + 0.1 * s) + 0.001 * k for k in range(3)]
            floors = [0.05 * (m + 1) + 0.001 * k for k in range(3)]
            step_s, floor_s = statistics.median(steps), statistics.median(floors)
            cells[model][setting] = {
                "status": "measured",
                "step_s": step_s,
                "floor_s": floor_s,
                "ratio_to_floor": step_s / floor_s,
                "step_times_s": steps,
                "floor_times_s": floors,
                "peak_memory_bytes": 2**30,
                "memory_measure": "torch.cuda.max_memory_allocated",
            }
    cells["sdxl"]["sdpo_pair"] = {"status": "error", "error_kind": "refused", "error": "ValueError: no"}
    cells["flux2-klein"]["sdpo_update"] = {"status": "not measured", "reason": "time guard"}
    module.add_ratios(cells)
    return {
        "command": "python benchmarks/speed/gpu_matrix.py --device cuda",
        "device": "a GPU",
        "device_type": "cuda",
        "machine": {"gpu": "a GPU"},
        "versions": {"torch": torch.__version__},
        "settings": {"steps": 3},
        "floor": "the floor",
        "timing": "wall clock",
        "models": {model: {} for model in MODELS},
        "cells": cells,
        "not_measured": ["flux2-klein/sdpo_update"],
        "wall_time_s": 1.0,
    }


def test_each_ratio_is_the_cells_step_over_its_models_dpo_step_and_a_wrong_row_is_caught():
    module = _module()
    report = _synthetic_report(module)
    check_report(report, module)
    assert report["cells"]["sdxl"]["dpo"]["ratio_to_dpo"] == 1.0
    # the ratio taken against another model's Diffusion-DPO row
    wrong = copy.deepcopy(report)
    cell = wrong["cells"]["sdxl"]["sdpo_param"]
    cell["ratio_to_dpo"] = cell["step_s"] / wrong["cells"]["sd15"]["dpo"]["step_s"]
    with pytest.raises(AssertionError):
        check_report(wrong, module)
    # against the setting's neighbour instead of Diffusion-DPO
    wrong = copy.deepcopy(report)
    cell = wrong["cells"]["sd15"]["sdpo_update"]
    cell["ratio_to_dpo"] = cell["step_s"] / wrong["cells"]["sd15"]["sdpo_param_two"]["step_s"]
    with pytest.raises(AssertionError):
        check_report(wrong, module)
    # a cell left out
    wrong = copy.deepcopy(report)
    del wrong["cells"]["sd15"]["sdpo_pair"]
    with pytest.raises(AssertionError):
        check_report(wrong, module)


def test_errors_are_recorded_by_kind():
    module = _module()
    from trl_diffusion_sdpo.safeguards.parameter import check_pair_scope_memory

    args = SimpleNamespace(per_device_train_batch_size=4, safeguard_scope="pair")
    with pytest.raises(ValueError) as refused:
        check_pair_scope_memory(args, lora=False, trainable_elements=859_520_964)  # SD1.5's UNet, full tuning
    cell = module.error_cell(refused.value)
    assert cell["error_kind"] == "refused" and "safeguard_scope='pair'" in cell["error"]
    assert module.error_cell(torch.cuda.OutOfMemoryError("CUDA out of memory."))["error_kind"] == "out of memory"
    assert module.error_cell(RuntimeError("shapes differ"))["error_kind"] == "failed"


def test_a_model_process_past_its_deadline_starts_no_cell_and_one_that_dies_records_the_cell_it_died_in(capsys):
    module = _module()
    opts = module.parse_args(["--device", "cpu", "--tiny", "--worker", "sdxl", "--deadline", "0"])
    module.worker(opts)  # past its deadline: no model is built
    lines = capsys.readouterr().out.splitlines()
    found = module.read_worker(lines, list(module.SETTINGS), 0, "")
    assert found["device"]["device"]
    assert all(c["status"] == "not measured" and "time guard" in c["reason"] for c in found["cells"].values())
    # a process that ended one cell, died in the next (exit 1) or was stopped there by the parent (None)
    measured = {"setting": "dpo", "status": "measured", "step_s": 1.0}
    lines = [f"CELL {json.dumps(measured)}", 'START {"setting": "sdpo"}']
    died = module.read_worker(lines, list(module.SETTINGS), 1, "Traceback: boom")["cells"]
    assert list(died) == list(module.SETTINGS) and died["dpo"]["status"] == "measured"
    assert died["sdpo"]["status"] == "error" and "boom" in died["sdpo"]["error"]
    assert {c["status"] for s, c in died.items() if s not in ("dpo", "sdpo")} == {"not measured"}
    stopped = module.read_worker(lines, list(module.SETTINGS), None, "")["cells"]
    reason = "time guard: the model's process was stopped during this cell"
    assert stopped["sdpo"] == {"status": "not measured", "reason": reason}


def test_a_spent_budget_writes_every_cell_as_not_measured(tmp_path):
    module = _module()
    output = tmp_path / "matrix.json"
    module.main(["--device", "cpu", "--tiny", "--budget-s", "0", "--output", str(output)])
    report = json.loads(output.read_text())
    check_report(report, module)
    assert len(report["not_measured"]) == len(MODELS) * len(module.SETTINGS)
    assert report["command"].endswith(f"--budget-s 0 --output {output}")


@pytest.mark.slow
def test_the_tiny_matrix_measures_every_cell(tmp_path):
    module = _module()
    output = tmp_path / "matrix.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--threads", "1", "--warmup", "1",
               "--steps", "3", "--output", str(output)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    report = json.loads(output.read_text())
    check_report(report, module)
    assert report["tiny"] and report["device_type"] == "cpu" and not report["not_measured"]
    statuses = [cell["status"] for row in report["cells"].values() for cell in row.values()]
    assert statuses.count("measured") == len(statuses), report["cells"]


def test_compiled_cells_are_keyed_by_mode_and_compared_with_diffusion_dpo_in_the_same_mode_and_the_fastest():
    module = _module()
    opts = module.parse_args(["--device", "cpu", "--tiny", "--settings", "dpo,sdpo_param", "--compile-modes",
                              "none,reduce-overhead"])  # fmt: skip
    assert module.cell_plan(opts) == [
        ("dpo", "dpo", "none", "none"),
        ("sdpo_param", "sdpo_param", "none", "none"),
        ("dpo+reduce-overhead", "dpo", "none", "reduce-overhead"),
        ("sdpo_param+reduce-overhead", "sdpo_param", "none", "reduce-overhead"),
    ]
    steps = {"dpo": 2.0, "sdpo_param": 3.0, "dpo+reduce-overhead": 1.0, "sdpo_param+reduce-overhead": 1.5}
    row = {key: {"status": "measured", "step_s": s} for key, s in steps.items()}
    module.add_ratios({"sd15": row})
    assert row["sdpo_param+reduce-overhead"]["ratio_to_dpo"] == 1.5  # over the compiled Diffusion-DPO step
    assert row["sdpo_param"]["ratio_to_dpo"] == 1.5 and row["sdpo_param"]["ratio_to_best_dpo"] == 3.0
    with pytest.raises(SystemExit):
        module.parse_args(["--compile-modes", "fastest"])


def test_the_device_busy_time_is_the_union_of_the_kernels_intervals():
    module = _module()
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(start_us: float, end_us: float, device=cuda):
        return SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=start_us, end=end_us))

    # two overlapping kernels (0-10, 5-12: 12 us), one inside another (20-30 holding 22-25: 10 us), a CPU op ignored
    events = [event(20, 30), event(0, 10), event(22, 25), event(5, 12), event(0, 100, cpu)]
    assert module.device_busy_s(SimpleNamespace(events=lambda: events)) == pytest.approx(22e-6)
