"""A health check in the training logs: Diffusion-DPO's pathology, seen while it happens.

Diffusion-DPO can widen the preference margin by making the loser worse faster than the winner, while the winner's
own denoising error climbs above the reference's (Fu et al., arXiv 2511.03317, the pathology the safeguard exists
for). Both halves are in the logs already: ``delta/winner`` (policy's winner error minus the reference's, averaged
over a logging window) and ``implicit_acc``. :func:`winner_pathology` reads them; :class:`WinnerHealthCallback`
logs the verdict as ``health/winner_pathology`` (1.0 or 0.0) at every training log and warns once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from transformers import TrainerCallback

__all__ = ["WINDOWS", "WinnerHealthCallback", "winner_pathology"]

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


class WinnerHealthCallback(TrainerCallback):
    """Adds ``health/winner_pathology`` to every training log that has ``delta/winner`` and warns once when it is
    1, naming the remedies. Put it before the reporting callbacks so that they see the metric."""

    def __init__(self, windows: int = WINDOWS) -> None:
        self.windows = windows
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "delta/winner" not in logs:
            return
        flagged = winner_pathology(state.log_history, self.windows)
        logs["health/winner_pathology"] = float(flagged)
        if state.log_history and state.log_history[-1].get("delta/winner") == logs["delta/winner"]:
            state.log_history[-1]["health/winner_pathology"] = float(flagged)
        if flagged and not self.warned:
            self.warned = True
            logger.warning(
                "Step %d: for %d logging windows the policy's winner error has been above the reference's "
                "(delta/winner > 0) while the implicit accuracy grew: Diffusion-DPO's pathology (the margin grows by "
                "making the winner worse). Remedies: the safeguard (safeguard=True, safeguard_space='parameter' or "
                "'update'), a smaller beta, or a smaller learning_rate.",
                state.global_step,
                self.windows,
            )
