"""The scorer name registry, without torch: listing the names (``evaluate --help``) imports no model code."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ...config.extras import require_extra
from ...config.messages import advice, did_you_mean

__all__ = ["available_scorers", "register_scorer", "scorer_factory", "unknown_scorer_message"]

# The distribution holding the ports of published reward models (HPSv2, HPSv3, ImageReward, ...), installed by the
# `rewards` extra: the core wheel stays the trainer.
REWARD_PORTS = "trl_diffusion_sdpo_rewards"

# name -> factory, or "package.module:attribute" naming it, imported when the scorer is first built (the built-in
# scorers' modules import transformers' CLIP and BLIP models, which listing the names should not pay for).
# A factory returns a `Scorer` (.base); not named here, so that the registry imports nothing of the scorers.
_REGISTRY: dict[str, Callable[..., Any] | str] = {}


def register_scorer(name: str, factory: Callable[..., Any] | str, overwrite: bool = False) -> None:
    """Make ``build_scorer(name, **kwargs)`` call ``factory(**kwargs)``. ``factory`` may be a `Scorer` subclass, or
    ``"package.module:attribute"`` naming one, imported on first use."""
    if name in _REGISTRY and not overwrite and not _same_factory(_REGISTRY[name], factory):
        raise ValueError(f"A scorer named {name!r} is already registered; pass overwrite=True to replace it.")
    if isinstance(factory, str) and ":" not in factory:
        raise ValueError(f"A scorer factory given by name reads 'package.module:attribute', got {factory!r}.")
    _REGISTRY[name] = factory


def _same_factory(registered: Callable[..., Any] | str, factory: Callable[..., Any] | str) -> bool:
    """Whether a registration by ``"module:attribute"`` and one by the object it names are one: a command registers a
    scorer by name so that its help lists it, and importing the scorer's module registers the object itself."""
    if isinstance(registered, str) == isinstance(factory, str):
        return False
    named, obj = (registered, factory) if isinstance(registered, str) else (factory, registered)
    return named == f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"


def available_scorers() -> list[str]:
    """The registered scorer names, sorted."""
    return sorted(_REGISTRY)


def unknown_scorer_message(name: str, given_as: str = "scorer") -> str:
    """What every command says of a scorer name that is not registered, given as ``given_as`` (the flag or keyword
    it came in): the closest registered one (as a misspelt flag's) and the registered names."""
    known = available_scorers()
    suggestion = did_you_mean(name, known, "")
    return f"{given_as} {name!r} is no registered scorer{suggestion}; registered: {', '.join(known)}."


def scorer_factory(name: str) -> Callable[..., Any]:
    """The factory registered under ``name`` (importing its module when it was registered by name)."""
    if name not in _REGISTRY:
        raise KeyError(unknown_scorer_message(name, advice("--scorer", "scorer")))
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        if module.startswith(f"{REWARD_PORTS}."):  # a port: a missing distribution is named with its install command
            imported = require_extra("rewards", module, f"Scorer {name!r} (a reward-model port)")
        else:
            imported = importlib.import_module(module)
        factory = _REGISTRY[name] = getattr(imported, attribute)
    return factory


# Scorers that live outside the evaluation package (which never imports them), registered by name so that listing
# the names needs no import; their module is imported, and registers the class itself, when one is first built.
OUTSIDE_SCORERS = {"colour": "trl_diffusion_sdpo.demo.scorer:ColourRewardScorer"}


def register_outside_scorers() -> None:
    """Register :data:`OUTSIDE_SCORERS` (by name; a scorer already registered is left as it is)."""
    for name, factory in OUTSIDE_SCORERS.items():
        if name not in _REGISTRY:
            register_scorer(name, factory)
