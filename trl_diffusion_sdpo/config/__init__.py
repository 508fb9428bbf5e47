"""Configuration of Diffusion-DPO / Diffusion-SDPO training: the package's bottom layer, importing nothing of the
package outside ``config/``. A config made anywhere asks the objective it names to check its fields, through the one
check the package's root module connects (:mod:`.rules`), so its answer never depends on import order.

:mod:`.fields` holds :class:`DiffusionSDPOConfig`'s fields (each field's help is its documentation), :mod:`.rules`
the rules of their values, :mod:`.defaults` the one table of the per-run defaults (learning_rate, beta,
safeguard_mu, safeguard_space per model family, objective, tuning and mode), the recommended learning-rate ranges and
the choices the trainer makes for the machine, :mod:`.docs` the class docstring written from the helps. The names
resolve on first use (:mod:`~trl_diffusion_sdpo.config._lazy`), so a layer that reads the rules imports
:mod:`.rules` without transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes
from .rules import *  # noqa: F403  (the rules import nothing heavy)
from .rules import __all__ as _RULES

if TYPE_CHECKING:  # the eager import, for type checkers and IDEs only
    from .fields import DiffusionSDPOConfig

__all__ = [*_RULES, "DiffusionSDPOConfig"]

# DiffusionSDPOConfig (over transformers.TrainingArguments) is imported when first used.
__getattr__, __dir__ = lazy_attributes(__name__, {"DiffusionSDPOConfig": ".fields"}, globals())
