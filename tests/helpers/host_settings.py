"""What the package may not change in its host process, read from the libraries' public switches, and a tiny run
that prints its trainer's progress, for the tests that run them in a fresh interpreter.

    python -m tests.helpers.host_settings settings OUT.json [STEPS [FD]]  # snapshot, import all, train, snapshot
    python -m tests.helpers.host_settings train STEPS                     # a tiny trainer.train() of STEPS steps

``settings`` with a terminal's file descriptor ``FD`` (a pseudo-terminal the caller reads) also forks, once the
libraries and every module of the package are imported (its settings read before those imports), a process that
trains ``STEPS`` steps with its stdin, stdout and stderr on that terminal: the ``train`` run in a fresh interpreter,
but for the imports a user's script makes first (and the package's other modules, whose imports change no setting:
the report's ``changed``); its exit status goes into the report as ``terminal_status``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pkgutil
import sys
import tempfile
from typing import Any

from tests.helpers.forking import run_forked

#: the libraries whose loggers (every logger under these names) the package must leave as it found them
LIBRARIES = ("transformers", "diffusers", "huggingface_hub", "datasets", "torch", "accelerate", "peft")
#: the state of a logger nobody configured: what a logger first created by an import must still have
PRISTINE = {"level": logging.NOTSET, "disabled": False, "propagate": True, "filters": [], "handlers": []}


def _logger_state(logger: logging.Logger) -> dict[str, Any]:
    return {
        "level": logger.level,
        "disabled": logger.disabled,
        "propagate": logger.propagate,
        "filters": [f"{type(f).__module__}.{type(f).__qualname__}@{id(f)}" for f in logger.filters],
        "handlers": [f"{type(h).__module__}.{type(h).__qualname__}@{id(h)}:{h.level}" for h in logger.handlers],
    }


def library_settings() -> dict[str, Any]:
    """The switches, verbosities and loggers of :data:`LIBRARIES`, and diffusers' pipeline class attribute."""
    import datasets
    import diffusers
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    loggers = {
        name: _logger_state(logger)
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and name.split(".")[0] in LIBRARIES
    }
    return {
        "switches": {
            "diffusers progress bars": diffusers.utils.logging.is_progress_bar_enabled(),
            "transformers progress bars": transformers.utils.logging.is_progress_bar_enabled(),
            "huggingface_hub progress bars disabled": huggingface_hub.utils.are_progress_bars_disabled(),
            "datasets progress bars": datasets.is_progress_bar_enabled(),
            "diffusers verbosity": diffusers.utils.logging.get_verbosity(),
            "transformers verbosity": transformers.utils.logging.get_verbosity(),
            "datasets verbosity": datasets.logging.get_verbosity(),
            "DiffusionPipeline._progress_bar_config": repr(
                vars(diffusers.DiffusionPipeline).get("_progress_bar_config")
            ),
        },
        "loggers": loggers,
    }


def changed_settings(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Each switch or logger that differs. A logger created since ``before`` must be as nobody configured it, but for
    what its own library sets on every logger it makes (diffusers' rank-zero filter)."""
    changed = [
        f"{name}: {before['switches'][name]!r} -> {value!r}"
        for name, value in after["switches"].items()
        if before["switches"][name] != value
    ]
    for name, state in after["loggers"].items():
        was = before["loggers"].get(name)
        if was is None:
            own = f"{name.split('.')[0]}."
            state = {key: [v for v in value if not v.startswith(own)] if isinstance(value, list) else value
                     for key, value in state.items()}  # fmt: skip
            was = PRISTINE
        changed += [f"logger {name}.{key}: {was[key]!r} -> {state[key]!r}" for key in state if state[key] != was[key]]
    return changed


def import_every_module() -> list[str]:
    """Import each module of the package; the modules an optional extra that is not installed keeps out."""
    import trl_diffusion_sdpo

    skipped = []
    for module in pkgutil.walk_packages(trl_diffusion_sdpo.__path__, "trl_diffusion_sdpo."):
        if module.name.endswith(".__main__"):
            continue  # running it is the command line
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError as missing:
            if (missing.name or "").startswith("trl_diffusion_sdpo"):
                raise
            skipped.append(f"{module.name} ({missing.name})")
    return skipped


def tiny_trainer(output_dir: str, steps: int, **overrides: Any):
    """A LoRA trainer on the tiny SD pipeline and six coloured pairs, logging every step; the config leaves
    ``disable_tqdm`` unset, as a user's does."""
    from datasets import Dataset

    from tests.helpers.common import lora_config, pickapic_rows
    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    pipeline = build_tiny_sd_pipeline(seed=0, tokenizer_dir=f"{output_dir}/tokenizer")
    config = DiffusionSDPOConfig(
        output_dir=f"{output_dir}/out",
        resolution=32,
        per_device_train_batch_size=2,
        max_steps=steps,
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        seed=0,
        **overrides,
    )
    pairs = Dataset.from_list(pickapic_rows(6))
    return DiffusionSDPOTrainer(pipeline, args=config, train_dataset=pairs, peft_config=lora_config())


def train_on_a_terminal(terminal: int, steps: int) -> int:
    """A tiny ``trainer.train()`` of ``steps`` steps in a forked process whose stdin, stdout and stderr are the
    terminal ``terminal`` (a file descriptor, closed here once the process is forked); its exit status."""

    def on_the_terminal() -> None:
        for standard in (0, 1, 2):
            os.dup2(terminal, standard)
        os.close(terminal)
        with tempfile.TemporaryDirectory() as folder:
            tiny_trainer(folder, steps=steps).train()

    status = run_forked(on_the_terminal)
    os.close(terminal)
    return os.waitstatus_to_exitcode(status)


def settings_around_a_run(out: str, steps: int = 1, terminal: int | None = None) -> None:
    # The libraries first, as a user's script imports them: what they set up themselves is theirs.
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import diffusers  # noqa: F401
    import huggingface_hub  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    before = library_settings()
    skipped = import_every_module()
    # its own process, forked once the package's modules are imported (a run's imports then cost nothing) and ended
    # before this one trains; nothing it does reaches this process's settings
    terminal_status = None if terminal is None else train_on_a_terminal(terminal, steps)
    with tempfile.TemporaryDirectory() as folder:
        trainer = tiny_trainer(folder, steps=steps)
        given = trainer.args_as_given
        caller = {name: getattr(given, name) for name in ("disable_tqdm", "dataloader_num_workers", "learning_rate")}
        trainer.train()
        caller_after = {name: getattr(given, name) for name in caller}
    after = library_settings()
    with open(out, "w") as file:
        json.dump(
            {
                "changed": changed_settings(before, after),
                "skipped": skipped,
                "caller": [caller, caller_after],
                "terminal_status": terminal_status,
            },
            file,
        )


if __name__ == "__main__":
    if sys.argv[1] == "settings":
        settings_around_a_run(*sys.argv[2:3], *map(int, sys.argv[3:5]))
    else:
        with tempfile.TemporaryDirectory() as folder:
            tiny_trainer(folder, steps=int(sys.argv[2])).train()
