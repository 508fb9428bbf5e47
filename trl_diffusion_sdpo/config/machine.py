"""The choices that depend on the machine and the output a run trains on (data-loading workers, non-blocking copies,
a progress bar or a line per log), made by the command line on its copy of the config where the caller left them
unset: :func:`machine_choices`, each choice with its reason for the start summary. The fields they may set
(:data:`~.defaults.MACHINE_FIELDS`) and what a run of preference pairs leaves unset of the data loading
(:func:`~.defaults.data_loading_defaults`) are the config's, in :mod:`.defaults`.

Only the command line imports this module (``cli.train.for_this_machine``): the trainer never chooses for the
machine, so a config means the same run on every machine, and a run built from Python never loads it. It imports
nothing of the package outside ``config/``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

from .defaults import ResolvedDefault

__all__ = ["MACHINE", "machine_choices"]

#: the scope of a choice made for the machine and the output (:func:`machine_choices`)
MACHINE = "this machine"


def _still_unset(config: Any, field: str) -> bool:
    """Whether ``field`` still holds the value the config was made with when the caller left it unset."""
    unset = getattr(config, "left_unset", {})
    return field in unset and getattr(config, field) == unset[field]


def machine_choices(
    config: Any, *, device_type: str, terminal: bool, cpus: int | None = None, processes: int | None = None
) -> tuple[Any, dict[str, ResolvedDefault]]:
    """A copy of ``config`` with the choices that depend on the machine and the output made where the caller left them
    unset (:data:`~.defaults.MACHINE_FIELDS`; the caller's config stays as given), and each choice with its reason for
    the start summary. The command line calls it (``cli.train.for_this_machine``); the trainer never does, so a config
    means the same run on every machine.

    ``device_type`` is the type of the device the run trains on (``"cuda"``, ``"cpu"``, ...), ``terminal`` whether
    stderr is a terminal or a notebook. The data loading is the config's own choice (its ``data_loading_defaults``:
    :func:`~.defaults.data_loading_defaults` for preference pairs; ``cpus`` the cores this process may use,
    ``processes`` those launched on this machine; read from the system when ``None``). Off a
    terminal the trainer's own progress bar, a line of ``\\r`` redraws in a log file, becomes a line per log
    (transformers' ``PrinterCallback``)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    chosen = config.data_loading_defaults(cuda=device_type == "cuda", cpus=cpus, processes=processes)
    where = f"{device_type}, {chosen['run']}, {cpus} CPU core(s) for {processes} process(es)"
    config = copy.copy(config)
    choices: dict[str, ResolvedDefault] = {}

    workers = chosen["dataloader_num_workers"]
    if _still_unset(config, "dataloader_num_workers"):
        config.dataloader_num_workers = workers
        why = (
            "the next batches are prepared while the GPU trains"
            if workers
            else "loaded in the training process: workers would take cores from the step or have nothing to overlap"
        )
        choices["dataloader_num_workers"] = ResolvedDefault(
            "dataloader_num_workers", workers, f"{where}: {why}", MACHINE
        )
    else:
        choices["dataloader_num_workers"] = ResolvedDefault(
            "dataloader_num_workers", config.dataloader_num_workers, "as given", given=True
        )

    non_blocking = chosen["non_blocking"] and config.dataloader_pin_memory
    if _still_unset(config, "accelerator_config"):
        if non_blocking:
            config.accelerator_config = dataclasses.replace(config.accelerator_config, non_blocking=True)
        why = "pinned batches copied to the GPU without waiting" if non_blocking else "no copy to overlap"
        choices["non_blocking"] = ResolvedDefault("non_blocking", non_blocking, f"{where}: {why}", MACHINE)
    else:
        given = bool(getattr(config.accelerator_config, "non_blocking", False))
        choices["non_blocking"] = ResolvedDefault("non_blocking", given, "as given", given=True)

    if _still_unset(config, "disable_tqdm") and not config.disable_tqdm and not terminal:
        config.disable_tqdm = True
        choices["disable_tqdm"] = ResolvedDefault(
            "disable_tqdm",
            True,
            "stderr is not a terminal: each log a line of its own (transformers' PrinterCallback), no progress bar "
            "redrawn with carriage returns",
            MACHINE,
        )
    return config, choices
