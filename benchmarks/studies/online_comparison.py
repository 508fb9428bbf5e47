"""Online against offline preference tuning on the toy demo: do the curves of what training never sees part?

    OMP_NUM_THREADS=1 python benchmarks/studies/online_comparison.py \\
        --json benchmarks/results/online/cpu-online-comparison-tiny.json

Four methods on the benchmark's base (``stability_map.STUDY_BASE``), with the same LoRA (the demo's rank 8 adapters),
learning rate, beta, optimizer steps and pairs per step (``--batch-size``), trained on the demo's colour reward:

* ``online-dpo``: ``OnlineDiffusionSDPOTrainer``, ``safeguard_space="none"`` (the reference of the paired comparison);
* ``online-sdpo-output``: the same, ``safeguard_space="output"`` (mu 0.5, the default);
* ``online-sdpo-parameter``: the same, ``safeguard_space="parameter"`` (mu 0.5);
* ``offline-dpo``: ``DiffusionSDPOTrainer`` with ``safeguard_space="none"`` on the demo's fixed pairs, sampled once
  from the base and ranked by the colour reward (``demo.pairs.make_preference_pairs``, the demo's pairs per prompt).

Two controls, run with ``--methods``: ``offline-sdpo-parameter`` (the parameter-space safeguard on the fixed pairs) and
``online-sdpo-parameter-decoded`` (online, each pair VAE-encoded from its decoded 8-bit images as the fixed pairs are,
instead of the sampler's final latents). Two more online settings, run with ``--methods``: ``online-sdpo-default``
(``safeguard_mu`` 0.9, the authors' SD1.5 value, which the demo base's family resolved to when the runs were made) and
``online-sdpo-output-auto`` (``safeguard_mu="auto"``): what the default costs online where Diffusion-DPO is healthy,
beside the online hacking regime (``online_hacking.py``) where it breaks. ``online-dormant-safeguard``: Diffusion-DPO
with ``on_pathology="safeguard"`` tried online (``stability_dormant.py``, whose result file holds its runs).

Images seen are matched: each online step samples ``--num-generations 2`` images per prompt and trains the one pair
(best against worst), as each offline pair is two base samples ranked; both sample with the demo's DDIM steps and
guidance. Pairing: a seed fixes the LoRA's initial weights, the prompts' order, the timesteps, the noise, the prompt
dropout and the online sampling noise (the online trainer seeds every image from the run's seed), so within a seed
the online methods' first generation is identical (checked: ``pairing``); the offline run shares the seed's LoRA,
timesteps and noise draws but trains on its own pair dataset.

Judged every ``--eval-every`` steps on the demo's held-out captions, with fixed evaluation noise, on measures the
training never sees (``online_measures.py``): shape correctness of samples (IoU with the demo's own shape drawings
and the shape accuracy, from the image's own background, colour-blind), sample diversity (mean pairwise RMS pixel
distance of a prompt's samples), the denoising error on clean held-out drawings minus the base's (the demo's
pathology measure: it rises when the policy forgets how to denoise real images), and the colour reward itself on the
held-out prompts. At the last step each safeguarded or offline run is compared with online Diffusion-DPO of the same
seed (``demo.stats.paired_difference``: the 95% paired t interval).

Runs go to ``--workers`` processes (one torch thread each), seed by seed; each finished run is written to ``--json``
at once, and a rerun with the same settings skips the runs already there.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.studies.online_measures import (  # noqa: E402
    diversity,
    drawings,
    held_out_denoising_error,
    shape_scores,
    shape_templates,
    validate_shape_scorer,
)
from benchmarks.studies.online_probe_runs import measure_stopped_run, probe_prompts  # noqa: E402
from benchmarks.studies.stability_dormant import ONLINE_DORMANT, tried_online  # noqa: E402
from benchmarks.studies.stability_guards import alarm_steps  # noqa: E402
from benchmarks.studies.stability_map import machine as stability_machine  # noqa: E402
from benchmarks.studies.stability_map import study_pipeline  # noqa: E402
from trl_diffusion_sdpo.demo.recipe import DemoRecipe  # noqa: E402
from trl_diffusion_sdpo.demo.stats import paired_difference, summarise  # noqa: E402

REFERENCE = "online-dpo"
_PARAMETER = {"safeguard_space": "parameter", "safeguard_mu": 0.5}
METHODS: dict[str, dict[str, Any]] = {
    "online-dpo": {"online": True, "safeguard_space": "none"},
    "online-sdpo-output": {"online": True, "safeguard_space": "output", "safeguard_mu": 0.5},
    "online-sdpo-parameter": {"online": True, **_PARAMETER},
    "offline-dpo": {"online": False, "safeguard_space": "none"},
    # controls, run with --methods: the parameter-space safeguard on the fixed pairs, and online with its pairs
    # VAE-encoded from their decoded 8-bit images (as the fixed pairs are) instead of the sampler's latents
    "offline-sdpo-parameter": {"online": False, **_PARAMETER},
    "online-sdpo-parameter-decoded": {"online": True, **_PARAMETER, "pair_latents": "decoded"},
    # the authors' SD1.5 mu online (what the demo base's family resolved when these runs were made; the tiny base's
    # own default is 0.5 now, online-sdpo-output), and the dual-ascent mu the online hacking regime compares it with
    "online-sdpo-default": {"online": True, "safeguard_space": "output", "safeguard_mu": 0.9},
    "online-sdpo-output-auto": {"online": True, "safeguard_space": "output", "safeguard_mu": "auto"},
    "online-dormant-safeguard": {"online": True, **ONLINE_DORMANT},  # the offline switch target tried online
}
DEFAULT_METHODS = ("online-dpo", "online-sdpo-output", "online-sdpo-parameter", "offline-dpo")
MEASURES = ("shape_iou", "shape_accuracy", "diversity", "denoising_error_change", "colour_reward")
HISTORY_KEYS = (
    "loss",
    "delta/winner",
    "delta/loser",
    "implicit_acc",
    "safeguard/lambda_mean",
    "safeguard/mu",
    "online/reward_mean",
    "online/reward_margin",
    "online/diversity",
    "mse/ref_winner",
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]  # the demo's
EVAL_SEED, DRAWING_SEED = 1_000_000, 55_555


def _ints(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high) + 1) if high else [int(low)])
    return out


def machine() -> dict[str, Any]:
    """The stability map's machine record (device, CPU model, cores, torch threads) and the load average."""
    return {**stability_machine(), "load_average": [round(v, 2) for v in os.getloadavg()]}


