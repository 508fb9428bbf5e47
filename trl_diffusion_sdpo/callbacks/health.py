"""A health check in the training logs: Diffusion-DPO's pathology, seen while it happens.

Diffusion-DPO can widen the preference margin by making the loser worse faster than the winner, while the winner's
own denoising error climbs above the reference's (Fu et al., arXiv 2511.03317, the pathology the safeguard exists
for). The logs carry ``delta/winner`` (policy's winner error minus the reference's, averaged over a logging window)
and ``implicit_acc``. :func:`winner_pathology` reads them with the rule :data:`RULE`, calibrated against the held-out
reward of every run of the stability benchmark (:data:`EVIDENCE`): the winner's error held above the reference's by
more than a margin while the implicit accuracy stays low, the pattern of the runs whose held-out reward fell.
:class:`~.alarm.TrainingLogSignal` logs the verdict as ``health/winner_pathology`` (1.0 or 0.0) at every training log
and warns once, naming only the remedies the evidence supports for the run that the run does not already use
(:func:`remedies`: the config's ``pathology_remedies``). What else happens when it fires is the config's
``on_pathology`` (``trl_diffusion_sdpo.callbacks.guards.PathologyAction``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config.pathology import SWITCH_TO, pair_remedies

__all__ = [
    "ENDED_AT_START",
    "EVIDENCE",
    "RULE",
    "SWITCH_TO",
    "WINDOWS",
    "PathologyRule",
    "config_in_force",
    "describe",
    "remedies",
    "start_weights_sentence",
    "switch_target",
    "switched_config",
    "winner_pathology",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PathologyRule:
    """When the alarm fires, on the training logs (reference-free logs, without ``delta/winner``, never fire).

    The logs are first grouped into windows of ``window_steps`` optimizer steps by their ``step`` (each window's
    ``delta/winner`` and ``implicit_acc`` the mean of its logs: the mean over its steps when every log covers as
    many); a log without ``step``, or ``window_steps=None``, is a window of its own. The rule fires on the last
    ``windows`` closed windows (a window closes when its last step is logged or a later window starts) when

    * ``delta/winner > min_delta_winner`` in each of them (the winner's error above the reference's),
    * the mean ``implicit_acc`` over them is below ``max_implicit_acc`` (``None``: no bound), and
    * with ``accuracy_must_grow``, the last window's ``implicit_acc`` is above the first's.
    """

    windows: int
    window_steps: int | None
    min_delta_winner: float
    max_implicit_acc: float | None
    accuracy_must_grow: bool = False


RULE = PathologyRule(windows=2, window_steps=10, min_delta_winner=0.02, max_implicit_acc=0.6)
"""The alarm's rule: chosen on the even training seeds of the stability benchmark's runs and checked on the odd ones
(``benchmarks/studies/alarm_calibration.py``, ``benchmarks/results/stability/cpu-alarm-calibration.json``)."""
EVIDENCE = 'docs/safeguard.md, "Seeing the pathology while training"'
"""Where users read the rule's calibration (warnings name this section; it cites the study's record,
``benchmarks/research/alarm.md``)."""
WINDOWS = RULE.windows  # the logs an escalation waits before it raises mu again (callbacks.guards.PathologyAction)


#: the flag of a run's last training log (and so of ``train()``'s metrics) where its result is the weights it started
#: from: its last rewind went back to the start at its last step (:meth:`~.rewind.RewindAction.ended_at_start`)
ENDED_AT_START = "health/ended_at_start"


def start_weights_sentence(step: int) -> str:
    """What a run whose result is the weights it started from is told, in its records, its warning and the command
    line's last line (``step``: the step its last rewind fired at)."""
    return (
        f"the run ends on the weights it started from (its last rewind, at step {step}, went back to the start), so "
        "its result is the base model's: it trained nothing"
    )


