"""Command line: ``trl-diffusion-sdpo train --config x.yaml``, ``trl-diffusion-sdpo cache --config x.yaml``,
``trl-diffusion-sdpo demo --output-dir DIR``, ``trl-diffusion-sdpo evaluate --base MODEL ...`` and
``trl-diffusion-sdpo export --lora DIR --base MODEL ...``, ``trl-diffusion-sdpo pairs --base MODEL ...`` (also
``python -m trl_diffusion_sdpo ...``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["build_parser", "main"]


def build_parser(evaluate_choices: tuple[list[str], list[str]] | None = None) -> argparse.ArgumentParser:
    """The command-line parser. ``evaluate_choices``: the registered scorers and prompt presets that ``evaluate
    --help`` lists (read from the evaluation package only when that command runs, see :func:`main`)."""
    parser = argparse.ArgumentParser(
        prog="trl-diffusion-sdpo",
        description="Preference tuning of text-to-image diffusion models with Diffusion-DPO and Diffusion-SDPO.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Its arguments are TRL's TrlParser's (see main and trl_diffusion_sdpo.scripts.train).
    add_forwarded_command(
        commands,
        "train",
        "Train Diffusion-DPO / Diffusion-SDPO from a YAML config and flags (`train --help` lists them).",
    )
    from .demo.cli import DESCRIPTION, add_demo_arguments

    demo = commands.add_parser(
        "demo",
        help="CPU demo: Diffusion-DPO and Diffusion-SDPO's safeguards from a tiny shipped model over several seeds, "
        "with 95%% intervals (minutes, offline).",
        description=DESCRIPTION,
    )
    add_demo_arguments(demo)
    add_evaluate_parser(commands, *(evaluate_choices or ([], [])))
    # Its own parser (trl_diffusion_sdpo.io.export) takes its arguments.
    add_forwarded_command(
        commands,
        "export",
        "Write a trained LoRA for AUTOMATIC1111/Forge, ComfyUI and kohya tools, or merge it into its base pipeline "
        "(--help for every option).",
    )
    from .pairs_cli import add_pairs_parser

    add_pairs_parser(commands, *(evaluate_choices or ([], [])))
    # Its own parser (the training config's fields) takes its arguments.
    add_forwarded_command(
        commands,
        "cache",
        "Encode a preference dataset into a sharded, resumable latent cache, one shard per process under accelerate "
        "launch (--config x.yaml: the training YAML; --help for every option).",
    )
    return parser


def add_forwarded_command(commands, name: str, help: str) -> None:
    """A subcommand listed in ``--help`` whose arguments another parser takes: :func:`main` hands everything after
    ``name`` to it before this parser runs, so this one adds no ``-h`` of its own (``name --help`` reaches the
    command's parser)."""
    commands.add_parser(name, add_help=False, help=help)


def add_evaluate_parser(
    commands, scorers: list[str] | None = None, presets: list[str] | None = None
) -> argparse.ArgumentParser:
    """The ``evaluate`` subcommand: generate, score and compare a base model and its variants. ``scorers`` and
    ``presets`` (the registry's names) are listed in its help."""
    listed = f"registered: {', '.join(scorers)}; " if scorers else ""
    presets_listed = ", ".join(presets) if presets else "a registered name"
    evaluate = commands.add_parser(
        "evaluate",
        help="Generate images for a prompt set from a base model and its variants, score them, compare.",
        description=(
            "Sample every model on the prompt set with the SDPO authors' protocol (Euler, 50 steps, guidance 8.5, "
            "native resolution, seed-0 noise for every prompt; images cached), score them, and write scores.csv, "
            "summary.csv/json (means with bootstrap 95% intervals), win_rates.csv/json, plots/ and grid.png. "
            "Models of every family: SD1.x/2.x and SDXL UNets, SD3/SD3.5 and FLUX.1 transformers (LoRA folders, "
            "full-tuning outputs with unet/ or transformer/, or whole pipelines)."
        ),
    )
    evaluate.add_argument("--base", required=True, help="Base pipeline: Hub id or local folder.")
    evaluate.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="A variant: LoRA folder/file, a full-tuning output (pipeline folder, or a folder with "
        "unet/ or transformer/), a UNet or transformer folder, Hub id, or .pth UNet state dict "
        "(repeatable).",
    )
    evaluate.add_argument(
        "--prompts",
        default="partiprompts",
        help=f"Preset ({presets_listed}), a .txt file, or a dataset id/folder (default: %(default)s).",
    )
    evaluate.add_argument(
        "--scorer",
        action="append",
        default=None,
        metavar="NAME",
        help=f"Scorer ({listed}repeatable; default: pickscore).",
    )
    evaluate.add_argument(
        "--scorer-arg",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="Argument of a scorer, e.g. pickscore.model=/path (VALUE parsed as JSON if it can be).",
    )
    evaluate.add_argument("--output-dir", default="evaluation", help="Output folder (default: %(default)s).")
    evaluate.add_argument(
        "--seed", type=int, action="append", default=None, help="Noise seed (repeatable; default 0)."
    )
    evaluate.add_argument("--bootstrap-resamples", type=int, default=1000, help="Bootstrap resamples.")
    add_sampling_arguments(evaluate)
    return evaluate


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The prompt-source and sampling flags that ``evaluate`` and ``pairs`` share (read by
    :func:`sampling_keywords`)."""
    parser.add_argument("--prompt-column", default=None, help="Prompt column of a dataset.")
    parser.add_argument("--prompt-split", default=None, help="Split of a dataset.")
    parser.add_argument("--prompt-path", default=None, help="Read a preset from this local copy.")
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N prompts.")
    parser.add_argument("--cache-dir", default=None, help="Image cache (default: OUTPUT_DIR/images).")
    parser.add_argument("--steps", type=int, default=50, help="Inference steps (default: %(default)s).")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=8.5,
        help="diffusers guidance; 8.5 equals the authors' eps_c + 7.5 (eps_c - eps_u) (default: %(default)s).",
    )
    parser.add_argument(
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
    parser.add_argument("--batch-size", type=int, default=1, help="Prompts per pipeline call.")
    parser.add_argument("--score-batch-size", type=int, default=16, help="Images per scorer call.")
    parser.add_argument("--device", default=None, help="Device (default: cuda if available, else cpu).")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")


def sampling_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords that :func:`add_sampling_arguments`' flags set, named as :func:`~.evaluation.evaluate` and
    :func:`~.evaluation.pairs.make_pairs` both take them: the generation settings, the prompt-loading options, the
    batch sizes, the image cache, the device and the progress bars."""
    from .evaluation import GenerationSettings

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
    }


