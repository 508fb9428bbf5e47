"""``trl-diffusion-sdpo cache --config x.yaml``: encode a preference dataset into a sharded latent cache.

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml --num_processes 8 \
        -m trl_diffusion_sdpo cache --config examples/configs/sd15_lora.yaml --latent_cache /data/sd15-latents

Every process encodes its own shard (see :mod:`.data.sharded_cache`); run the same command again to resume an
interrupted run. The YAML file is the training one: the model, dataset and transform settings are read from it, and
keys only training uses (LoRA, optimizer) are ignored. Train from the result with ``--latent_cache`` in the example
scripts, or ``train_dataset=load_sharded_latent_cache(folder)``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

__all__ = ["CacheArguments", "run_cache"]


@dataclass
class CacheArguments:
    """What to encode and where; the names match the example scripts' so one YAML file serves both."""

    model_name_or_path: str = field(metadata={"help": "Pipeline folder or Hub id."})
    dataset_name: str = field(metadata={"help": "Hub id, local data folder, or a folder written by save_to_disk."})
    latent_cache: str = field(metadata={"help": "Folder of the cache (created, or resumed)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to encode."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of loading it."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Encode only the first N rows."})
    weights_dtype: str = field(default="float32", metadata={"help": "dtype the pipeline is loaded in."})
    cache_chunk_size: int = field(
        default=1000, metadata={"help": "Source rows per chunk: one shard file, and the unit a resumed run redoes."}
    )
    cache_batch_size: int = field(default=8, metadata={"help": "Pairs per VAE batch."})


def run_cache(argv: list[str] | None = None) -> int:
    import torch
    from accelerate import PartialState
    from trl import TrlParser

    from .config import DiffusionSDPOConfig
    from .data.preference import load_preference_dataset
    from .data.sharded_cache import build_sharded_latent_cache
    from .distributed import load_pipeline
    from .families import family_for_pipeline

    parser = TrlParser((CacheArguments, DiffusionSDPOConfig), prog="trl-diffusion-sdpo cache")
    # Keys of the YAML file that only training reads (LoRA settings, ...) are ignored; unknown flags are not.
    cache_args, args, _yaml_only, unknown = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # The training config sets up the process group as training would (gloo for several CPU processes); a bare
    # PartialState() would run each CPU process as a lone one.
    device = args.device
    state = PartialState()
    pipeline = load_pipeline(cache_args.model_name_or_path, torch_dtype=getattr(torch, cache_args.weights_dtype))
    family = family_for_pipeline(pipeline)
    for module in family.frozen_modules().values():  # placed once, not per chunk
        module.to(device=device, dtype=torch.float32)
    dataset = load_preference_dataset(
        cache_args.dataset_name, cache_args.dataset_train_split, cache_args.streaming, cache_args.max_train_rows
    )
    cache = build_sharded_latent_cache(
        dataset,
        args,
        family,
        cache_args.latent_cache,
        rank=state.process_index,
        world_size=state.num_processes,
        device=device,
        chunk_size=cache_args.cache_chunk_size,
        batch_size=cache_args.cache_batch_size,
        barrier=state.wait_for_everyone,
        dataset_id={
            "name": cache_args.dataset_name,
            "split": cache_args.dataset_train_split,
            "streaming": cache_args.streaming,
            "max_rows": cache_args.max_train_rows,
        },
        progress=not args.disable_tqdm,
    )
    if state.is_main_process and cache is not None:
        m = cache.manifest
        print(
            f"Latent cache in {cache_args.latent_cache}: {m['num_pairs']} pairs from {m['rows_read']} rows "
            f"({m['ties_dropped']} ties, {m['invalid_skipped']} invalid rows dropped) in {len(m['shards'])} shards"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cache())
