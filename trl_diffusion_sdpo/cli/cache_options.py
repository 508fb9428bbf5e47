"""``trl-diffusion-sdpo cache``'s options and parser: ``train``'s (:mod:`.train_options`, whose YAML file it reads)
with :class:`CacheArguments`, and the checks of the parsed arguments that need nothing loaded. ``cache --help``
imports this module, not :mod:`.cache`, which encodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from trl import ModelConfig, ScriptArguments

from ..config import DiffusionSDPOConfig
from .argument_checks import LATENT_CACHE_REQUIRED
from .help_topics import FIRST_HELP_OPTIONS
from .parsing import parse_or_exit
from .train_options import ARGUMENT_TYPES, DiffusionScriptArguments, check_supported, make_parser, train_topics

__all__ = ["CacheArguments", "make_cache_parser", "parse_cache_args"]


@dataclass
class CacheArguments:
    """Options of ``trl-diffusion-sdpo cache`` beside the ``train`` command's (whose YAML file it reads)."""

    cache_chunk_size: int = field(
        default=1000, metadata={"help": "Source rows per chunk: one shard file, and the unit a resumed run redoes."}
    )
    cache_batch_size: int = field(default=8, metadata={"help": "Pairs per VAE batch."})


ParsedCacheArguments = tuple[
    ScriptArguments, DiffusionSDPOConfig, ModelConfig, DiffusionScriptArguments, CacheArguments
]

# ``--overwrite`` is train's switch (train_options.OutputArguments), listed under the cache's topic with what it does
# here.
OVERWRITE_HELP = (
    "Replace a cache in --latent_cache built with other settings, or write the cache into a folder holding other "
    "files (both refused otherwise, before the model loads; resuming a cache of the same settings never needs it)."
)


def make_cache_parser():
    """``train``'s parser (:func:`~.train_options.make_parser`) with :class:`CacheArguments` under a topic of their
    own."""
    return make_parser(
        "trl-diffusion-sdpo cache",
        (*ARGUMENT_TYPES, CacheArguments),
        "Encode a preference dataset into a sharded, resumable latent cache (--latent_cache FOLDER), one shard per "
        "process under accelerate launch, from the training YAML (--config) and flags.",
        "",
        lambda: [
            ("Cache", "", {**dict.fromkeys(f.name for f in fields(CacheArguments)), "overwrite": OVERWRITE_HELP}),
            *train_topics(),
        ],
        # its help: the cache's own options and the folder it writes, beside the first run's
        first_help=(*FIRST_HELP_OPTIONS, *(f.name for f in fields(CacheArguments)), "latent_cache"),
    )


def parse_cache_args(argv: Sequence[str] | None = None) -> ParsedCacheArguments:
    """``argv`` (the ``train`` command's options plus :class:`CacheArguments`) as the five argument dataclasses, a
    pipeline and a dataset named and ``--latent_cache`` given (exits on ``--help`` and with a usage error)."""
    parser = make_cache_parser()
    script_args, args, model_args, diffusion_args, cache_args = parse_or_exit(parser, argv)  # exits on --help
    check_supported(script_args, model_args)
    if not diffusion_args.latent_cache:
        parser.error(LATENT_CACHE_REQUIRED)
    return script_args, args, model_args, diffusion_args, cache_args
