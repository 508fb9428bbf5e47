"""A health check in the training logs: Diffusion-DPO's pathology, seen while it happens.

Diffusion-DPO can widen the preference margin by making the loser worse faster than the winner, while the winner's
own denoising error climbs above the reference's (Fu et al., arXiv 2511.03317, the pathology the safeguard exists
for). The logs carry ``delta/winner`` (policy's winner error minus the reference's, averaged over a logging window)
and ``implicit_acc``. :func:`winner_pathology` reads them with the rule :data:`RULE`, calibrated against the held-out
reward of every run of the stability benchmark (:data:`EVIDENCE`): the winner's error held above the reference's by
more than a margin while the implicit accuracy stays low, the pattern of the runs whose held-out reward fell.
:class:`WinnerHealth` logs the verdict as ``health/winner_pathology`` (1.0 or 0.0) at every training log and warns
once, naming only the remedies the evidence supports for the run's regime that the run does not already use
(:func:`remedies`). What else happens when it fires is the config's ``on_pathology``
(``trl_diffusion_sdpo.callbacks.guards.PathologyAction``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from ..safeguards import safeguard_for

if TYPE_CHECKING:
    from ..safeguards import Safeguard

__all__ = [
    "EVIDENCE",
    "NO_ONLINE_SWITCH",
    "ONLINE_SWITCH_TO",
    "RULE",
    "SWITCH_TO",
    "WINDOWS",
    "PathologyRule",
    "WinnerHealth",
    "describe",
    "dormant_safeguard",
    "remedies",
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
SWITCH_TO: dict[str, Any] = {"safeguard_space": "output", "safeguard_mu": 0.5}
"""What ``on_pathology="safeguard"`` switches an offline Diffusion-DPO run to when the alarm fires: the one setting
that kept the held-out reward where Diffusion-DPO's fell (lr 2e-4: its change from the base includes 0, where every
other guard's is below it; at 1e-3 none held; benchmarks/research/stability.md)."""
ONLINE_SWITCH_TO: dict[str, Any] | None = None
"""What it switches an online run to: nothing, so the online config refuses ``on_pathology="safeguard"``
(:data:`NO_ONLINE_SWITCH` says why)."""
NO_ONLINE_SWITCH = (
    "online no safeguard setting held what online Diffusion-DPO lost, and the alarm fired in none of the online runs "
    "(docs/online.md), so there is nothing to switch to"
)
WINDOWS = RULE.windows  # the logs an escalation waits before it raises mu again (callbacks.guards.PathologyAction)


def switch_target(args: Any) -> dict[str, Any] | None:
    """The safeguard ``on_pathology="safeguard"`` switches ``args``'s run to in its regime: :data:`SWITCH_TO`
    offline, :data:`ONLINE_SWITCH_TO` online (``None``: none), by the config's ``regime``."""
    return {"offline": SWITCH_TO, "online": ONLINE_SWITCH_TO}[args.regime]


def switched_config(args: Any) -> Any:
    """A copy of ``args`` with the safeguard of :func:`switch_target` on (``on_pathology="safeguard"``'s, built when
    the trainer is, so that the engine checks it before the first step)."""
    target = switch_target(args)
    if target is None:
        raise ValueError(f"on_pathology='safeguard': {NO_ONLINE_SWITCH}")
    switched = copy.copy(args)
    for name, value in target.items():
        setattr(switched, name, value)
    return switched


def dormant_safeguard(args: Any, engine: Any) -> Safeguard | None:
    """``on_pathology="safeguard"`` (or ``"rewind"`` in an offline Diffusion-DPO run, which switches to it after its
    rewind): the safeguard the run switches to when the alarm fires, checked against ``engine`` when the trainer is
    built and dormant until then; ``None`` otherwise."""
    rewinds_to_it = (
        args.on_pathology == "rewind" and args.safeguard_space == "none" and switch_target(args) is not None
    )
    return safeguard_for(switched_config(args), engine) if args.on_pathology == "safeguard" or rewinds_to_it else None


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
    """The remedies for the pathology that the evidence supports in ``args``'s regime (the run's config; ``None``:
    unknown, offline) and that the run does not already use, each naming the setting to change as ``field=value``.

    Offline, in the order the toy benchmarks found them to work where Diffusion-DPO's held-out reward fell
    (benchmarks/research/stability.md, benchmarks/research/safeguard.md): the safeguard where it is off; where it is
    on, the update space (it paid at lr 2e-4 and 1e-4, the output space only at 2e-4) and a larger fixed ``mu`` (0.9
    paid as much as 0.5 at 2e-4; ``"auto"`` in the output space paid less than a fixed 0.5); then a smaller learning
    rate (Diffusion-DPO broke at 2e-4, not at 2e-5). A smaller ``beta`` is not among them: no beta from 5 to 50000
    changed the picture at the demo's rate.

    Online (a config whose ``regime`` is ``"online"``) never a safeguard: where online Diffusion-DPO was healthy every
    safeguard setting cost held-out quality, and where it hacked its reward none kept what it lost (docs/online.md);
    so the safeguard's removal where it is on, then a smaller learning rate (online Diffusion-DPO was healthy at 2e-4
    and hacked at 1e-3)."""
    if args is None:
        return ["the safeguard (safeguard_space='output')", "a smaller learning_rate"]
    return {"offline": _offline_remedies, "online": _online_remedies}[args.regime](args)


