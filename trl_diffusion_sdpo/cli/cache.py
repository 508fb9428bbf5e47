"""``trl-diffusion-sdpo cache --config x.yaml``: encode a preference dataset into a sharded latent cache.

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml --num_processes 8 \
        -m trl_diffusion_sdpo cache --config examples/configs/sd15_lora.yaml --latent_cache /data/sd15-latents

Every process encodes its own shard (see :mod:`.data.sharded_cache`); run the same command again to resume an
interrupted run. The arguments are the ``train`` command's (:mod:`.train`), so the training YAML file serves
both: the model, dataset and transform settings are read from it, and what only training uses (LoRA, optimizer) is
parsed and unused. Train from the result with ``trl-diffusion-sdpo train ... --latent_cache FOLDER``, or
``train_dataset=load_sharded_latent_cache(folder)``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields

__all__ = ["CacheArguments", "make_cache_parser", "run_cache"]


@dataclass
class CacheArguments:
    """Options of ``trl-diffusion-sdpo cache`` beside the ``train`` command's (whose YAML file it reads)."""

    cache_chunk_size: int = field(
        default=1000, metadata={"help": "Source rows per chunk: one shard file, and the unit a resumed run redoes."}
    )
    cache_batch_size: int = field(default=8, metadata={"help": "Pairs per VAE batch."})


# ``--overwrite`` is train's switch (cli.train.OutputArguments), listed under the cache's topic with what it does here.
OVERWRITE_HELP = (
    "Replace a cache in --latent_cache built with other settings, or write the cache into a folder holding other "
    "files (both refused otherwise, before the model loads; resuming a cache of the same settings never needs it)."
)


def make_cache_parser():
    """``train``'s parser (:func:`~.train.make_parser`) with :class:`CacheArguments` under a topic of their
    own."""
    from .train import ARGUMENT_TYPES, make_parser, train_topics

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
    )


def run_cache(argv: list[str] | None = None) -> int:
    """``trl-diffusion-sdpo cache``: parse ``argv`` (the ``train`` command's options plus :class:`CacheArguments`)
    and encode this process's shard into ``--latent_cache``; returns the exit status."""
    from .data_options import load_train_split
    from .parsing import parse_or_exit
    from .train import build_pipeline, check_supported

    parser = make_cache_parser()
    script_args, args, model_args, diffusion_args, cache_args = parse_or_exit(parser, argv)  # exits on --help
    import torch
    from accelerate import PartialState

    from ..data.sharded_cache import build_sharded_latent_cache, refuse_other_files
    from ..families import family_for_pipeline

    check_supported(script_args, model_args)
    if not diffusion_args.latent_cache:
        parser.error("--latent_cache FOLDER is required: where the cache is written (or resumed)")
    refuse_other_files(diffusion_args.latent_cache, diffusion_args.overwrite)  # before the model loads
    # The training config has set up the process group as training would (on CPU processes it refused a launch
    # without accelerate's CPU mode); a bare PartialState() would run each CPU process as a lone one.
    device = args.device
    state = PartialState()
    pipeline = build_pipeline(model_args, diffusion_args)
    family = family_for_pipeline(
        pipeline, max_sequence_length=args.max_sequence_length, guidance_scale=args.flux_guidance_scale
    )
    for module in family.frozen_modules().values():  # placed once, not per chunk
        module.to(device=device, dtype=torch.float32)
    dataset = load_train_split(script_args, diffusion_args, args)
    cache = build_sharded_latent_cache(
        dataset,
        args,
        family,
        diffusion_args.latent_cache,
        rank=state.process_index,
        world_size=state.num_processes,
        device=device,
        chunk_size=cache_args.cache_chunk_size,
        batch_size=cache_args.cache_batch_size,
        barrier=state.wait_for_everyone,
        dataset_id={
            "name": script_args.dataset_name,
            "split": script_args.dataset_train_split,
            "streaming": script_args.dataset_streaming,
            "max_rows": diffusion_args.max_train_rows,
        },
        progress=not args.disable_tqdm,
        overwrite=diffusion_args.overwrite,
    )
    if state.is_main_process and cache is not None:
        m = cache.manifest
        print(
            f"Latent cache in {diffusion_args.latent_cache}: {m['num_pairs']} pairs from {m['rows_read']} rows "
            f"({m['ties_dropped']} ties, {m['invalid_skipped']} invalid rows dropped) in {len(m['shards'])} shards"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cache())
