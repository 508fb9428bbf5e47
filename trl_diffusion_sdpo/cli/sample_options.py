"""The prompt-source, sampling and scorer options that ``trl-diffusion-sdpo evaluate`` and ``... pairs`` share: flags
and how the scorer flags are read. Below both commands' parsers (:mod:`.evaluate_options`, :mod:`.pairs_options`), so
that neither imports the other for them; importing nothing heavy (``--help`` lists them). :mod:`.sample` turns the
parsed flags into the sampling keywords when a command runs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config.messages import OVERWRITE_FLAG
from ..io.cpu_threads import THREADS_HELP

__all__ = [
    "add_base_argument",
    "add_sampling_arguments",
    "add_scorer_arg_argument",
    "json_or_text",
    "registered_lists",
    "scorer_arguments",
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
    :func:`~.sample.sampling_keywords`)."""
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


def json_or_text(value: str) -> Any:
    """A ``--scorer_arg`` value: parsed as JSON where it is JSON (numbers, booleans, lists), else the text itself."""
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
