"""The prompt-source, sampling and scorer options that ``trl-diffusion-sdpo evaluate`` and ``... pairs`` share: flags
and how they become keywords. Below both commands' modules (:mod:`.main`, :mod:`.pairs`), so that neither imports
the other for them."""

from __future__ import annotations

import argparse
from typing import Any

from ..config.messages import OVERWRITE_FLAG
from ..io.cpu_threads import THREADS_HELP, apply_threads

__all__ = [
    "add_base_argument",
    "add_sampling_arguments",
    "add_scorer_arg_argument",
    "command_sampling_keywords",
    "json_or_text",
    "registered_lists",
    "scorer_arguments",
    "start_sampling_command",
]


def registered_lists(scorers: list[str] | None, presets: list[str] | None) -> tuple[str, str]:
    """The registered scorers (``"registered: a, b; "``, or nothing) and prompt presets (``"a, b"``) as the help of
    ``evaluate`` and ``pairs`` lists them in ``--scorer`` and ``--prompts``."""
    listed = f"registered: {', '.join(scorers)}; " if scorers else ""
    return listed, ", ".join(presets) if presets else "a registered name"


def add_base_argument(parser: argparse.ArgumentParser) -> None:
    """``--base``: the pipeline that ``evaluate`` and ``pairs`` sample (a LoRA or a tuned denoiser goes on it)."""
    parser.add_argument("--base", required=True, help="Base pipeline: Hub id or local folder.")


def add_scorer_arg_argument(parser: argparse.ArgumentParser, metavar: str, help: str) -> None:
    """``--scorer_arg``, repeatable, its values kept in order as written (``evaluate`` and ``pairs`` read them with
    :func:`scorer_arguments`, ``reward-server`` as KEY=VALUE): ``metavar`` and ``help`` say which form."""
    parser.add_argument("--scorer_arg", "--scorer-arg", action="append", default=[], metavar=metavar, help=help)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The prompt-source and sampling flags that ``evaluate`` and ``pairs`` share (read by
    :func:`sampling_keywords`)."""
    parser.add_argument("--prompt_column", "--prompt-column", default=None, help="Prompt column of a dataset.")
    parser.add_argument("--prompt_split", "--prompt-split", default=None, help="Split of a dataset.")
    parser.add_argument("--prompt_path", "--prompt-path", default=None, help="Read a preset from this local copy.")
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N prompts.")
    parser.add_argument("--cache_dir", "--cache-dir", default=None, help="Image cache (default: OUTPUT_DIR/images).")
    parser.add_argument("--steps", type=int, default=50, help="Inference steps (default: %(default)s).")
    parser.add_argument(
        "--guidance_scale",
        "--guidance-scale",
        type=float,
        default=8.5,
        help="diffusers guidance; 8.5 equals the authors' eps_c + 7.5 (eps_c - eps_u) (default: %(default)s).",
    )
    parser.add_argument(
        "--true_cfg_scale",
        "--true-cfg-scale",
        type=float,
        default=None,
        help="Classifier-free guidance of pipelines that take true_cfg_scale (Qwen-Image, FLUX.1; default: the "
        "pipeline's, 4.0 for Qwen-Image).",
    )
    parser.add_argument("--resolution", type=int, default=None, help="Image size (default: the model's native).")
    parser.add_argument(
        "--scheduler", choices=("euler", "model"), default="euler", help="Sampler (default: %(default)s)."
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="Generation dtype (default: %(default)s).",
    )
    parser.add_argument("--batch_size", "--batch-size", type=int, default=1, help="Prompts per pipeline call.")
    parser.add_argument(
        "--score_batch_size", "--score-batch-size", type=int, default=16, help="Images per scorer call."
    )
    parser.add_argument("--device", default=None, help="Device (default: cuda if available, else cpu).")
    # train's option (io/cpu_threads.py decides its default and help): the command's process samples with it
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument(
        "--no_progress",
        "--no-progress",
        action="store_true",
        help="Hide progress bars: a log line per model and batch instead (as off a terminal).",
    )
    parser.add_argument(
        OVERWRITE_FLAG,
        action="store_true",
        help="Replace what an earlier run wrote in --output_dir (refused otherwise); its cached images are reused.",
    )


def sampling_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords that :func:`add_sampling_arguments`' flags set, named as :func:`~.evaluation.evaluate` and
    :func:`~.evaluation.pairs.make_pairs` both take them: the generation settings, the prompt-loading options, the
    batch sizes, the image cache, the device and the progress bars."""
    from ..evaluation import GenerationSettings

    settings = GenerationSettings(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        scheduler=args.scheduler,
        dtype=args.dtype,
        true_cfg_scale=args.true_cfg_scale,
    )
    options = {"column": args.prompt_column, "split": args.prompt_split, "path": args.prompt_path, "limit": args.limit}
    return {
        "settings": settings,
        "prompt_kwargs": {k: v for k, v in options.items() if v is not None},
        "batch_size": args.batch_size,
        "score_batch_size": args.score_batch_size,
        "cache_dir": args.cache_dir,
        "device": args.device,
        "progress": not args.no_progress,
        "overwrite": args.overwrite,
    }


def start_sampling_command(args: argparse.Namespace) -> None:
    """What ``evaluate`` and ``pairs`` set for their own process before loading anything, as ``train`` does: the
    package's INFO messages (the progress lines) on stderr, and ``--threads`` torch threads when it samples on the
    CPU (:func:`~trl_diffusion_sdpo.io.cpu_threads.apply_threads`; a GPU run leaves them alone)."""
    from ..rewards.scorers.base import resolve_device
    from .console import log_to_console

    log_to_console()
    apply_threads(args.threads, on_cpu=resolve_device(args.device).type == "cpu")


def command_sampling_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`sampling_keywords` with ``--prompts`` and ``--output_dir``, which both commands declare, as a command
    passes them: off a terminal (a log file) the command's own bars are off, as the libraries' are (the command line's
    entry, :func:`~trl_diffusion_sdpo.cli.console.quiet_command_line`), so that a log file gets no bars redrawn with
    carriage returns."""
    from ..io.console import on_terminal

    keywords = {"prompts": args.prompts, "output_dir": args.output_dir, **sampling_keywords(args)}
    if not on_terminal():
        keywords["progress"] = False
    return keywords


def json_or_text(value: str) -> Any:
    """A ``--scorer_arg`` value: parsed as JSON where it is JSON (numbers, booleans, lists), else the text itself."""
    import json

    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def scorer_arguments(items: list[str], scorers: list[str]) -> dict[str, dict]:
    """``--scorer_arg NAME.KEY=VALUE`` flags as ``{NAME: {KEY: VALUE}}`` (VALUE parsed as JSON if it can be), for
    ``evaluate`` and ``pairs`` alike: a flag for a scorer the command does not run is refused, not ignored."""
    kwargs: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, argument = key.rpartition(".")
        if not sep or not dot or not name or not argument:
            raise SystemExit(f"--scorer_arg {item!r} should read NAME.KEY=VALUE.")
        kwargs.setdefault(name, {})[argument] = json_or_text(value)
    unknown = sorted(set(kwargs) - set(scorers))
    if unknown:
        raise SystemExit(f"--scorer_arg names {unknown}, but the scorers are {scorers}.")
    return kwargs
