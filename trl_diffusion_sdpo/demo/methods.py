"""The methods the demo compares, each a set of trainer config fields on top of the same recipe.

Every method trains from the same base, on the same pairs, with the same training seeds (hence, per seed, the same
batches, timesteps and noise) and the same number of steps; only the fields below differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_GUARDS", "DEFAULT_METHODS", "GUARDS", "METHODS", "Method", "method_unavailable"]


@dataclass(frozen=True)
class Method:
    """One row of the comparison.

    ``safeguard``: whether a safeguard runs, in ``safeguard_space`` (the output space when unset). ``config``: any
    other config fields as ``(name, value)`` pairs, e.g. ``(("safeguard_scope", "pair"),)`` or
    ``(("loss_type", "smpo"),)``, so a new variant is one ``Method(...)`` line. ``log_output_lambda``: the parameter
    space also logs the authors' output-space ``lambda`` for comparison.
    """

    key: str
    label: str
    safeguard: bool
    safeguard_mu: float | str | None = None
    safeguard_space: str | None = None
    config: tuple[tuple[str, Any], ...] = ()
    log_output_lambda: bool = False

    @property
    def probes(self) -> bool:
        """Whether the method runs the held-out probe (``probe_steps``), which then reads pairs of its own: the demo
        samples them from the training captions with other noise (never trained on), so the training data stays the
        other rows'."""
        return dict(self.config).get("probe_steps") is not None

    def config_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"safeguard_space": (self.safeguard_space or "output") if self.safeguard else "none"}
        if self.safeguard_mu is not None:
            kwargs["safeguard_mu"] = self.safeguard_mu
        kwargs.update(self.config)
        return kwargs


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("dpo", "Diffusion-DPO", safeguard=False),
        Method("sdpo-output", "SDPO output mu=0.9", safeguard=True, safeguard_mu=0.9),
        Method("sdpo-output-mu0.6", "SDPO output mu=0.6", safeguard=True, safeguard_mu=0.6),
        Method("sdpo-output-mu0.2", "SDPO output mu=0.2", safeguard=True, safeguard_mu=0.2),
        Method(
            "sdpo-parameter",
            "SDPO parameter mu=0.9",
            safeguard=True,
            safeguard_mu=0.9,
            safeguard_space="parameter",
            log_output_lambda=True,  # output_lambda_mean in the results, for comparison
        ),
    )
}
"""``dpo``: no safeguard. ``sdpo-output``: the authors' output-space rule at their SD1.5 DPO setting ``mu = 0.9``,
with ``mu = 0.6`` (their SDXL setting) and ``0.2`` (their SD1.5 DSPO setting) as a sweep. ``sdpo-parameter``: the
exact rule from per-branch parameter gradients at ``mu = 0.9``."""

DEFAULT_METHODS: tuple[str, ...] = ("dpo", "sdpo-output")
"""The rows the demo compares unless ``--full`` asks for every row of :data:`METHODS`: Diffusion-DPO and the authors'
output-space rule at their SD1.5 setting, the paper's comparison. They are rows of the full table, trained alike, so
the default's figures are the full comparison's for these rows."""

GUARDS: dict[str, Method] = {
    m.key: m
    for m in (
        METHODS["dpo"],
        Method("sdpo-output-mu0.5", "SDPO output mu=0.5", safeguard=True, safeguard_mu=0.5),
        Method(
            "guard-rewind",
            "DPO on_pathology=rewind",
            safeguard=False,
            config=(("on_pathology", "rewind"), ("probe_steps", 5), ("probe_pairs", 8)),
        ),
        Method("guard-auto-mu", "SDPO output mu=auto", safeguard=True, safeguard_mu="auto"),
        Method("guard-max-margin", "DPO max_margin=5", safeguard=False, config=(("max_margin", 5.0),)),
        Method("guard-sft", "DPO sft_weight=1", safeguard=False, config=(("sft_weight", 1.0),)),
        Method("guard-auto-beta", "DPO auto_beta", safeguard=False, config=(("auto_beta", True),)),
        Method("guard-ema", "DPO ema_decay=0.99", safeguard=False, config=(("ema_decay", 0.99),)),
    )
}
"""The breaking regime's rows (:class:`~trl_diffusion_sdpo.demo.recipe.BreakingRegime`), as in
``benchmarks/results/stability/cpu-stability-guards-demo.json``: Diffusion-DPO, the output-space safeguard at
``mu = 0.5`` (the package's default where the authors measured no ``mu``), Diffusion-DPO with ``on_pathology="rewind"``
(not in the benchmark: its held-out probe every 5 steps on 8 pairs of its own, :attr:`Method.probes`),
``safeguard_mu="auto"``, and Diffusion-DPO with each loss guard (``max_margin``, ``sft_weight``, ``auto_beta``) at the
benchmark's values; then Diffusion-DPO with ``ema_decay`` (not in the benchmark: it changes no training step, and the
demo samples from the EMA weights as validation does)."""

DEFAULT_GUARDS: tuple[str, ...] = ("dpo", "sdpo-output-mu0.5")
"""The breaking regime's rows unless ``--full`` asks for every row of :data:`GUARDS`: Diffusion-DPO and the
output-space safeguard at the package's default where the authors measured no ``mu``, trained as in the full regime."""


def method_unavailable(method: Method, config_class: type | None = None) -> str | None:
    """Why the installed trainer (its config, ``config_class``, by default ``DiffusionSDPOConfig``) cannot run
    ``method`` (then the demo skips it and says so), or ``None``."""
    if config_class is None:
        # lazy: `demo --help` reads METHODS without transformers, which the config class imports
        from ..config import DiffusionSDPOConfig as config_class

    fields = {f.name for f in dataclasses.fields(config_class)}
    missing = [name for name, _ in method.config if name not in fields]
    if missing:
        return f"the installed DiffusionSDPOConfig has no {', '.join(missing)} field (this trainer predates it)"
    return None


def resolve_methods(keys: tuple[str, ...] | list[str], table: dict[str, Method] = METHODS) -> list[Method]:
    """The methods of ``table`` named by ``keys``, in the given order; unknown keys fail with the known ones."""
    unknown = [k for k in keys if k not in table]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; choose from {list(table)}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"demo methods listed twice: {list(keys)}")
    return [table[k] for k in keys]