def config_in_force(args: Any, safeguard: Any | None) -> Any:
    """A copy of ``args`` whose safeguard fields are the ``safeguard`` in force (``None``: none): what the run trains
    with now, after a switch (the rewind's, ``on_pathology="safeguard"``'s) or an escalation of ``mu``, which the
    config as given no longer says. The remedies a warning names are those this copy does not use."""
    live = copy.copy(args)
    live.safeguard_space = "none" if safeguard is None else safeguard.name
    if safeguard is not None:
        margin = safeguard.margin
        live.safeguard_mu = "auto" if margin.auto else margin.current()
    return live


def switch_target(args: Any) -> dict[str, Any] | None:
    """The safeguard ``on_pathology="safeguard"`` switches ``args``'s run to (``None``: none), as the run's config
    answers it (its ``pathology_switch``: :data:`SWITCH_TO` for preference pairs)."""
    return args.pathology_switch()[0]


def switched_config(args: Any) -> Any:
    """A copy of ``args`` with the safeguard of :func:`switch_target` on (``on_pathology="safeguard"``'s, built when
    the trainer is, so that the engine checks it before the first step)."""
    target, why = args.pathology_switch()
    if target is None:
        raise ValueError(f"on_pathology='safeguard': {why}")
    switched = copy.copy(args)
    for name, value in target.items():
        setattr(switched, name, value)
    return switched


def describe(rule: PathologyRule = RULE) -> str:
    """The rule in words, for help texts and the warning."""
    span = f"{rule.windows} windows of {rule.window_steps} steps" if rule.window_steps else f"{rule.windows} logs"
    text = f"the policy's winner error above the reference's by more than {rule.min_delta_winner:g} (delta/winner)"
    if rule.max_implicit_acc is not None:
        text += f" while the implicit accuracy stays below {rule.max_implicit_acc:g}"
    if rule.accuracy_must_grow:
        text += " while the implicit accuracy grows"
    return f"{text}, over {span}"


def _windows(history: Sequence[Mapping[str, float]], rule: PathologyRule) -> list[tuple[float, float]]:
    """The closed windows of ``history``'s training logs: ``(delta/winner, implicit_acc)`` means, oldest first."""
    entries = [entry for entry in history if "delta/winner" in entry and "implicit_acc" in entry]
    groups: list[tuple[Any, list[Mapping[str, float]]]] = []
    for index, entry in enumerate(entries):
        step = entry.get("step")
        key = ("log", index) if step is None or rule.window_steps is None else (int(step) - 1) // rule.window_steps
        if groups and groups[-1][0] == key:
            groups[-1][1].append(entry)
        else:
            groups.append((key, [entry]))
    if groups and isinstance(groups[-1][0], int):
        last = groups[-1][1][-1]["step"]
        if int(last) % rule.window_steps:  # the window's last step is not logged yet: it may still change
            groups.pop()
    return [
        (sum(e["delta/winner"] for e in g) / len(g), sum(e["implicit_acc"] for e in g) / len(g)) for _, g in groups
    ]


def winner_pathology(history: Sequence[Mapping[str, float]], rule: PathologyRule = RULE) -> bool:
    """Whether the last training logs in ``history`` show the pathology by ``rule`` (:class:`PathologyRule`).

    Logs without ``delta/winner`` (evaluation logs, reference-free objectives) are skipped; with fewer than
    ``rule.windows`` closed windows the answer is ``False``.
    """
    windows = _windows(history, rule)[-rule.windows :]
    if len(windows) < rule.windows:
        return False
    if not all(delta > rule.min_delta_winner for delta, _ in windows):
        return False
    if rule.max_implicit_acc is not None and sum(acc for _, acc in windows) / len(windows) >= rule.max_implicit_acc:
        return False
    return not rule.accuracy_must_grow or windows[-1][1] > windows[0][1]


def remedies(args: Any | None) -> list[str]:
    """The remedies for the pathology that the evidence supports in ``args``'s run and that the run does not already
    use, each naming the setting to change as ``field=value``: the run's config answers (its
    ``pathology_remedies``; ``None``: unknown, those of a run of preference pairs,
    :func:`~trl_diffusion_sdpo.config.pathology.pair_remedies`)."""
    return pair_remedies(None) if args is None else args.pathology_remedies()
