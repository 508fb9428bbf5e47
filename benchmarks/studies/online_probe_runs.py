"""What the online regimes' runs (``online_hacking.py``, ``online_comparison.py``) need to run with the held-out probe
logged or rewinding (``stability_probe.py online``): the probe's prompts, the training-log keys that record its
readings and rewinds, and a stopped run's measures.

The probe's prompts are the regime's held-out captions (the prompts its held-out measures sample), given to the
online trainer as its eval prompts: the training prompts stay those of the stored runs, so a probing run trains bit
for bit as Diffusion-DPO of its seed until its probe acts, and the two are paired by seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def probe_prompts(held_out: Iterable[Any], fields: Mapping[str, Any]) -> Any:
    """The probe's eval prompts for a run with ``fields`` (the held-out captions, a ``prompt`` column), or ``None``
    when the run does not probe."""
    if not fields.get("probe_steps"):
        return None
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [caption.text for caption in held_out]})


def measure_stopped_run(
    curve: dict[str, dict[str, float]], step: int, eval_steps: Iterable[int], measure: Callable[[], dict[str, float]]
) -> None:
    """A run that stopped itself at optimizer step ``step`` (a rewind's stop, its healthy weights the result): its
    held-out measures taken now stand for every evaluation step after ``step``, in ``curve``, in place."""
    later = sorted(s for s in eval_steps if s > step)
    if not later:
        return
    measured = measure()
    for s in later:
        curve[str(s)] = measured


#: the training-log keys a probing run's ``history`` records beside its regime's own
PROBE_HISTORY = (
    "probe/delta_winner",
    "probe/delta_loser",
    "probe/implicit_acc",
    "probe/mse_policy_winner",
    "probe/mse_ref_winner",
    "probe/mse_policy_loser",
    "probe/mse_ref_loser",
    "probe/winner_rise_z",
    "health/rewind_to",
)


def probe_record(history: dict[str, list[float]], max_steps: int) -> dict[str, Any]:
    """From a probing run's ``history`` (its training logs' values by key, NaN where a log lacks one): the probe's
    readings (``probe``: step and figures), the rewinds (``rewinds``: the step fired and the step restored) and the
    step the run stopped itself at (``stopped_at``; ``None`` for a run that trained to ``max_steps``)."""
    steps = history["step"]
    keys = [k for k in PROBE_HISTORY if k.startswith("probe/") and k in history]
    readings = [
        {"step": step, **{k.split("/", 1)[1]: history[k][i] for k in keys}}
        for i, step in enumerate(steps)
        if keys and not math.isnan(history["probe/delta_winner"][i])
    ]
    fired = history.get("health/rewind_to", [math.nan] * len(steps))
    rewinds = [
        {"fired_at": step, "restored": int(fired[i])} for i, step in enumerate(steps) if not math.isnan(fired[i])
    ]
    return {"probe": readings, "rewinds": rewinds, "stopped_at": steps[-1] if steps[-1] < max_steps else None}
