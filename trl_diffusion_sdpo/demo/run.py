"""Orchestration of the CPU demo: base model, preference pairs, Diffusion-DPO vs Diffusion-SDPO, figures, summary.

Both methods train through the same :class:`~trl_diffusion_sdpo.DiffusionSDPOTrainer` code path real models use,
from the same base weights, on the same pairs, with the same seed (hence the same batches, timesteps and noise) and
the same number of steps; the only difference is ``safeguard=False`` (Diffusion-DPO) or ``safeguard=True`` with
``safeguard_mu=0.9`` (Diffusion-SDPO, the authors' SD1.5 setting).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
from ..trainer import DiffusionSDPOTrainer
from .pairs import make_preference_pairs, sample_images
from .plots import plot_error_deltas, plot_lambda, sample_grid
from .pretrain import PretrainRecipe, load_or_pretrain, recipe_hash
from .shapes import Caption, colour_reward, split_captions

__all__ = ["METHODS", "DemoRecipe", "format_table", "quiet_libraries", "run_demo"]

METHODS: dict[str, str] = {"dpo": "Diffusion-DPO", "sdpo": "Diffusion-SDPO"}
LAST_FRACTION = 0.1  # "final" figures average the last 10% of optimizer steps


@dataclass(frozen=True)
class DemoRecipe:
    """Every knob of the demo. ``DemoRecipe()`` is the full demo; ``DemoRecipe.quick()`` a seconds-long smoke run.

    > Base model: ``pretrain`` (see :class:`PretrainRecipe`); ``seed`` overrides its seed.

    > Prompts, pairs and evaluation

    num_held_out_prompts: captions kept out of the preference pairs; rewards are measured on these.
    pairs_per_prompt: pairs sampled for each remaining caption (two samples each, ranked by the colour reward).
    min_reward_margin: pairs whose rewards differ by less are dropped as ties.
    num_inference_steps, guidance_scale: DDIM sampling for pairs, evaluation and the grid.
    eval_seeds_per_prompt: samples per held-out prompt for the reward (same seeds for every model).
    grid_seeds: samples per prompt and model shown in ``samples.png``.

    > Preference tuning (identical for both methods)

    tuning: ``"full"`` (all UNet weights, frozen-copy reference) or ``"lora"`` (adapters of rank ``lora_rank``).
    beta: Diffusion-DPO beta (the official launchers' 5000).
    learning_rate: AdamW learning rate, used as given (no per-pair scaling), constant after a linear warmup.
    batch_size: preference pairs per optimizer step. max_steps, warmup_steps: optimizer steps.
    safeguard_mu: Diffusion-SDPO margin (authors' SD1.5 DPO setting 0.9).
    proportion_empty_prompts, random_flip: the authors' prompt dropout and flip augmentation.
    """

    seed: int = 0
    pretrain: PretrainRecipe = field(default_factory=PretrainRecipe)
    # prompts, pairs, evaluation
    num_held_out_prompts: int = 6
    pairs_per_prompt: int = 8
    min_reward_margin: float = 0.01
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    eval_seeds_per_prompt: int = 24
    grid_seeds: int = 2
    # preference tuning
    tuning: str = "full"
    lora_rank: int = 8
    beta: float = 5000.0
    learning_rate: float = 1e-5
    batch_size: int = 8
    max_steps: int = 300
    warmup_steps: int = 30
    safeguard_mu: float = 0.9
    proportion_empty_prompts: float = 0.2
    random_flip: bool = True

    def __post_init__(self) -> None:
        if self.tuning not in ("full", "lora"):
            raise ValueError(f"tuning must be 'full' or 'lora', got {self.tuning!r}")
        if self.grid_seeds > self.eval_seeds_per_prompt:
            raise ValueError(
                f"grid_seeds ({self.grid_seeds}) cannot exceed eval_seeds_per_prompt ({self.eval_seeds_per_prompt})"
            )
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("max_steps and batch_size must be at least 1")
        if self.pretrain.seed != self.seed:
            # One seed drives everything: the base model, the pairs, both trainings and the evaluation noise.
            object.__setattr__(self, "pretrain", dataclasses.replace(self.pretrain, seed=self.seed))

    @classmethod
    def quick(cls, seed: int = 0) -> DemoRecipe:
        """The same pipeline end to end in well under a minute: for tests and a first look, not for conclusions."""
        return cls(
            seed=seed,
            pretrain=PretrainRecipe(
                seed=seed, images_per_caption=2, vae_steps=15, vae_batch_size=8, unet_steps=20, unet_batch_size=16
            ),
            pairs_per_prompt=1,
            min_reward_margin=0.0,
            num_inference_steps=3,
            eval_seeds_per_prompt=2,
            max_steps=6,
            warmup_steps=1,
            batch_size=4,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence library warnings and loading bars (not the demo's own progress bars) inside the block."""
    import datasets
    import diffusers
    import transformers

    levels = (diffusers.logging.get_verbosity(), transformers.logging.get_verbosity())
    datasets_bars = datasets.is_progress_bar_enabled()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        diffusers.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
        diffusers.logging.enable_progress_bar()
        transformers.logging.enable_progress_bar()
        if datasets_bars:
            datasets.enable_progress_bars()


class _TrainingBar(TrainerCallback):
    """A tqdm bar over optimizer steps showing the latest loss and error deltas (replaces the per-log printout)."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "delta/winner" in logs:
            self.bar.set_postfix(
                loss=f"{logs['loss']:.3f}", dW=f"{logs['delta/winner']:+.4f}", dL=f"{logs['delta/loser']:+.4f}",
                refresh=False,
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


_HISTORY_KEYS = (
    "loss", "implicit_acc", "delta/winner", "delta/loser", "mse/policy_winner", "mse/policy_loser",
    "mse/ref_winner", "mse/ref_loser", "safeguard/lambda_mean", "safeguard/lambda_min", "safeguard/lambda_max",
    "safeguard/engaged",
)


def _history(log_history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-step metrics from ``trainer.state.log_history`` as columns (``step`` plus the logged keys)."""
    rows = [entry for entry in log_history if "delta/winner" in entry]
    columns: dict[str, list[float]] = {"step": [int(row["step"]) for row in rows]}
    for key in _HISTORY_KEYS:
        if all(key in row for row in rows):
            columns[key] = [float(row[key]) for row in rows]
    return columns


def _final_mean(history: dict[str, list[float]], key: str, max_steps: int) -> float:
    """Mean of ``key`` over the logged steps in the last ``LAST_FRACTION`` of training (at least one entry)."""
    threshold = max_steps * (1.0 - LAST_FRACTION)
    values = [v for s, v in zip(history["step"], history[key]) if s > threshold] or history[key][-1:]
    return float(np.mean(values))


def _training_args(recipe: DemoRecipe, safeguard: bool, output_dir: str) -> DiffusionSDPOConfig:
    return DiffusionSDPOConfig(
        output_dir=output_dir,
        beta=recipe.beta,
        safeguard=safeguard,
        safeguard_mu=recipe.safeguard_mu,
        resolution=recipe.pretrain.image_size,
        proportion_empty_prompts=recipe.proportion_empty_prompts,
        random_flip=recipe.random_flip,
        learning_rate=recipe.learning_rate,
        scale_lr=False,
        warmup_steps=recipe.warmup_steps,
        per_device_train_batch_size=recipe.batch_size,
        max_steps=recipe.max_steps,
        logging_steps=1,
        save_strategy="no",
        seed=recipe.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        report_to="none",
        disable_tqdm=False,  # else transformers prints every log dict when its verbosity is above warning
    )


def _trainer_settings(recipe: DemoRecipe) -> dict[str, Any]:
    """The trainer settings the recipe does not spell out (defaults of the config), for the summary."""
    args = _training_args(recipe, safeguard=True, output_dir=tempfile.gettempdir())
    return {
        "optimizer": str(args.optim.value if hasattr(args.optim, "value") else args.optim),
        "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "max_grad_norm": args.max_grad_norm,
        "weight_decay": args.weight_decay,
        "scale_lr": args.scale_lr,
        "safeguard_max_lambda": args.safeguard_max_lambda,
        "timesteps": [args.min_timestep, args.max_timestep],
    }


def train_preference(
    base: StableDiffusionPipeline, dataset: Dataset, recipe: DemoRecipe, method: str
) -> tuple[StableDiffusionPipeline, dict[str, list[float]]]:
    """Tune a copy of ``base``'s UNet with ``method`` (``"dpo"`` or ``"sdpo"``); return the tuned pipeline and the
    per-step metrics. The VAE and text encoder are shared with ``base`` (they stay frozen)."""
    components = {**base.components, "unet": copy.deepcopy(base.unet), "scheduler": copy.deepcopy(base.scheduler)}
    pipeline = StableDiffusionPipeline(**components, requires_safety_checker=False)
    peft_config = None
    if recipe.tuning == "lora":
        peft_config = LoraConfig(
            r=recipe.lora_rank, lora_alpha=recipe.lora_rank,
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"],
        )
    with tempfile.TemporaryDirectory(prefix=f"demo-{method}-") as workdir:
        args = _training_args(recipe, safeguard=method == "sdpo", output_dir=workdir)
        trainer = DiffusionSDPOTrainer(pipeline, None, args, dataset, peft_config=peft_config)
        trainer.remove_callback(ProgressCallback)  # our bar shows the step metrics instead of printing them
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_TrainingBar(f"Training {METHODS[method]}"))
        trainer.train()
    pipeline.unet.eval()
    return pipeline, _history(trainer.state.log_history)


def _evaluate(
    pipeline: StableDiffusionPipeline, captions: list[Caption], recipe: DemoRecipe, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``[P, S, H, W, 3]`` and rewards ``[P, S]`` on ``captions`` with the fixed evaluation seeds."""
    per_prompt = recipe.eval_seeds_per_prompt
    prompts = [c.text for c in captions for _ in range(per_prompt)]
    seeds = [_eval_seed(recipe, j) for _ in captions for j in range(per_prompt)]
    images = sample_images(pipeline, prompts, seeds, recipe.num_inference_steps, recipe.guidance_scale, desc=desc)
    rewards = colour_reward(images, [c for c in captions for _ in range(per_prompt)])
    return images.reshape(len(captions), per_prompt, *images.shape[1:]), rewards.reshape(len(captions), per_prompt)


def _eval_seed(recipe: DemoRecipe, index: int) -> int:
    return 1_000_000 + 1_000 * recipe.seed + index


def _stderr(values: np.ndarray) -> float:
    values = np.asarray(values).ravel()
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


# ---------------------------------------------------------------------------------------------------- the demo


def run_demo(
    output_dir: str | Path,
    recipe: DemoRecipe | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo and write ``summary.json``, ``history.json``, ``losses.png``, ``lambda.png`` and ``samples.png``
    into ``output_dir``. Returns the summary; ``echo`` receives the console lines (stage headers and the table)."""
    recipe = recipe or DemoRecipe()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    echo("[1/4] Base model: a tiny text-to-image latent diffusion pipeline (UNet, VAE, CLIP text encoder)")
    tick = time.perf_counter()
    base, cache_hit, folder = load_or_pretrain(recipe.pretrain, cache_root=cache_dir, use_cache=use_cache)
    timings["base_model_seconds"] = time.perf_counter() - tick
    if cache_hit:
        echo(f"      loaded the pretrained base from the cache: {folder}")
    else:
        where = f", cached in {folder}" if folder else " (not cached)"
        echo(f"      pretrained in {timings['base_model_seconds']:.0f} s{where}")

    echo("[2/4] Preference pairs: two samples per prompt from the base, ranked by colour agreement with the caption")
    tick = time.perf_counter()
    pair_captions, held_out = split_captions(recipe.num_held_out_prompts, recipe.seed)
    dataset, pair_stats = make_preference_pairs(
        base, pair_captions, recipe.pairs_per_prompt, recipe.min_reward_margin, recipe.num_inference_steps,
        recipe.guidance_scale, seed=100_000 * recipe.seed,
    )
    echo(
        f"      {pair_stats.num_kept} of {pair_stats.num_sampled} pairs kept (reward chosen "
        f"{pair_stats.mean_reward_chosen:.3f} vs rejected {pair_stats.mean_reward_rejected:.3f})"
    )
    base_images, base_rewards = _evaluate(base, held_out, recipe, "Sampling the base on held-out prompts")
    timings["pairs_seconds"] = time.perf_counter() - tick

    echo(f"[3/4] Diffusion-DPO and Diffusion-SDPO from the same base, pairs, seed and {recipe.max_steps} steps")
    histories: dict[str, dict[str, list[float]]] = {}
    results: dict[str, dict[str, Any]] = {}
    grid_images = {"base": base_images[:, : recipe.grid_seeds]}
    for method, name in METHODS.items():
        tick = time.perf_counter()
        tuned, history = train_preference(base, dataset, recipe, method)
        timings[f"{method}_train_seconds"] = time.perf_counter() - tick
        images, rewards = _evaluate(tuned, held_out, recipe, f"Sampling {name} on held-out prompts")
        grid_images[method] = images[:, : recipe.grid_seeds]
        histories[method] = history
        result = {
            "winner_delta": _final_mean(history, "delta/winner", recipe.max_steps),
            "loser_delta": _final_mean(history, "delta/loser", recipe.max_steps),
            "reward_base": float(base_rewards.mean()),
            "reward_final": float(rewards.mean()),
            "reward_base_stderr": _stderr(base_rewards),
            "reward_final_stderr": _stderr(rewards),
            "implicit_acc_final": _final_mean(history, "implicit_acc", recipe.max_steps),
            "loss_final": _final_mean(history, "loss", recipe.max_steps),
        }
        if method == "sdpo":
            result["lambda_mean"] = float(np.mean(history["safeguard/lambda_mean"]))
            result["lambda_final"] = _final_mean(history, "safeguard/lambda_mean", recipe.max_steps)
        results[method] = result
        del tuned

    echo("[4/4] Figures and summary")
    plot_error_deltas(histories, METHODS, out / "losses.png")
    plot_lambda(histories["sdpo"], 1.0, out / "lambda.png")
    sample_grid(
        [c.text for c in held_out],
        ["base", "DPO", "SDPO"],
        {"base": grid_images["base"], "DPO": grid_images["dpo"], "SDPO": grid_images["sdpo"]},
        recipe.grid_seeds,
        out / "samples.png",
    )
    timings["total_seconds"] = time.perf_counter() - start

    findings = {
        "dpo_winner_and_loser_error_rise": results["dpo"]["winner_delta"] > 0 and results["dpo"]["loser_delta"] > 0,
        "sdpo_winner_error_does_not_rise": results["sdpo"]["winner_delta"] <= 0,
        "dpo_margin_grows": results["dpo"]["implicit_acc_final"] > 0.5,
        "sdpo_margin_grows": results["sdpo"]["implicit_acc_final"] > 0.5,
        "dpo_reward_change": results["dpo"]["reward_final"] - results["dpo"]["reward_base"],
        "sdpo_reward_change": results["sdpo"]["reward_final"] - results["sdpo"]["reward_base"],
    }
    summary: dict[str, Any] = {
        **results,
        "config": {**recipe.to_dict(), "seed": recipe.seed, "trainer": _trainer_settings(recipe)},
        "findings": findings,
        "base_model": {
            "cache_hit": cache_hit,
            "cache_dir": str(folder) if folder else None,
            "recipe_hash": recipe_hash(recipe.pretrain),
        },
        "pairs": dataclasses.asdict(pair_stats),
        "held_out_prompts": [c.text for c in held_out],
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "environment": {
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "history.json").write_text(json.dumps(histories))
    for line in format_table(summary).splitlines():
        echo(line)
    echo(f"Wrote summary.json, history.json, losses.png, lambda.png and samples.png to {out} "
         f"({timings['total_seconds'] / 60:.1f} min)")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The console table: final error deltas, implicit accuracy, rewards and lambda, then what they show."""
    header = f"{'':16}{'winner Δ':>11}{'loser Δ':>11}{'impl. acc':>11}{'reward base → final':>24}{'λ mean':>9}"
    lines = [header, "-" * len(header)]
    for method, name in METHODS.items():
        r = summary[method]
        lam = f"{r['lambda_mean']:.3f}" if "lambda_mean" in r else "-"
        rewards = f"{r['reward_base']:.3f} → {r['reward_final']:.3f}"
        lines.append(
            f"{name:16}{r['winner_delta']:>+11.5f}{r['loser_delta']:>+11.5f}{r['implicit_acc_final']:>11.2f}"
            f"{rewards:>24}{lam:>9}"
        )
    steps = summary["config"]["max_steps"]
    lines.append(f"(Δ = policy − reference denoising error, mean over the last {max(1, round(steps * LAST_FRACTION))} "
                 f"of {steps} steps; reward ± {summary['sdpo']['reward_final_stderr']:.3f} standard error)")
    dpo, sdpo = summary["dpo"], summary["sdpo"]
    if summary["findings"]["dpo_winner_and_loser_error_rise"]:
        lines.append("Diffusion-DPO: the winner's and the loser's errors BOTH rose above the base (the paper's "
                     "pathology).")
    else:
        lines.append(f"Diffusion-DPO: the paper's pathology did NOT appear here (winner Δ {dpo['winner_delta']:+.5f}, "
                     f"loser Δ {dpo['loser_delta']:+.5f}).")
    if summary["findings"]["sdpo_winner_error_does_not_rise"]:
        lines.append("Diffusion-SDPO: the winner's error did not rise above the base (the safeguard's aim).")
    else:
        lines.append(f"Diffusion-SDPO: the winner's error rose too (winner Δ {sdpo['winner_delta']:+.5f}); the "
                     "safeguard did not hold it here.")
    for method, name in METHODS.items():
        r = summary[method]
        margin = "grew" if r["implicit_acc_final"] > 0.5 else "did not grow"
        lines.append(f"{name}: preference margin {margin} (implicit accuracy {r['implicit_acc_final']:.2f}); "
                     f"held-out reward {r['reward_final'] - r['reward_base']:+.3f}.")
    return "\n".join(lines)
