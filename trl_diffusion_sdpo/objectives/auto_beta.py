"""Auto-beta: ``beta`` chosen from the run's own margins so that a typical pair's gradient factor stays at a target.

The gradient of ``-logsigmoid(u)`` with respect to ``u`` is ``sigmoid(-u)``: near 1 for a pair the policy gets wrong,
near 0 for one it has won by far. With ``u = -0.5 * beta * m`` and the raw margin
``m = (e_theta^w - e_theta^l) - (e_ref^w - e_ref^l)`` (:func:`.base.diffusion_dpo_logits`), a pair at the typical
``|m|`` has the gradient factor ``target`` when

    beta = -2 * logit(target) / EMA(|m|)            (SimpleTuner's Flow-DPO rule; target 0.2 by default)

``EMA(|m|)`` is an exponential moving average, over optimizer steps, of the mean ``|m|`` of each step's pairs on
every process: the sums behind the mean are all-reduced before they act, so every process uses the same ``beta``.
``beta`` is clamped to ``[beta_0 / AUTO_BETA_RANGE, beta_0 * AUTO_BETA_RANGE]`` around the configured ``beta_0``: a
policy equal to its reference (LoRA at initialisation) has ``m = 0`` and would otherwise get an infinite ``beta``.
Until the first optimizer step closes, the configured ``beta`` is used; the EMA starts at the first step whose mean
``|m|`` is not 0.

The trainer holds it beside its objective (``trainer.auto_beta``): each training micro-batch's ``compute_loss``
evaluates the objective with the ``beta`` in force (:meth:`AutoBeta.objective`) and then hands the micro-batch's
errors to :meth:`AutoBeta.adapt`. Its state (:meth:`AutoBeta.state_dict`) is kept in every checkpoint and in the
rewind's snapshot, so a resumed or rewound run continues as the uninterrupted one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import partial

import torch

from .base import DenoisingErrors, PreferenceObjective

__all__ = ["AUTO_BETA_DECAY", "AUTO_BETA_RANGE", "AutoBeta", "auto_beta"]

#: the EMA's decay per optimizer step (this package's choice: about a 100-step memory)
AUTO_BETA_DECAY = 0.99
#: the clamp: within this factor of the configured ``beta`` either way
AUTO_BETA_RANGE = 10.0


def auto_beta(mean_abs_margin: torch.Tensor, target: float, low: float, high: float) -> torch.Tensor:
    """``clamp(-2 * logit(target) / mean_abs_margin, low, high)``; a zero margin gives ``high``."""
    logit = math.log(target / (1.0 - target))
    return (-2.0 * logit / mean_abs_margin.float()).clamp(min=low, max=high)


class AutoBeta:
    """The auto-beta's state: :meth:`adapt` to every micro-batch's errors (:meth:`observe` them, :meth:`update` when
    an optimizer step's window closes, on every process: it all-reduces), and :meth:`objective` the objective with the
    ``beta`` in force. :meth:`state_dict` / :meth:`load_state_dict` carry what it has learnt.

    Args:
        beta: the configured ``beta``, the clamp's centre and the value until the first update.
        target: the gradient factor ``sigmoid(-|u|)`` of a pair at the typical margin, in (0, 0.5).
        reduce_sum: sums a tensor over processes (``None`` on one process).
        decay: the EMA's decay per optimizer step.
        device: where a loaded state's tensors are put (the run's device).
    """

    def __init__(
        self,
        beta: float,
        target: float,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
        decay: float = AUTO_BETA_DECAY,
        device: torch.device | str = "cpu",
    ) -> None:
        self.configured, self.target, self.decay = beta, target, decay
        self.low, self.high = beta / AUTO_BETA_RANGE, beta * AUTO_BETA_RANGE
        self.reduce_sum, self.device = reduce_sum, device
        self.ema: torch.Tensor | None = None  # EMA(|m|), a device tensor once a step has closed
        self.beta: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None  # [sum |m|, pairs] over the open window, this process

    @classmethod
    def from_config(cls, args, num_processes: int) -> AutoBeta | None:
        """The auto-beta ``args`` asks for (``None`` without ``auto_beta``), reduced over ``num_processes``."""
        if not args.auto_beta:
            return None
        from accelerate.utils import reduce  # the sum over processes the trainer's metrics use too

        reduce_sum = partial(reduce, reduction="sum") if num_processes > 1 else None
        return cls(args.beta, args.auto_beta_target, reduce_sum, device=args.device)

    def adapt(self, errors: DenoisingErrors, contributes: bool, window_closes: bool) -> None:
        """A training micro-batch's errors (:meth:`observe`; zeros for a replay), and the window's :meth:`update` when
        it is the last of its optimizer step (``window_closes``: accelerate's ``sync_gradients``). On the device: no
        host read."""
        self.observe(errors, contributes)
        if window_closes:
            self.update()

    def observe(self, errors: DenoisingErrors, contributes: bool = True) -> None:
        """Add a micro-batch's ``|m|`` to the open window (zeros for a replay; non-finite margins left out)."""
        margin = (errors.policy_winner - errors.policy_loser) - (errors.reference_winner - errors.reference_loser)
        margin = margin.detach().float()
        finite = torch.isfinite(margin) & contributes
        sums = torch.stack([torch.where(finite, margin.abs(), 0.0).sum(), finite.float().sum()])
        self._sums = sums if self._sums is None else self._sums + sums

    def update(self) -> None:
        """Close the window: reduce its sums over processes, move the EMA, set ``beta``. Call it on every process."""
        if self._sums is None:
            return
        sums, self._sums = self._sums, None
        if self.reduce_sum is not None:
            sums = self.reduce_sum(sums)
        pairs = sums[1]
        mean = sums[0] / pairs.clamp(min=1.0)
        if self.ema is None:
            self.ema = mean
        else:  # an EMA still at 0 (a policy equal to its reference so far) starts at the first informative window
            moved = torch.where(self.ema > 0, self.decay * self.ema + (1.0 - self.decay) * mean, mean)
            self.ema = torch.where(pairs > 0, moved, self.ema)
        self.beta = auto_beta(self.ema, self.target, self.low, self.high)

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """What it has learnt: ``ema`` (``EMA(|m|)``) and the ``beta`` in force, 0-dim tensors (``None`` before the
        first update); references, as torch's ``state_dict`` returns. Taken at the end of an optimizer step (a
        checkpoint, the rewind's snapshot), where no window is open."""
        return {"ema": self.ema, "beta": self.beta}

    def load_state_dict(self, state: dict[str, torch.Tensor | float | None]) -> None:
        """The state :meth:`state_dict` gave (tensors or numbers), copied onto the run's device as float32; ``beta`` is
        formed again from ``ema`` where the state has none. An open window is dropped."""
        self.ema, beta = (_on(state.get(key), self.device) for key in ("ema", "beta"))
        if beta is None and self.ema is not None:
            beta = auto_beta(self.ema, self.target, self.low, self.high)
        self.beta, self._sums = beta, None

    def objective(self, objective: PreferenceObjective) -> PreferenceObjective:
        """``objective`` with the ``beta`` in force (a shallow copy; the configured one before the first update).
        The copy skips the fields' checks: ``beta`` is a device tensor here, checked by the clamp."""
        if self.beta is None:
            return objective
        current = copy.copy(objective)
        object.__setattr__(current, "beta", self.beta)
        return current

    def current(self) -> float:
        """The ``beta`` in force, as logged (one host read)."""
        return self.configured if self.beta is None else float(self.beta)


def _on(value: torch.Tensor | float | None, device: torch.device | str) -> torch.Tensor | None:
    """A loaded value as a float32 0-dim tensor of its own on ``device`` (``None`` stays ``None``)."""
    return None if value is None else torch.as_tensor(value, dtype=torch.float32).to(device, copy=True)
