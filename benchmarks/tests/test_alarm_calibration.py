"""``benchmarks/studies/alarm_calibration.py``: the alarm's confusion matrices recomputed from the stability
benchmark's result files, against the written ``cpu-alarm-calibration.json`` and the package's rule; and the alarm's
remedies against the evidence (``recommendation.py``'s reading of the same files).

Run with ``python -m pytest benchmarks/tests``; the package's suite does not read the result files.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.studies import alarm_calibration as study  # noqa: E402
from benchmarks.studies.recommendation import choose, load_rows, online_evidence  # noqa: E402
from trl_diffusion_sdpo import DiffusionSDPOConfig  # noqa: E402
from trl_diffusion_sdpo.callbacks.health import RULE, PathologyRule, remedies  # noqa: E402
from trl_diffusion_sdpo.online.config import OnlineDiffusionSDPOConfig  # noqa: E402


@pytest.fixture(scope="module")
def written() -> dict:
    return json.loads(study.OUTPUT.read_text())


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return study.load_runs()


def _matrix(runs: list[dict], rule: PathologyRule, logging_steps: int) -> tuple[int, int, int, int]:
    """Fired and fell counted by hand: the alarm replayed per run with the package's rule, the label from the run's
    last reward change (not the script's ``confusion``)."""
    counts = [0, 0, 0, 0]
    for run in runs:
        fired = study.fires(run, rule, logging_steps) is not None
        fell = run["reward_change"][max(run["reward_change"])] < -study.TOLERANCE
        counts[(0 if fell else 1) if fired else (2 if fell else 3)] += 1
    return tuple(counts)


def test_the_package_rule_is_the_calibrated_one(written):
    assert written["rules"]["calibrated"] == asdict(RULE) and written["package_rule_is_calibrated"]


@pytest.mark.parametrize("rule_name", ["today", "calibrated"])
@pytest.mark.parametrize("which", ["report_runs", "choose_runs", "all_runs"])
def test_each_confusion_matrix_recomputes_from_the_result_files(written, runs, rule_name, which):
    rule = PathologyRule(**written["rules"][rule_name])
    subset = [r for r in runs if which == "all_runs" or study.split(r) == which.split("_")[0]]
    stored = written["confusion"][rule_name][which]
    keys = ("fired_fell", "fired_held", "quiet_fell", "quiet_held")
    assert _matrix(subset, rule, written["logging_steps"]) == tuple(stored[k] for k in keys)
    assert stored["runs"] == len(subset)
    assert stored["precision"] == pytest.approx(stored["fired_fell"] / (stored["fired_fell"] + stored["fired_held"]))


@pytest.mark.parametrize("rule_name", ["today", "calibrated"])
def test_the_other_base_is_reported_on_and_chooses_nothing(written, runs, rule_name):
    """The shipped base's runs: counted by hand against the stored matrix, and none of them among the runs the rule
    was chosen or reported on."""
    other = study.load_runs(sources=study.OTHER_BASE)
    stored = written["confusion"][rule_name]["other_base_runs"]
    keys = ("fired_fell", "fired_held", "quiet_fell", "quiet_held")
    rule = PathologyRule(**written["rules"][rule_name])
    assert len(other) == stored["runs"] >= 60
    assert _matrix(other, rule, written["logging_steps"]) == tuple(stored[k] for k in keys)
    assert not {r["id"] for r in other} & {r["id"] for r in runs}


def test_the_labels_and_splits_are_the_files_own(written, runs):
    by_id = {r["id"]: r for r in runs}
    assert sorted(by_id) == sorted(r["id"] for r in written["runs"])
    for row in written["runs"]:
        run = by_id[row["id"]]
        assert row["fell"] == (row["reward_change"] < -written["tolerance"])
        assert row["reward_change"] == pytest.approx(run["reward_change"][max(run["reward_change"])], abs=1e-6)
        assert row["split"] == ("choose" if run["seed"] % 2 == 0 else "report")


def test_the_files_are_found_wherever_they_are_moved_under_results(tmp_path):
    moved = tmp_path / "stability"
    moved.mkdir()
    (moved / "cpu-stability-map-demo.json").write_text("{}")
    (tmp_path / "history").mkdir()
    (tmp_path / "history" / "cpu-stability-map-demo.json").write_text("{}")  # an older copy: not read
    assert study.find("cpu-stability-map-demo.json", tmp_path) == [moved / "cpu-stability-map-demo.json"]


# ------------------------------------------------------------------------------------------------------ remedies

_SAFEGUARD_ON = re.compile(r"safeguard_space='(output|parameter|update)'|safeguard_mu|escalate")
_SETTING = re.compile(r"(\w+)=('?)([\w.]+)\2")


def _configs(tmp_path) -> list:
    offline = [
        DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, **fields)
        for fields in (
            {"safeguard_space": "none"},
            {"safeguard_mu": 0.5},
            {"safeguard_mu": 0.5, "on_pathology": "escalate"},
            {"safeguard_mu": "auto"},
            {"safeguard_space": "update", "safeguard_mu": 0.5},
            {"safeguard_space": "update", "safeguard_mu": 0.9},
            {"safeguard_space": "parameter", "safeguard_mu": 0.95},
        )
    ]
    online = [
        OnlineDiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, **fields)
        for fields in ({}, {"safeguard_space": "output"}, {"safeguard_space": "update"}, {"safeguard_mu": 0.5})
    ]
    return offline + online


