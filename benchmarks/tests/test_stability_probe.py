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
import stability_probe_online as online_study  # noqa: E402

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


class _Measured(study.ProbeMeasures):
    """:class:`stability_probe.ProbeMeasures` whose evaluation records its step as every measure (no sampling)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self.measures[str(state.global_step)] = {"reward": float(state.global_step)}
            self.rewards[state.global_step] = float(state.global_step)


def _evaluator() -> _Measured:
    from trl_diffusion_sdpo.demo.recipe import DemoRecipe
    from trl_diffusion_sdpo.demo.shapes import split_captions

    return _Measured([10, 20, 30], split_captions(1, 0)[1][:1], DemoRecipe())


STOPS = [  # (the step the run stopped at, the figure each evaluation step ends with)
    (25, {"10": 10.0, "20": 20.0, "30": 25.0}),  # between evaluation steps: measured at 25, kept as step 30's
    (20, {"10": 10.0, "20": 20.0, "30": 20.0}),  # at an evaluation step
    (30, {"10": 10.0, "20": 20.0, "30": 30.0}),  # the whole run
]


@pytest.mark.parametrize(("stop", "expected"), STOPS)
def test_a_run_that_stops_itself_is_measured_at_its_stop_for_every_later_evaluation_step(stop, expected):
    from types import SimpleNamespace

    evaluator = _evaluator()
    args = SimpleNamespace(max_steps=30)
    for step in range(1, stop + 1):
        evaluator.on_step_end(args, SimpleNamespace(global_step=step), None)
    evaluator.on_train_end(args, SimpleNamespace(global_step=stop), None)
    assert {s: m["reward"] for s, m in evaluator.measures.items()} == expected
    assert evaluator.rewards == {int(s): v for s, v in expected.items()}
    assert evaluator.stopped_at == (None if stop == 30 else stop)


# ------------------------------------------------------------------------------------------------------ online

ONLINE_BASE = {"colour_reward": 0.86, "shape_iou": 0.78, "diversity": 0.15, "denoising_error": 0.039}


def _online_run(method: str, seed: int, reward: float, **extra) -> dict:
    """An online run as the online studies store it: its held-out measures per evaluation step (``curve``)."""
    curve = {s: {**ONLINE_BASE, "colour_reward": ONLINE_BASE["colour_reward"] + reward * int(s) / 60}
             for s in ("20", "40", "60")}  # fmt: skip
    return {"seed": seed, "learning_rate": 1e-3, "method": method, "curve": curve, **extra}


def test_the_online_goal_pairs_the_rewind_of_todays_rule_with_the_probe_logged_runs_and_the_stored_settings(
    tmp_path, monkeypatch
):
    current = online_study.package_rule()
    stored = {
        "base": {"measures": ONLINE_BASE},
        "config": {"beta": 5000.0},
        "grid_learning_rate": 1e-3,
        "runs": {
            **{f"s{seed}-dpo": _online_run("dpo", seed, 0.5) for seed in range(3)},  # replaced by the probe runs
            **{f"s{seed}-fixed": _online_run("max-margin-5", seed, -0.01 * (seed + 1)) for seed in range(3)},
            **{f"s{seed}-off": _online_run("offline-dpo", seed, 0.3) for seed in range(3)},  # not an online setting
        },
    }
    (tmp_path / "stored.json").write_text(json.dumps(stored))
    runs = {f"p{seed}": _online_run("dpo-probe", seed, -0.05 - 0.001 * seed) for seed in range(3)}
    # seed 0 quiet (Diffusion-DPO's run), seeds 1 and 2 stopped at step 20 with the base's measures
    runs["r0"] = _online_run("dpo-rewind", 0, -0.05, probe_alarm=current, rewinds=[], stopped_at=None)
    for seed in (1, 2):
        rewound = _online_run("dpo-rewind", seed, 0.0, probe_alarm=current, stopped_at=20)
        runs[f"r{seed}"] = {**rewound, "rewinds": [{"fired_at": 20, "restored": 10}]}
    runs["old"] = _online_run("dpo-rewind", 3, 0.9, rewinds=[], stopped_at=None)  # an earlier rule's: left out
    report = {"regimes": {"online-hacking": {"stored_file": str(tmp_path / "stored.json"), "reference": "dpo",
                                             "learning_rate": 1e-3, "runs": runs}}}  # fmt: skip
    goal = online_study.online_goal(report)
    cell = goal["analysis"]["online-hacking"]["lr0.001-beta5000"]
    assert set(cell) - {"learning_rate", "beta"} == {"dpo", "guard-max-margin", "rewind"}
    assert cell["rewind"]["seeds"] == [0, 1, 2] and cell["rewind"]["best_fixed"] == "guard-max-margin"
    # the rewind against Diffusion-DPO at step 60: 0 at seed 0, +0.051 and +0.052 at seeds 1 and 2
    vs_dpo = cell["rewind"]["steps"]["60"]["reward"]["vs_dpo"]
    assert vs_dpo["mean"] == pytest.approx((0.0 + 0.051 + 0.052) / 3)
    quiet = goal["quiet_identity"]["online-hacking"]["lr0.001-beta5000"]
    assert (quiet["quiet"], quiet["equal_to_dpo"]) == (1, 1)
    rewound = goal["rewinds"]["online-hacking"]["lr0.001-beta5000"]
    assert (rewound["runs"], rewound["rewound"], rewound["stopped"]) == (3, 2, 2)
    assert goal["goal_all_measures"]["online-hacking/lr0.001-beta5000"]["diffusion_dpo_breaks"]
    assert not online_study._current(runs["old"]) and online_study._current(runs["r1"])


class _SearchModule:
    """A regime's study module whose Diffusion-DPO run at a learning rate ends with the held-out colour reward change
    ``changes[lr][seed]`` from the base's."""

    def __init__(self, changes: dict[float, dict[int, float]]) -> None:
        self.changes, self.trained = changes, []

    @staticmethod
    def run_key(seed: int, lr: float, method: str) -> str:
        return f"seed{seed}-lr{lr:g}-{method}"

    def run_one(self, task: tuple[int, float, str]) -> dict:
        seed, lr, method = task
        self.trained.append(task)
        reward = ONLINE_BASE["colour_reward"] + self.changes[lr][seed]
        return {"seed": seed, "learning_rate": lr, "method": method, "curve": {"60": {"colour_reward": reward}},
                "history": {"step": [60]}}  # fmt: skip


