"""The online reward-hacking regime of the stability benchmark: online training on a reward the policy can raise
while what the user wants falls. Does Diffusion-DPO's held-out shape measure turn down, and does each guard keep it?

    OMP_NUM_THREADS=1 nice -n 5 nohup python benchmarks/studies/online_hacking.py run &
    python benchmarks/studies/online_hacking.py analyse --page benchmarks/research/stability.md  # the tables, again
    python benchmarks/studies/online_hacking.py figure

Not part of the test suite. ``OnlineDiffusionSDPOTrainer`` on the benchmark's base (``stability_map.STUDY_BASE``), with
the online comparison's set-up (``online_comparison.py``: the demo's LoRA, beta, warm-up, prompt dropout, 4 prompts per
step, 2 samples per prompt with the demo's DDIM steps and guidance, best against worst), trained on :func:`brightness`,
the mean pixel value of the sample: a reward a sample raises by washing its shape into its background, which the
caption never asks for. Judged every ``--eval-every`` steps on the demo's held-out prompts with fixed noise, on what
the training never sees (``online_measures.py``): shape IoU and accuracy, sample diversity, the denoising error on
clean held-out drawings; and on the brightness and the demo's colour reward of the held-out samples.

1. ``search``: Diffusion-DPO alone, 2 seeds, learning rates in ``--search-lrs`` in rising order, until its mean
   held-out shape IoU at the last evaluation lies ``--turn`` or more below its best point along the run (step 0, the
   base, included): Diffusion-DPO's held-out measure *turns down*. If no learning rate does, the grid runs at the last.
2. ``grid``: at that learning rate, ``--seeds`` seeds of each setting in ``--methods`` (:data:`METHODS`), in groups of
   all seeds so that a run cut short leaves whole settings: Diffusion-DPO, the default safeguard (``safeguard_mu``
   unset: its family's value, recorded per run), the output space with ``mu="auto"``, then the guards.
   ``ema-0.999`` is judged on its EMA weights (the trainer's ``sampling_weights``, what validation samples from), and
   at the last step on its trained weights too (``trained_final``).

Pairing: a seed fixes the LoRA's initial weights, the prompts' order, timesteps, noise and the sampling noise, so the
settings of a seed share their first generation. Each setting at the grid's last step is compared with Diffusion-DPO
of the same seed and with the base (:func:`trl_diffusion_sdpo.demo.stats.paired_difference`: 95% paired t
intervals). Runs go to ``--workers`` processes (one torch thread each); each finished run is appended to ``--json``
and a rerun with the same settings skips the runs already there.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.studies.online_comparison import (  # noqa: E402
    HISTORY_KEYS,
    LORA_TARGETS,
    Context,
    _commit,
    _ints,
    _quiet,
    _write,
    machine,
    recipe_config_kwargs,
)
from benchmarks.studies.online_measures import drawings, shape_templates, validate_shape_scorer  # noqa: E402
from benchmarks.studies.online_probe_runs import measure_stopped_run, probe_prompts  # noqa: E402
from benchmarks.studies.stability_dormant import ONLINE_DORMANT, tried_online  # noqa: E402
from benchmarks.studies.stability_guards import DORMANT, _png, _strip, alarm_steps, sample_grid, write_block  # noqa: E402
from benchmarks.studies.stability_map import study_pipeline  # noqa: E402
from trl_diffusion_sdpo.demo.recipe import DemoRecipe  # noqa: E402
from trl_diffusion_sdpo.demo.stats import paired_difference, summarise  # noqa: E402

REFERENCE = "dpo"
#: setting -> config fields on top of the shared ones, in the order the grid runs them
METHODS: dict[str, dict[str, Any]] = {
    "dpo": {"safeguard_space": "none"},
    "sdpo-default": {"safeguard_space": "output", "safeguard_mu": 0.9},  # the authors' SD1.5 mu, as run
    "sdpo-output-auto": {"safeguard_space": "output", "safeguard_mu": "auto"},
    "max-margin-5": {"safeguard_space": "none", "max_margin": 5.0},
    "sft-1": {"safeguard_space": "none", "sft_weight": 1.0},
    "ema-0.999": {"safeguard_space": "none", "ema_decay": 0.999},
    "auto-beta": {"safeguard_space": "none", "auto_beta": True},
    "sdpo-parameter-auto": {"safeguard_space": "parameter", "safeguard_mu": "auto"},
    "sdpo-update-auto": {"safeguard_space": "update", "safeguard_mu": "auto"},
    DORMANT: ONLINE_DORMANT,  # the offline switch target, tried online: its runs are stability_dormant's
}
LABELS = {
    "dpo": "Diffusion-DPO",
    "sdpo-default": "output space, mu=0.9",
    "sdpo-output-auto": "output space, mu=auto",
    "max-margin-5": "Diffusion-DPO, max_margin=5",
    "sft-1": "Diffusion-DPO, sft_weight=1",
    "ema-0.999": "Diffusion-DPO, ema_decay=0.999 (EMA judged)",
    "auto-beta": "Diffusion-DPO, auto_beta",
    "sdpo-parameter-auto": "parameter space, mu=auto",
    "sdpo-update-auto": "update space, mu=auto",
    DORMANT: "Diffusion-DPO, on_pathology=safeguard",
}
#: held-out measures: (name, +1 where higher is better for the user, -1 where lower is); brightness is the reward
MEASURES = (
    ("brightness", 0.0),
    ("colour_reward", 1.0),
    ("shape_iou", 1.0),
    ("shape_accuracy", 1.0),
    ("diversity", 1.0),
    ("denoising_error", -1.0),
)
#: the grid's settings in the order run: Diffusion-DPO, the two safeguards, then the guards as the budget allows
DEFAULT_METHODS = ("dpo", "sdpo-default", "sdpo-output-auto", "ema-0.999", "max-margin-5", "sft-1", "auto-beta")
EXTRA_HISTORY = ("beta", "guard/capped_fraction", "guard/sft_loss")


def brightness(prompts: list[str], images: list, **columns: Any) -> list[float]:
    """The hackable reward: each image's mean pixel value over its RGB channels, in [0, 1]
    (``mean(x) / 255`` of its 8-bit pixels). The caption never asks for it."""
    return [float(np.asarray(image.convert("RGB"), dtype=np.float64).mean() / 255.0) for image in images]


class HackingContext(Context):
    """The online comparison's evaluation context without its offline pairs: the base, the held-out captions and
    drawings (``Context.evaluate`` gives the held-out measures; its ``last_images`` the samples)."""

    def __init__(self, grid: dict[str, Any]) -> None:
        from trl_diffusion_sdpo.demo.shapes import split_captions

        self.grid = grid
        self.base = study_pipeline()
        self.train_captions, self.held_out = split_captions(grid["held_out_prompts"], DemoRecipe.seed)
        self.templates = shape_templates()
        self.pixels = drawings(self.held_out, grid["drawings_per_prompt"], grid["drawing_seed"])

    def measures(self, pipeline) -> tuple[dict[str, float], np.ndarray]:
        """The held-out measures with the samples' brightness, and each prompt's first sample ``[P, H, W, 3]``."""
        out = self.evaluate(pipeline)
        images = self.last_images
        out["brightness"] = float(images.mean())
        return out, images[:: self.grid["eval_samples_per_prompt"]]


_CONTEXT: HackingContext | None = None


def _init_worker(grid: dict[str, Any]) -> None:
    global _CONTEXT
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    _quiet()
    _CONTEXT = HackingContext(grid)


def run_key(seed: int, lr: float, method: str) -> str:
    return f"seed{seed}-lr{lr:g}-{method}"


def run_one(task: tuple[int, float, str]) -> dict[str, Any]:
    """Train one (seed, learning rate, setting) from the base; its held-out measures every ``eval_every`` steps
    (on the weights validation samples from), and for seed 0 each held-out prompt's first sample."""
    from datasets import Dataset
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from trl_diffusion_sdpo.online import OnlineDiffusionSDPOConfig, OnlineDiffusionSDPOTrainer

    seed, lr, method = task
    if METHODS[method].get("on_pathology") == "safeguard":
        tried_online()
    context = _CONTEXT
    assert context is not None, "the worker's context is built by _init_worker"
    grid = context.grid
    started = time.perf_counter()
    base = context.base
    components = {**base.components, "unet": copy.deepcopy(base.unet), "scheduler": copy.deepcopy(base.scheduler)}
    pipeline = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    last = grid["max_steps"]
    eval_steps = set(range(grid["eval_every"], last + 1, grid["eval_every"])) | {last}
    curve: dict[str, dict[str, float]] = {}
    samples: dict[str, str] = {}
    extra: dict[str, Any] = {}

    class Judge(TrainerCallback):  # added after the trainer's own callbacks: the EMA has stepped when it runs
        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if control.should_training_stop:  # a rewind's stop: its result stands for the later evaluation steps
                with trainer.sampling_weights():
                    measure_stopped_run(curve, step, eval_steps, lambda: context.measures(pipeline)[0])
            if step not in eval_steps:
                return
            with trainer.sampling_weights():
                curve[str(step)], firsts = context.measures(pipeline)
            if seed == 0:
                samples[str(step)] = _png(firsts)
            if step == last and trainer.ema is not None:  # the trained weights themselves, for comparison
                extra["trained_final"] = context.measures(pipeline)[0]

    lora = LoraConfig(r=grid["lora_rank"], lora_alpha=grid["lora_rank"], target_modules=LORA_TARGETS)
    with tempfile.TemporaryDirectory(prefix=f"online-hacking-{method}-") as workdir:
        args = OnlineDiffusionSDPOConfig(
            **recipe_config_kwargs(grid, lr, seed, workdir),
            num_generations=grid["num_generations"],
            sample_steps=grid["sample_steps"],
            sample_guidance_scale=grid["guidance_scale"],
            **METHODS[method],
        )
        prompts = Dataset.from_dict({"prompt": [c.text for c in context.train_captions]})
        held = probe_prompts(context.held_out, METHODS[method])  # the held-out probe's prompts, if it probes
        trainer = OnlineDiffusionSDPOTrainer(
            pipeline, None, args, prompts, held, reward_funcs=[brightness], peft_config=lora
        )
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(Judge())
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "step" in entry]
    history: dict[str, list[float]] = {"step": [int(e["step"]) for e in logs]}
    for key in (*HISTORY_KEYS, *EXTRA_HISTORY):
        if any(key in e for e in logs):
            history[key] = [float(e.get(key, float("nan"))) for e in logs]
    return {
        "seed": seed,
        "learning_rate": lr,
        "method": method,
        "config_fields": {k: v for k, v in METHODS[method].items()},
        "safeguard_space": trainer.args.safeguard_space,
        "safeguard_mu": trainer.args.safeguard_mu if trainer.args.safeguarded else None,  # as resolved
        "curve": curve,
        **extra,
        "history": history,
        "alarm": alarm_steps(trainer.state.log_history),
        **({"samples": samples} if samples else {}),
        "seconds": round(time.perf_counter() - started, 2),
        "machine": machine(),
    }


