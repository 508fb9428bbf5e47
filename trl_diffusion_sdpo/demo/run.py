"""The CPU demo's runs: base model, preference pairs, several methods times several seeds, then the figures and
``summary.json`` (the settings are :mod:`.recipe`'s, the summary and tables :mod:`.report`'s).

Every method trains through the same :class:`~trl_diffusion_sdpo.DiffusionSDPOTrainer` code path real models use,
from the same base weights, on the same pairs; for a training seed every method sees the same batches, timesteps
and noise, and every model is evaluated on the same held-out prompts with the same initial noise. The methods
differ only in their safeguard fields (:mod:`.methods`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..config import DiffusionSDPOConfig
from ..config.extras import require_extra
from ..config.messages import OutputExistsError, advice, overwrite_advice, replacing_refusal
from ..trainer import DiffusionSDPOTrainer
from .base_check import rebuild_and_check
from .methods import GUARDS, METHODS, Method, method_unavailable, resolve_methods
from .pairs import make_preference_pairs, sample_images
from .pretrain import PretrainRecipe, load_base, recipe_hash
from .recipe import DemoRecipe
from .report import (
    final_mean,
    format_report,
    history_from_logs,
    mean_history,
    safeguard_recommendation,
    summarise_breaking,
    summarise_methods,
)
from .shapes import Caption, colour_reward, split_captions

__all__ = ["refuse_earlier_outputs", "run_demo", "run_pretrain", "train_preference"]


# What the demo writes into its output folder, and what ``--pretrain`` writes into its own.
DEMO_OUTPUTS = (
    "summary.json",
    "history.json",
    "losses.png",
    "lambda.png",
    "breaking_regime.png",
    "breaking_history.json",
)
PRETRAIN_OUTPUTS = ("base", "pretrain_report.json")


def refuse_earlier_outputs(output_dir: str | Path, names: Sequence[str], writer: str, overwrite: bool) -> None:
    """Refuse, unless ``overwrite``, an ``output_dir`` holding anything, before anything loads or trains: an earlier
    run's files (``names``, what ``writer`` writes there), which this one would replace, or else whatever it holds,
    which this one would write among."""
    new_folder = f"write to a new {advice('--output_dir', 'output_dir')}"
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):  # a file: no switch makes it a folder
        raise OutputExistsError(replacing_refusal(str(output_dir), writer, [new_folder]))
    if overwrite or not os.path.exists(output_dir):
        return
    found = [name for name in names if os.path.exists(os.path.join(output_dir, name))]
    held = "an earlier run's files" if found else ""
    found = found or sorted(os.listdir(output_dir))
    if found:
        ways = [f"pass {overwrite_advice()} to {'replace them' if held else 'write among them'}", new_folder]
        raise OutputExistsError(replacing_refusal(str(output_dir), writer, ways, held, found))


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _TrainingBar(TrainerCallback):
    """A tqdm bar over optimizer steps showing the latest loss and error deltas (replaces the per-log printout)."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, dynamic_ncols=True, leave=False, disable=None)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "delta/winner" in logs:
            self.bar.set_postfix(
                loss=f"{logs['loss']:.3f}",
                dW=f"{logs['delta/winner']:+.4f}",
                dL=f"{logs['delta/loser']:+.4f}",
                refresh=False,
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def _training_args(
    recipe: DemoRecipe, method: Method, seed: int, output_dir: str, latent_cache_dir: str | None
) -> DiffusionSDPOConfig:
    return DiffusionSDPOConfig(
        output_dir=output_dir,
        beta=recipe.beta,
        **method.config_kwargs(),
        resolution=recipe.pretrain.image_size,
        proportion_empty_prompts=recipe.proportion_empty_prompts,
        random_flip=recipe.random_flip,
        cache_latents=recipe.cache_latents,
        latent_cache_dir=latent_cache_dir,
        learning_rate=recipe.learning_rate,
        scale_lr=False,
        weight_decay=recipe.weight_decay,
        warmup_steps=recipe.warmup_steps,
        per_device_train_batch_size=recipe.batch_size,
        max_steps=recipe.max_steps,
        logging_steps=1,
        save_strategy="no",
        seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        report_to="none",
        disable_tqdm=False,  # else transformers prints every log dict when its verbosity is above warning
    )


def _trainer_settings(recipe: DemoRecipe) -> dict[str, Any]:
    """The trainer settings the recipe does not spell out (defaults of the config), for the summary."""
    args = _training_args(recipe, METHODS["sdpo-output"], recipe.seeds[0], tempfile.gettempdir(), None)
    return {
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "max_grad_norm": args.max_grad_norm,
        "weight_decay": args.weight_decay,
        "scale_lr": args.scale_lr,
        "safeguard_max_lambda": args.safeguard_max_lambda,
        "timesteps": [args.min_timestep, args.max_timestep],
    }


def train_preference(
    base: StableDiffusionPipeline,
    dataset: Dataset,
    recipe: DemoRecipe,
    method: Method,
    seed: int,
    latent_cache_dir: str | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    probe_pairs: Dataset | None = None,
) -> tuple[StableDiffusionPipeline, dict[str, list[float]]]:
    """Tune a copy of ``base``'s UNet with ``method`` and training seed ``seed``; return the tuned pipeline and the
    per-step metrics. The VAE and text encoder are shared with ``base`` (they stay frozen). ``callbacks`` are added
    to the trainer (e.g. an evaluation partway through training, as :class:`EvaluateAt`); each receives the pipeline
    being tuned as its ``pipeline`` attribute and the trainer's ``sampling_weights`` (the weights validation samples
    from: the EMA's with ``ema_decay``) as its ``sampling_weights``. ``probe_pairs``: the held-out probe's pairs (the
    trainer's eval split) for a method that :attr:`~.methods.Method.probes`, so its training data stays ``dataset``."""
    components = {**base.components, "unet": copy.deepcopy(base.unet), "scheduler": copy.deepcopy(base.scheduler)}
    pipeline = StableDiffusionPipeline(**components, requires_safety_checker=False)
    peft_config = None
    if recipe.tuning == "lora":
        peft_config = LoraConfig(
            r=recipe.lora_rank,
            lora_alpha=recipe.lora_rank,
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"],
        )
    with tempfile.TemporaryDirectory(prefix=f"demo-{method.key}-") as workdir:
        args = _training_args(recipe, method, seed, workdir, latent_cache_dir)
        held = probe_pairs if method.probes else None
        trainer = DiffusionSDPOTrainer(pipeline, None, args, dataset, held, peft_config=peft_config)
        if method.log_output_lambda:
            trainer.safeguard.log_output_lambda(trainer.args)
        trainer.remove_callback(ProgressCallback)  # our bar shows the step metrics instead of printing them
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_TrainingBar(f"{method.label}, seed {seed}"))
        for callback in callbacks:
            callback.pipeline, callback.sampling_weights = pipeline, trainer.sampling_weights
            trainer.add_callback(callback)
        trainer.train()
    pipeline.unet.eval()
    return pipeline, history_from_logs(trainer.state.log_history)


