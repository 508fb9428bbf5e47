"""The probe study online (``stability_probe.py online``): the online regimes of the stability benchmark, each run as
its own study runs it (``online_hacking.run_one``: brightness reward, lr 1e-3, 60 steps;
``online_comparison.run_one``: the colour reward, lr 2e-4, 120 steps), with the grid, learning rate and evaluation
steps read from its stored result file (:data:`ONLINE_REGIMES`; a regime at a learning rate of its own,
``online-hacking-fast``, searches it first: :func:`search_online`, and trains its fixed setting beside it), in these
settings: the regime's Diffusion-DPO trained again on this machine (``plain``: float results differ across CPUs),
Diffusion-DPO with the probe logged (``<dpo>-probe``), the regime's own fixed setting (``fixed``, where it has one)
and Diffusion-DPO with ``on_pathology="rewind"`` (``<dpo>-rewind``; online a rewind stops the run with the healthy
weights). The probe's prompts are the regime's held-out captions, given as the online trainer's eval prompts, so the
training prompts are the stored runs' and every run is paired by seed with the stored Diffusion-DPO run: a probe that
never acts trains bit for bit as that run, so the probe-logged runs' held-out measures are Diffusion-DPO's;
``identity`` records, per run, whether its held-out measures equal those of the plain run of its seed (else the
stored run) at every evaluation step before its first rewind. A rewinding run records the rule its alarm read
(``probe_alarm``: the package's online rule, chosen on the probe-logged runs by ``probe_alarm.py``); a run of an
earlier rule is trained again and listed under ``replaced``. The file carries the rewind's verdict against the goal
as ``stability_probe.assemble`` gives it offline (:func:`online_goal`). The probe reads the captions the held-out
measures sample (its pairs at its own seeds, not the measures' images): the rewind's choice and the verdict share
prompts, not images. Each finished run is written to ``--json`` at once and a rerun skips the runs already there::

    OMP_NUM_THREADS=1 nice -n 5 nohup python benchmarks/studies/stability_probe.py online --seeds 0-9 &
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import stability_guards as study  # noqa: E402
from stability_dormant import from_online  # noqa: E402
from stability_probe import PROBE_STEPS, goal_record, package_rule  # noqa: E402

from benchmarks.studies.online_probe_runs import PROBE_HISTORY, probe_record  # noqa: E402


class OnlineRegime(NamedTuple):
    """An online regime: its study module, its stored result file (the set-up, the base, the evaluation steps and,
    at the stored learning rate, the fixed settings), its Diffusion-DPO setting; for a regime at a learning rate the
    stored file has no runs at, the learning rates searched (``search_lrs``, rising: :func:`search_online`) and the
    one fixed setting trained beside it for the goal (``fixed``)."""

    module: str
    stored: Path
    dpo: str
    search_lrs: tuple[float, ...] = ()
    fixed: str | None = None


HACKING = Path("benchmarks/results/online/cpu-online-hacking-demo.json")
ONLINE_REGIMES: dict[str, OnlineRegime] = {
    "online-hacking": OnlineRegime("online_hacking", HACKING, "dpo"),
    "online-healthy": OnlineRegime(
        "online_comparison", Path("benchmarks/results/online/cpu-online-comparison-tiny.json"), "online-dpo"
    ),
    # the hacking regime where Diffusion-DPO breaks: its set-up at the search's learning rate; its fixed setting is
    # the best of the hacking regime's stored grid (the highest mean held-out colour reward change at lr 1e-3)
    "online-hacking-fast": OnlineRegime("online_hacking", HACKING, "dpo", search_lrs=(3e-3, 1e-2), fixed="ema-0.999"),
}
#: the search's seeds: outside the ten paired seeds, so the learning rate is not chosen on the runs the alarm is
#: calibrated and the rewind judged on
SEARCH_SEEDS = (10, 11)
SEARCH_RULE = (
    "the lowest learning rate of the rising search_lrs at which Diffusion-DPO's held-out colour reward at the last "
    "evaluation step lies more than alarm_calibration.TOLERANCE below the base's (the label the alarm is calibrated "
    "on) on most (more than half) of the search seeds; none: the regime is not run"
)
ONLINE_OUTPUT = Path("benchmarks/results/probe/cpu-stability-probe-online.json")
#: plain: the regime's Diffusion-DPO as stored, trained again on this machine (float results differ across CPUs, so
#: the identity is checked against it where the stored run was made on another); <dpo>-probe: the probe logged;
#: <dpo>-rewind: on_pathology="rewind"
#: fixed: the regime's fixed setting (``OnlineRegime.fixed``), where its stored file has none at its learning rate
ONLINE_SETTINGS = ("plain", "probe", "fixed", "rewind")


def online_settings(dpo_fields: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The two online settings' config fields on top of the regime's Diffusion-DPO ones."""
    probe = {**dpo_fields, "probe_steps": PROBE_STEPS}
    return {"probe": probe, "rewind": {**probe, "on_pathology": "rewind"}}