# ---------------------------------------------------------------------------------------------- shared set-up


class Context:
    """What every run of an invocation shares: the base, the held-out captions and drawings, the evaluation seeds
    and the offline pairs (built once per process, identically: every step of it is seeded)."""

    def __init__(self, grid: dict[str, Any], pairs_dir: str | None = None, base: str = "benchmark") -> None:
        from trl_diffusion_sdpo.demo.pairs import make_preference_pairs
        from trl_diffusion_sdpo.demo.shapes import split_captions

        self.grid = grid
        self.base = study_pipeline(base)  # the benchmark's base; --quick: the shipped one (loads at once)
        self.train_captions, self.held_out = split_captions(grid["held_out_prompts"], DemoRecipe.seed)
        self.templates = shape_templates()
        self.pixels = drawings(self.held_out, grid["drawings_per_prompt"], DRAWING_SEED)
        self.pair_stats: dict[str, Any] = {}
        if pairs_dir is not None and Path(pairs_dir, "dataset_info.json").exists():
            from datasets import load_from_disk

            self.pairs = load_from_disk(pairs_dir)
        else:
            self.pairs, stats = make_preference_pairs(
                self.base,
                self.train_captions,
                grid["pairs_per_prompt"],
                grid["min_reward_margin"],
                grid["sample_steps"],
                grid["guidance_scale"],
                seed=100_000 * DemoRecipe.seed,
            )
            self.pair_stats = vars(stats)
            if pairs_dir is not None:
                self.pairs.save_to_disk(pairs_dir)

    def evaluate(self, pipeline) -> dict[str, float]:
        """The held-out measures of ``pipeline`` (its UNet as it is, adapters on), with fixed noise."""
        from diffusers import StableDiffusionPipeline

        from trl_diffusion_sdpo.demo.pairs import sample_images
        from trl_diffusion_sdpo.demo.shapes import colour_reward

        per = self.grid["eval_samples_per_prompt"]
        captions = [c for c in self.held_out for _ in range(per)]
        sampler = StableDiffusionPipeline(
            **{**pipeline.components, "scheduler": copy.deepcopy(pipeline.scheduler)}, requires_safety_checker=False
        )
        unet = pipeline.unet
        was_training = unet.training
        unet.eval()
        try:
            images = sample_images(
                sampler,
                [c.text for c in captions],
                [EVAL_SEED + j for _ in self.held_out for j in range(per)],
                self.grid["sample_steps"],
                self.grid["guidance_scale"],
                batch_size=256,
            )
            error = held_out_denoising_error(pipeline, self.pixels, self.held_out, self.grid["drawings_per_prompt"])
        finally:
            unet.train(was_training)
        self.last_images = images  # [prompts * per, H, W, 3], prompt-major: for a caller's own measures or figure
        iou, correct = shape_scores(images, captions, self.templates)
        return {
            "shape_iou": float(iou.mean()),
            "shape_accuracy": float(correct.mean()),
            "diversity": float(diversity(images.reshape(len(self.held_out), per, *images.shape[1:])).mean()),
            "denoising_error": error,
            "colour_reward": float(colour_reward(images, captions).mean()),
        }


