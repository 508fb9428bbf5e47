"""``trl-diffusion-sdpo cache --config x.yaml``: encode a preference dataset into a sharded latent cache.

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml --num_processes 8 \
        -m trl_diffusion_sdpo cache --config examples/configs/sd15_lora.yaml --latent_cache /data/sd15-latents

Every process encodes its own shard (see :mod:`.data.sharded_cache`); run the same command again to resume an
interrupted run. The arguments are the ``train`` command's (:mod:`.cache_options`), so the training YAML file serves
both: the model, dataset and transform settings are read from it, and what only training uses (LoRA, optimizer) is
parsed and unused. Train from the result with ``trl-diffusion-sdpo train ... --latent_cache FOLDER``, or
``train_dataset=load_sharded_latent_cache(folder)``.
"""

from __future__ import annotations

import sys

import torch
from accelerate import PartialState

from ..data.sharded_cache import build_sharded_latent_cache, refuse_other_files
from ..families import family_for_pipeline
from .cache_options import CacheArguments, ParsedCacheArguments, make_cache_parser, parse_cache_args
from .data_options import load_train_split
from .model_loading import build_pipeline

__all__ = ["CacheArguments", "build_cache", "make_cache_parser", "run_cache"]


def run_cache(argv: list[str] | None = None) -> int:
    """``trl-diffusion-sdpo cache``: parse ``argv`` (the ``train`` command's options plus :class:`CacheArguments`)
    and encode this process's shard into ``--latent_cache``; returns the exit status."""
    return build_cache(parse_cache_args(argv))


def build_cache(arguments: ParsedCacheArguments) -> int:
    """Encode this process's shard into ``--latent_cache`` as the parsed ``arguments`` say
    (:func:`~.cache_options.parse_cache_args`; the command registry's runner); returns the exit status."""
    script_args, args, model_args, diffusion_args, cache_args = arguments
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
