"""``trl-diffusion-sdpo demo``'s run: the demo (or ``--pretrain``) as its parsed options say. The options, the parser
and the entry points are :mod:`.demo`'s, which loads this module through the command registry once the process is
quieted and the options are read."""

from __future__ import annotations

import argparse

from ..demo.pretrain import PretrainRecipe
from ..demo.recipe import DemoRecipe
from ..demo.run import run_demo, run_pretrain

__all__ = ["run_from_args"]


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo (or ``--pretrain``) as the parsed options say; the exit status. Changes no setting of another
    library: the command line quiets its own process before it calls this (:func:`~.demo.command`, the ``python -m``
    entry, and ``trl-diffusion-sdpo demo``, through :func:`~trl_diffusion_sdpo.cli.console.quiet_command_line`)."""
    threads = getattr(args, "threads", 1) or None
    if getattr(args, "pretrain", False):
        recipe = PretrainRecipe.tiny() if args.quick else PretrainRecipe()
        report = run_pretrain(args.output_dir, recipe, threads=threads, overwrite=getattr(args, "overwrite", False))
        # Rebuilding the shipped recipe claims to reproduce the shipped base: a failed check is an error.
        return 1 if report["strict"] and not report["check"]["passed"] else 0
    overrides = {"threads": threads}
    if getattr(args, "seeds", None):
        overrides["seeds"] = tuple(args.seeds)
    if getattr(args, "methods", None):
        overrides["methods"] = tuple(args.methods)
    if getattr(args, "no_breaking_regime", False):
        overrides["breaking"] = None
    size = DemoRecipe.quick if args.quick else DemoRecipe.full if getattr(args, "full", False) else DemoRecipe
    recipe = size(seed=args.seed, **overrides)
    run_demo(
        args.output_dir,
        recipe,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        overwrite=getattr(args, "overwrite", False),
    )
    return 0
