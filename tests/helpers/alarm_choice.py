"""How the probe alarm's default constants are chosen from recorded runs: a pure function of the calibration records,
shared by the study that writes them (``benchmarks/studies/probe_alarm_carry.py``) and the test that holds the
config's defaults to what it returns.

A record is one run with the probe logged and never acted on: ``id``, ``held_out`` (``calibration``, or the held-out
axis it stands on: ``held-out dataset``, ``held-out model``), ``group`` (where its rates are read: its axis, mode,
tuning and probe size), ``class`` (``breaking``, ``healthy`` or ``dipped``: the held-out reward at its evaluations)
and ``probe``, its readings in order, each a mapping with ``step`` and the probe's figures (``probe/delta_winner``,
``probe/mse_ref_winner``, ``probe/winner_rise_z``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trl_diffusion_sdpo.callbacks.rewind import ProbeAlarmRule, alarm_steps, relative_winner_rise

CALIBRATION = "calibration"
QUIET_TARGET, FIRING_TARGET = 0.95, 0.90
#: the relative rise's thresholds searched (about 25 % apart), the significance floors and the patiences
RISES: tuple[float, ...] = (0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
Z_FLOORS: tuple[float, ...] = (1.645, 3.0, 5.0)
PATIENCES: tuple[int, ...] = (1, 2)


def calibration_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records a choice may read: those of the calibration model and dataset, none held out."""
    return [r for r in records if r["held_out"] == CALIBRATION]


def fires(rule: ProbeAlarmRule, record: Mapping[str, Any]) -> list[int]:
    """The steps ``rule`` fires at on ``record``'s readings (the package's own replay)."""
    return alarm_steps(rule, [(int(p["step"]), p) for p in record["probe"]])


def peak_rise(record: Mapping[str, Any]) -> float:
    """The largest relative rise over a run's readings."""
    return max((relative_winner_rise(p) for p in record["probe"]), default=float("nan"))


def rates(rule: ProbeAlarmRule, records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per group: its healthy runs, the share of them the rule leaves quiet, its breaking runs, the share it fires
    on, and the dipped runs it fires on."""
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        group = out.setdefault(record["group"], {"healthy": 0, "quiet": 0, "breaking": 0, "fired": 0, "dipped": 0,
                                                 "dipped_fired": 0})  # fmt: skip
        fired = bool(fires(rule, record))
        if record["class"] == "healthy":
            group["healthy"] += 1
            group["quiet"] += not fired
        elif record["class"] == "breaking":
            group["breaking"] += 1
            group["fired"] += fired
        else:
            group["dipped"] += 1
            group["dipped_fired"] += fired
    for group in out.values():
        group["quiet_rate"] = group["quiet"] / group["healthy"] if group["healthy"] else None
        group["firing_rate"] = group["fired"] / group["breaking"] if group["breaking"] else None
    return out


def choose(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The relative-rise rule chosen on ``records`` (calibration records only: a held-out one is refused).

    Admissible: quiet on at least :data:`QUIET_TARGET` of the healthy runs of every group that has one. Among them:
    the most breaking runs fired on, then the highest worst group's firing rate, then the smaller patience, then the
    lower floor; of the thresholds tied on all of these (a run of the grid between the healthy runs' peaks and the
    breaking runs'), the middle one, as far from either side as the grid allows. Returns ``rise``, ``z_floor``,
    ``patience`` and the tied thresholds."""
    held_out = sorted({r["held_out"] for r in records} - {CALIBRATION})
    if held_out:
        raise ValueError(f"the choice reads calibration records only, not {', '.join(held_out)}")
    scored = []
    for patience in PATIENCES:
        for z_floor in Z_FLOORS:
            for rise in RISES:
                by_group = rates(ProbeAlarmRule.relative(rise, z_floor, patience), records)
                quiet = [g["quiet_rate"] for g in by_group.values() if g["quiet_rate"] is not None]
                if min(quiet, default=1.0) < QUIET_TARGET:
                    continue
                fired = sum(g["fired"] for g in by_group.values())
                worst = min((g["firing_rate"] for g in by_group.values() if g["firing_rate"] is not None), default=0.0)
                scored.append(((-fired, -worst, patience, z_floor), rise))
    if not scored:
        raise ValueError("no rule of the grid is quiet on the healthy runs of every group")
    best = min(key for key, _ in scored)
    tied = [rise for key, rise in scored if key == best]
    _, _, patience, z_floor = best
    return {"rise": tied[(len(tied) - 1) // 2], "z_floor": z_floor, "patience": patience, "tied_rises": tied}


AXES = (CALIBRATION, "held-out dataset", "held-out model")


def _trio(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _spread(values: list[float]) -> list[float]:
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return [ordered[0], median, ordered[-1]]


def table(rule: ProbeAlarmRule, records: Sequence[Mapping[str, Any]]) -> str:
    """Per group, its healthy and breaking runs side by side: how many, the spread of their largest relative rise
    and of their largest ``z`` (min / median / max), and the share ``rule`` leaves quiet or fires on; the dipped runs
    and how many it fires on. Calibration groups first, then the held-out ones."""
    by_group = rates(rule, records)
    lines = [
        "| group | healthy runs | their peak rise | their peak `z` | quiet | breaking runs | their peak rise | "
        "their peak `z` | fired | dipped: runs, fired |",
        "|---|---:|---|---|---:|---:|---|---|---:|---|",
    ]
    order = sorted(by_group, key=lambda g: (next(i for i, a in enumerate(AXES) if g.startswith(a)), g))
    for name in order:
        group = by_group[name]
        cells = [name]
        for label, count, share in (("healthy", "quiet", "quiet_rate"), ("breaking", "fired", "firing_rate")):
            mine = [r for r in records if r["group"] == name and r["class"] == label]
            if not mine:
                cells += ["0", "", "", ""]
                continue
            peaks_z = [max(p["probe/winner_rise_z"] for p in r["probe"]) for r in mine]
            cells += [str(len(mine)), _trio(_spread([peak_rise(r) for r in mine])), _trio(_spread(peaks_z)),
                      f"{group[count]} ({group[share]:.0%})"]  # fmt: skip
        cells.append(f"{group['dipped']}, {group['dipped_fired']}" if group["dipped"] else "0")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
