"""``benchmarks/studies/stability_probe.py``: the rewind's bookkeeping (its rewinds, its quiet runs against
Diffusion-DPO's) on synthetic runs; and, on the written result file, that every setting of a cell trained on the same
pairs, that a rewind run trained as Diffusion-DPO until its first alarm, that a stopped run's result stands for the
later evaluation steps, and that the pages quote the file.

Run with ``python -m pytest benchmarks/tests``; the package's suite does not read the result files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "studies"))

import probe_alarm  # noqa: E402
import stability_probe as study  # noqa: E402

BASE = {"reward": 0.8, "shape_iou": 0.7, "diversity": 0.15, "denoising_error": 0.04}


def _run(method: str, seed: int, reward: float, rewinds=(), stopped_at=None, lr: float = 2e-4) -> dict:
    return {
        "seed": seed,
        "learning_rate": lr,
        "beta": 5000.0,
        "method": method,
        "measures": {"0": BASE, "50": {**BASE, "reward": BASE["reward"] + reward}},
        "rewinds": [{"fired_at": f, "restored": r} for f, r in rewinds],
        "stopped_at": stopped_at,
    }


def test_rewinds_count_the_runs_that_rewound_and_stopped():
    runs = {
        "a": _run("rewind", 0, 0.0, [(15, 5)]),
        "b": _run("rewind", 1, 0.0, [(10, 0), (20, 0)], stopped_at=20),
        "c": _run("rewind", 2, 0.0),
        "d": _run("dpo", 0, -0.1),
    }
    cell = study.rewinds(runs)["lr0.0002-beta5000"]
    assert (cell["runs"], cell["rewound"], cell["stopped"]) == (3, 2, 1)
    assert cell["per_seed"]["1"] == {"rewinds": [{"fired_at": 10, "restored": 0}, {"fired_at": 20, "restored": 0}],
                                     "stopped_at": 20}  # fmt: skip
    expected = "rewound in 2 of 3 runs (fired at step 10, 15, 20; restored step 0, 5), stopped in 1"
    assert study._rewound(cell) == expected


def test_quiet_identity_compares_each_quiet_rewind_with_its_seeds_diffusion_dpo():
    runs = {
        "r0": _run("rewind", 0, 0.01),  # quiet, equal to its Diffusion-DPO run
        "d0": _run("dpo", 0, 0.01),
        "r1": _run("rewind", 1, 0.02),  # quiet, not equal
        "d1": _run("dpo", 1, 0.03),
        "r2": _run("rewind", 2, 0.0, [(15, 5)]),  # rewound: not a quiet run
        "d2": _run("dpo", 2, 0.0),
    }
    assert study.quiet_identity(runs) == {"lr0.0002-beta5000": {"quiet": 2, "equal_to_dpo": 1, "seeds": [0, 1]}}


# ------------------------------------------------------------------------------------------- the written file


@pytest.fixture(scope="module")
def written() -> dict:
    path = ROOT / study.OUTPUT
    if not path.exists():
        pytest.skip(f"{path.name} not written")
    return json.loads(path.read_text())


def _cells(written: dict):
    for regime, report in written["regimes"].items():
        by_cell: dict = {}
        for run in report["runs"].values():
            by_cell.setdefault((run["learning_rate"], run["beta"], run["seed"]), []).append(run)
        yield regime, by_cell


def test_every_setting_of_a_cell_trained_on_the_same_pairs(written):
    """The reference is frozen: its errors depend on the batches, timesteps and noise alone, so equal traces mean the
    same pairs in the same order (the probe held the same pairs back in every setting)."""
    checked = 0
    for _, by_cell in _cells(written):
        for runs in by_cell.values():
            full = [r for r in runs if r["stopped_at"] is None]
            digests = {r["reference_errors"]["sha256"] for r in full}
            assert len(digests) == 1, [r["method"] for r in full]
            trace = full[0]["reference_errors"]["trace"]
            for run in runs:  # a stopped run's trace is the others' up to its stop
                mine = run["reference_errors"]["trace"]
                assert [row[: len(mine[0])] for row in trace] == mine
            checked += len(runs)
    assert checked >= 60


def test_a_rewind_run_trains_as_diffusion_dpo_until_its_first_alarm(written):
    checked = 0
    for _, by_cell in _cells(written):
        for runs in by_cell.values():
            methods = {r["method"]: r for r in runs}
            if "rewind" not in methods or "dpo" not in methods:
                continue
            mine, dpo = methods["rewind"], methods["dpo"]
            until = mine["rewinds"][0]["fired_at"] if mine["rewinds"] else None
            for step, measures in mine["measures"].items():
                if until is None or int(step) < until:
                    assert measures == dpo["measures"][step], (mine["seed"], step)
            probes = [p for p in mine["probe"] if until is None or p["step"] <= until]
            assert probes == dpo["probe"][: len(probes)]
            checked += 1
    assert checked >= 10


def test_a_stopped_run_is_measured_at_its_stop_for_every_later_step(written):
    stopped = 0
    for _, by_cell in _cells(written):
        for runs in by_cell.values():
            for run in runs:
                if run["stopped_at"] is None:
                    continue
                at = run["measures"][str(run["stopped_at"])]
                later = [s for s in run["measures"] if int(s) > run["stopped_at"]]
                assert later and all(run["measures"][s] == at for s in later)
                stopped += 1
    assert stopped >= 1


def test_the_quiet_rewinds_are_diffusion_dpos_runs(written):
    for regime, cells in written["quiet_identity"].items():
        for cell, entry in cells.items():
            assert entry["equal_to_dpo"] == entry["quiet"], (regime, cell)


def test_the_written_result_file_is_assembled_from_its_runs(written, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    for name, report in written["regimes"].items():
        (parts / f"{name}.json").write_text(json.dumps(report))
    study.assemble(parts, tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == written


def test_the_research_page_quotes_the_result_file():
    page = (ROOT / "docs" / "research" / "stability.md").read_text()
    block = page.split(study.REWIND_START, 1)[1].split(study.REWIND_END, 1)[0]
    assert block.strip() == study.rewind_tables(ROOT / study.OUTPUT).strip()
    alarm_page = (ROOT / "docs" / "research" / "alarm.md").read_text()
    block = alarm_page.split(probe_alarm.START, 1)[1].split(probe_alarm.END, 1)[0]
    assert block.strip() == probe_alarm.tables(json.loads(probe_alarm.OUTPUT.read_text())).strip()
