"""Seconds per evaluation image under the SDPO authors' sampling protocol, for the real-scale recipe's cost estimate.

The pipelines are built from the real SD1.5 / SDXL configs with random weights (``harness.build_pipeline``; the
cost does not depend on the weights): Euler scheduler, 50 steps, classifier-free guidance 8.5 (two UNet passes per
step), the native resolution, UNet and text encoders in bf16, VAE decode in float32, one prompt per batch as the
authors' scripts, or larger batches. Output: median seconds per image after one warm-up, and the peak memory.

    python benchmarks/speed/generation_time.py --unet sd15 --batch-sizes 1,4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness

from benchmarks.harness import PRESETS, build_pipeline  # noqa: E402


def time_generation(preset: str, batch_size: int, steps: int, repeats: int, device: str) -> dict:
    from diffusers import EulerDiscreteScheduler

    pipe = build_pipeline(preset, device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe.unet.to(dtype)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(dtype)
    pipe.vae.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    resolution = PRESETS[preset]["resolution"]
    prompts = ["a photo of a red cube on a blue table"] * batch_size
    generator = torch.Generator(device).manual_seed(0)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            latents = pipe(
                prompts,
                num_inference_steps=steps,
                guidance_scale=8.5,
                height=resolution,
                width=resolution,
                negative_prompt=[""] * batch_size,
                generator=generator,
                output_type="latent",
            ).images
            # the authors decode in float32
            pipe.vae.decode(latents.float() / pipe.vae.config.scaling_factor, return_dict=False)
        if device == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first call warms up kernels and the allocator
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {
        "preset": preset,
        "batch_size": batch_size,
        "steps": steps,
        "resolution": resolution,
        "seconds_per_image": statistics.median(times) / batch_size,
        "peak_memory_bytes": peak,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unet", choices=sorted(PRESETS), default="sd15")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    results = [
        time_generation(args.unet, int(b), args.steps, args.repeats, args.device) for b in args.batch_sizes.split(",")
    ]
    for r in results:
        memory = "" if r["peak_memory_bytes"] is None else f", peak {r['peak_memory_bytes'] / 2**30:.1f} GiB"
        print(
            f"{r['preset']} {r['resolution']} px, batch {r['batch_size']}, {r['steps']} steps: "
            f"{r['seconds_per_image']:.2f} s/image{memory} ({r['device']})"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
