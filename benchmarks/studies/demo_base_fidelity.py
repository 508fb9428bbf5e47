"""Does the demo's shipped base draw its own captions? Shape, colour and background of its samples, against chance.

Not part of the test suite. The base (``trl_diffusion_sdpo/demo/base/``, or ``--base``) samples every one of its 36
pretraining captions with the demo's sampler (DDIM, the demo's steps and guidance) and fixed seeds; each sample is
read three ways, none of them trained on:

* shape: ``online_measures.shape_scores``, the IoU of the sample's foreground with the demo's own drawings of the
  caption's shape, and whether the caption's shape fits best of the three;
* shape colour: the palette colour (``shapes.COLOURS``, six) nearest in RGB to the central 4x4 patch, the patch the
  colour reward scores (``shapes.colour_reward``), against the caption's;
* background: the background colour (``shapes.BACKGROUNDS``, two) nearest to the outer two-pixel ring, against the
  caption's;

plus the colour reward itself. A sample is *drawn as captioned* when all three readings name the caption's word.
Chance is each measure of the same samples against every caption (the mean over the 36: a caption drawn at random,
independent of the sample); the ceiling is the same measures on fresh drawings of the captions (``draw_shape``, what
pretraining saw) and on those drawings passed through the base's VAE (what the VAE alone keeps). Optionally
(``--vae-steps``), a VAE retrained from scratch with the base's recipe at another step count, its reconstructions
measured the same way: what a longer VAE stage would buy.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/studies/demo_base_fidelity.py \
        --json benchmarks/results/demo/cpu-demo-base-fidelity.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from online_measures import shape_scores, shape_templates  # noqa: E402

from benchmarks.harness import machine_description  # noqa: E402
from trl_diffusion_sdpo.cli.console import quiet_command_line  # noqa: E402
from trl_diffusion_sdpo.demo.pairs import sample_images  # noqa: E402
from trl_diffusion_sdpo.demo.pretrain import (  # noqa: E402
    PretrainRecipe,
    _train_vae,
    build_untrained_pipeline,
    load_base,
    pretraining_images,
    recipe_hash,
    shipped_base_record,
)
from trl_diffusion_sdpo.demo.recipe import DemoRecipe  # noqa: E402
from trl_diffusion_sdpo.demo.shapes import (  # noqa: E402
    BACKGROUNDS,
    COLOURS,
    Caption,
    all_captions,
    colour_reward,
    draw_shape,
)

OUTPUT = ROOT / "benchmarks" / "results" / "demo" / "cpu-demo-base-fidelity.json"
MEASURES = ("drawn_as_captioned", "shape_correct", "shape_iou", "colour_match", "background_match", "colour_reward")
_CENTRE, _RING = 2, 2  # colour_reward's regions: the central 4x4 patch, the outer two-pixel ring
_SEED = 2_000_000  # sampling and drawing seeds: disjoint from the demo's pairs (100_000 * seed) and evaluation


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> list[str]:
    """The palette word whose colour is nearest to each ``rgb`` row (in [0, 1])."""
    names = list(palette)
    colours = np.array([palette[n] for n in names], dtype=np.float64) / 255.0
    return [names[i] for i in np.linalg.norm(rgb[:, None] - colours[None], axis=-1).argmin(axis=1)]


def readings(images: np.ndarray) -> dict[str, list[str]]:
    """What each image ``[N, H, W, 3]`` (in [0, 1]) shows: the nearest palette colour of its central patch and the
    nearest background colour of its border ring (``colour_reward``'s regions)."""
    images = np.asarray(images, dtype=np.float64)
    height, width = images.shape[1:3]
    cy, cx = height // 2, width // 2
    centre = images[:, cy - _CENTRE : cy + _CENTRE, cx - _CENTRE : cx + _CENTRE].mean(axis=(1, 2))
    ring = np.ones((height, width), dtype=bool)
    ring[_RING:-_RING, _RING:-_RING] = False
    return {"colour": _nearest(centre, COLOURS), "background": _nearest(images[:, ring].mean(axis=1), BACKGROUNDS)}


def measure(
    images: np.ndarray, captions: Sequence[Caption], templates: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per image, every measure of ``MEASURES`` against its caption (booleans as 0/1)."""
    iou, correct = shape_scores(images, captions, templates)
    seen = readings(images)
    colour = np.array([s == c.colour for s, c in zip(seen["colour"], captions)])
    background = np.array([s == c.background for s, c in zip(seen["background"], captions)])
    return {
        "drawn_as_captioned": (correct & colour & background).astype(np.float64),
        "shape_correct": correct.astype(np.float64),
        "shape_iou": iou,
        "colour_match": colour.astype(np.float64),
        "background_match": background.astype(np.float64),
        "colour_reward": colour_reward(images, list(captions)),
    }


def chance(images: np.ndarray, templates: dict[str, np.ndarray]) -> dict[str, float]:
    """Every measure of ``images`` against each of the 36 captions in turn, averaged: the score of a caption drawn at
    random, independent of what the image shows."""
    captions = all_captions()
    totals = {m: 0.0 for m in MEASURES}
    for caption in captions:
        for name, values in measure(images, [caption] * len(images), templates).items():
            totals[name] += float(values.mean()) / len(captions)
    return totals


def _shown(folder: Path | None) -> str | None:
    """``folder`` relative to the repository root where it lies inside it (a result file names no machine's paths)."""
    if folder is None:
        return None
    folder = Path(folder).resolve()
    return str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else folder.name


def _means(values: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: round(float(v.mean()), 4) for name, v in values.items()}


def drawings(captions: Sequence[Caption], size: int, seed: int) -> np.ndarray:
    """Fresh ``draw_shape`` drawings of ``captions`` (random size, jitter and colour jitter), ``[N, H, W, 3]``."""
    rng = random.Random(seed)
    return np.stack([np.asarray(draw_shape(c, size, rng), dtype=np.float64) / 255.0 for c in captions])


@torch.no_grad()
def reconstruct(vae, images: np.ndarray) -> np.ndarray:
    """``images`` through ``vae`` (posterior mean, then the decoder), back in [0, 1]."""
    pixels = torch.from_numpy(images).float().permute(0, 3, 1, 2) * 2.0 - 1.0
    decoded = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in pixels.split(256)])
    return ((decoded.clamp(-1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 3, 1).double().numpy()


def per_caption(values: dict[str, np.ndarray], captions: list[Caption], per: int) -> list[dict[str, Any]]:
    rows = []
    for i, caption in enumerate(captions):
        part = {name: v[i * per : (i + 1) * per] for name, v in values.items()}
        rows.append({"caption": caption.text, **_means(part)})
    return rows


def probe_vae(recipe: PretrainRecipe, steps: int, images: np.ndarray, captions, templates) -> dict[str, Any]:
    """A VAE trained from scratch with ``recipe``'s VAE stage at ``steps`` steps (same data, seed and learning-rate
    schedule shape), its reconstructions of ``images`` measured."""
    probe = dataclasses.replace(recipe, vae_steps=steps)
    vae = build_untrained_pipeline(probe).vae
    pixels, _ = pretraining_images(probe)
    tick = time.perf_counter()
    _train_vae(vae, pixels, probe, torch.Generator().manual_seed(probe.seed))
    seconds = time.perf_counter() - tick
    measured = _means(measure(reconstruct(vae, images), captions, templates))
    return {"vae_steps": steps, "seconds": round(seconds, 1), **measured}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=None, help="A saved base folder (default: the shipped base).")
    parser.add_argument("--per-caption", type=int, default=16, help="Samples per caption (default: %(default)s).")
    parser.add_argument("--vae-steps", type=int, nargs="*", default=[], help="Also probe VAEs trained this long.")
    parser.add_argument("--json", default=str(OUTPUT), help="Result file (default: %(default)s).")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_start = [round(v, 2) for v in os.getloadavg()]
    began = time.perf_counter()
    demo = DemoRecipe()
    if args.base is None:
        base, source, folder = load_base(demo.pretrain)
        record = shipped_base_record(folder)
    else:
        from diffusers import StableDiffusionPipeline

        base, source, folder = StableDiffusionPipeline.from_pretrained(args.base), "folder", Path(args.base)
        record = shipped_base_record(folder)
    recipe = PretrainRecipe.from_dict(record["recipe"]) if record else demo.pretrain
    captions = all_captions()
    repeated = [c for c in captions for _ in range(args.per_caption)]
    seeds = [_SEED + j for _ in captions for j in range(args.per_caption)]
    tick = time.perf_counter()
    samples = sample_images(
        base, [c.text for c in repeated], seeds, demo.num_inference_steps, demo.guidance_scale, batch_size=144
    )
    sampling_seconds = time.perf_counter() - tick
    templates = shape_templates(recipe.image_size)
    drawn = drawings(repeated, recipe.image_size, _SEED)
    values = measure(samples, repeated, templates)
    report: dict[str, Any] = {
        "description": "The demo's base on its own 36 captions: is each sample drawn as captioned (the caption's "
        "shape fits best, its colour and background are the nearest palette colours), against chance and the "
        "drawings it was trained on",
        "measures": {
            "drawn_as_captioned": "shape_correct and colour_match and background_match, per sample",
            "shape_correct": "the caption's shape fits the foreground best of the three "
            "(online_measures.shape_scores)",
            "shape_iou": "IoU of the foreground with the best template of the caption's shape",
            "colour_match": "the palette colour (6) nearest the central 4x4 patch is the caption's",
            "background_match": "the background colour (2) nearest the outer 2-pixel ring is the caption's",
            "colour_reward": "the demo's colour reward (shapes.colour_reward)",
        },
        "base": {
            "source": source,
            "folder": _shown(folder),
            "recipe_hash": recipe_hash(recipe),
            **({} if args.base is None else {"recipe": recipe.to_dict()}),  # another base: how it was trained
            **({"pretrain_seconds": record["pretrain_seconds"]} if record and "pretrain_seconds" in record else {}),
        },
        "sampling": {
            "per_caption": args.per_caption,
            "num_inference_steps": demo.num_inference_steps,
            "guidance_scale": demo.guidance_scale,
            "seeds": f"{_SEED} + sample index",
        },
        "samples": _means(values),
        "chance": {k: round(v, 4) for k, v in chance(samples, templates).items()},
        "drawings": _means(measure(drawn, repeated, templates)),
        "vae_reconstructions": _means(measure(reconstruct(base.vae, drawn), repeated, templates)),
        "captions_drawn_as_captioned": None,
        "per_caption": per_caption(values, captions, args.per_caption),
    }
    majority = [row for row in report["per_caption"] if row["drawn_as_captioned"] > 0.5]
    report["captions_drawn_as_captioned"] = {
        "rule": "more than half of the caption's samples drawn as captioned",
        "count": len(majority),
        "of": len(captions),
    }
    if args.vae_steps:
        report["vae_probe"] = [probe_vae(recipe, s, drawn, repeated, templates) for s in args.vae_steps]
    report["timing"] = {
        "sampling_seconds": round(sampling_seconds, 1),
        "wall_seconds": round(time.perf_counter() - began, 1),
        "load_average_start": load_start,
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }
    report["machine"] = machine_description("cpu", 1)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(summary_lines(report))
    print(f"Wrote {path}")
    return 0


def summary_lines(report: dict[str, Any]) -> str:
    """The measures side by side: samples, chance, the drawings and their VAE reconstructions (and any probe)."""
    columns = [("samples", report["samples"]), ("chance", report["chance"]), ("drawings", report["drawings"])]
    columns.append(("VAE recon", report["vae_reconstructions"]))
    columns += [(f"VAE {p['vae_steps']} steps", p) for p in report.get("vae_probe", [])]
    lines = [f"{'':20}" + "".join(f"{name:>16}" for name, _ in columns)]
    for measure_name in MEASURES:
        lines.append(f"{measure_name:20}" + "".join(f"{values[measure_name]:>16.3f}" for _, values in columns))
    counted = report["captions_drawn_as_captioned"]
    lines.append(f"captions drawn as captioned (majority of samples): {counted['count']} of {counted['of']}")
    return "\n".join(lines)


if __name__ == "__main__":
    quiet_command_line(own_report=True)  # the script's own process: its report only
    sys.exit(main())
