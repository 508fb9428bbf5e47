"""The error the fits verdict plans with: each row of ``engines/memory/measured.py`` recomputed from the GPU result
file it cites, the verdict of ``estimate-memory --gpu`` planned with it and saying so, and docs/memory.md's advice
stating the same figures."""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import fresh_forks
from trl_diffusion_sdpo.cli.memory import run_estimate_memory
from trl_diffusion_sdpo.engines.memory import GIB, USABLE_SHARE
from trl_diffusion_sdpo.engines.memory.measure import live_tensor_bytes
from trl_diffusion_sdpo.engines.memory.measured import MEASURED_ERRORS, MEASUREMENTS_FILE, planning_error

ROOT = Path(__file__).resolve().parents[2]
# benchmarks/speed/gpu_matrix.py's models -> (estimate-memory's family, LoRA unless --lora-all says so)
MODELS = {"sd15": ("stable-diffusion", False), "flux2-klein": ("flux2-klein", True)}


def measured_ratios() -> dict[tuple[str, bool, bool], float]:
    """``{(family, lora, bitsandbytes base): the largest peak / estimate}`` over the result file's cells that carry an
    estimate of the current estimator (``estimate_now_gib``)."""
    result = json.loads((ROOT / MEASUREMENTS_FILE).read_text())
    ratios: dict[tuple[str, bool, bool], float] = {}
    for cell in result["cells"]:
        if cell.get("estimate_now_gib") is None:
            continue
        family, lora = MODELS[cell["model"]]
        lora = lora or result["reports"][cell["run"]]["settings"]["lora_all"]
        base = cell["cell"].partition("@")[2]
        key = (family, lora, base.startswith("bnb"))
        ratios[key] = max(ratios.get(key, 0.0), cell["peak_gib"] / cell["estimate_now_gib"])
    return ratios


def test_each_measured_error_is_the_largest_in_its_result_file() -> None:
    ratios = measured_ratios()
    table = {(row.family, row.lora, row.bitsandbytes): row.ratio for row in MEASURED_ERRORS}
    assert table.keys() == ratios.keys()
    for key, ratio in ratios.items():
        assert table[key] == pytest.approx(ratio, abs=1e-3), key


def estimate_json(capsys, *argv: str) -> dict:
    assert run_estimate_memory([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


KLEIN = ("--config", str(ROOT / "examples/configs/flux2_klein_lora.yaml"), "--gpu", "24")


def test_flux2_klein_lora_on_24_gb_states_the_margin_it_planned_with(capsys) -> None:
    """FLUX.2 [klein] LoRA ran 22 % to 28 % over its estimate on a GPU: the verdict plans with the largest, says so,
    and a 17.3 GiB estimate no longer fits 24 GB (20.1 GiB usable)."""
    result = estimate_json(capsys, *KLEIN)
    ratio = measured_ratios()[("flux2-klein", True, False)]
    total = sum(result["components_bytes"].values())
    assert result["planned_gib"] == pytest.approx(total * ratio / GIB, rel=1e-3)  # the table rounds to 1e-3
    assert result["margin_gib"] == pytest.approx((USABLE_SHARE * 24e9 - total * ratio) / GIB, abs=0.03)
    assert result["fits"] is False and total / GIB < USABLE_SHARE * 24e9 / GIB  # the estimate alone would fit
    assert run_estimate_memory(list(KLEIN)) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("Does not fit a 24 GB GPU: ")
    assert f"planning with {result['planned_gib']:.2f} GiB" in line
    assert f"plus {(ratio - 1) * 100:.0f} %" in line and "flux2-klein LoRA" in line and "GPU (FLUX.2 [klein]" in line


def test_a_family_with_no_gpu_measurement_says_so_and_takes_the_largest_error(capsys) -> None:
    result = estimate_json(capsys, "--config", str(ROOT / "examples/configs/qwen_image_lora.yaml"), "--gpu", "80")
    largest = max(ratio for (_, _, bnb), ratio in measured_ratios().items() if not bnb)
    total = sum(result["components_bytes"].values())
    assert result["planned_gib"] == pytest.approx(total * largest / GIB, rel=1e-3)
    assert "qwen-image LoRA has not been measured on a GPU" in result["plan"] and "largest error" in result["plan"]
    # a bitsandbytes base plans with the largest error measured on one
    assert planning_error("qwen-image", True, bitsandbytes=True).ratio == pytest.approx(
        max(ratio for (_, _, bnb), ratio in measured_ratios().items() if bnb), abs=1e-3
    )


def test_the_docs_advice_states_each_measured_error() -> None:
    """docs/memory.md's table of measured errors lists every row, with its percentage, and nothing else."""
    text = (ROOT / "docs" / "memory.md").read_text()
    block = text.split("<!-- measured errors -->", 1)[1].split("<!-- end of measured errors -->", 1)[0]
    rows = [line for line in block.strip().splitlines()[2:] if line.startswith("|")]
    assert len(rows) == len(MEASURED_ERRORS)
    for row, line in zip(MEASURED_ERRORS, rows):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:3] == [f"`{row.family}`", row.tuning, "bitsandbytes" if row.bitsandbytes else "bf16, 8-bit"]
        assert re.fullmatch(rf"\+{(row.ratio - 1) * 100:.0f} %", cells[3]), (cells, row)


# The census counts every live tensor of its process, so in the test's own process it would also count what earlier
# tests leave to be freed (a compiled test's caches let go between two censuses): it runs in a fresh process (one
# forked once torch and the other libraries are imported, before anything else: tests.helpers.fresh_forks).
CENSUS = """
import json
import torch
from torch._subclasses.fake_tensor import FakeTensorMode  # what torch.compile's caches hold
from trl_diffusion_sdpo.engines.memory.measure import live_tensor_bytes

before = live_tensor_bytes()
kept = torch.zeros(1000)  # 4000 bytes, and a view of them that adds none
view = kept[10:]
with FakeTensorMode():
    fake = torch.empty(10**6)  # no memory of its own: its data pointer cannot be read
print(json.dumps(live_tensor_bytes() - before))
"""


def test_the_live_census_counts_real_storages_once_and_leaves_out_a_compilers_fake_tensors():
    done = fresh_forks.run(["-c", CENSUS], timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == 4000


def test_the_census_warns_that_it_misses_what_the_caller_froze(gc_unfrozen):
    kept = torch.zeros(1000)
    gc.freeze()
    try:
        with pytest.warns(UserWarning, match=r"frozen by gc\.freeze\(\) are not counted"):
            live_tensor_bytes()
    finally:
        gc.unfreeze()
    del kept