def scorer_arguments(items: list[str], scorers: list[str]) -> dict[str, dict]:
    """``--scorer-arg NAME.KEY=VALUE`` flags as ``{NAME: {KEY: VALUE}}`` (VALUE parsed as JSON if it can be), for
    ``evaluate`` and ``pairs`` alike: a flag for a scorer the command does not run is refused, not ignored."""
    import json

    kwargs: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, argument = key.rpartition(".")
        if not sep or not dot or not name or not argument:
            raise SystemExit(f"--scorer-arg {item!r} should read NAME.KEY=VALUE.")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        kwargs.setdefault(name, {})[argument] = parsed
    unknown = sorted(set(kwargs) - set(scorers))
    if unknown:
        raise SystemExit(f"--scorer-arg names {unknown}, but the scorers are {scorers}.")
    return kwargs


def run_evaluate(args: argparse.Namespace) -> int:
    from .demo import scorer as _demo_scorer  # noqa: F401  registers the demo's ``colour`` scorer
    from .evaluation import evaluate

    scorers = args.scorer or ["pickscore"]
    result = evaluate(
        args.base,
        args.model,
        prompts=args.prompts,
        scorers=scorers,
        output_dir=args.output_dir,
        seeds=args.seed or [0],
        scorer_kwargs=scorer_arguments(args.scorer_arg, scorers),
        n_resamples=args.bootstrap_resamples,
        **sampling_keywords(args),
    )
    for row in result.summary:
        print(f"{row.model:>16} {row.metric:>12} {row.mean:.4f} [{row.ci_low:.4f}, {row.ci_high:.4f}] ({row.scale})")
    for row in result.win_rates:
        print(f"{row.model} vs {row.opponent} [{row.metric}]: win rate {row.win_rate:.3f} over {row.n}")
    print(f"Results in {args.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from .scripts.train import main as train

        train(argv[1:])
        return 0
    if argv[:1] == ["cache"]:
        from .cache_cli import run_cache

        return run_cache(argv[1:])
    if argv[:1] == ["export"]:
        from .io.export import build_export_parser, run_export

        return run_export(build_export_parser().parse_args(argv[1:]))
    evaluate_choices = None
    if argv[:1] in (["evaluate"], ["pairs"]):  # the evaluation package is imported only for the commands using it
        from .evaluation.prompts import PROMPT_PRESETS
        from .evaluation.scorers import available_scorers

        evaluate_choices = (available_scorers(), list(PROMPT_PRESETS))
    args = build_parser(evaluate_choices).parse_args(argv)
    if args.command == "demo":
        from .demo.cli import run_from_args

        return run_from_args(args)
    if args.command == "evaluate":
        return run_evaluate(args)
    if args.command == "pairs":
        from .pairs_cli import run_pairs

        return run_pairs(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
