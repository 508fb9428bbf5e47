"""The safeguard's margin ``mu``: the configured value, or ``safeguard_mu="auto"`` holding the paper's constraint.

Diffusion-SDPO's promise (Fu et al., arXiv 2511.03317) is that the preferred image's denoising error does not rise
above the reference's. The safeguard's ``lambda`` keeps it from rising to first order with margin ``mu``; whether a
given ``mu`` holds it over a run depends on the model, the data and the learning rate. With ``"auto"``, ``mu`` is
the multiplier of that constraint, moved by projected dual ascent once per optimizer step:

    c_k    = sum_i (e_theta^w_i - e_ref^w_i) / sum_i e_ref^w_i          (the relative violation; > 0: broken)
    mu_k+1 = clamp(mu_k + eta * c_k, 0, 1)                              (eta: ``safeguard_mu_step``)

over the pairs of step ``k`` on every process: the sums are all-reduced before they act, so every process uses the
same ``mu``. ``mu`` starts at :data:`AUTO_MU_START`. A violated constraint raises ``mu`` (a smaller ``lambda``, a
more conservative step); slack lowers it again, so a healthy run pays less. The safeguards read
:attr:`SafeguardMargin.value` at every micro-batch. Health's ``on_pathology="escalate"`` raises ``mu`` halfway to 1
(:meth:`SafeguardMargin.escalate`).

The safeguard owns its margin (``safeguard.margin``): the trainer hands every training micro-batch's errors to
:meth:`SafeguardMargin.adapt` once the safeguard has read ``mu`` for it. Its state (:meth:`SafeguardMargin.state_dict`,
the ``mu`` in force, fixed or not: an escalation moves a fixed one) is kept in every checkpoint and in the rewind's
snapshot, so a resumed or rewound run continues as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config.defaults import resolve_default
from ..engines.collectives import all_reduce_sum
from ..objectives import DenoisingErrors

__all__ = ["AUTO", "AUTO_MU_START", "SafeguardMargin"]

AUTO = "auto"
#: where ``safeguard_mu="auto"`` starts: the package's default mu (:mod:`trl_diffusion_sdpo.config.defaults`)
AUTO_MU_START: float = resolve_default("safeguard_mu").value


class SafeguardMargin:
    """``mu`` as the safeguards consult it.

    Args:
        mu: a number in [0, 1] (fixed; :meth:`escalate` alone moves it) or ``"auto"``.
        step: ``eta``, the dual-ascent step per unit of relative violation (``"auto"`` only).
        reduce_sum: sums a tensor over processes (``None`` on one process).
        device: where a loaded ``"auto"`` state is put (the run's device).
    """

    def __init__(
        self,
        mu: float | str,
        step: float = 1.0,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.auto = mu == AUTO
        self.step, self.reduce_sum, self.device = step, reduce_sum, device
        #: a float for a fixed ``mu``; a 0-dim device tensor with ``"auto"`` (moved on the device, never read back)
        self.value: float | torch.Tensor = AUTO_MU_START if self.auto else float(mu)
        self._sums: torch.Tensor | None = None  # [sum(e_w - e_ref_w), sum(e_ref_w)] over the open window

    @classmethod
    def from_config(cls, args, num_processes: int) -> SafeguardMargin:
        """``args.safeguard_mu`` with ``args.safeguard_mu_step``, reduced over ``num_processes``."""
        reduce = all_reduce_sum if num_processes > 1 else None
        return cls(args.safeguard_mu, getattr(args, "safeguard_mu_step", 1.0), reduce, device=args.device)

    def adapt(self, errors: DenoisingErrors, contributes: bool, window_closes: bool) -> None:
        """A training micro-batch's errors (:meth:`observe`; zeros for a replay), and the window's :meth:`update` when
        it is the last of its optimizer step (``window_closes``: accelerate's ``sync_gradients``). A fixed ``mu``
        ignores them. On the device: no host read."""
        self.observe(errors, contributes)
        if window_closes:
            self.update()

    def observe(self, errors: DenoisingErrors, contributes: bool = True) -> None:
        """Add a micro-batch's winner errors to the open window (zeros for a replay; non-finite pairs left out)."""
        if not self.auto or errors.reference_winner is None:
            return
        policy, reference = errors.policy_winner.detach().float(), errors.reference_winner.detach().float()
        finite = torch.isfinite(policy) & torch.isfinite(reference) & contributes
        sums = torch.stack(
            [torch.where(finite, policy - reference, 0.0).sum(), torch.where(finite, reference, 0.0).sum()]
        )
        self._sums = sums if self._sums is None else self._sums + sums

    def update(self) -> None:
        """Close the window: reduce its sums over processes and take one dual-ascent step. Call it on every
        process at the end of each optimizer step's window."""
        if not self.auto or self._sums is None:
            return
        sums, self._sums = self._sums, None
        if self.reduce_sum is not None:
            sums = self.reduce_sum(sums)
        violation = torch.where(sums[1] > 0, sums[0] / sums[1].clamp(min=torch.finfo(torch.float32).tiny), 0.0)
        value = torch.as_tensor(self.value, dtype=torch.float32, device=sums.device)
        self.value = (value + self.step * violation).clamp(0.0, 1.0)

    def escalate(self) -> float:
        """Raise ``mu`` halfway to 1 (health's ``on_pathology="escalate"``) and return it."""
        self.value = (1.0 + self.value) / 2.0
        return self.current()

    def state_dict(self) -> dict[str, torch.Tensor | float]:
        """The ``mu`` in force (``value``: a 0-dim device tensor with ``"auto"`` once it has moved, else a float), a
        reference as torch's ``state_dict`` returns. Taken at the end of an optimizer step, where no window is open."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, torch.Tensor | float]) -> None:
        """The ``mu`` :meth:`state_dict` gave (a tensor or a number): with ``"auto"`` a float32 tensor of its own on
        the run's device, a fixed ``mu`` a float. An open window is dropped."""
        value = state["value"]
        if self.auto:
            self.value = torch.as_tensor(value, dtype=torch.float32).to(self.device, copy=True)
        else:
            self.value = float(value)
        self._sums = None

    def current(self) -> float:
        """``mu`` as logged (one host read with ``"auto"``)."""
        return float(self.value)

    def __float__(self) -> float:
        return self.current()