# ---------------------------------------------------------------------------------------------- analysis


def _runs(report: dict[str, Any], lr: float, method: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in report["runs"].values() if r["learning_rate"] == lr and r["method"] == method}


def search_turn(report: dict[str, Any], lr: float, threshold: float) -> dict[str, Any]:
    """Diffusion-DPO's mean held-out curves at ``lr`` (step 0: the base) and whether the shape IoU turned down: its
    last point ``threshold`` or more below its best. The denoising error's and diversity's moves are recorded too."""
    runs = _runs(report, lr, REFERENCE)
    base = report["base"]["measures"]
    steps = ["0", *[str(s) for s in report["eval_steps"]]]
    curves = {
        m: {s: float(np.mean([base[m] if s == "0" else r["curve"][s][m] for r in runs.values()])) for s in steps}
        for m, _ in MEASURES
    }
    iou = curves["shape_iou"]
    best = max(iou, key=iou.get)  # type: ignore[arg-type]
    drop = iou[best] - iou[steps[-1]]
    return {
        "learning_rate": lr,
        "seeds": sorted(runs),
        "mean_curves": curves,
        "shape_iou_best_step": int(best),
        "shape_iou_last_below_best": drop,
        "denoising_error_last_minus_base": curves["denoising_error"][steps[-1]] - base["denoising_error"],
        "diversity_last_minus_base": curves["diversity"][steps[-1]] - base["diversity"],
        "brightness_last_minus_base": curves["brightness"][steps[-1]] - base["brightness"],
        "turned_down": bool(drop >= threshold),
    }