def _online_setup(regime: str) -> tuple[Any, dict[str, Any], float, str]:
    """The regime's study module (its METHODS extended by the two settings, its worker context built in this
    process), its stored report, learning rate and Diffusion-DPO setting."""
    name, stored_path, dpo = ONLINE_REGIMES[regime][:3]
    module = importlib.import_module(f"benchmarks.studies.{name}")
    stored = json.loads(stored_path.read_text())
    grid = stored["config"]
    lr = stored["grid_learning_rate"] if "grid_learning_rate" in stored else stored["learning_rates"][0]
    for setting, fields in online_settings(module.METHODS[dpo]).items():
        module.METHODS[f"{dpo}-{setting}"] = fields
        if hasattr(module, "LABELS"):
            module.LABELS[f"{dpo}-{setting}"] = f"{module.LABELS[dpo]}, {setting}"
    hacking = importlib.import_module("benchmarks.studies.online_hacking")
    comparison = importlib.import_module("benchmarks.studies.online_comparison")
    # the probe's readings and the rewinds in the runs' history (the regimes record their own keys)
    hacking.EXTRA_HISTORY = (*dict.fromkeys((*hacking.EXTRA_HISTORY, *PROBE_HISTORY)),)
    comparison.HISTORY_KEYS = (*dict.fromkeys((*comparison.HISTORY_KEYS, *PROBE_HISTORY)),)
    if module is hacking:
        hacking._init_worker(grid)
    else:  # its held-out evaluation without the offline pairs, which these runs never train on
        hacking._init_worker({**grid, "drawing_seed": comparison.DRAWING_SEED})
        module._CONTEXT, hacking._CONTEXT = hacking._CONTEXT, None
        module._CONTEXT.grid = grid
    return module, stored, lr, dpo


