"""Configuration of Diffusion-DPO / Diffusion-SDPO training: the package's bottom layer, importing nothing of the
package but :mod:`~trl_diffusion_sdpo.checks` and :mod:`~trl_diffusion_sdpo._lazy`.

:mod:`.fields` holds :class:`DiffusionSDPOConfig`'s fields (each field's help is its documentation), :mod:`.rules`
the rules of their values (and the checks the layers above register, :func:`register_config_check`), :mod:`.docs`
the class docstring written from the helps. The names resolve on first use (:mod:`~trl_diffusion_sdpo._lazy`), so
a layer that registers a check imports :mod:`.rules` without transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from .fields import DiffusionSDPOConfig
    from .rules import (
        CROSS_FIELD_RULES,
        DSPO_FORM_CHOICES,
        FIELD_RULES,
        INVERSION_NETWORKS,
        NOISING_MODES,
        NONFINITE_ACTIONS,
        SAFEGUARD_PASSES,
        SAFEGUARD_SCOPES,
        SAFEGUARD_SPACES,
        CrossFieldRule,
        check_config,
        register_config_check,
        registered_config_checks,
    )

__all__ = [
    "CROSS_FIELD_RULES",
    "DSPO_FORM_CHOICES",
    "FIELD_RULES",
    "INVERSION_NETWORKS",
    "NOISING_MODES",
    "NONFINITE_ACTIONS",
    "SAFEGUARD_PASSES",
    "SAFEGUARD_SCOPES",
    "SAFEGUARD_SPACES",
    "CrossFieldRule",
    "DiffusionSDPOConfig",
    "check_config",
    "register_config_check",
    "registered_config_checks",
]

# Public name -> the submodule that defines it, imported when the name is first used.
_EXPORTS = {name: ".fields" if name == "DiffusionSDPOConfig" else ".rules" for name in __all__}
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