def analyse(report: dict[str, Any]) -> dict[str, Any]:
    """At the grid's learning rate, per setting and evaluation step: each measure's change from the base (t interval
    over seeds; the base's samples share the prompts and noise) and its paired difference from Diffusion-DPO of the
    same seeds (95% paired t)."""
    lr = report.get("grid_learning_rate")
    if lr is None:
        return {}
    base = report["base"]["measures"]
    steps = [str(s) for s in report["eval_steps"]]
    reference = _runs(report, lr, REFERENCE)
    out: dict[str, Any] = {"learning_rate": lr, "steps": report["config"]["max_steps"], "settings": {}}
    for method in METHODS:
        runs = _runs(report, lr, method)
        if not runs:
            continue
        seeds = sorted(runs)
        entry: dict[str, Any] = {
            "label": LABELS[method],
            "seeds": seeds,
            "safeguard_mu": sorted({str(r["safeguard_mu"]) for r in runs.values()}),
            "seconds_per_run": round(float(np.mean([r["seconds"] for r in runs.values()])), 1),
            "by_step": {},
        }
        paired = sorted(set(seeds) & set(reference))
        for step in steps:
            row: dict[str, Any] = {}
            for measure, _ in MEASURES:
                mine = {s: runs[s]["curve"][step][measure] for s in seeds}
                values = list(mine.values())
                item: dict[str, Any] = {"value": summarise(values)}
                if len(values) >= 2:
                    item["vs_base"] = paired_difference(values, [base[measure]] * len(values))
                if method != REFERENCE and len(paired) >= 2:
                    theirs = [reference[s]["curve"][step][measure] for s in paired]
                    item["vs_dpo"] = paired_difference([mine[s] for s in paired], theirs)
                row[measure] = item
            entry["by_step"][step] = row
        if method == "ema-0.999" and len(seeds) >= 2 and all("trained_final" in r for r in runs.values()):
            entry["trained_final_minus_ema"] = {
                m: paired_difference([runs[s]["trained_final"][m] for s in seeds],
                                     [runs[s]["curve"][steps[-1]][m] for s in seeds])
                for m, _ in MEASURES
            }  # fmt: skip
        out["settings"][method] = entry
    out["goal"] = goal(out, steps[-1])
    return out