def _online_remedies(args: Any) -> list[str]:
    online: list[str] = []
    if getattr(args, "safeguard_space", "none") not in (None, "none"):
        online.append("safeguard_space='none' (online, every safeguard setting cost held-out quality)")
    return [*online, "a smaller learning_rate"]


def _offline_remedies(args: Any) -> list[str]:
    found: list[str] = []
    if getattr(args, "safeguard_space", "none") == "none":
        found.append("the safeguard (safeguard_space='output')")
    else:
        if getattr(args, "safeguard_space", "output") != "update":
            found.append("safeguard_space='update' (exact under the optimizer's step)")
        mu = getattr(args, "safeguard_mu", None)
        if mu == "auto":
            found.append("a fixed safeguard_mu such as 0.9")
        else:
            now = "the family's default" if mu is None else f"{mu:g}"  # None: a config not yet given to a trainer
            if mu is None or mu < 0.9:
                raise_it = (
                    ""
                    if getattr(args, "on_pathology", "warn") == "escalate"
                    else " (on_pathology='escalate' raises it)"
                )
                found.append(f"a larger safeguard_mu than {now}{raise_it}")
    found.append("a smaller learning_rate")
    return found


class WinnerHealth(TrainerCallback):
    """The health alarm: adds ``health/winner_pathology`` to every training log that has ``delta/winner`` and warns
    once when it is 1, naming the remedies. The trainer calls :meth:`annotate` on a log before transformers records
    it, so the reporting callbacks, the guards and ``state.log_history`` see the metric with the rest of the log.

    The trainer builds one from its config; a Python user may build one (another ``rule``, say) and pass it in
    ``callbacks=``, and the trainer uses it instead (one per run)::

        health = WinnerHealth(rule=PathologyRule(windows=3, window_steps=5, min_delta_winner=0.01,
                                                 max_implicit_acc=None))
        DiffusionSDPOTrainer(pipe, args=config, train_dataset=pairs, callbacks=[health])

    Args:
        rule: when the alarm fires (:class:`PathologyRule`; :data:`RULE`, the calibrated one, by default).
        args: the run's config, for the remedies the warning names (:func:`remedies`; ``None``: the offline
            defaults' remedies). A health built by hand is given the trainer's config when the trainer takes it
            (:meth:`attach`), unless it was given one.
    """

    #: what the trainer looks for in ``callbacks=`` (one of each kind of run control per run)
    run_control = "health"

    def __init__(self, rule: PathologyRule = RULE, args: Any | None = None) -> None:
        self.rule = rule
        self.remedies = remedies(args)
        self._given_args = args is not None
        self.warned = False

    def attach(self, trainer: Any) -> None:
        """Taken by ``trainer`` (built by hand and passed in ``callbacks=``): the remedies of its config."""
        if not self._given_args:
            self.remedies = remedies(trainer.args)

    def annotate(self, logs: dict[str, float], history: Sequence[Mapping[str, float]], step: int) -> None:
        """Add the verdict on ``history`` (the logs recorded so far) followed by ``logs`` (the log of optimizer
        step ``step``) to ``logs``, in place."""
        if "delta/winner" not in logs:
            return
        flagged = winner_pathology([*history, {**logs, "step": step}], self.rule)
        logs["health/winner_pathology"] = float(flagged)
        if flagged and not self.warned:
            self.warned = True
            logger.warning(
                "Step %d: %s: Diffusion-DPO's pathology, the pattern of the runs whose held-out reward fell "
                "(calibration: %s). Remedies not in use in this run: %s.",
                step,
                describe(self.rule),
                EVIDENCE,
                "; ".join(self.remedies),
            )