def _evaluate(
    pipeline: StableDiffusionPipeline, captions: list[Caption], recipe: DemoRecipe, desc: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``[P, S, H, W, 3]`` and rewards ``[P, S]`` on ``captions`` with the fixed evaluation seeds."""
    per_prompt = recipe.eval_seeds_per_prompt
    prompts = [c.text for c in captions for _ in range(per_prompt)]
    seeds = [_eval_seed(recipe, j) for _ in captions for j in range(per_prompt)]
    images = sample_images(
        pipeline, prompts, seeds, recipe.num_inference_steps, recipe.guidance_scale, batch_size=256, desc=desc
    )
    rewards = colour_reward(images, [c for c in captions for _ in range(per_prompt)])
    return images.reshape(len(captions), per_prompt, *images.shape[1:]), rewards.reshape(len(captions), per_prompt)


class EvaluateAt(TrainerCallback):
    """The held-out samples ``[P, S, H, W, 3]`` and rewards ``[P, S]`` (:func:`_evaluate`: the same prompts and noise
    as the base's) after the optimizer steps in ``steps``, in ``images`` and ``rewards`` keyed by step.

    Samples from the trainer's sampling weights (the EMA's with ``ema_decay``; set by :func:`train_preference`, after
    the EMA's own step), with a copy of the scheduler and the UNet in eval mode, then restores train mode; the
    sampling noise comes from per-sample generators, so the training's batches, timesteps and noise are untouched."""

    def __init__(self, steps: Sequence[int], held_out: list[Caption], recipe: DemoRecipe) -> None:
        self.steps, self.held_out, self.recipe = set(steps), held_out, recipe
        self.pipeline: StableDiffusionPipeline | None = None
        self.sampling_weights: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.images: dict[int, np.ndarray] = {}
        self.rewards: dict[int, np.ndarray] = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self._sample(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        # A run that stopped early (on_pathology="rewind" stops with its healthy weights) ends with the weights it
        # stopped with: they stand for every evaluation step it did not reach.
        if len(self.images) < len(self.steps):
            self._sample(state.global_step)
            for step in self.steps - set(self.images):
                self.images[step], self.rewards[step] = self.images[state.global_step], self.rewards[state.global_step]

    def _sample(self, step: int) -> None:
        sampler = StableDiffusionPipeline(
            **{**self.pipeline.components, "scheduler": copy.deepcopy(self.pipeline.scheduler)},
            requires_safety_checker=False,
        )
        self.pipeline.unet.eval()
        with self.sampling_weights():
            images, rewards = _evaluate(sampler, self.held_out, self.recipe)
        self.pipeline.unet.train()
        self.images[step], self.rewards[step] = images, rewards


def _eval_seed(recipe: DemoRecipe, index: int) -> int:
    return 1_000_000 + 1_000 * recipe.seed + index


def _load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _probe_pairs_seed(recipe: DemoRecipe) -> int:
    """The probe's pairs' first sampling seed: after every seed of the training pairs' (``100_000 * seed`` on)."""
    return 100_000 * recipe.seed + 50_000


def _run_breaking_regime(
    base: StableDiffusionPipeline,
    dataset: Dataset,
    pair_captions: list[Caption],
    held_out: list[Caption],
    demo: DemoRecipe,
    latent_cache_dir: str | None,
    echo: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, dict[str, list[float]]]]:
    """Train every row of ``demo.breaking`` (Diffusion-DPO and each guard) with its training seed from ``base`` on
    ``dataset``, sampling the held-out prompts at its evaluation steps. A row that runs the held-out probe reads pairs
    sampled for it from ``pair_captions`` with other noise than the training pairs'. Returns the summary entry
    (:func:`~.report.summarise_breaking`), the figure's images per row (``[steps + 1, P, H, W, 3]``: the base, then
    each evaluation step; the first sample of every prompt) and the per-step metric histories."""
    regime = demo.breaking
    recipe = regime.recipe(demo)
    methods, skipped = [], {}
    for method in resolve_methods(regime.methods, GUARDS):
        reason = method_unavailable(method)
        if reason is None:
            methods.append(method)
        else:
            skipped[method.key] = reason
    probe_pairs = None
    if any(method.probes for method in methods):
        probe_pairs, _ = make_preference_pairs(
            base,
            pair_captions,
            1,
            recipe.min_reward_margin,
            recipe.num_inference_steps,
            recipe.guidance_scale,
            seed=_probe_pairs_seed(recipe),
        )
    base_images, base_rewards = _evaluate(base, held_out, recipe)
    rewards: dict[str, dict[int, np.ndarray]] = {}
    histories: dict[str, dict[str, list[float]]] = {}
    images: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for method in methods:
        tick = time.perf_counter()
        evaluate = EvaluateAt(regime.eval_steps, held_out, recipe)
        tuned, histories[method.key] = train_preference(
            base, dataset, recipe, method, regime.seed, latent_cache_dir, [evaluate], probe_pairs
        )
        del tuned
        seconds[method.key] = time.perf_counter() - tick
        rewards[method.key] = evaluate.rewards
        images[method.key] = np.stack([base_images[:, 0], *(evaluate.images[s][:, 0] for s in regime.eval_steps)])
        change = evaluate.rewards[regime.max_steps].mean() - base_rewards.mean()
        echo(f"      {method.label}: held-out reward change {change:+.3f} ({seconds[method.key]:.0f} s)")
    summary = summarise_breaking(regime, methods, rewards, base_rewards, histories, seconds, skipped)
    return summary, images, histories


# ---------------------------------------------------------------------------------------------------- the demo


def run_demo(
    output_dir: str | Path,
    recipe: DemoRecipe | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    echo: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the demo and write ``summary.json``, ``history.json``, ``losses.png`` and ``lambda.png`` into
    ``output_dir``, and with ``recipe.breaking`` ``breaking_regime.png`` and ``breaking_history.json``. Returns the
    summary; ``echo`` receives the console lines (stage headers, then the tables: the breaking regime's first).

    An ``output_dir`` holding an earlier demo's files is refused unless ``overwrite``
    (:class:`~trl_diffusion_sdpo.config.messages.OutputExistsError`). The figures need matplotlib (the ``plots``
    extra): without it this fails here too. Both before any training.
    """
    refuse_earlier_outputs(output_dir, DEMO_OUTPUTS, "the demo", overwrite)
    require_extra("plots", "matplotlib", "The demo's figures")  # now, not after minutes of training

    recipe = recipe or DemoRecipe()
    with _torch_threads(recipe.threads):
        return _run_demo(Path(output_dir), recipe, cache_dir, use_cache, echo)


def _run_demo(
    out: Path, recipe: DemoRecipe, cache_dir: str | Path | None, use_cache: bool, echo: Callable[[str], None]
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    timings: dict[str, Any] = {}
    load_start = _load_average()
    start = time.perf_counter()
    methods, skipped = [], {}
    for method in resolve_methods(recipe.methods):
        reason = method_unavailable(method)
        if reason is None:
            methods.append(method)
        else:
            skipped[method.key] = reason
    if not methods:
        raise RuntimeError(f"no demo method can run here: {skipped}")

    stages = 4 if recipe.breaking is None else 5
    echo(f"[1/{stages}] Base model: a tiny text-to-image latent diffusion pipeline (UNet, VAE, CLIP text encoder)")
    tick = time.perf_counter()
    base, source, folder = load_base(recipe.pretrain, cache_root=cache_dir, use_cache=use_cache, warn=echo)
    timings["base_model_seconds"] = time.perf_counter() - tick
    described = {
        "shipped": "loaded the base shipped with the package",
        "cache": "loaded the base from the cache",
        "pretrained": f"pretrained in {timings['base_model_seconds']:.0f} s",
    }[source]
    echo(f"      {described} ({folder or 'not cached'}, recipe {recipe_hash(recipe.pretrain)})")

    echo(
        f"[2/{stages}] Preference pairs: two samples per prompt from the base, ranked by colour agreement with "
        "the caption"
    )
    tick = time.perf_counter()
    pair_captions, held_out = split_captions(recipe.num_held_out_prompts, recipe.seed)
    dataset, pair_stats = make_preference_pairs(
        base,
        pair_captions,
        recipe.pairs_per_prompt,
        recipe.min_reward_margin,
        recipe.num_inference_steps,
        recipe.guidance_scale,
        seed=100_000 * recipe.seed,
    )
    timings["pairs_seconds"] = time.perf_counter() - tick
    echo(
        f"      {pair_stats.num_kept} of {pair_stats.num_sampled} pairs kept (reward chosen "
        f"{pair_stats.mean_reward_chosen:.3f} vs rejected {pair_stats.mean_reward_rejected:.3f})"
    )
    tick = time.perf_counter()
    _, base_rewards = _evaluate(base, held_out, recipe)  # the rewards; breaking_regime.png shows samples
    timings["base_eval_seconds"] = time.perf_counter() - tick

    runs_total = len(methods) * len(recipe.seeds)
    echo(
        f"[3/{stages}] {len(methods)} methods x {len(recipe.seeds)} seeds ({runs_total} runs of {recipe.max_steps} "
        "steps) from the same base and pairs"
    )
    for key, reason in skipped.items():
        echo(f"      skipped {key}: {reason}")
    runs: dict[str, list[dict[str, Any]]] = {m.key: [] for m in methods}
    rewards_per_run: dict[str, list[np.ndarray]] = {m.key: [] for m in methods}
    histories: dict[str, dict[str, dict[str, list[float]]]] = {m.key: {} for m in methods}
    bar = tqdm(total=runs_total, desc="Runs", dynamic_ncols=True, disable=None)  # None: no bar off a terminal
    with tempfile.TemporaryDirectory(prefix="demo-latents-") as latent_cache_dir:
        for seed in recipe.seeds:
            for method in methods:
                tick = time.perf_counter()
                tuned, history = train_preference(base, dataset, recipe, method, seed, latent_cache_dir)
                train_seconds = time.perf_counter() - tick
                tick = time.perf_counter()
                _, rewards = _evaluate(tuned, held_out, recipe)
                eval_seconds = time.perf_counter() - tick
                del tuned
                histories[method.key][str(seed)] = history
                rewards_per_run[method.key].append(rewards.ravel())
                run = {
                    "seed": seed,
                    "reward": float(rewards.mean()),
                    "reward_change": float(rewards.mean() - base_rewards.mean()),
                    "winner_delta": final_mean(history, "delta/winner", recipe.max_steps),
                    "loser_delta": final_mean(history, "delta/loser", recipe.max_steps),
                    "implicit_acc": final_mean(history, "implicit_acc", recipe.max_steps),
                    "loss": final_mean(history, "loss", recipe.max_steps),
                    "train_seconds": round(train_seconds, 2),
                    "eval_seconds": round(eval_seconds, 2),
                }
                if "safeguard/lambda_mean" in history:
                    run["lambda_mean"] = float(np.mean(history["safeguard/lambda_mean"]))
                    run["lambda_final"] = final_mean(history, "safeguard/lambda_mean", recipe.max_steps)
                    run["lambda_below_max"] = float(np.mean(history["safeguard/engaged"]))
                if "safeguard/output_lambda_mean" in history:
                    run["output_lambda_mean"] = float(np.mean(history["safeguard/output_lambda_mean"]))
                runs[method.key].append(run)
                bar.update(1)
                if bar.disable:  # a log file: one plain line per run instead of the bar
                    done = sum(len(r) for r in runs.values())
                    echo(f"      run {done}/{runs_total} done: {method.label}, seed {seed} ({train_seconds:.0f} s)")
        bar.close()
        breaking = None
        if recipe.breaking is not None:
            regime = recipe.breaking
            echo(
                f"[4/5] Breaking regime: Diffusion-DPO and each guard at lr {regime.learning_rate:g}, "
                f"{regime.max_steps} steps of {regime.batch_size} pairs, seed {regime.seed}"
            )
            tick = time.perf_counter()
            breaking = _run_breaking_regime(base, dataset, pair_captions, held_out, recipe, latent_cache_dir, echo)
            timings["breaking_regime_seconds"] = time.perf_counter() - tick
    timings["runs_seconds"] = sum(r["train_seconds"] + r["eval_seconds"] for rs in runs.values() for r in rs)
    timings["train_seconds"] = sum(r["train_seconds"] for rs in runs.values() for r in rs)
    timings["eval_seconds"] = sum(r["eval_seconds"] for rs in runs.values() for r in rs)

    echo(f"[{stages}/{stages}] Figures and summary")
    # lazy: the plots extra (matplotlib, checked when the demo starts); the module imports without it
    from .plots import plot_breaking_regime, plot_error_deltas, plot_lambda

    tick = time.perf_counter()
    labels = {m.key: m.label for m in methods}
    mean_histories = {k: mean_history(list(h.values())) for k, h in histories.items()}
    recommendation = safeguard_recommendation()
    plot_error_deltas(mean_histories, labels, out / "losses.png")
    safeguarded = {k: h for k, h in mean_histories.items() if "safeguard/lambda_mean" in h}
    if safeguarded:
        plot_lambda(safeguarded, labels, 1.0, out / "lambda.png")
    if breaking is not None:
        regime_summary, regime_images, regime_histories = breaking
        plot_breaking_regime(
            regime_summary,
            [c.text for c in held_out],
            regime_images,
            recipe.pretrain.image_size,
            out / "breaking_regime.png",
        )
        (out / "breaking_history.json").write_text(json.dumps(regime_histories))
    timings["figures_seconds"] = time.perf_counter() - tick
    timings["total_seconds"] = time.perf_counter() - start

    results = summarise_methods(methods, runs, rewards_per_run, base_rewards, recipe.seed)

    summary: dict[str, Any] = {
        "methods": results,
        "skipped": skipped,
        "recommendation": recommendation,
        "breaking_regime": None if breaking is None else breaking[0],
        "base": {
            "reward": float(base_rewards.mean()),
            "reward_stderr": float(base_rewards.std(ddof=1) / np.sqrt(base_rewards.size)),
            "source": source,
            "folder": str(folder) if folder else None,
            "recipe_hash": recipe_hash(recipe.pretrain),
        },
        "intervals": {
            "level": 0.95,
            "t": "Student t over training seeds (mean +- t(n-1) sd / sqrt n), clipped to the metric's range (reward, "
            "implicit_acc, lambda_mean in [0, 1]); null with one seed",
            "bootstrap": "reward_change_bootstrap: percentile bootstrap resampling training seeds, then held-out "
            "samples (paired with the base's samples)",
        },
        "config": {**recipe.to_dict(), "trainer": _trainer_settings(recipe)},
        "plan": recipe.planned_work(),
        "pairs": dataclasses.asdict(pair_stats),
        "held_out_prompts": [c.text for c in held_out],
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "environment": {
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": _load_average(),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(histories))
    for line in format_report(summary).splitlines():
        echo(line)
    names = ["breaking_regime.png", "breaking_history.json"] if breaking is not None else []
    names += ["summary.json", "history.json", "losses.png", *(["lambda.png"] if safeguarded else [])]
    # The machine's load goes to summary.json (environment), beside the timings it qualifies, not to the console.
    echo(f"Wrote {', '.join(names[:-1])} and {names[-1]} to {out} ({timings['total_seconds'] / 60:.1f} min)")
    left_out = [key for key in METHODS if key not in recipe.methods]
    if recipe.breaking is not None:
        left_out += [key for key in GUARDS if key not in recipe.breaking.methods]
    if left_out:
        echo(f"Not run here, in the full comparison (--full): {', '.join(left_out)}")
    return summary


def run_pretrain(
    output_dir: str | Path,
    recipe: PretrainRecipe | None = None,
    threads: int | None = 1,
    echo: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``demo --pretrain``: rebuild the base from ``recipe`` (default: the shipped one's), check it, compare it with
    the shipped base and save it to ``<output_dir>/base``. Returns the report (also in ``pretrain_report.json``).
    An ``output_dir`` holding an earlier rebuild is refused unless ``overwrite``, before the pretraining."""
    refuse_earlier_outputs(output_dir, PRETRAIN_OUTPUTS, "the base's rebuild", overwrite)
    recipe = recipe or PretrainRecipe()
    echo(f"Rebuilding the demo's base from recipe {recipe_hash(recipe)}")
    with _torch_threads(threads):
        report = rebuild_and_check(recipe, output_dir, echo=echo)
    check = report["check"]
    echo(
        f"      held-out denoising loss {check['denoising_loss']:.4f} (untrained UNet "
        f"{check['denoising_loss_untrained']:.4f}), VAE reconstruction MSE {check['vae_reconstruction_mse']:.4f}, "
        f"sample colour reward {check['sample_reward']:.4f}"
    )
    echo("      check " + ("passed" if check["passed"] else "FAILED: " + "; ".join(check["failures"])))
    shipped = report["shipped"]
    if shipped is not None:
        weights = ", ".join(
            f"{name} " + ("identical" if w.get("identical") else f"relative L2 {w['relative_l2']:.2e}")
            if w["comparable"]
            else f"{name} not comparable"
            for name, w in shipped["weights"].items()
        )
        same = "same recipe" if shipped["same_recipe"] else "another recipe"
        echo(
            f"      against the shipped base ({same}): {weights}; sample reward "
            f"{shipped['sample_reward_difference']:+.4f}, denoising loss {shipped['denoising_loss_difference']:+.4f}"
        )
    echo(f"Wrote {report['saved_to']} and pretrain_report.json")
    return report
