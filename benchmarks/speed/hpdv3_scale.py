"""What reading HPDv3 at its published size costs: a synthetic ``train.json`` of ``--rows`` comparisons, read as
``trl-diffusion-sdpo train --dataset_name <folder>`` reads it.

    python benchmarks/speed/hpdv3_scale.py --rows 1170000 --output benchmarks/results/data/cpu-hpdv3-scale-1170k.json
    python benchmarks/speed/hpdv3_scale.py --rows 10000 100000 1170000 --output ...   # several sizes, one file

The synthetic annotation (assumptions, from ``docs/data.md``'s HPDv3 section and ``formats.read_hpd``):

* one JSON array ``train.json`` (as published: an array, not JSON Lines), one compact record per line, with the
  fields of the published records: ``prompt``, ``choice_dist`` (two vote counts), ``confidence``, ``path1``
  (preferred), ``path2``, ``model1``, ``model2``; ``choice_dist`` and ``confidence`` are ``null`` for the sources
  that have none (Midjourney, curated HPDv2: here one record in five);
* image paths ``images/<uuid4>.jpg`` (47 characters, the docs' ``images/uuid1.jpg`` with real UUIDs);
* HPDv3's proportions, 1.08M images for 1.17M comparisons: 4 images per prompt and ``rows / 4.33`` prompts, so
  ``4 * rows / 4.33 = 0.92 * rows`` distinct images; each prompt's comparisons are distinct pairs of its 4 images
  (at most 6), the records shuffled; prompts of 8 to 60 words (about 40 on average, 230 characters).

Measured, each stage in a fresh child process (so its peak is its own): wall time (``time.perf_counter``), CPU time
(``resource.getrusage`` user + system of the child and of any process it waited for) and peak RSS (``ru_maxrss`` of
the child; the RSS after imports is given too, so the reading itself is ``peak - after imports``):

* ``load_cold``: ``load_preference_data(folder)`` (what ``load_train_split`` calls) with an empty ``datasets`` cache:
  the JSON parsed into Arrow, then the paths resolved (``read_hpd``'s batched ``map``);
* ``load_warm``: the same call again, the Arrow files cached by ``datasets``;
* ``validate``: ``prepare_preference_dataset`` (what the trainer runs before training: every row's two images
  opened and decoded at 1/8 scale) on the first ``--validate-rows`` rows, for which tiny placeholder JPEGs are
  written (no image is written for the other rows: the reader never opens one, only validation does), and the
  collated first batch (``PreferenceCollator`` with the trainer's pair transform at ``--resolution``), and the check
  of one 1024 px JPEG (median of 20), the size of HPDv3's images, for which the 16 px placeholders stand in.

The reader checks that a file exists for the first image only (to find the image folder); every row's files are
opened by validation, whose per-row cost is measured on the rows with placeholders.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness
from benchmarks.harness import cpu_name, rss  # noqa: E402

HPDV3_COMPARISONS = 1_170_000  # HPDv3 (MizzenAI/HPDv3): 1.17M annotated pairs of 1.08M images
IMAGES_PER_PROMPT = 4
COMPARISONS_PER_PROMPT = 1.17 / 1.08 * IMAGES_PER_PROMPT  # 4.33: HPDv3's images-to-comparisons ratio
MODELS = ("flux", "infinity", "sd3", "kolors", "hunyuan", "sdxl", "playground", "cogview4", "pixart", "midjourney")
WORDS = (
    "a portrait of an old fisherman in the rain cinematic lighting highly detailed oil painting of a castle on a "
    "hill at sunset watercolor cat sitting on a windowsill photorealistic 8k street market in tokyo at night neon "
    "reflections wet pavement futuristic city skyline with flying cars soft morning light forest path covered in "
    "autumn leaves close up macro shot of a dew drop on a leaf minimalist poster design vintage car"
).split()


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def write_annotation(
    folder: str,
    rows: int,
    seed: int = 0,
    placeholder_rows: int = 0,
    layout: str = "json",
    placeholder_size: int = 16,
) -> dict[str, int]:
    """Write ``folder/train.json`` with ``rows`` records (see the module docstring; ``layout="jsonl"``: the same
    records as ``train.jsonl``, one object a line), and JPEGs of ``placeholder_size`` px (16: one colour; larger:
    noise, which compresses as badly as a photo) for the images of its first ``placeholder_rows`` records. Returns
    what was written (records, prompts, images, bytes)."""
    rng = random.Random(seed)
    prompts = max(1, round(rows / COMPARISONS_PER_PROMPT))
    # Comparisons of each prompt: rows spread as evenly as possible over the prompts (at most 6 = C(4, 2) each).
    base, extra = divmod(rows, prompts)
    pairs_of_four = [(i, j) for i in range(IMAGES_PER_PROMPT) for j in range(i + 1, IMAGES_PER_PROMPT)]
    if base + (extra > 0) > len(pairs_of_four):
        raise ValueError(f"{rows} rows over {prompts} prompts exceed {len(pairs_of_four)} pairs a prompt")
    records: list[tuple[int, int, int]] = []  # (prompt, image a, image b), image = prompt * 4 + k
    for p in range(prompts):
        for a, b in rng.sample(pairs_of_four, base + (p < extra)):
            records.append((p, p * IMAGES_PER_PROMPT + a, p * IMAGES_PER_PROMPT + b))
    rng.shuffle(records)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(8, 60))) + f" #{p}" for p in range(prompts)]
    images = [f"images/{_uuid(rng)}.jpg" for _ in range(prompts * IMAGES_PER_PROMPT)]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "train." + layout)
    array = layout == "json"
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" if array else "")
        for n, (p, a, b) in enumerate(records):
            model1, model2 = rng.choice(MODELS), rng.choice(MODELS)
            voted = rng.random() >= 0.2
            first = rng.randint(5, 20) if voted else 0
            record = {
                "prompt": texts[p],
                "choice_dist": [first, rng.randint(0, first)] if voted else None,
                "confidence": round(rng.uniform(0.5, 1.0), 7) if voted else None,
                "path1": images[a],
                "path2": images[b],
                "model1": model1,
                "model2": model2,
            }
            f.write(json.dumps(record) + (",\n" if array and n + 1 < len(records) else "\n"))
        f.write("]\n" if array else "")
    jpeg = _placeholder_jpeg(placeholder_size)
    placed = {images[i] for _, a, b in records[:placeholder_rows] for i in (a, b)}
    for relative in placed:
        target = os.path.join(folder, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(jpeg)
    return {
        "records": len(records),
        "prompts": len({p for p, _, _ in records}),
        "images": len({i for _, a, b in records for i in (a, b)}),
        "annotation_bytes": os.path.getsize(path),
        "placeholder_images": len(placed),
    }


def _placeholder_jpeg(size: int = 16) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    if size <= 16:
        Image.new("RGB", (size, size), (200, 80, 40)).save(buffer, format="JPEG")
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# -- measured stages (each in its own child process) --------------------------------------------------------------


def _usage() -> dict[str, float]:
    own, waited = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_s": own.ru_utime + own.ru_stime + waited.ru_utime + waited.ru_stime,
        "peak_rss_mb": own.ru_maxrss / 1024,  # Linux: kilobytes
    }


def _stage(name: str, folder: str, validate_rows: int, resolution: int, batch_size: int) -> dict[str, Any]:
    """Run one stage in this process and return its figures (called in a child: ``--stage``)."""
    from trl_diffusion_sdpo.data.formats import load_preference_data

    if name == "validate":  # its imports (torch, transformers) before the clock starts
        import trl_diffusion_sdpo.data.preparation  # noqa: F401
        from trl_diffusion_sdpo import DiffusionSDPOConfig  # noqa: F401
    rss_after_imports = rss() / 2**20
    before = _usage()
    start = time.perf_counter()
    dataset = load_preference_data(folder)
    wall = time.perf_counter() - start
    after = _usage()
    result: dict[str, Any] = {}
    if name == "validate":  # timed apart: wall_s, cpu_s are the reading's; peak_rss_mb the whole stage's
        result.update(_validate(dataset, validate_rows, resolution, batch_size, folder))
        after["peak_rss_mb"] = _usage()["peak_rss_mb"]
    prompts = dataset["prompt"] if name != "validate" else []
    result.update(
        {
            "wall_s": round(wall, 3),
            "cpu_s": round(after["cpu_s"] - before["cpu_s"], 3),
            "peak_rss_mb": round(after["peak_rss_mb"], 1),
            "rss_after_imports_mb": round(rss_after_imports, 1),
            "pairs": len(dataset),
            "columns": sorted(dataset.column_names),
        }
    )
    if name != "validate":
        # Checks that the pairs are the annotation's records, counted from the dataset (after the timing).
        result["distinct_prompts"] = len(set(prompts))
        result["distinct_images"] = len(set(dataset["chosen"]) | set(dataset["rejected"]))
        result["first_chosen"] = dataset[0]["chosen"]
    return result


def _validate(dataset, rows: int, resolution: int, batch_size: int, folder: str) -> dict[str, Any]:
    """Validation of the first ``rows`` rows, and the first collated batch, timed apart from the reading."""
    from trl_diffusion_sdpo import DiffusionSDPOConfig
    from trl_diffusion_sdpo.data.collators import PreferenceCollator
    from trl_diffusion_sdpo.data.preparation import prepare_preference_dataset
    from trl_diffusion_sdpo.data.transforms import PairTransform

    config = DiffusionSDPOConfig(
        output_dir=os.path.join(folder, "out"), resolution=resolution, per_device_train_batch_size=batch_size
    )
    config.disable_tqdm = True
    subset = dataset.select(range(min(rows, len(dataset))))
    start, cpu = time.perf_counter(), _usage()["cpu_s"]
    prepared, columns, report = prepare_preference_dataset(subset, config, "train")
    validate_wall, validate_cpu = time.perf_counter() - start, _usage()["cpu_s"] - cpu
    collator = PreferenceCollator(columns, _no_tokenizer, PairTransform(resolution), train=True)
    start = time.perf_counter()
    batch = collator([prepared[i] for i in range(batch_size)])
    batch_wall = time.perf_counter() - start
    # The placeholders are 16 px; HPDv3's images are about 1024 px JPEGs: one such image (noise, so it compresses as
    # badly as a photo) checked as validation checks every image (opened, decoded at 1/8 scale).
    from trl_diffusion_sdpo.data.validation import _image_file_problem, image_problem

    large = os.path.join(folder, "large.jpg")
    with open(large, "wb") as f:
        f.write(_placeholder_jpeg(1024))
    times = []
    for _ in range(20):
        _image_file_problem.cache_clear()  # a file's check is remembered: time the decoding, not the lookup
        start = time.perf_counter()
        assert image_problem(large) == ""
        times.append(time.perf_counter() - start)
    # A file named again (HPDv3 names each image about twice) is not decoded again: its check is the stat and the
    # lookup, per call over 5 rounds of 2000.
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(2000):
            image_problem(large)
        rounds.append((time.perf_counter() - start) / 2000)
    return {
        "check_1024px_jpeg_ms_median": round(1000 * sorted(times)[len(times) // 2], 3),
        "remembered_check_us_median": round(1e6 * sorted(rounds)[len(rounds) // 2], 3),
        "validated_rows": len(subset),
        "validated_kept": report.num_kept,
        "validate_wall_s": round(validate_wall, 3),
        "validate_cpu_s": round(validate_cpu, 3),
        "validate_ms_per_row": round(1000 * validate_wall / len(subset), 4),
        "first_batch_wall_s": round(batch_wall, 4),
        "first_batch_pixel_shape": list(batch["pixel_values"].shape),
    }


def _no_tokenizer(prompts: list[str]) -> dict[str, Any]:
    """The collator's prompt tokenizer, left out: the batch's cost here is reading and transforming the images."""
    return {}


def _run_child(stage: str, folder: str, cache: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, HF_DATASETS_CACHE=cache, HF_DATASETS_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
    command = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--folder", folder]
    command += ["--validate-rows", str(args.validate_rows), "--resolution", str(args.resolution)]
    command += ["--batch-size", str(args.batch_size)]
    load_before = os.getloadavg()
    if args.in_process:  # quick (tests): no child, so peak_rss_mb is this process's peak so far
        import datasets

        datasets.config.HF_DATASETS_CACHE = cache
        result = _stage(stage, folder, args.validate_rows, args.resolution, args.batch_size)
    else:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"stage {stage} failed:\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    result["loadavg_before"] = [round(x, 2) for x in load_before]
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def measure(rows: int, args: argparse.Namespace) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix="hpdv3-scale-", dir=args.workdir)
    folder, cache = os.path.join(work, "HPDv3"), os.path.join(work, "hf-cache")
    try:
        start = time.perf_counter()
        written = write_annotation(folder, rows, args.seed, args.validate_rows, args.layout, args.placeholder_size)
        entry: dict[str, Any] = {
            "rows": rows,
            "placeholder_px": args.placeholder_size,
            "layout": args.layout,
            "written": written,
            "write_s": round(time.perf_counter() - start, 2),
        }
        if args.keep:
            entry["folder"] = folder
        stages = ["load_cold", "load_warm"] + (["validate"] if args.validate_rows > 0 else [])
        for stage in stages:
            entry[stage] = _run_child(stage, folder, cache, args)
            print(f"rows={rows} {stage}: {json.dumps(entry[stage])}", file=sys.stderr)
        entry["cache_bytes"] = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(cache) for f in files
        )
        return entry
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def machine() -> dict[str, Any]:
    import datasets
    import pyarrow

    with open("/proc/meminfo") if os.path.exists("/proc/meminfo") else open(os.devnull) as f:
        memory = next((line.split(":", 1)[1].strip() for line in f if line.startswith("MemTotal")), "")
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "memory": memory,
        "datasets": datasets.__version__,
        "pyarrow": pyarrow.__version__,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[HPDV3_COMPARISONS], help="comparisons (sizes)")
    parser.add_argument("--output", help="JSON file for the results")
    parser.add_argument("--validate-rows", type=int, default=2000, help="rows validated (placeholders written)")
    parser.add_argument(
        "--placeholder-size", type=int, default=16, help="the validated rows' JPEGs in px (HPDv3's: 1024)"
    )
    parser.add_argument("--resolution", type=int, default=512, help="the first batch's resolution")
    parser.add_argument("--batch-size", type=int, default=4, help="the first batch's pairs")
    parser.add_argument(
        "--layout", choices=("json", "jsonl"), default="json", help="json: one array, as published; jsonl: a line each"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where the synthetic data is written (default: the system's temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic data (its folder is reported)")
    parser.add_argument(
        "--in-process", action="store_true", help="run the stages here, not in child processes (peaks not apart)"
    )
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(_stage(args.stage, args.folder, args.validate_rows, args.resolution, args.batch_size)))
        return {}
    results = {
        "benchmark": "hpdv3_scale",
        "machine": machine(),
        "measures": "wall: time.perf_counter; cpu: resource.getrusage user+sys; peak RSS: ru_maxrss of the child",
        "in_process": args.in_process,
        "sizes": [measure(rows, args) for rows in args.rows],
    }
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