def _oriented(ci: list[float] | None, sign: float) -> tuple[float, float] | None:
    """A 95% interval turned so that higher is better for the user (``sign`` -1 flips a lower-is-better measure)."""
    if ci is None:
        return None
    low, high = sign * ci[0], sign * ci[1]
    return min(low, high), max(low, high)


def goal(analysis: dict[str, Any], step: str) -> dict[str, Any]:
    """The stability benchmark's two halves per held-out user measure at ``step`` (the brightness is the reward and
    is not judged), with each measure turned so that higher is better:

    - Diffusion-DPO *breaks* on a measure when its change from the base has its 95% interval below 0; there a
      setting *holds* when its own interval against the base includes or exceeds 0 and overlaps the best setting's
      (the one with the highest mean change);
    - otherwise Diffusion-DPO is *healthy* on it; there a setting *costs nothing* when its paired interval against
      Diffusion-DPO includes 0 or lies above it.
    """
    settings = analysis["settings"]
    if REFERENCE not in settings:
        return {}
    out: dict[str, Any] = {}
    for measure, sign in MEASURES:
        if sign == 0.0:
            continue
        at = {m: e["by_step"][step][measure] for m, e in settings.items() if "vs_base" in e["by_step"][step][measure]}
        dpo = _oriented(at[REFERENCE]["vs_base"]["ci95"], sign)
        breaks = dpo is not None and dpo[1] < 0
        best = max(at, key=lambda m: sign * at[m]["vs_base"]["mean"])
        best_ci = _oriented(at[best]["vs_base"]["ci95"], sign)
        verdicts: dict[str, Any] = {}
        for method, item in at.items():
            if method == REFERENCE:
                continue
            if breaks:
                ci = _oriented(item["vs_base"]["ci95"], sign)
                met = ci is not None and best_ci is not None and ci[1] >= 0 and ci[1] >= best_ci[0]
                verdicts[method] = {"half": "holds where Diffusion-DPO breaks", "met": bool(met)}
            else:
                vs = _oriented(item.get("vs_dpo", {}).get("ci95"), sign)
                verdicts[method] = {"half": "costs nothing where Diffusion-DPO is healthy",
                                    "met": vs is not None and vs[1] >= 0}  # fmt: skip
        out[measure] = {"higher_is_better": sign > 0, "dpo_change": at[REFERENCE]["vs_base"],
                        "diffusion_dpo_breaks": breaks, "best": best, "settings": verdicts}  # fmt: skip
    return out


