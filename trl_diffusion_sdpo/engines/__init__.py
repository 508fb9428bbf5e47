"""Training engines: one object per engine behind :class:`Engine`, picked once by :func:`engine_for`.

* :class:`PlainEngine`: one process or DDP (:mod:`.plain`);
* :class:`DeepSpeedEngine`: DeepSpeed ZeRO-1/2/3 (:mod:`.deepspeed`);
* :class:`FSDP2Engine` and :class:`FSDP1Engine`: FSDP through accelerate (:mod:`.fsdp`).

Each engine's module is imported when a run trains with it (:data:`BUILT_IN_ENGINES`), or when its class here is
first used. To support another engine, subclass :class:`Engine` (see :mod:`.base` for what it answers), name it in
:data:`BUILT_IN_ENGINES` and add its condition to :func:`engine_for`: the trainer never checks which engine runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config._lazy import import_target, lazy_attributes

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from .base import Engine
    from .deepspeed import DeepSpeedEngine
    from .fsdp import FSDP1Engine, FSDP2Engine
    from .plain import PlainEngine

__all__ = [
    "BUILT_IN_ENGINES",
    "DeepSpeedEngine",
    "Engine",
    "FSDP1Engine",
    "FSDP2Engine",
    "PlainEngine",
    "engine_for",
]

#: Engine name -> ``"module:class"``, imported when :func:`engine_for` picks it.
BUILT_IN_ENGINES: dict[str, str] = {
    "deepspeed": f"{__name__}.deepspeed:DeepSpeedEngine",
    "fsdp2": f"{__name__}.fsdp:FSDP2Engine",
    "fsdp1": f"{__name__}.fsdp:FSDP1Engine",
    "plain": f"{__name__}.plain:PlainEngine",
}

_EXPORTS = {target.partition(":")[2]: target.partition(":")[0] for target in BUILT_IN_ENGINES.values()}
_EXPORTS["Engine"] = f"{__name__}.base"  # on first use too: the memory estimate (.memory) imports no trainer


def engine_for(accelerator) -> Engine:
    """The engine ``accelerator`` trains with."""
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        return import_target(BUILT_IN_ENGINES["deepspeed"])(accelerator, int(plugin.zero_stage))
    if getattr(accelerator, "is_fsdp2", False):
        return import_target(BUILT_IN_ENGINES["fsdp2"])(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        return import_target(BUILT_IN_ENGINES["fsdp1"])(accelerator)
    return import_target(BUILT_IN_ENGINES["plain"])(accelerator)


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