SEARCH_STORED = {"base": {"measures": ONLINE_BASE}, "config": {"max_steps": 60}}


@pytest.mark.parametrize(
    ("changes", "chosen", "tried"),
    [
        # both seeds fall beyond the tolerance at the first learning rate: chosen, the next never trained
        ({3e-3: {10: -0.05, 11: -0.03}, 1e-2: {10: -0.2, 11: -0.2}}, 3e-3, [3e-3]),
        # one seed of two is not most: the next learning rate, where both fall
        ({3e-3: {10: -0.05, 11: -0.01}, 1e-2: {10: -0.05, 11: -0.021}}, 1e-2, [3e-3, 1e-2]),
        # a fall within the tolerance is no fall: none chosen, the regime is not run
        ({3e-3: {10: -0.019, 11: 0.0}, 1e-2: {10: -0.019, 11: -0.019}}, None, [3e-3, 1e-2]),
    ],
)
def test_the_search_takes_the_lowest_learning_rate_where_most_search_seeds_lose_held_out_reward(
    monkeypatch, changes, chosen, tried
):
    regime = online_study.OnlineRegime(
        "online_hacking", Path("stored.json"), "dpo", search_lrs=(3e-3, 1e-2), fixed="x"
    )
    monkeypatch.setitem(online_study.ONLINE_REGIMES, "searched", regime)
    module, entry = _SearchModule(changes), {"runs": {}}
    assert online_study.search_online("searched", module, SEARCH_STORED, entry, lambda: None) == chosen
    assert entry["search"]["chosen"] == chosen
    assert [v["learning_rate"] for v in entry["search"]["by_learning_rate"]] == tried
    assert module.trained == [(s, lr, "dpo-probe") for lr in tried for s in online_study.SEARCH_SEEDS]
    assert not set(online_study.SEARCH_SEEDS) & set(range(10))  # never the paired seeds the alarm is chosen on
    assert entry["runs"] == {}  # the search's runs are not the regime's runs
    again = _SearchModule(changes)  # a rerun reads the runs it has
    assert (
        online_study.search_online("searched", again, SEARCH_STORED, entry, lambda: None) == chosen
        and not again.trained
    )