def goal_lines(analysis: dict[str, Any]) -> list[str]:
    """One line per judged measure: whether Diffusion-DPO breaks on it, and each setting's half, met or missed."""
    lines = []
    for measure, entry in (analysis.get("goal") or {}).items():
        state = "breaks" if entry["diffusion_dpo_breaks"] else "healthy"
        verdicts = ", ".join(f"{LABELS[m]}: {'meets' if v['met'] else 'misses'}" for m, v in entry["settings"].items())
        lines.append(f"- {measure}: Diffusion-DPO {state} ({_ci(entry['dpo_change'])}); {verdicts}")
    return lines


def _ci(item: dict[str, Any] | None, digits: int = 4) -> str:
    if item is None or item.get("ci95") is None:
        return "n/a"
    low, high = item["ci95"]
    return f"{item['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def table(report: dict[str, Any]) -> str:
    """Markdown: the search, then per setting at the last step each measure's change from the base and its paired
    difference from Diffusion-DPO."""
    lines = [
        "| learning rate | seeds | shape IoU best step | shape IoU last below best | brightness vs base "
        "| denoising error vs base | diversity vs base | turned down |",
        "|---|---:|---:|---|---|---|---|---|",
    ]
    for s in report.get("search", []):
        lines.append(
            f"| {s['learning_rate']:g} | {len(s['seeds'])} | {s['shape_iou_best_step']} | "
            f"{s['shape_iou_last_below_best']:+.4f} | {s['brightness_last_minus_base']:+.4f} | "
            f"{s['denoising_error_last_minus_base']:+.4f} | {s['diversity_last_minus_base']:+.4f} | "
            f"{'yes' if s['turned_down'] else 'no'} |"
        )
    analysis = report.get("analysis") or {}
    if not analysis:
        return "\n".join(lines)
    last = str(report["eval_steps"][-1])
    names = [m for m, _ in MEASURES]
    lines += ["", f"lr {analysis['learning_rate']:g}, step {last}: change from the base [95% paired t]", "",
              "| setting | seeds | " + " | ".join(names) + " |", "|---|---:|" + "---|" * len(names)]  # fmt: skip
    for entry in analysis["settings"].values():
        row = entry["by_step"][last]
        cells = " | ".join(_ci(row[m].get("vs_base")) for m in names)
        lines.append(f"| {entry['label']} | {len(entry['seeds'])} | {cells} |")
    lines += ["", f"minus Diffusion-DPO of the same seed, step {last} [95% paired t]", "",
              "| setting | seeds | " + " | ".join(names) + " |", "|---|---:|" + "---|" * len(names)]  # fmt: skip
    for method, entry in analysis["settings"].items():
        if method != REFERENCE:
            row = entry["by_step"][last]
            n = row["shape_iou"].get("vs_dpo", {}).get("n", 0)
            cells = " | ".join(_ci(row[m].get("vs_dpo")) for m in names)
            lines.append(f"| {entry['label']} | {n} | {cells} |")
    if analysis.get("goal"):
        lines += ["", f"The goal's halves at step {last} (each measure turned so that higher is better):", ""]
        lines += goal_lines(analysis)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- figure


