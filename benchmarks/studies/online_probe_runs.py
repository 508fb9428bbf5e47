"""What the online regimes' runs (``online_hacking.py``, ``online_comparison.py``) need to run with the held-out probe
logged or rewinding (``stability_probe.py online``): the probe's prompts, its readings and a stopped run's measures.

The probe's prompts are the regime's held-out captions (the prompts its held-out measures sample), given to the
online trainer as its eval prompts: the training prompts stay those of the stored runs, so a probing run trains bit
for bit as the stored run of its seed until its probe acts, and the two are paired by seed.
"""

from __future__ import annotations

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


def probe_record(state: Any, max_steps: int) -> dict[str, Any]:
    """From a probing run's ``TrainerState``: the probe's readings (``probe``: step and figures), the rewinds
    (``rewinds``: the step fired and the step restored) and the step it stopped itself at (``stopped_at``, ``None``
    for a run that trained to ``max_steps``)."""
    readings, rewinds = [], []
    for entry in state.log_history:
        if "probe/delta_winner" in entry:
            figures = {k.split("/", 1)[1]: float(v) for k, v in entry.items() if k.startswith("probe/")}
            readings.append({"step": int(entry["step"]), **figures})
        if "health/rewind_to" in entry:
            rewinds.append({"fired_at": int(entry["step"]), "restored": int(entry["health/rewind_to"])})
    stopped = state.global_step if state.global_step < max_steps else None
    return {"probe": readings, "rewinds": rewinds, "stopped_at": stopped}
