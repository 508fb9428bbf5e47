"""Lazy package attributes: a package names its public objects and the submodules that define them, and each
submodule is imported on first access (PEP 562 module ``__getattr__``), as TRL's and diffusers' ``_LazyModule`` do.

``import trl_diffusion_sdpo`` then costs no torch, transformers or diffusers import; the first
``trl_diffusion_sdpo.DiffusionSDPOTrainer`` pays for what the trainer needs, once.

Not transformers' ``_LazyModule``: importing it imports transformers' top level (1 to 8 s on a loaded 2-core machine,
``python -X importtime``, against a few milliseconds for this package), which ``import trl_diffusion_sdpo`` and the
command line's ``--help`` do without (``tests/docs/test_imports.py``); diffusers' imports torch. TRL, too, keeps its
own (``trl/_lazy_module.py``).

The registries of what a run chooses by name (model families, objectives, engines) name their built-in members as
``"package.module:attribute"`` and import one with :func:`import_target` when it is chosen, so a run loads the members
it uses and no other.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["LazyDocstring", "import_target", "lazy_attributes"]


def lazy_attributes(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` for ``exports`` (public name -> relative submodule).

    ``namespace`` is the package's ``globals()``: a resolved name is stored there, so ``__getattr__`` runs once per
    name. A name that is not exported raises ``AttributeError`` as a plain module would (submodules stay importable
    as usual, ``import package.submodule``).
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


def import_target(target: str) -> Any:
    """The object ``target`` names as ``"package.module:attribute"``, its module imported (Python imports it once)."""
    module, colon, attribute = target.partition(":")
    if not colon or not module or not attribute:
        raise ValueError(f"a lazy target reads 'package.module:attribute', got {target!r}")
    return getattr(importlib.import_module(module), attribute)


class LazyDocstring:
    """A class's docstring written when first read (``help()``, an IDE, the API page) by the function ``writer`` names
    as ``"package.module:attribute"``, called with the class and ``arguments`` (the writer's module is imported then:
    a training run, which never reads the docstring, never loads it). Assigned as the class's ``__doc__``: Python's
    ``type.__doc__`` calls a descriptor stored there, and an instance reaches it as a class attribute; a subclass has
    a ``__doc__`` of its own."""

    def __init__(self, cls: type, writer: str, *arguments: Any) -> None:
        self.cls, self.writer, self.arguments = cls, writer, arguments
        self.text: str | None = None

    def __get__(self, instance: Any, owner: type | None = None) -> str:
        if self.text is None:
            self.text = import_target(self.writer)(self.cls, *self.arguments)
        return self.text
