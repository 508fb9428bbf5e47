"""Training engines: one object per engine behind :class:`Engine`, picked once by :func:`engine_for`.

* :class:`PlainEngine`: one process or DDP (:mod:`.plain`);
* :class:`DeepSpeedEngine`: DeepSpeed ZeRO-1/2/3 (:mod:`.deepspeed`);
* :class:`FSDP2Engine` and :class:`FSDP1Engine`: FSDP through accelerate (:mod:`.fsdp`).

To support another engine, subclass :class:`Engine` (see :mod:`.base` for what it answers) and add a branch to
:func:`engine_for`: the trainer never checks which engine runs.
"""

from __future__ import annotations

from accelerate.utils import DistributedType

from .base import Engine
from .deepspeed import DeepSpeedEngine
from .fsdp import FSDP1Engine, FSDP2Engine
from .plain import PlainEngine

__all__ = [
    "DeepSpeedEngine",
    "Engine",
    "FSDP1Engine",
    "FSDP2Engine",
    "PlainEngine",
    "engine_for",
]


def engine_for(accelerator) -> Engine:
    """The engine ``accelerator`` trains with."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        return DeepSpeedEngine(accelerator, int(plugin.zero_stage))
    if getattr(accelerator, "is_fsdp2", False):
        return FSDP2Engine(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        return FSDP1Engine(accelerator)
    return PlainEngine(accelerator)