_CONTEXT: Context | None = None


def _init_worker(grid: dict[str, Any], pairs_dir: str | None, base: str) -> None:
    global _CONTEXT
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    _quiet()
    _CONTEXT = Context(grid, pairs_dir, base)


def _quiet() -> None:
    import datasets
    import diffusers
    import transformers

    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
    datasets.disable_progress_bars()


# ---------------------------------------------------------------------------------------------- one run


def _config_kwargs(grid: dict[str, Any], lr: float, seed: int, method: str, output_dir: str) -> dict[str, Any]:
    spec = {k: v for k, v in METHODS[method].items() if k not in ("online", "pair_latents")}
    return {**recipe_config_kwargs(grid, lr, seed, output_dir), **spec}


def recipe_config_kwargs(grid: dict[str, Any], lr: float, seed: int, output_dir: str) -> dict[str, Any]:
    """The config fields every run of the recipe shares (offline and online), before its method's own."""
    return dict(
        output_dir=output_dir,
        resolution=32,
        beta=grid["beta"],
        learning_rate=lr,
        scale_lr=False,
        weight_decay=0.0,
        warmup_steps=grid["warmup_steps"],
        per_device_train_batch_size=grid["batch_size"],
        max_steps=grid["max_steps"],
        proportion_empty_prompts=grid["proportion_empty_prompts"],
        random_flip=False,  # online training trains its sampled latents unflipped: the offline run too
        cache_latents=False,
        logging_steps=1,
        save_strategy="no",
        seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=True,
    )


