"""``trl-diffusion-sdpo estimate-memory --config x.yaml [flags] [--json]``: the per-process peak memory of the run the
same ``train`` arguments describe, before anything loads (:mod:`.memory`).

    trl-diffusion-sdpo estimate-memory --config examples/configs/sdxl_full.yaml --engine zero2 --num_processes 8
    trl-diffusion-sdpo estimate-memory --config examples/configs/qwen_image_lora.yaml --base_quantization quanto-int4
    trl-diffusion-sdpo estimate-memory --config examples/configs/flux2_klein_lora.yaml --gpu 24 --json

The engine and the process count come from ``accelerate launch``, not the training YAML: give them here. An
``online`` command's YAML file (one with ``prompts`` or ``reward_funcs``) is read with that command's options.

The stored option table and model counts answer where they hold the run (:mod:`.option_table`, no transformers or
diffusers); the real parser and the model on the meta device where they do not (:mod:`.memory_parser`,
:mod:`.memory_meta`). Either way the output is :mod:`.memory_report`'s.
"""

from __future__ import annotations

import sys

from ..engines.memory.stored import NotStored, stored_model_sizes
from .command_parser import REFUSED_OPTIONS
from .memory_report import EstimateArguments, answer, shape
from .option_table import _table, parse_stored

__all__ = ["EstimateArguments", "run_estimate_memory"]


def _stored_answer(argv: list[str]) -> str | None:
    """The command's output for ``argv`` from the stored option table (:mod:`.option_table`) and the known models'
    stored counts (:mod:`~trl_diffusion_sdpo.engines.memory.stored`), nothing of transformers or diffusers imported;
    ``None`` where either lacks what the run needs (the real parser and the model built on the meta device answer
    then)."""
    given = ["--use_cpu", "true", *argv]
    parsed = parse_stored(given)  # None for another command's YAML file: its keys are unknown to train's table
    if parsed is None:
        return None
    _, args, model_args, diffusion_args, estimate_args = parsed
    defaults = {entry["dest"]: entry["default"] for entry in _table()["options"]}
    if (
        model_args.model_name_or_path is None
        or any(getattr(model_args, name) != defaults[name] for name in REFUSED_OPTIONS)
        or model_args.dtype not in (None, "auto", "float32", "bfloat16", "float16")
        or estimate_args.num_processes < 1
        or (estimate_args.gpu is not None and estimate_args.gpu <= 0)
    ):
        return None  # refused: by the real parser's words
    sizes = stored_model_sizes(model_args.model_name_or_path)
    if sizes is None:
        return None
    run = shape(
        args,
        model_args,
        estimate_args,
        sizes.family,
        lora_targets=sizes.counts.family_lora_targets,
        base_quantization=diffusion_args.base_quantization,
        checkpointing=bool(args.activation_checkpointing),
        latent_cache=bool(args.cache_latents or diffusion_args.latent_cache),
    )
    options = {f"--{name}" for name in defaults}
    accepted = lambda flags: parse_stored([*given, *flags]) is not None  # noqa: E731
    try:
        return answer(sizes, run, estimate_args, model_args.model_name_or_path, accepted, options)
    except (NotStored, ValueError):
        return None


def run_estimate_memory(argv: list[str] | None = None, stored: bool = True) -> int:
    """``trl-diffusion-sdpo estimate-memory``: parse ``argv`` and print the estimate; returns the exit status.
    ``stored``: answer from the stored option table and model counts where they hold the run (the same output, in a
    fraction of the time), else with the real parser and the model built on the meta device."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if stored:
        found = _stored_answer(argv)
        if found is not None:
            print(found)
            return 0
    # Chosen here, where the stored tables lack the run: the real parser imports transformers (and exits on --help),
    # the model on the meta device diffusers; the stored answer does without both.
    from .memory_parser import parse_for_estimate

    parsed = parse_for_estimate(argv)
    from .memory_meta import estimate_on_meta  # past the parser's --help: the meta-device model, chosen at run time

    return estimate_on_meta(parsed)


if __name__ == "__main__":
    sys.exit(run_estimate_memory())
