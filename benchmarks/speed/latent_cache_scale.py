"""The sharded latent cache's throughput, side by side with ``cache_latents``, and the arithmetic for Pick-a-Pic.

    python benchmarks/speed/latent_cache_scale.py --out benchmarks/results/data/cpu-latent-cache-small.json
    python benchmarks/speed/latent_cache_scale.py --preset sd15 --device cuda --pairs 256 --out ...   # on a GPU

Measured (one process, ``--preset`` models from ``benchmarks/harness.py`` with random weights, synthetic JPEG
pairs at the preset's resolution):

* ``map``: ``build_latent_cache`` (what ``cache_latents=True`` runs) on a map-style dataset, pairs per second;
* ``sharded``: ``build_sharded_latent_cache`` on the same rows with ``--chunk-size`` (several shard files), pairs per
  second; ``sharded/map`` is the cost of chunking, progress files and the per-chunk set-up;
* ``read``: pairs per second read back through the trainer's collators: the streamed shards
  (``ArrowRowsCollator``) and the map-style cache (``CachedPreferenceCollator``);
* bytes per pair on disk against the bytes the stored shapes predict;
* ``decode``: the CPU work per pair before the VAE (two JPEGs decoded, resized and center-cropped, and their mirrored
  copies) on real-size images (512 and 1024 px), which every process does on its host.

Computed (no model is run: meta tensors under ``torch.utils.flop_counter``): the FLOPs of the real SD1.5 and SDXL VAE
encoders and text encoders per pair, the bytes per pair of the real shapes, and hours for Pick-a-Pic v2 on N GPUs at
a stated fraction of a stated peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness
from benchmarks.harness import (  # noqa: E402
    CLIP_BIG_G,
    CLIP_L,
    PRESETS,
    SD15_VAE,
    SDXL_VAE,
    build_pipeline,
    machine_description,
    sync,
    synthetic_pairs,
)

PICKAPIC_PAIRS = 1_000_000  # Pick-a-Pic v2 train, ties dropped: about a million pairs
H100_PEAK_TF32 = 494.7e12  # dense TF32 tensor-core FLOP/s, H100 SXM datasheet (the cache encodes in float32/TF32)
H100_PEAK_BF16 = 989.4e12  # dense BF16


def _config(resolution: int):
    from trl_diffusion_sdpo import DiffusionSDPOConfig

    return DiffusionSDPOConfig(
        output_dir=tempfile.mkdtemp(prefix="cache-bench-"),
        resolution=resolution,
        random_flip=True,
        report_to="none",
        disable_tqdm=True,
    )


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def measure(opts: argparse.Namespace) -> dict[str, Any]:
    import datasets

    from trl_diffusion_sdpo.data.latent_cache import CachedPreferenceCollator, build_latent_cache
    from trl_diffusion_sdpo.data.preparation import prepare_preference_dataset
    from trl_diffusion_sdpo.data.sharded_cache import build_sharded_latent_cache
    from trl_diffusion_sdpo.families import family_for_pipeline

    datasets.disable_progress_bars()
    spec = PRESETS[opts.preset]
    resolution = spec["resolution"]
    pipe = build_pipeline(opts.preset, opts.device)
    family = family_for_pipeline(pipe)
    data = synthetic_pairs(opts.pairs, resolution)
    args = _config(resolution)
    work = tempfile.mkdtemp(prefix="cache-bench-")
    prepared, columns, _ = prepare_preference_dataset(data, args)
    rows: dict[str, list[float]] = {"map": [], "sharded": [], "sharded_one_chunk": []}
    read: dict[str, list[float]] = {"map": [], "sharded": []}
    sizes: dict[str, int] = {}
    for repeat in range(opts.repeats):  # alternate, so a change in machine load hits both
        folder = os.path.join(work, f"map-{repeat}")
        sync(opts.device)
        start = time.perf_counter()
        mapped = build_latent_cache(
            prepared,
            columns,
            family,
            resolution=resolution,
            random_flip=True,
            cache_dir=folder,
            device=opts.device,
            batch_size=opts.batch_size,
        )
        sync(opts.device)
        rows["map"].append(opts.pairs / (time.perf_counter() - start))
        sizes["map"] = _folder_bytes(folder)

        folder = os.path.join(work, f"sharded-{repeat}")
        sync(opts.device)
        start = time.perf_counter()
        sharded = build_sharded_latent_cache(
            data,
            args,
            family,
            folder,
            device=opts.device,
            progress=False,
            chunk_size=opts.chunk_size,
            batch_size=opts.batch_size,
        )
        sync(opts.device)
        rows["sharded"].append(opts.pairs / (time.perf_counter() - start))
        sizes["sharded_shards"] = _folder_bytes(os.path.join(folder, "shards"))
        one = os.path.join(work, f"one-{repeat}")
        start = time.perf_counter()
        build_sharded_latent_cache(
            data,
            args,
            family,
            one,
            device=opts.device,
            progress=False,
            chunk_size=opts.pairs,
            batch_size=opts.batch_size,
        )
        sync(opts.device)
        rows["sharded_one_chunk"].append(opts.pairs / (time.perf_counter() - start))

        collate = sharded.collator()
        start = time.perf_counter()
        batch: list = []
        for row in sharded.dataset:
            batch.append(row)
            if len(batch) == opts.read_batch:
                collate(batch)
                batch = []
        read["sharded"].append(opts.pairs / (time.perf_counter() - start))
        collate_map = CachedPreferenceCollator(with_flipped=True)
        start = time.perf_counter()
        for first in range(0, len(mapped.dataset), opts.read_batch):
            collate_map([mapped.dataset[i] for i in range(first, min(first + opts.read_batch, len(mapped.dataset)))])
        read["map"].append(opts.pairs / (time.perf_counter() - start))
    example = mapped.dataset[0]
    predicted = sum(v.numel() * v.element_size() for k, v in example.items() if isinstance(v, torch.Tensor))
    shutil.rmtree(work, ignore_errors=True)
    median = {k: float(np.median(v)) for k, v in rows.items()}
    return {
        "preset": opts.preset,
        "resolution": resolution,
        "pairs": opts.pairs,
        "chunk_size": opts.chunk_size,
        "batch_size": opts.batch_size,
        "encode_pairs_per_s": rows,
        "encode_median_pairs_per_s": median,
        # Per repeat (the three ran back to back), then the median: a change in machine load hits a repeat's rows.
        "sharded_over_map_throughput": float(np.median(np.divide(rows["sharded"], rows["map"]))),
        "sharded_one_chunk_over_map_throughput": float(np.median(np.divide(rows["sharded_one_chunk"], rows["map"]))),
        # Seconds each extra chunk costs: (time with n chunks - time with one) / (n - 1), per repeat, median.
        "seconds_per_extra_chunk": float(
            np.median(
                [
                    (opts.pairs / a - opts.pairs / b) / (math.ceil(opts.pairs / opts.chunk_size) - 1)
                    for a, b in zip(rows["sharded"], rows["sharded_one_chunk"])
                ]
            )
        ),
        "read_pairs_per_s": read,
        "read_median_pairs_per_s": {k: float(np.median(v)) for k, v in read.items()},
        "bytes_per_pair_on_disk": {k: v / opts.pairs for k, v in sizes.items()},
        "bytes_per_pair_predicted_from_shapes": predicted,
    }


def decode_cost(repeats: int) -> dict[str, float]:
    """Milliseconds per pair of host work before the VAE: two JPEGs decoded, resized, center-cropped, and mirrored."""
    from trl_diffusion_sdpo.data.transforms import PairTransform, load_image

    out = {}
    for resolution in (512, 1024):
        data = synthetic_pairs(8, resolution, seed=1)
        transform = PairTransform(resolution, random_crop=False)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for row in data:
                winner, loser = load_image(row["jpg_0"]), load_image(row["jpg_1"])
                for flip in (False, True):
                    transform.center_crop_pair(winner, loser, flip)
            times.append((time.perf_counter() - start) / len(data) * 1e3)
        out[f"ms_per_pair_{resolution}px"] = float(np.median(times))
    return out


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def real_size_arithmetic() -> dict[str, Any]:
    """FLOPs and bytes per pair of the real models (meta tensors: nothing is computed), and hours for Pick-a-Pic."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out: dict[str, Any] = {}
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(SD15_VAE)
        text_l = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        text_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G))
    tokens = torch.zeros(1, 77, dtype=torch.long, device="meta")
    clip_l = _flops(lambda: text_l(tokens))
    clip_g = _flops(lambda: text_g(tokens))
    for name, vae_config, resolution, text_flops, embed_dim, pooled in (
        ("sd15", SD15_VAE, 512, clip_l, 768, 0),
        ("sdxl", SDXL_VAE, 1024, clip_l + clip_g, 768 + 1280, 1280),
    ):
        del vae_config  # the two VAEs share their architecture; only the resolution differs
        image = torch.zeros(1, 3, resolution, resolution, device="meta")
        vae_encoder = _flops(lambda image=image: vae.encode(image))
        latent = resolution // 8
        # Stored per pair (float32), with random_flip: mean and std [2, 4, h, w] for the plain and the mirrored view,
        # prompt embeddings [77, D], pooled [P] (SDXL), time_ids [2, 6] twice.
        latent_bytes = 2 * 2 * (2 * 4 * latent * latent) * 4
        text_bytes = 77 * embed_dim * 4 + pooled * 4
        per_pair_bytes = latent_bytes + text_bytes + 2 * 2 * 6 * 4
        per_pair_flops = 4 * vae_encoder + text_flops  # 2 images x (plain + mirrored) through the VAE, 1 prompt
        hours = {}
        for fraction in (0.25, 0.5):
            seconds = PICKAPIC_PAIRS * per_pair_flops / (H100_PEAK_TF32 * fraction)
            hours[f"{int(fraction * 100)}pct_of_tf32_peak"] = {n: seconds / n / 3600 for n in (1, 8, 64)}
        out[name] = {
            "resolution": resolution,
            "vae_encoder_flops_per_image": vae_encoder,
            "text_encoder_flops_per_prompt": text_flops,
            "flops_per_pair_with_flips": per_pair_flops,
            "bytes_per_pair": per_pair_bytes,
            "bytes_latents": latent_bytes,
            "bytes_text": text_bytes,
            "pickapic_terabytes": PICKAPIC_PAIRS * per_pair_bytes / 1e12,
            "pickapic_hours_on_n_h100": hours,
        }
    out["assumptions"] = {
        "pairs": PICKAPIC_PAIRS,
        "peak_flops": H100_PEAK_TF32,
        "note": "H100 SXM dense TF32 peak (the cache encodes in float32, convolutions on TF32 tensor cores); the "
        "fraction of peak reached is assumed, not measured",
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--read-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()

    result = {
        "machine": machine_description(opts.device, torch.get_num_threads()),
        "measured": measure(opts),
        "decode_on_this_host": decode_cost(opts.repeats),
        "real_size_arithmetic": real_size_arithmetic(),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