def run_one(task: tuple[int, float, str]) -> dict[str, Any]:
    """Train one (seed, learning rate, method) from the base; its held-out measures every ``eval_every`` steps."""
    from datasets import Dataset
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
    from trl_diffusion_sdpo.online import OnlineDiffusionSDPOConfig, OnlineDiffusionSDPOTrainer

    seed, lr, method = task
    if METHODS[method].get("on_pathology") == "safeguard":
        tried_online()
    context = _CONTEXT
    assert context is not None, "the worker's context is built by _init_worker"
    grid = context.grid
    started, cpu_started = time.perf_counter(), time.process_time()
    base = context.base
    components = {**base.components, "unet": copy.deepcopy(base.unet), "scheduler": copy.deepcopy(base.scheduler)}
    pipeline = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    eval_steps = set(range(grid["eval_every"], grid["max_steps"] + 1, grid["eval_every"])) | {grid["max_steps"]}
    curve: dict[str, dict[str, float]] = {}
    eval_seconds = [0.0]

    class Judge(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in eval_steps:
                tick = time.perf_counter()
                curve[str(state.global_step)] = context.evaluate(pipeline)
                eval_seconds[0] += time.perf_counter() - tick
            if control.should_training_stop:  # a rewind's stop: its result stands for the later evaluation steps
                measure_stopped_run(curve, state.global_step, eval_steps, lambda: context.evaluate(pipeline))

    lora = LoraConfig(r=grid["lora_rank"], lora_alpha=grid["lora_rank"], target_modules=LORA_TARGETS)
    with tempfile.TemporaryDirectory(prefix=f"online-comparison-{method}-") as workdir:
        kwargs = _config_kwargs(grid, lr, seed, method, workdir)
        if METHODS[method]["online"]:
            args = OnlineDiffusionSDPOConfig(
                **kwargs,
                reward_funcs=["colour"],
                num_generations=grid["num_generations"],
                sample_steps=grid["sample_steps"],
                sample_guidance_scale=grid["guidance_scale"],
            )
            prompts = Dataset.from_dict({"prompt": [c.text for c in context.train_captions]})
            held = probe_prompts(context.held_out, METHODS[method])  # the held-out probe's prompts, if it probes
            trainer = OnlineDiffusionSDPOTrainer(pipeline, None, args, prompts, held, peft_config=lora)
            if METHODS[method].get("pair_latents") == "decoded":  # the pairs VAE-encoded from their 8-bit images
                trainer.generation.direct_latents = False
        else:
            args = DiffusionSDPOConfig(**kwargs)
            trainer = DiffusionSDPOTrainer(pipeline, None, args, context.pairs, peft_config=lora)
        trainer.remove_callback(PrinterCallback)  # the per-step log dicts: kept in the results file instead
        trainer.add_callback(Judge())
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "step" in entry]
    history: dict[str, list[float]] = {"step": [int(e["step"]) for e in logs]}
    for key in HISTORY_KEYS:
        if any(key in e for e in logs):
            history[key] = [float(e.get(key, float("nan"))) for e in logs]
    return {
        "seed": seed,
        "learning_rate": lr,
        "method": method,
        "safeguard_mu": trainer.args.safeguard_mu if trainer.args.safeguarded else None,  # as resolved
        "curve": curve,
        "history": history,
        "alarm": alarm_steps(trainer.state.log_history),
        "seconds": round(time.perf_counter() - started, 2),
        "eval_seconds": round(eval_seconds[0], 2),
        "process_cpu_seconds": round(time.process_time() - cpu_started, 2),
        "machine": machine(),
    }


# ---------------------------------------------------------------------------------------------- analysis


def run_key(seed: int, lr: float, method: str) -> str:
    return f"seed{seed}-lr{lr:g}-{method}"


def measures_at(run: dict[str, Any], step: str, base: dict[str, float]) -> dict[str, float]:
    """The compared measures of ``run`` at evaluation step ``step`` (the denoising error as a change from base)."""
    point = run["curve"][step]
    values = {m: point[m] for m in MEASURES if m in point}
    values["denoising_error_change"] = point["denoising_error"] - base["denoising_error"]
    return values