def test_a_searched_regimes_own_fixed_setting_is_its_best_fixed_setting_in_the_online_goal(tmp_path, monkeypatch):
    current = online_study.package_rule()
    stored = {"base": {"measures": ONLINE_BASE}, "config": {"beta": 5000.0}, "grid_learning_rate": 1e-3,
              "runs": {f"s{seed}-old": _online_run("max-margin-5", seed, 0.5) for seed in range(3)}}  # fmt: skip
    (tmp_path / "stored.json").write_text(json.dumps(stored))
    regime = online_study.OnlineRegime(
        "online_hacking", tmp_path / "stored.json", "dpo", search_lrs=(3e-3,), fixed="ema-0.999"
    )
    monkeypatch.setitem(online_study.ONLINE_REGIMES, "fast", regime)
    fast = {}
    for seed in range(3):
        for method, change in (("dpo-probe", -0.1), ("ema-0.999", -0.01), ("max-margin-5", 0.2)):
            fast[f"{seed}-{method}"] = {**_online_run(method, seed, change), "learning_rate": 3e-3}
        rewind = _online_run("dpo-rewind", seed, -0.01, probe_alarm=current, rewinds=[], stopped_at=None)
        fast[f"{seed}-rewind"] = {**rewind, "learning_rate": 3e-3}
    report = {"regimes": {"fast": {"stored_file": str(tmp_path / "stored.json"), "reference": "dpo",
                                   "learning_rate": 3e-3, "runs": fast}}}  # fmt: skip
    cell = online_study.online_goal(report)["analysis"]["fast"]["lr0.003-beta5000"]
    # the stored runs at lr 1e-3 and a setting the regime does not name are left out
    assert set(cell) - {"learning_rate", "beta"} == {"dpo", "ema-0.999", "rewind"}
    assert cell["rewind"]["best_fixed"] == "ema-0.999"
    missing = online_study.online_not_run({"regimes": {"fast": {"runs": fast, "search": {"chosen": 3e-3}}}})
    counts = (("dpo", 0), ("dpo-probe", 3), ("ema-0.999", 3), ("dpo-rewind", 3))
    expected = [f"fast: {m}: {n} of 10 seeds" + (online_study.PLAIN_WHY if m == "dpo" else "") for m, n in counts]
    assert [m for m in missing if m.startswith("fast:")] == expected
    none = online_study.online_not_run({"regimes": {"fast": {"runs": {}, "search": {"chosen": None}}}})
    assert [m for m in none if m.startswith("fast:")] == [
        "fast: no searched learning rate broke Diffusion-DPO; not run"
    ]


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
                later = sorted((s for s in run["measures"] if int(s) > run["stopped_at"]), key=int)
                at = run["measures"].get(str(run["stopped_at"]), run["measures"][later[0]])
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
    page = (ROOT / "benchmarks" / "research" / "stability.md").read_text()
    block = page.split(study.REWIND_START, 1)[1].split(study.REWIND_END, 1)[0]
    assert block.strip() == study.rewind_tables(ROOT / study.OUTPUT).strip()
    block = page.split(study.ONLINE_REWIND_START, 1)[1].split(study.ONLINE_REWIND_END, 1)[0]
    assert block.strip() == study.rewind_tables(ROOT / online_study.ONLINE_OUTPUT).strip()
    alarm_page = (ROOT / "benchmarks" / "research" / "alarm.md").read_text()
    calibration = json.loads(probe_alarm.OUTPUT.read_text())
    block = alarm_page.split(probe_alarm.START, 1)[1].split(probe_alarm.END, 1)[0]
    assert block.strip() == probe_alarm.tables(calibration).strip()
    block = alarm_page.split(probe_alarm.ONLINE_START, 1)[1].split(probe_alarm.ONLINE_END, 1)[0]
    assert block.strip() == probe_alarm.online_tables(calibration["online"]).strip()