def figure(path: Path, out: Path, seed: int = 0, scale: int = 3) -> int:
    """Held-out samples along the grid's runs of ``seed`` (one column per evaluation step, the base first), one row
    per setting, Diffusion-DPO first: each held-out prompt's first sample, the same noise in every row."""
    report = __import__("json").loads(path.read_text())
    lr = report["grid_learning_rate"]
    runs = [r for m in METHODS for r in _runs(report, lr, m).values() if r["seed"] == seed and "samples" in r]
    steps = ["0", *[str(s) for s in report["eval_steps"]]]
    strips = [[_strip(report["base"]["samples"] if s == "0" else r["samples"][s]) for s in steps] for r in runs]
    labels = []
    for run in runs:
        final = run["curve"][steps[-1]]
        labels.append((LABELS[run["method"]], f"IoU {final['shape_iou']:.3f}, brightness {final['brightness']:.3f}"))
    return sample_grid(strips, steps, labels, out, scale, left=300)


# ---------------------------------------------------------------------------------------------- main


TABLES_START, TABLES_END = "<!-- online-hacking-tables:start -->", "<!-- online-hacking-tables:end -->"
#: what the study does not run, whatever its invocation; the settings not yet run are added per report
NOT_RUN = (
    "a saturation reward; the colour reward pushed longer or harder",
    "more than 60 steps",
)


def _finish(path: Path, report: dict[str, Any]) -> None:
    report["analysis"] = analyse(report)
    lr = report.get("grid_learning_rate")
    done = {s["learning_rate"] for s in report.get("search", [])}
    report["not_run"] = [
        *(f"the search's learning rate {v:g}: the search stopped before it" for v in (3e-3, 1e-2) if v not in done),
        *(f"the setting {LABELS[m]}" for m in METHODS if lr is not None and not _runs(report, lr, m) and m != DORMANT),
        *NOT_RUN,
    ]
    _write(path, report)


