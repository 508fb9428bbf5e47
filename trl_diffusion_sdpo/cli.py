"""Command line: ``trl-diffusion-sdpo demo --output-dir DIR`` (also ``python -m trl_diffusion_sdpo demo``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-diffusion-sdpo",
        description="Preference tuning of text-to-image diffusion models with Diffusion-DPO and Diffusion-SDPO.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="CPU demo: Diffusion-DPO's pathology and Diffusion-SDPO's safeguard on a tiny model (minutes, offline).",
        description=(
            "Pretrain a tiny text-to-image latent diffusion model on coloured shapes (cached after the first run), "
            "sample preference pairs ranked by colour agreement with the caption, train Diffusion-DPO and "
            "Diffusion-SDPO from the same base, and write summary.json, losses.png, lambda.png and samples.png."
        ),
    )
    demo.add_argument("--output-dir", default="demo-output", help="Where the figures and summary go (default: "
                      "%(default)s).")
    demo.add_argument("--quick", action="store_true", help="A seconds-long smoke run with few steps (for tests; its "
                      "numbers mean nothing).")
    demo.add_argument("--seed", type=int, default=0, help="Seed of everything: base model, pairs, training, sampling.")
    demo.add_argument("--cache-dir", default=None, help="Cache folder of pretrained base models (default: "
                      "${XDG_CACHE_HOME:-~/.cache}/trl-diffusion-sdpo/demo).")
    demo.add_argument("--no-cache", action="store_true", help="Pretrain the base model even if cached, and do not "
                      "cache it.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        # Quiet the libraries' warnings before the demo's imports (diffusers' pipelines warn about optional
        # packages on import); the demo shows its own progress.
        import diffusers
        import transformers

        transformers.logging.set_verbosity_error()
        diffusers.logging.set_verbosity_error()
        from .demo.run import DemoRecipe, quiet_libraries, run_demo

        recipe = DemoRecipe.quick(seed=args.seed) if args.quick else DemoRecipe(seed=args.seed)
        with quiet_libraries():
            run_demo(args.output_dir, recipe, cache_dir=args.cache_dir, use_cache=not args.no_cache)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