def stated_figures(probe: dict, calibration: dict) -> list[str]:
    """The figures docs/safeguard.md states about the probe's alarm and the rewind, each formatted from the result
    files."""
    held_out = calibration["confusion"]["calibrated"]["report_runs"]
    cells = probe["analysis"]["offline"]
    rewinds, quiet = probe["rewinds"]["offline"], probe["quiet_identity"]["offline"]
    breaking = probe["goal_all_measures"]["offline/lr0.0002-beta5000"]["settings"]["rewind"]["measures"]
    at_2e4 = cells["lr0.0002-beta5000"]
    reward = at_2e4["rewind"]["steps"]["50"]["reward"]["vs_base"]
    dpo = at_2e4["dpo"]["steps"]["50"]["reward"]["vs_base"]
    healthy = quiet["lr2e-05-beta5000"]
    small = probe["quiet_identity"]["small-beta"]["lr2e-05-beta5"]
    small_runs = probe["rewinds"]["small-beta"]["lr2e-05-beta5"]["runs"]
    long = probe["rewinds"]["long"]["lr6.7e-05-beta5000"]
    long_vs_dpo = probe["analysis"]["long"]["lr6.7e-05-beta5000"]["rewind"]["steps"]["1000"]["reward"]["vs_dpo"]
    return [
        f"precision is {held_out['precision']:.2f} and its recall {held_out['recall']:.2f}",
        f"rewound in {long['rewound']} of {long['runs']} runs (stopping in {long['stopped']}), ending "
        f"{long_vs_dpo['mean']:+.3f} [{long_vs_dpo['ci95'][0]:+.3f}, {long_vs_dpo['ci95'][1]:+.3f}] in held-out "
        "reward against Diffusion-DPO",
        f"{held_out['timely_strict']} of its {held_out['fired_fell']} alarms on runs whose reward fell",
        f"quiet in {healthy['quiet']} of {rewinds['lr2e-05-beta5000']['runs']} runs",
        f"{healthy['equal_to_dpo']} of them equal to Diffusion-DPO's",
        f"at beta 5 (100 steps) quiet in {small['quiet']} of {small_runs} runs",
        f"stopped with the base's weights in {rewinds['lr0.001-beta5000']['stopped']} of "
        f"{rewinds['lr0.001-beta5000']['runs']} runs",
        f"rewound in {rewinds['lr0.0002-beta5000']['rewound']} of {rewinds['lr0.0002-beta5000']['runs']} runs "
        f"(stopping in {rewinds['lr0.0002-beta5000']['stopped']})",
        f"{reward['mean']:+.3f} [{reward['ci95'][0]:+.3f}, {reward['ci95'][1]:+.3f}] in held-out reward from the base "
        f"(Diffusion-DPO {dpo['mean']:+.3f})",
        f"missing the holding half by {breaking['reward']['miss']:.3f} on the reward, "
        f"{breaking['shape_iou']['miss']:.3f} on the shape IoU and {breaking['denoising_error']['miss']:.3f} on the "
        "denoising error",
    ]


def test_the_safeguard_page_states_the_result_files_figures(written):
    calibration = json.loads(probe_alarm.OUTPUT.read_text())
    text = " ".join((ROOT / "docs" / "safeguard.md").read_text().split())
    missing = [figure for figure in stated_figures(written, calibration) if figure not in text]
    assert not missing, missing
    verdict = written["verdict"]
    assert ("meets the healthy half" in text) == verdict["meets"]["healthy"]
    assert ("misses the holding half at lr 2e-4" in text) == ("offline/lr0.0002-beta5000" in verdict["missed_by"])
    assert ("it is not the default" in text) == (not verdict["becomes_default"])
    at_1e3 = written["rewinds"]["offline"]["lr0.001-beta5000"]["per_seed"].values()
    assert all(run["rewinds"][-1]["restored"] == 0 for run in at_1e3 if run["stopped_at"] is not None)