def identity(run: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    """Whether ``run``'s held-out measures equal those of ``reference`` (Diffusion-DPO of its seed without the
    probe) at every evaluation step before its first rewind (up to then both train bit for bit alike, if the probe
    leaves the training as it is), and the reference's machine."""
    if reference is None:
        return {"reference": None}
    fired = min((r["fired_at"] for r in run.get("rewinds", [])), default=None)
    steps = [s for s in run["curve"] if fired is None or int(s) < fired]
    equal = {s: run["curve"][s] == reference["curve"].get(s) for s in steps}
    gaps = [
        abs(value - reference["curve"][s][measure])
        for s in steps
        if s in reference["curve"]
        for measure, value in run["curve"][s].items()
    ]
    return {
        "reference_cpu": reference.get("machine", {}).get("cpu"),
        "steps": steps,
        "equal": all(equal.values()) if equal else None,
        "per_step": equal,
        "max_abs_difference": max(gaps, default=None),
    }


def _reference(entry: dict[str, Any], stored: dict[str, Any], key: str) -> tuple[str, dict[str, Any] | None]:
    """Diffusion-DPO of a seed without the probe (``key``): trained again here (``plain``) where it was, else the
    stored run."""
    if key in entry["runs"]:
        return "plain run on this machine", entry["runs"][key]
    return "stored run", stored["runs"].get(key)


def _identities(entry: dict[str, Any], stored: dict[str, Any], run_key: Any, dpo: str) -> None:
    """Each run's ``identity``: a plain run's against the stored run of its seed, a probing run's against the plain
    run of its seed where there is one, else the stored run. A fixed setting's run trains otherwise: none."""
    for run in entry["runs"].values():
        if run["method"] not in (dpo, f"{dpo}-probe", f"{dpo}-rewind"):
            continue
        key = run_key(run["seed"], entry["learning_rate"], dpo)
        if run["method"] == dpo:
            against, reference = "stored run", stored["runs"].get(key)
        else:
            against, reference = _reference(entry, stored, key)
        run["identity"] = {"against": against, **identity(run, reference)}


PLAIN_WHY = " (the probe-logged runs, equal to it where both ran, stand for it)"


def online_not_run(report: dict[str, Any]) -> list[str]:
    """What the online result file lacks: per regime the settings with fewer than 10 seeds (a rewinding run counts
    only when its alarm read the package's online rule)."""
    missing = []
    for regime in ONLINE_REGIMES:
        entry = report["regimes"].get(regime, {})
        runs = entry.get("runs", {}).values()
        if ONLINE_REGIMES[regime].search_lrs and entry.get("search", {}).get("chosen", 0.0) is None:
            missing.append(f"{regime}: no searched learning rate broke Diffusion-DPO; not run")
            continue
        for setting in ONLINE_SETTINGS:
            method = _method(regime, setting)
            if method is None:
                continue
            seeds = {r["seed"] for r in runs if r["method"] == method and (setting != "rewind" or _current(r))}
            if len(seeds) < 10:
                missing.append(
                    f"{regime}: {method}: {len(seeds)} of 10 seeds{PLAIN_WHY if setting == 'plain' else ''}"
                )
    return missing


def _current(run: dict[str, Any]) -> bool:
    """Whether a rewinding run's alarm read the package's online rule as it is now (runs of an earlier rule are
    trained again)."""
    return run.get("probe_alarm") == package_rule()


#: the online regimes' stored settings that are no fixed online setting: offline Diffusion-DPO and its safeguard,
#: trained on offline pairs beside the online runs of the healthy regime
OFFLINE_IN_ONLINE = ("offline-",)


def online_goal(report: dict[str, Any]) -> dict[str, Any]:
    """The rewind online against the goal, as :func:`assemble` judges it offline: per online regime the runs of
    :func:`stability_dormant.from_online` (the held-out colour reward as the reward, shape IoU, diversity and
    denoising error, the base of the regime's stored file at step 0) for Diffusion-DPO (the probe-logged runs: they
    train bit for bit as Diffusion-DPO on this machine), the rewind (its runs that read the package's online rule)
    and every fixed online setting of the regime's stored runs at its learning rate; the paired intervals, the two
    halves, the verdict, the rewinds and the quiet runs' identity."""
    regimes: dict[str, Any] = {}
    for regime, entry in report["regimes"].items():
        if entry.get("learning_rate") is None:  # a searched regime whose search found no breaking learning rate
            continue
        stored = json.loads(Path(entry["stored_file"]).read_text())
        dpo, lr = entry["reference"], entry["learning_rate"]
        mine = {
            key: run
            for key, run in stored["runs"].items()
            if run["method"] != dpo and not run["method"].startswith(OFFLINE_IN_ONLINE) and run["learning_rate"] == lr
        }
        fixed = ONLINE_REGIMES[regime].fixed if regime in ONLINE_REGIMES else None
        for key, run in entry["runs"].items():
            if run["method"] == fixed:  # the regime's own fixed setting, trained here at its learning rate
                mine[key] = run
            elif run["method"] == f"{dpo}-probe":
                mine[key] = {**run, "method": "online-dpo"}  # from_online's name for Diffusion-DPO online
            elif run["method"] == f"{dpo}-rewind" and _current(run):
                mine[key] = {**run, "method": study.REWIND}
        converted = from_online({**stored, "grid_learning_rate": lr, "runs": mine})
        for key, run in converted["runs"].items():
            run["rewinds"], run["stopped_at"] = mine[key].get("rewinds", []), mine[key].get("stopped_at")
        regimes[regime] = converted
    return {
        "goal_what": "the rewind online against the goal: per regime, at the last evaluation step, each held-out "
        "measure's change from the base (the regime's stored base) and the paired differences (95% t intervals over "
        "seeds) from Diffusion-DPO (this file's probe-logged runs, which train bit for bit as Diffusion-DPO here) and "
        "the best fixed setting of the regime's stored runs (the highest mean reward change; trained on the machines "
        "their file names); the reward is the held-out colour reward",
        **goal_record(regimes),
    }


def _method(regime: str, setting: str) -> str | None:
    """The method key of ``setting`` in ``regime`` (``None``: the regime has no such setting)."""
    spec = ONLINE_REGIMES[regime]
    if setting == "fixed":
        return spec.fixed
    return spec.dpo if setting == "plain" else f"{spec.dpo}-{setting}"


def _train(module: Any, stored: dict[str, Any], seed: int, lr: float, method: str, setting: str) -> dict[str, Any]:
    """One online run of ``module`` with the probe's record where it probes and the rule its alarm read where it
    rewinds."""
    run = module.run_one((seed, lr, method))
    run.pop("samples", None)  # the regime's figure is drawn from its own result file
    if setting in ("probe", "rewind"):
        run.update(probe_record(run["history"], stored["config"]["max_steps"]))
    if setting == "rewind":  # the rule its alarm read
        run["probe_alarm"] = package_rule()
    return run


def search_online(regime: str, module: Any, stored: dict[str, Any], entry: dict[str, Any], save: Any) -> float | None:
    """The learning rate of a searched regime (:data:`SEARCH_RULE`): Diffusion-DPO with the probe logged on
    :data:`SEARCH_SEEDS` at each of ``search_lrs`` in rising order, until most of them lost held-out colour reward;
    the runs and each learning rate's verdict go to ``entry["search"]`` (``chosen``: ``None`` where none broke)."""
    from alarm_calibration import TOLERANCE

    spec = ONLINE_REGIMES[regime]
    search = entry.setdefault("search", {"runs": {}, "by_learning_rate": []})
    search.update(
        rule=SEARCH_RULE, tolerance=TOLERANCE, seeds=list(SEARCH_SEEDS), learning_rates=list(spec.search_lrs)
    )
    base = stored["base"]["measures"]["colour_reward"]
    last = str(stored["config"]["max_steps"])
    search["by_learning_rate"], search["chosen"] = [], None
    for lr in spec.search_lrs:
        for seed in SEARCH_SEEDS:
            key = module.run_key(seed, lr, f"{spec.dpo}-probe")
            if key not in search["runs"]:
                search["runs"][key] = _train(module, stored, seed, lr, f"{spec.dpo}-probe", "probe")
                save()
        changes = [search["runs"][module.run_key(s, lr, f"{spec.dpo}-probe")]["curve"][last]["colour_reward"] - base
                   for s in SEARCH_SEEDS]  # fmt: skip
        fell = sum(change < -TOLERANCE for change in changes)
        broke = fell > len(SEARCH_SEEDS) / 2
        search["by_learning_rate"].append(
            {"learning_rate": lr, "colour_reward_change": changes, "fell": fell, "breaks": broke}
        )
        print(f"{regime} search, lr {lr:g}: held-out colour reward change {changes}, breaks: {broke}", flush=True)
        if broke:
            search["chosen"] = lr
            break
    save()
    return search["chosen"]


def run_online(regimes: list[str], seeds: list[int], settings: list[str], path: Path) -> int:
    """Train the online settings of ``regimes`` for ``seeds`` in this process (one torch thread), each run written to
    ``path`` as it finishes; runs already there are skipped. A searched regime (``OnlineRegime.search_lrs``) first
    searches its learning rate (:func:`search_online`) and is not run where none breaks."""
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    report.setdefault("regimes", {})
    report["description"] = __doc__.split("::")[0].replace("\n", " ")
    report["probe"] = {"probe_steps": PROBE_STEPS, "probe_pairs": "the config's default", "prompts": "held-out"}
    report["probe_alarm"] = package_rule()
    report["command"] = "OMP_NUM_THREADS=1 python benchmarks/studies/stability_probe.py online --seeds 0-9"

    def save() -> None:
        from benchmarks.studies.online_comparison import _write  # the online result files' layout

        report.update(online_goal(report))
        report["not_run"] = online_not_run(report)
        _write(path, report)

    for regime in regimes:
        module, stored, lr, dpo = _online_setup(regime)
        entry = report["regimes"].setdefault(regime, {"runs": {}})
        entry.update(stored_file=str(ONLINE_REGIMES[regime].stored), learning_rate=lr, config=stored["config"],
                     eval_steps=stored["eval_steps"], reference=dpo)  # fmt: skip
        if ONLINE_REGIMES[regime].search_lrs:
            entry["learning_rate"] = lr = search_online(regime, module, stored, entry, save)
            if lr is None:
                continue
        _identities(entry, stored, module.run_key, dpo)  # again: runs of another invocation may be their references
        save()
        for seed in seeds:
            for setting in sorted(settings, key=ONLINE_SETTINGS.index):  # plain first: the others' reference
                method = _method(regime, setting)
                if method is None:
                    continue
                key = module.run_key(seed, lr, method)
                if key in entry["runs"] and (setting != "rewind" or _current(entry["runs"][key])):
                    continue
                if key in entry["runs"]:  # a rewinding run of an earlier rule: trained again with today's
                    old = entry["runs"][key].get("probe_alarm", "the offline rule of the time (patience 2, 0.05)")
                    entry.setdefault("replaced", []).append(f"{key}: its alarm read {old}; trained again")
                started = time.perf_counter()
                entry["runs"][key] = run = _train(module, stored, seed, lr, method, setting)
                _identities(entry, stored, module.run_key, dpo)
                save()
                same = run.get("identity", {"against": "none (a fixed setting)"})
                print(
                    f"{regime} {key}: {time.perf_counter() - started:.0f} s, rewinds {run.get('rewinds')}, stopped "
                    f"at {run.get('stopped_at')}, equal to the {same['against']}: {same.get('equal')}",
                    flush=True,
                )
    return 0