def analyse(report: dict[str, Any]) -> dict[str, Any]:
    """Per learning rate: each method's mean curves (with t intervals over seeds), its change from the base at the
    last step, its paired differences from online Diffusion-DPO at the last step (and along the run), the pairing
    check, and whether online Diffusion-DPO's held-out shape measure turned down."""
    grid, base = report["config"], report["base"]["measures"]
    steps = [str(s) for s in report["eval_steps"]]
    final = steps[-1]
    out: dict[str, Any] = {}
    for lr in report["learning_rates"]:
        runs = {m: {r["seed"]: r for r in report["runs"].values() if r["learning_rate"] == lr and r["method"] == m}
                for m in METHODS}  # fmt: skip
        setting: dict[str, Any] = {"learning_rate": lr, "steps": grid["max_steps"], "methods": {}}
        reference = runs[REFERENCE]
        for method, by_seed in runs.items():
            seeds = sorted(by_seed)
            if not seeds:
                continue
            entry: dict[str, Any] = {"seeds": seeds, "seconds_per_run": round(float(np.mean(
                [r["seconds"] for r in by_seed.values()])), 1)}  # fmt: skip
            entry["curves"] = {
                m: {"0": summarise([base[m] if m != "denoising_error_change" else 0.0] * len(seeds))}
                | {s: summarise([measures_at(by_seed[x], s, base)[m] for x in seeds]) for s in steps}
                for m in MEASURES
            }
            entry["change_from_base"] = {m: summarise([measures_at(by_seed[x], final, base)[m] - (
                0.0 if m == "denoising_error_change" else base[m]) for x in seeds]) for m in MEASURES}  # fmt: skip
            paired = sorted(set(seeds) & set(reference))
            if method != REFERENCE and len(paired) >= 2:
                entry["paired_seeds"] = paired
                entry["minus_online_dpo"] = {
                    m: paired_difference(
                        [measures_at(by_seed[x], final, base)[m] for x in paired],
                        [measures_at(reference[x], final, base)[m] for x in paired],
                    )
                    for m in MEASURES
                }
                entry["minus_online_dpo_by_step"] = {
                    m: {
                        s: {
                            k: paired_difference(
                                [measures_at(by_seed[x], s, base)[m] for x in paired],
                                [measures_at(reference[x], s, base)[m] for x in paired],
                            )[k]
                            for k in ("mean", "ci95")
                        }
                        for s in steps
                    }
                    for m in MEASURES
                }
            setting["methods"][method] = entry
        setting["pairing"] = pairing_check(runs)
        if reference:
            setting["online_dpo_turn"] = turn(setting["methods"][REFERENCE]["curves"])
        out[f"lr{lr:g}"] = setting
    return out


def turn(curves: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Where online Diffusion-DPO's mean held-out curves peak (shape IoU, shape accuracy: higher is better; the
    denoising error change: lower is better) and how far the last evaluation lies from that best point."""
    out = {}
    for measure, sign in (("shape_iou", 1.0), ("shape_accuracy", 1.0), ("denoising_error_change", -1.0)):
        points = {int(s): v["mean"] for s, v in curves[measure].items()}
        best = max(points, key=lambda s: sign * points[s])
        last = max(points)
        out[measure] = {"best_step": best, "best": points[best], "last": points[last],
                        "last_minus_best": points[last] - points[best]}  # fmt: skip
    return out


def pairing_check(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per seed, whether the online methods' first step saw the same generation (its mean reward) and, where they
    train the sampled latents, the same reference errors: with the LoRA's up-projections at zero every policy is the
    base at step 0."""
    online = [m for m in METHODS if METHODS[m]["online"] and runs.get(m)]
    same, seeds = [], sorted(set.intersection(*(set(runs[m]) for m in online))) if online else []
    for seed in seeds:
        rewards = [runs[m][seed]["history"]["online/reward_mean"][0] for m in online]
        errors = [runs[m][seed]["history"]["mse/ref_winner"][0] for m in online if "pair_latents" not in METHODS[m]]
        same.append(bool(np.allclose(rewards, rewards[0], rtol=1e-5, atol=0))
                    and bool(np.allclose(errors, errors[0], rtol=1e-5, atol=0)))  # fmt: skip
    # the offline runs of a seed train the same pairs in the same order: the same reference errors, first 3 steps
    offline = [m for m in METHODS if not METHODS[m]["online"] and runs.get(m)]
    offline_seeds = sorted(set.intersection(*(set(runs[m]) for m in offline))) if offline else []

    def first(method: str, seed: int) -> list[float]:
        return runs[method][seed]["history"]["mse/ref_winner"][:3]

    offline_same = [all(np.allclose(first(m, s), first(offline[0], s), rtol=1e-5, atol=0) for m in offline)
                    for s in offline_seeds]  # fmt: skip
    return {
        "methods": online,
        "seeds": seeds,
        "first_step_identical": same,
        "offline_methods": offline,
        "offline_first_steps_identical": offline_same,
        "all": bool(same) and all(same) and all(offline_same),
    }


