"""What an online run decides differently from a run of preference pairs, from the online evidence
(docs/online.md): the defaults' entries it replaces (:data:`ONLINE_DEFAULTS`), its data loading
(:data:`ONLINE_DATA_LOADING`), the safeguard the pathology alarm switches it to (none: :data:`ONLINE_SWITCH_TO`,
:data:`NO_ONLINE_SWITCH`) and the remedies the alarm names (:func:`online_remedies`); and the keys only its YAML
files have (:data:`ONLINE_FILE_KEYS`). ``OnlineDiffusionSDPOConfig``
overrides the offline config's methods with them; the offline modules ask the config and never name the online run.

Importing nothing heavy (the command line's help reads :func:`safeguard_default_sentence` before transformers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config.defaults import DefaultEntry, default_table, resolve_default
from ..config.defaults import safeguard_default_sentence as pairs_safeguard_sentence

__all__ = [
    "NO_ONLINE_SWITCH",
    "ONLINE_DATA_LOADING",
    "ONLINE_DEFAULTS",
    "ONLINE_FILE_KEYS",
    "ONLINE_SWITCH_TO",
    "online_remedies",
    "online_table",
    "safeguard_default_sentence",
]

ONLINE_DEFAULTS: tuple[DefaultEntry, ...] = (
    DefaultEntry(
        "safeguard_space",
        "none",
        "online Diffusion-DPO: the authors' mu values were measured on offline pairs, and on the CPU demo every "
        "safeguard setting cost held-out quality online (docs/online.md)",
    ),
)
"""The entries an online run resolves from in place of every offline entry of the same field."""

ONLINE_DATA_LOADING: dict[str, Any] = {"dataloader_num_workers": 0, "non_blocking": False, "run": "online"}
"""An online run's data loading on any machine: its batches are prompts, so workers and non-blocking copies would
have nothing to overlap (``run``: the start summary's name for the run)."""

ONLINE_FILE_KEYS = ("prompts", "reward_funcs", "num_generations")
"""Keys only an online run's YAML file has: ``estimate-memory`` reads such a file with the ``online`` command's
options (``trl_diffusion_sdpo.cli.config_paths.FILE_COMMANDS``)."""

ONLINE_SWITCH_TO: dict[str, Any] | None = None
"""What ``on_pathology="safeguard"`` switches an online run to: nothing, so the online config refuses that action
(:data:`NO_ONLINE_SWITCH` says why)."""
NO_ONLINE_SWITCH = (
    "online no safeguard setting held what online Diffusion-DPO lost, and the alarm fired in none of the online runs "
    "(docs/online.md), so there is nothing to switch to"
)


def online_table(offline: Sequence[DefaultEntry], safeguard_asked: bool = False) -> tuple[DefaultEntry, ...]:
    """``offline``'s entries with :data:`ONLINE_DEFAULTS` in place of every entry of the fields they set; where the
    run asks for a safeguard (``safeguard_asked``: a ``safeguard_mu`` given, or ``on_pathology="escalate"``) the
    offline ``safeguard_space`` stays, so an unset space is then the offline default."""
    online = tuple(e for e in ONLINE_DEFAULTS if not (safeguard_asked and e.field == "safeguard_space"))
    replaced = {entry.field for entry in online}
    return tuple(entry for entry in offline if entry.field not in replaced) + online


def online_remedies(args: Any) -> list[str]:
    """The remedies the alarm names in an online run (``args``: its config): never a safeguard, since where online
    Diffusion-DPO was healthy every safeguard setting cost held-out quality, and where it hacked its reward none kept
    what it lost (docs/online.md); so the safeguard's removal where it is on, then a smaller learning rate (online
    Diffusion-DPO was healthy at 2e-4 and hacked at 1e-3)."""
    found: list[str] = []
    if getattr(args, "safeguard_space", "none") not in (None, "none"):
        found.append("safeguard_space='none' (online, every safeguard setting cost held-out quality)")
    return [*found, "a smaller learning_rate"]


def safeguard_default_sentence() -> str:
    """What the safeguard does by default online, from the online table (``online --help`` prints it)."""
    space = resolve_default("safeguard_space", table=online_table(default_table()))
    if space.value != "none":
        return pairs_safeguard_sentence()
    return (
        "Online the pairs train without the safeguard by default (safeguard_space unset is none there); "
        "--safeguard_space or --safeguard_mu turns it on."
    )