def run(args: argparse.Namespace, grid: dict[str, Any], path: Path) -> int:
    import json

    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if report.get("config") != grid:
        report = {"config": grid, "runs": {}, "invocations": []}
    report["what"] = __doc__.split("\n\n")[0].replace("\n", " ")
    report["reward"] = brightness.__doc__.replace("\n", " ")
    invocation: dict[str, Any] = {"argv": sys.argv, "commit": _commit(), "machine_start": machine()}
    wall = time.perf_counter()
    torch.set_num_threads(1)
    _quiet()
    context = HackingContext(grid)
    base_measures, base_firsts = context.measures(context.base)
    report["base"] = {"measures": base_measures, "samples": _png(base_firsts)}
    report["held_out_prompts"] = [c.text for c in context.held_out]
    report["scorer_validation"] = validate_shape_scorer()
    report["eval_steps"] = sorted(set(range(args.eval_every, args.max_steps + 1, args.eval_every)) | {args.max_steps})
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        args.workers, mp_context=spawn, initializer=_init_worker, initargs=(grid,)
    ) as pool:

        def do(tasks: list[tuple[int, float, str]]) -> None:
            tasks = [t for t in tasks if run_key(*t) not in report["runs"]]
            print(f"{len(tasks)} runs to do ({len(report['runs'])} in {path})", flush=True)
            for future in concurrent.futures.as_completed([pool.submit(run_one, t) for t in tasks]):
                result = future.result()
                report["runs"][run_key(result["seed"], result["learning_rate"], result["method"])] = result
                _finish(path, report)
                final = result["curve"][str(args.max_steps)]
                print(f"{time.strftime('%H:%M:%S')} {result['method']} seed {result['seed']} lr "
                      f"{result['learning_rate']:g}: {result['seconds']} s, shape IoU {final['shape_iou']:.4f}, "
                      f"brightness {final['brightness']:.4f}", flush=True)  # fmt: skip

        report["search"], chosen = [], None
        for lr in [float(v) for v in args.search_lrs.split(",")]:
            do([(s, lr, REFERENCE) for s in _ints(args.search_seeds)])
            verdict = search_turn(report, lr, args.turn)
            report["search"].append(verdict)
            print(f"search lr {lr:g}: {verdict}", flush=True)
            chosen = lr
            if verdict["turned_down"]:
                break
        report["grid_learning_rate"] = chosen
        report["search_rule"] = (
            f"rising learning rates, seeds {args.search_seeds} of Diffusion-DPO; stop at the first whose mean shape "
            f"IoU at step {args.max_steps} is {args.turn} or more below its best point along the run (the base "
            "included); none: the last"
        )
        _finish(path, report)
        for method in args.methods.split(","):
            do([(s, chosen, method) for s in _ints(args.seeds)])  # type: ignore[misc]
    invocation.update(wall_seconds=round(time.perf_counter() - wall, 1), workers=args.workers, machine_end=machine())
    report["invocations"].append(invocation)
    _finish(path, report)
    print(table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("run", "analyse", "figure"))
    parser.add_argument("--search-lrs", default="1e-3,3e-3,1e-2", help="Search: rising learning rates.")
    parser.add_argument("--search-seeds", default="0,1")
    parser.add_argument("--turn", type=float, default=0.01, help="Search: the shape IoU drop that stops it.")
    parser.add_argument("--seeds", default="0-9", help="Grid seeds, e.g. 0-9.")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"Of {', '.join(METHODS)}.")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4, help="Prompts per step.")
    parser.add_argument("--eval-samples-per-prompt", type=int, default=4)
    parser.add_argument("--drawings-per-prompt", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/online/cpu-online-hacking-demo.json", type=Path)
    parser.add_argument("--figure", default="docs/images/online_hacking_samples.png", type=Path)
    parser.add_argument("--page", default=None, type=Path, help="analyse: rewrite this page's marked tables block.")
    args = parser.parse_args(argv)
    if any(m not in METHODS for m in args.methods.split(",")) or args.methods.split(",")[0] != REFERENCE:
        parser.error(f"--methods starts with {REFERENCE} and names only {list(METHODS)}")
    if args.command == "figure":
        return figure(args.json, args.figure)
    if args.command == "analyse":
        report = json.loads(args.json.read_text())
        _finish(args.json, report)
        if args.page is not None:
            write_block(args.page, TABLES_START, TABLES_END, table(report))
        else:
            print(table(report))
        return 0
    grid = {
        "reward": "brightness",
        "max_steps": args.max_steps,
        "eval_every": args.eval_every,
        "batch_size": args.batch_size,
        "num_generations": 2,
        "eval_samples_per_prompt": args.eval_samples_per_prompt,
        "drawings_per_prompt": args.drawings_per_prompt,
        "drawing_seed": 55_555,
        "held_out_prompts": DemoRecipe.num_held_out_prompts,
        "sample_steps": DemoRecipe.num_inference_steps,
        "guidance_scale": DemoRecipe.guidance_scale,
        "beta": DemoRecipe.beta,
        "warmup_steps": min(DemoRecipe.warmup_steps, args.max_steps - 1),
        "proportion_empty_prompts": DemoRecipe.proportion_empty_prompts,
        "lora_rank": DemoRecipe.lora_rank,
    }
    return run(args, grid, args.json)


if __name__ == "__main__":
    sys.exit(main())