def test_the_alarm_never_recommends_what_the_run_already_uses(tmp_path):
    named = 0
    for args in _configs(tmp_path):
        for remedy in remedies(args):
            for field, _, value in _SETTING.findall(remedy):
                named += 1
                now = getattr(args, field)
                assert str(now) != value, f"{remedy!r} names {field}={value}, which the run already uses"
    assert named >= 8  # the check read the settings the remedies name


def test_an_online_run_never_names_a_safeguard_while_the_online_evidence_says_none_holds(tmp_path):
    evidence = online_evidence()  # raises where a file says a safeguard holds online
    assert evidence["rows"]["hacking"] and not any(row["holds"] for row in evidence["rows"]["hacking"])
    for args in _configs(tmp_path):
        if not isinstance(args, OnlineDiffusionSDPOConfig):
            continue
        found = remedies(args)
        assert not any(_SAFEGUARD_ON.search(remedy) for remedy in found), found
        assert any("learning_rate" in remedy for remedy in found)
        if args.safeguard_space != "none":  # online, a safeguard on costs: turning it off is the first remedy
            assert found[0].startswith("safeguard_space='none'")


def test_the_offline_remedies_are_the_safeguards_that_paid_where_diffusion_dpo_fell(tmp_path):
    picked = choose(load_rows())
    assert picked["update"]["verdict"] == "pays" and picked["default"]["verdict"] == "pays"
    off = remedies(DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, safeguard_space="none"))
    assert off[0] == "the safeguard (safeguard_space='output')"
    output = remedies(DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, safeguard_mu=0.5))
    assert any(remedy.startswith(f"safeguard_space='{picked['update']['label'].split()[0]}'") for remedy in output)


# ---------------------------------------------------------------------------------------------------------- pages


def test_the_research_page_carries_the_tables_of_the_result_file(written):
    text = study.PAGE.read_text()
    block = text.split(study.START, 1)[1].split(study.END, 1)[0].strip("\n")
    assert block == study.tables(written), "stale: run alarm_calibration.py --page"