def online_stated_figures(online: dict) -> list[str]:
    """The figures docs/safeguard.md and docs/online.md state about the rewind online, formatted from its result
    file: the quiet runs, the hacking regime's miss, and the breaking regime's rewinds, reward and miss."""
    quiet = [cell for regime in online["quiet_identity"].values() for cell in regime.values()]
    runs = sum(cell["runs"] for regime in online["rewinds"].values() for cell in regime.values())
    missed = online["verdict"]["missed_by"]["online-hacking/lr0.001-beta5000"]
    fast = online["rewinds"]["online-hacking-fast"]["lr0.01-beta5000"]
    cell = online["analysis"]["online-hacking-fast"]["lr0.01-beta5000"]
    reward, dpo = cell["rewind"]["steps"]["60"]["reward"]["vs_base"], cell["dpo"]["steps"]["60"]["reward"]["vs_base"]
    fast_missed = online["verdict"]["missed_by"]["online-hacking-fast/lr0.01-beta5000"]
    return [
        f"quiet in {sum(c['quiet'] for c in quiet)} of {runs} rewinding runs, each equal to",
        f"the hacking regime, by {missed['reward']:.3f} on the held-out reward and {missed['denoising_error']:.3f} on "
        "the denoising error",
        f"rewound in {fast['rewound']} of {fast['runs']} runs (stopping in {fast['stopped']}",
        f"ending {reward['mean']:+.3f} [{reward['ci95'][0]:+.3f}, {reward['ci95'][1]:+.3f}] in held-out reward from "
        f"the base (Diffusion-DPO {dpo['mean']:+.3f})",
        f"on the denoising error by {fast_missed['denoising_error']:.3f}",
    ]


def test_the_pages_state_the_online_rewinds_figures():
    online = json.loads((ROOT / online_study.ONLINE_OUTPUT).read_text())
    quiet = [cell for regime in online["quiet_identity"].values() for cell in regime.values()]
    assert all(c["equal_to_dpo"] == c["quiet"] for c in quiet)  # "each equal to Diffusion-DPO's"
    verdict = online["verdict"]
    assert verdict["meets"] == {"breaks": False, "healthy": True} and not verdict["fixed_settings_meeting_both"]
    # "misses the holding half only on the denoising error" where it breaks
    assert set(verdict["missed_by"]["online-hacking-fast/lr0.01-beta5000"]) == {"denoising_error"}
    figures = online_stated_figures(online)
    text = " ".join((ROOT / "docs" / "safeguard.md").read_text().split())
    assert not [figure for figure in figures if figure not in text]
    text = " ".join((ROOT / "docs" / "online.md").read_text().split())
    figures[1] = figures[1].replace("the hacking regime, by", "brightness-hacking regime by")
    figures[4] = figures[4].replace("on the denoising error by", "on the denoising error, by")
    assert not [figure for figure in figures if figure not in text]


def test_the_breaking_online_regime_is_the_searchs_choice_and_its_runs_are_complete():
    online = json.loads((ROOT / online_study.ONLINE_OUTPUT).read_text())
    entry = online["regimes"]["online-hacking-fast"]
    search = entry["search"]
    assert search["chosen"] == entry["learning_rate"] == 1e-2 and search["seeds"] == list(online_study.SEARCH_SEEDS)
    base = json.loads((ROOT / entry["stored_file"]).read_text())["base"]["measures"]["colour_reward"]
    for verdict in search["by_learning_rate"]:  # recomputed from the search's runs
        lr = verdict["learning_rate"]
        changes = [search["runs"][f"seed{s}-lr{lr:g}-dpo-probe"]["curve"]["60"]["colour_reward"] - base
                   for s in online_study.SEARCH_SEEDS]  # fmt: skip
        assert verdict["breaks"] == (sum(c < -search["tolerance"] for c in changes) > len(changes) / 2)
    assert [v["breaks"] for v in search["by_learning_rate"]] == [False, True]
    for method in ("dpo-probe", "ema-0.999", "dpo-rewind"):
        assert {r["seed"] for r in entry["runs"].values() if r["method"] == method} == set(range(10)), method
    assert not [m for m in online["not_run"] if m.startswith("online-hacking-fast") and "plain" not in m
                and "stand for it" not in m]  # fmt: skip