# ---------------------------------------------------------------------------------------------- main


def _commit() -> str | None:
    """The checkout's commit (with ``+changes`` where the package or this script differ from it), or ``None``."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "trl_diffusion_sdpo", "benchmarks/studies"], cwd=root,
                               capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    text = json.dumps(report, indent=1)  # then lists of numbers on one line each
    text = re.sub(r"\[\s*([-+0-9.eENa,\s]+?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _fmt(d: dict[str, Any], digits: int = 4) -> str:
    return f"{d['mean']:+.{digits}f} [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}]"


def table(analysis: dict[str, Any]) -> list[str]:
    """Markdown: per learning rate, each method's paired difference from online Diffusion-DPO at the last step."""
    lines = []
    for key, setting in analysis.items():
        lines.append(f"\n{key}, {setting['steps']} steps: method minus online Diffusion-DPO [95% paired t]")
        lines.append("| method | seeds | " + " | ".join(MEASURES) + " |")
        lines.append("|---|---:|" + "---|" * len(MEASURES))
        for method, entry in setting["methods"].items():
            if "minus_online_dpo" in entry:
                diffs = entry["minus_online_dpo"]
                cells = " | ".join(_fmt(diffs[m]) for m in MEASURES)
                lines.append(f"| {method} | {len(entry['paired_seeds'])} | {cells} |")
        dpo = setting["methods"].get(REFERENCE)
        if dpo:
            for m in MEASURES:
                curve = ", ".join(f"{s}: {v['mean']:.4f}" for s, v in dpo["curves"][m].items())
                lines.append(f"online-dpo {m}: {curve}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0-9", help="Training seeds, e.g. 0-9 or 0,1,2.")
    parser.add_argument("--lrs", default="2e-4", help="Learning rates (comma-separated).")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"Of {', '.join(METHODS)}.")
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4, help="Prompts (online) or pairs (offline) per step.")
    parser.add_argument("--num-generations", type=int, default=2, help="Online samples per prompt.")
    parser.add_argument("--pairs-per-prompt", type=int, default=DemoRecipe.pairs_per_prompt)
    parser.add_argument("--eval-samples-per-prompt", type=int, default=8)
    parser.add_argument("--drawings-per-prompt", type=int, default=8, help="Held-out drawings for the error.")
    parser.add_argument("--workers", type=int, default=2, help="Processes; 1 runs in this process.")
    parser.add_argument("--quick", action="store_true", help="A few seconds' smoke run: 2 seeds, 2 steps, tiny sizes.")
    parser.add_argument("--json", default="benchmarks/results/online/cpu-online-comparison-tiny.json")
    parser.add_argument("--analyse", action="store_true", help="Only analyse the runs already in --json again.")
    args = parser.parse_args(argv)
    if args.analyse:
        report = json.loads(Path(args.json).read_text())
        report["analysis"] = analyse(report)
        _write(Path(args.json), report)
        print("\n".join(table(report["analysis"])))
        return 0
    if args.quick:
        args.seeds, args.max_steps, args.eval_every, args.batch_size = "0,1", 2, 1, 1
        args.pairs_per_prompt, args.eval_samples_per_prompt, args.drawings_per_prompt = 1, 2, 1
    methods = args.methods.split(",")
    if REFERENCE not in methods or any(m not in METHODS for m in methods):
        raise SystemExit(f"--methods must include {REFERENCE} and name only {list(METHODS)}")
    grid = {
        "max_steps": args.max_steps,
        "eval_every": args.eval_every,
        "batch_size": args.batch_size,
        "num_generations": args.num_generations,
        "pairs_per_prompt": args.pairs_per_prompt,
        "min_reward_margin": 0.0,  # no tie filter: every online prompt gives its pair, every offline pair is kept
        "eval_samples_per_prompt": args.eval_samples_per_prompt,
        "drawings_per_prompt": args.drawings_per_prompt,
        "held_out_prompts": DemoRecipe.num_held_out_prompts,
        "sample_steps": DemoRecipe.num_inference_steps,
        "guidance_scale": DemoRecipe.guidance_scale,
        "beta": DemoRecipe.beta,
        "warmup_steps": min(DemoRecipe.warmup_steps, args.max_steps - 1),
        "proportion_empty_prompts": DemoRecipe.proportion_empty_prompts,
        "lora_rank": DemoRecipe.lora_rank,
    }
    seeds, lrs = _ints(args.seeds), [float(v) for v in args.lrs.split(",")]
    path = Path(args.json)
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if report.get("config") != grid:
        report = {"config": grid, "runs": {}, "invocations": []}
    invocation: dict[str, Any] = {"argv": [Path(sys.argv[0]).as_posix(), *sys.argv[1:]] if argv is None else argv,
                                  "commit": _commit(), "machine_start": machine()}  # fmt: skip
    wall = time.perf_counter()
    torch.set_num_threads(1)
    _quiet()
    with tempfile.TemporaryDirectory(prefix="online-comparison-pairs-") as pairs_dir:
        base = "shipped" if args.quick else "benchmark"
        context = Context(grid, pairs_dir, base)  # builds the offline pairs once; the workers load them
        report["offline_pairs"] = context.pair_stats
        report["held_out_prompts"] = [c.text for c in context.held_out]
        report["base"] = {"measures": context.evaluate(context.base)}
        report["scorer_validation"] = validate_shape_scorer()
        report["eval_steps"] = sorted(set(range(args.eval_every, args.max_steps + 1, args.eval_every))
                                      | {args.max_steps})  # fmt: skip
        tasks = [(s, lr, m) for s in seeds for lr in lrs for m in methods if run_key(s, lr, m) not in report["runs"]]
        print(f"{len(tasks)} runs to do ({len(report['runs'])} already in {path})", flush=True)

        def done(result: dict[str, Any]) -> None:
            report["runs"][run_key(result["seed"], result["learning_rate"], result["method"])] = result
            _write(path, report)
            print(f"{result['method']} seed {result['seed']} lr {result['learning_rate']:g}: {result['seconds']} s, "
                  f"last {result['curve'][str(grid['max_steps'])]}", flush=True)  # fmt: skip

        if args.workers <= 1:
            global _CONTEXT
            _CONTEXT = context
            for task in tasks:
                done(run_one(task))
        else:
            spawn = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(
                args.workers, mp_context=spawn, initializer=_init_worker, initargs=(grid, pairs_dir, base)
            ) as pool:
                for future in concurrent.futures.as_completed([pool.submit(run_one, t) for t in tasks]):
                    done(future.result())
    report["learning_rates"] = sorted({r["learning_rate"] for r in report["runs"].values()})
    invocation.update(wall_seconds=round(time.perf_counter() - wall, 1), workers=args.workers, runs=len(tasks),
                      machine_end=machine())  # fmt: skip
    report["invocations"].append(invocation)
    report["analysis"] = analyse(report)
    report["what"] = __doc__.split("\n")[0]
    _write(path, report)
    for line in table(report["analysis"]):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
