"""The core a first upstream pull request would take, by part: docs/design.md's table names the same modules
(tests/docs/test_core_list.py) and benchmarks/tools/reviewer_figures.py counts their lines."""

from __future__ import annotations

#: by part: a trainer on transformers.Trainer running Diffusion-DPO and the output-space safeguard on the SD, SDXL, SD3
#: and FLUX.1 families, with its config, data, probe, alarm, EMA and saving; everything else sits on top of it
CORE: dict[str, tuple[str, ...]] = {
    "trainer": ("__init__.py", "trainer.py"),
    "config": tuple(
        f"config/{name}.py"
        for name in (
            "__init__",
            "_lazy",
            "checks",
            "defaults",
            "fields",
            "file_modes",
            "messages",
            "pathology",
            "rules",
        )
    ),
    "Diffusion-DPO objective": (
        "objectives/__init__.py",
        "objectives/base.py",
        "objectives/dpo.py",
        "objectives/masks.py",
    ),
    "the step": ("step/__init__.py", "step/stages.py", "step/predictions.py", "step/frozen_reference.py"),
    "output-space safeguard": (
        "safeguards/__init__.py",
        "safeguards/base.py",
        "safeguards/output.py",
        "safeguards/margin.py",
    ),
    "engines (one process, DDP)": ("engines/__init__.py", "engines/base.py", "engines/plain.py"),
    "SD, SDXL, SD3, FLUX.1 families": tuple(
        f"families/{name}.py"
        for name in (
            "__init__",
            "base",
            "registry",
            "loading",
            "preparation",
            "noising",
            "masks",
            "reference_copy",
            "flow",
            "sd",
            "sdxl",
            "sd3",
            "flux",
        )
    ),
    "data": tuple(
        f"data/{name}.py"
        for name in (
            "__init__",
            "errors",
            "names",
            "columns",
            "formats",
            "pickapic",
            "validation",
            "image_files",
            "transforms",
            "random_crop",
            "collators",
            "placeholder",
            "preparation",
            "streamed",
            "training_data",
            "progress",
        )
    ),
    "probe, alarm, EMA": (
        "callbacks/__init__.py",
        "callbacks/probe.py",
        "callbacks/alarm.py",
        "callbacks/probe_signal.py",
        "callbacks/health.py",
        "callbacks/guards.py",
        "callbacks/pathology_acts.py",
        "callbacks/early_stopping.py",
        "callbacks/ema.py",
        "callbacks/interruptions.py",
        "callbacks/preemption.py",
        "callbacks/state_files.py",
    ),
    "saving": (
        "io/__init__.py",
        "io/run_files.py",
        "io/saving.py",
        "io/checkpoints.py",
        "io/checkpoint_writing.py",
        "io/hub.py",
        "io/console.py",
        "io/run_summary.py",
    ),
}

#: the package lines a run on the tiny SD pipeline with LoRA may load, per scenario of
#: benchmarks/tools/loaded_modules.py (``dpo``: plain Diffusion-DPO; ``parameter``: the exact rule), which records
#: them beside its figures; tests/docs/test_imports.py holds the plain run to its limit
LOADED_LINES_LIMITS: dict[str, int] = {"dpo": 10_000, "parameter": 12_500}
