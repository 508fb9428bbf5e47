"""A health check in the training logs: Diffusion-DPO's pathology, seen while it happens.

Diffusion-DPO can widen the preference margin by making the loser worse faster than the winner, while the winner's
own denoising error climbs above the reference's (Fu et al., arXiv 2511.03317, the pathology the safeguard exists
for). Both halves are in the logs already: ``delta/winner`` (policy's winner error minus the reference's, averaged
over a logging window) and ``implicit_acc``. :func:`winner_pathology` reads them; :class:`WinnerHealth`
logs the verdict as ``health/winner_pathology`` (1.0 or 0.0) at every training log and warns once, naming only the
remedies the run's configuration does not already use (:func:`remedies`). What else happens when it fires is the
config's ``on_pathology`` (``trl_diffusion_sdpo.callbacks.guards.PathologyCallback``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["WINDOWS", "WinnerHealth", "remedies", "winner_pathology"]

logger = logging.getLogger(__name__)

WINDOWS = 3  # consecutive logging windows the pattern must hold over: one noisy window is not a trend


def winner_pathology(history: Sequence[Mapping[str, float]], windows: int = WINDOWS) -> bool:
    """Whether the last ``windows`` training logs in ``history`` show the pathology: in every one of them the
    policy's winner error is above the reference's (``delta/winner > 0``), and the implicit accuracy grew from the
    first of them to the last.

    Logs without ``delta/winner`` (evaluation logs, reference-free objectives) are skipped; with fewer than
    ``windows`` training logs the answer is ``False``.
    """
    entries = [entry for entry in history if "delta/winner" in entry and "implicit_acc" in entry][-windows:]
    if len(entries) < windows:
        return False
    above_reference = all(entry["delta/winner"] > 0 for entry in entries)
    accuracy_grew = entries[-1]["implicit_acc"] > entries[0]["implicit_acc"]
    return above_reference and accuracy_grew


def remedies(args: Any | None) -> list[str]:
    """The remedies for the pathology that ``args`` (the run's config; ``None``: unknown) does not already use, in the
    order the toy benchmarks found them to work where Diffusion-DPO's held-out reward fell (docs/research/stability.md,
    docs/research/safeguard.md): the safeguard where it is off; where it is on, the update space (it paid at lr 2e-4
    and 1e-4, the output space only at 2e-4) and a larger fixed ``mu`` (0.9 paid as much as 0.5 at 2e-4; ``"auto"``
    in the output space paid less than a fixed 0.5); then a smaller learning rate (Diffusion-DPO broke at 2e-4, not at
    2e-5). A smaller ``beta`` is not among them: no beta from 5 to 50000 changed the picture at the demo's rate."""
    if args is None:
        return ["the safeguard (safeguard_space='output')", "a smaller learning_rate"]
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
                found.append(f"a larger safeguard_mu than {now} (on_pathology='escalate' raises it)")
    found.append("a smaller learning_rate")
    return found


class WinnerHealth:
    """Adds ``health/winner_pathology`` to every training log that has ``delta/winner`` and warns once when it is
    1, naming the remedies. The trainer calls :meth:`annotate` on a log before transformers records it, so the
    reporting callbacks and ``state.log_history`` see the metric with the rest of the log."""

    def __init__(self, windows: int = WINDOWS, args: Any | None = None) -> None:
        self.windows = windows
        self.remedies = remedies(args)
        self.warned = False

    def annotate(self, logs: dict[str, float], history: Sequence[Mapping[str, float]], step: int) -> None:
        """Add the verdict on ``history`` (the logs recorded so far) followed by ``logs`` to ``logs``, in place."""
        if "delta/winner" not in logs:
            return
        flagged = winner_pathology([*history, logs], self.windows)
        logs["health/winner_pathology"] = float(flagged)
        if flagged and not self.warned:
            self.warned = True
            logger.warning(
                "Step %d: for %d logging windows the policy's winner error has been above the reference's "
                "(delta/winner > 0) while the implicit accuracy grew: Diffusion-DPO's pathology (the margin grows by "
                "making the winner worse). Remedies not in use in this run: %s.",
                step,
                self.windows,
                "; ".join(self.remedies),
            )
