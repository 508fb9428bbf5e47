"""What the pathology alarm (``trl_diffusion_sdpo.callbacks.health``) does for a run of preference pairs: the
safeguard ``on_pathology="safeguard"`` switches it to (:data:`SWITCH_TO`) and the remedies its warning names
(:func:`pair_remedies`). ``DiffusionSDPOConfig.pathology_switch`` and ``pathology_remedies`` return them; a config
whose runs have other evidence overrides those methods (the online config: ``trl_diffusion_sdpo.online.defaults``).

This module imports nothing of the package, so the config (the bottom layer) can answer with it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SWITCH_REASON", "SWITCH_TO", "pair_remedies"]

SWITCH_TO: dict[str, Any] = {"safeguard_space": "output", "safeguard_mu": 0.5}
"""What ``on_pathology="safeguard"`` switches an offline Diffusion-DPO run to when the alarm fires: the one setting
that kept the held-out reward where Diffusion-DPO's fell (lr 2e-4: its change from the base includes 0, where every
other guard's is below it; at 1e-3 none held; benchmarks/research/stability.md)."""
SWITCH_REASON = (
    "the one setting that kept the held-out reward where Diffusion-DPO's fell (benchmarks/research/stability.md)"
)
"""Why :data:`SWITCH_TO` is the target, in the words a message gives."""


def pair_remedies(args: Any | None) -> list[str]:
    """The remedies for the pathology that the evidence supports in a run of preference pairs (``args``: its config;
    ``None``: unknown) and that the run does not already use, each naming the setting to change as ``field=value``.

    In the order the toy benchmarks found them to work where Diffusion-DPO's held-out reward fell
    (benchmarks/research/stability.md, benchmarks/research/safeguard.md): the safeguard where it is off; where it is
    on, the update space (it paid at lr 2e-4 and 1e-4, the output space only at 2e-4) and a larger fixed ``mu`` (0.9
    paid as much as 0.5 at 2e-4; ``"auto"`` in the output space paid less than a fixed 0.5); then a smaller learning
    rate (Diffusion-DPO broke at 2e-4, not at 2e-5). A smaller ``beta`` is not among them: no beta from 5 to 50000
    changed the picture at the demo's rate."""
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