def test_the_safeguard_page_states_the_rule_and_the_files_figures(written):
    from trl_diffusion_sdpo.callbacks.health import describe

    text = (ROOT / "docs" / "safeguard.md").read_text()
    calibrated, before = written["confusion"]["calibrated"], written["confusion"]["today"]
    at_2e5 = [r for r in written["runs"] if ", lr 2e-05," in r["group"]]
    figures = [
        describe(RULE),
        f"precision {calibrated['report_runs']['precision']:.2f} and found {calibrated['report_runs']['recall']:.2f}",
        f"precision {calibrated['report_runs_safeguard_off']['precision']:.2f} and recall "
        f"{calibrated['report_runs_safeguard_off']['recall']:.2f}",
        f"precision of\n{before['report_runs']['precision']:.2f}",
        f"{sum(r['today_fires_at'] is not None for r in at_2e5)} of the {len(at_2e5)} runs",
        f"this one on {sum(r['calibrated_fires_at'] is not None for r in at_2e5)}.",
        f"(recall {calibrated['report_runs_safeguard_on']['recall']:.2f}:",
        f"{len(written['runs'])} runs",
    ]
    missing = [figure for figure in figures if figure not in text]
    assert not missing, missing


def test_the_dormant_safeguard_switches_to_the_setting_that_held_where_diffusion_dpo_broke():
    from trl_diffusion_sdpo.callbacks.health import SWITCH_TO

    goal = json.loads(study.find("cpu-stability-guards-demo.json")[0].read_text())["goal"]["reward"]
    breaking = [cell for name, cell in goal.items() if name.startswith("offline/") and cell["diffusion_dpo_breaks"]]
    held = {m for cell in breaking for m, verdict in cell["settings"].items() if verdict["met"]}
    assert breaking and held == {f"sdpo-{SWITCH_TO['safeguard_space']}-mu{SWITCH_TO['safeguard_mu']:g}"}


def test_the_online_refusal_states_what_the_evidence_holds(written, runs):
    """``health.NO_ONLINE_SWITCH`` (why the online config refuses ``on_pathology="safeguard"``) against the files: no
    online setting held where online Diffusion-DPO hacked its reward, the calibrated alarm, replayed here, fires on
    none of the online runs, and it switched none of the online dormant runs that ran it live."""
    from benchmarks.studies.stability_dormant import DORMANT_OUTPUT
    from trl_diffusion_sdpo.online.defaults import NO_ONLINE_SWITCH, ONLINE_SWITCH_TO

    assert ONLINE_SWITCH_TO is None
    assert (
        "no safeguard setting held" in NO_ONLINE_SWITCH
        and "the alarm fired in none of the online runs" in NO_ONLINE_SWITCH
    )
    assert not any(row["holds"] for row in online_evidence()["rows"]["hacking"])
    online = [r for r in runs if r["regime"] == "online"]
    assert len(online) >= 100
    assert all(study.fires(r, RULE, written["logging_steps"]) is None for r in online)
    live = json.loads((ROOT / DORMANT_OUTPUT).read_text())["alarms"]
    regimes = [name for name in live if name.startswith("online")]
    assert regimes and all(cell["switched"] == 0 for name in regimes for cell in live[name].values())


@pytest.mark.parametrize("word,guarded", [("safeguard_off", False), ("safeguard_on", True)])
def test_each_signals_separation_is_its_mann_whitney_statistic(written, runs, word, guarded):
    """The written separation of each signal against scipy's Mann-Whitney U over the same values (U / (n1 n2) is the
    area under the ROC curve), the values taken here from the runs' histories, not by the script's helper."""
    from scipy.stats import mannwhitneyu

    for signal in study.SIGNALS:
        fell, held = [], []
        for run in (r for r in runs if study.safeguarded(r) == guarded):
            last = study.logs(run)[-2:]
            if last:
                value = sum(e[signal] for e in last) / len(last)
                (fell if run["reward_change"][max(run["reward_change"])] < -study.TOLERANCE else held).append(value)
        expected = mannwhitneyu(fell, held).statistic / (len(fell) * len(held))
        assert written["separation"][word][signal] == pytest.approx(expected, abs=1e-12), signal
