"""Stability map on the toy demo: where does Diffusion-DPO's pathology bite, does a safeguard keep the reward?

Not part of the test suite. On the benchmark's base (:data:`STUDY_BASE`; ``--base shipped``: the demo's shipped
base), its preference pairs and its held-out evaluation
(``trl_diffusion_sdpo.demo``: built once, shared by every run), it sweeps a star around the demo's setting (learning
rate 2e-5, beta 5000): the learning rate over ``--lrs`` at the demo's beta, and beta over ``--betas`` at the demo's
learning rate. In each cell it trains every method in ``--methods`` with every seed in ``--seeds`` for
``--max-steps`` optimizer steps and evaluates the held-out reward at every step in ``--eval-steps`` along the run.

One run evaluated at steps 50, 100 and 200 stands in for separate 50-, 100- and 200-step runs: the demo's schedule
is ``constant_with_warmup`` with a fixed 5-step warmup (``DemoRecipe.warmup_steps``; the config's default
``lr_scheduler_type``), so the learning rate at step ``k`` does not depend on the run's length, and the evaluation
draws its noise from its own seeded generators and samples with a copy of the scheduler, so it changes nothing the
training sees (batches, timesteps and noise come from the trainer's seeded RNG). The 50-step prefix of a 200-step run
is therefore the 50-step run.

Per run it records the reward change against the base at each evaluation step, and per logged step the winner's and
loser's error against the reference (``delta/winner``, ``delta/loser``), the implicit accuracy and the safeguard's
lambda. A run shows the pathology at an evaluation step when, over the 10% of steps before it, ``delta/winner > 0``
while the implicit accuracy is above 0.5, and its reward change is negative.

Resumable: each finished run is appended to ``--json`` at once (written atomically); a rerun with the same grid skips
the runs already there. Runs go seed by seed (every cell and method for seed 0, then seed 1, ...), so a cut-short
map still covers every cell.

    OMP_NUM_THREADS=1 nohup python benchmarks/studies/stability_map.py \\
        --json benchmarks/results/stability/cpu-stability-map-demo.json &
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from trl_diffusion_sdpo.cli.console import quiet_command_line  # noqa: E402
from trl_diffusion_sdpo.demo.methods import METHODS, Method, method_unavailable  # noqa: E402
from trl_diffusion_sdpo.demo.pairs import make_preference_pairs  # noqa: E402
from trl_diffusion_sdpo.demo.pretrain import PretrainRecipe, load_base, recipe_hash  # noqa: E402
from trl_diffusion_sdpo.demo.recipe import DemoRecipe  # noqa: E402
from trl_diffusion_sdpo.demo.run import _evaluate, _training_args, train_preference  # noqa: E402
from trl_diffusion_sdpo.demo.shapes import split_captions  # noqa: E402

DEMO_LR, DEMO_BETA = DemoRecipe.learning_rate, DemoRecipe.beta
#: The base every study under benchmarks/studies trains on: the demo's architecture and data with a third of the
#: shipped base's pretraining (VAE 500 steps, UNet 1,000). It draws its captions roughly (0.231 of its samples as
#: captioned, ``cpu-demo-base-fidelity-benchmark-base.json``). Its weights are kept in :data:`STUDY_BASE_DIR` and
#: loaded from there (:func:`load_study_base`). The shipped base's own evidence (the tiny base's defaults) runs with
#: ``--base shipped``.
STUDY_BASE = PretrainRecipe(vae_steps=500, unet_steps=1000)
BASES = {"benchmark": STUDY_BASE, "shipped": PretrainRecipe()}
#: The weights every stored study result on :data:`STUDY_BASE` was measured on (the package's shipped base until it
#: was replaced by a longer-pretrained one), kept in the repository beside ``benchmarks/`` and outside the wheel:
#: pretraining the recipe again gives other weights, other preference pairs and other figures (on the same CPU with
#: later code too: ``cpu-rerun-cell-seed4-lr2e-4-step50-pretrained-base.json``). ``demo_recipe.json`` is the record
#: the pretraining wrote; ``SHA256SUMS`` (``sha256sum -c`` reads it) the digest of every file.
STUDY_BASE_DIR = Path(__file__).resolve().parents[1] / "study_base"
CHECKSUMS = "SHA256SUMS"
EXTRA_METHODS = (
    Method("sdpo-output-mu0.5", "SDPO output mu=0.5", safeguard=True, safeguard_mu=0.5),
    Method("sdpo-parameter-mu0.5", "SDPO parameter mu=0.5", True, 0.5, "parameter"),
    Method("sdpo-update", "SDPO update mu=0.9", True, 0.9, "update"),
    Method("sdpo-update-mu0.5", "SDPO update mu=0.5", True, 0.5, "update"),
    Method("sdpo-pair-mu0.5", "SDPO per-pair mu=0.5", True, 0.5, "parameter", (("safeguard_scope", "pair"),)),
    # A new variant is one line here plus its key in --methods; a run whose config the installed trainer refuses
    # (a field or value not landed yet) is skipped and listed under "skipped" in the results file. For example:
    #   Method("sdpo-pair-mu0.5", "SDPO per-pair mu=0.5", True, 0.5, "parameter", (("safeguard_scope", "pair"),)),
    #   Method("smpo-inversion", "SmPO (inversion)", False, config=(("loss_type", "smpo"), ...)),
)
EVALUATOR: type[EvaluateAt] | None = None  # a study's subclass of EvaluateAt (set before main), else EvaluateAt
HISTORY_KEYS = ("step", "loss", "delta/winner", "delta/loser", "implicit_acc", "safeguard/lambda_mean")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _listed(value: str | list[str] | None) -> list[str]:
    return value.split(",") if isinstance(value, str) else list(value or [])


def cells(lrs: list[float], betas: list[float]) -> list[tuple[float, float]]:
    """The star: every learning rate at the demo's beta, every beta at the demo's learning rate (no duplicates)."""
    out = [(lr, DEMO_BETA) for lr in lrs] + [(DEMO_LR, beta) for beta in betas]
    return list(dict.fromkeys(out))


def window(history: dict[str, list[float]], step: int) -> dict[str, float]:
    """Means over the 10% of logged steps up to ``step`` (at least the last one): winner and loser deltas, implicit
    accuracy."""
    steps = history["step"]
    last = [i for i, s in enumerate(steps) if 0.9 * step < s <= step] or [
        max(i for i, s in enumerate(steps) if s <= step)
    ]
    return {
        key: float(np.mean([history[key][i] for i in last])) for key in ("delta/winner", "delta/loser", "implicit_acc")
    }


class EvaluateAt(TrainerCallback):
    """Held-out rewards at the given optimizer steps with the demo's evaluation (same prompts and noise as the base's).

    Samples with a copy of the scheduler (sampling sets its timesteps) and the UNet in eval mode, then restores train
    mode; the sampling noise comes from per-sample generators, so training's RNG stream is untouched."""

    def __init__(self, steps: list[int], held_out: list, recipe: DemoRecipe) -> None:
        self.steps, self.held_out, self.recipe = set(steps), held_out, recipe
        self.pipeline: StableDiffusionPipeline | None = None  # set by train_preference
        self.rewards: dict[int, float] = {}
        self.seconds = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step not in self.steps:
            return
        tick = time.perf_counter()
        unet = self.pipeline.unet
        sampler = StableDiffusionPipeline(
            **{**self.pipeline.components, "scheduler": copy.deepcopy(self.pipeline.scheduler)},
            requires_safety_checker=False,
        )
        unet.eval()
        images, rewards = _evaluate(sampler, self.held_out, self.recipe)
        self.rewards[state.global_step] = float(rewards.mean())
        self.measure(state.global_step, sampler, images)
        unet.train()
        self.seconds += time.perf_counter() - tick

    def measure(self, step: int, pipeline: StableDiffusionPipeline, images: np.ndarray) -> None:
        """Further held-out measures of the model at ``step`` (``images``: the held-out samples ``[P, S, H, W, 3]``);
        none here, a study adds its own and returns them from :meth:`extras`."""

    def extras(self) -> dict[str, Any]:
        """What :meth:`measure` recorded, added to the run's entry in the results file."""
        return {}


def _run_key(seed: int, lr: float, beta: float, method: str) -> str:
    return f"seed{seed}-lr{lr:g}-beta{beta:g}-{method}"


def machine() -> dict[str, Any]:
    """Which machine ran a run: the device, the CPU model, cores and torch threads."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"device": "cpu", "cpu": model, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def study_base_problem(folder: Path = STUDY_BASE_DIR) -> str | None:
    """Why ``folder`` does not hold the stored weights of :data:`STUDY_BASE`, or ``None``: its ``demo_recipe.json``
    must record the recipe's hash, and every file ``SHA256SUMS`` lists must have its digest (a Git LFS pointer or an
    edited file does not)."""
    record, sums = folder / "demo_recipe.json", folder / CHECKSUMS
    if not record.is_file() or not sums.is_file():
        return f"{folder} holds no stored base (no demo_recipe.json or {CHECKSUMS})"
    recorded = json.loads(record.read_text()).get("recipe_hash")
    if recorded != recipe_hash(STUDY_BASE):
        return f"{record} records recipe {recorded}, not STUDY_BASE's {recipe_hash(STUDY_BASE)}"
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = folder / name.lstrip("*")
        if not path.is_file():
            return f"{path} is missing"
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return f"{path} is not the stored file (its SHA-256 differs from {CHECKSUMS}'s)"
    return None


def load_study_base(pretrain: bool = False) -> tuple[StableDiffusionPipeline, str]:
    """:data:`STUDY_BASE`'s pipeline and where it came from: the stored weights of :data:`STUDY_BASE_DIR`, checked
    against their record and digests (a mismatch raises, naming the file), or with ``pretrain`` the recipe pretrained
    again, the way the stored weights were made (cached by the demo under the recipe's hash; not the stored
    weights)."""
    if pretrain:
        pipeline, source, _ = load_base(STUDY_BASE)  # "pretrained", or "cache" where an earlier pretraining left it
        return pipeline, source
    problem = study_base_problem()
    if problem is not None:
        raise RuntimeError(f"the benchmark's base cannot be loaded: {problem}")
    return StableDiffusionPipeline.from_pretrained(STUDY_BASE_DIR), "stored"


def study_pairs(base: StableDiffusionPipeline, base_recipe: DemoRecipe) -> tuple[Any, Any, list, Any]:
    """The study's data on ``base``: its preference pairs (and their statistics) drawn from the training captions,
    the held-out captions, and the base's rewards on them (what each run's reward change is measured against)."""
    pair_captions, held_out = split_captions(base_recipe.num_held_out_prompts, base_recipe.seed)
    dataset, pair_stats = make_preference_pairs(
        base,
        pair_captions,
        base_recipe.pairs_per_prompt,
        base_recipe.min_reward_margin,
        base_recipe.num_inference_steps,
        base_recipe.guidance_scale,
        seed=100_000 * base_recipe.seed,
    )
    _, base_rewards = _evaluate(base, held_out, base_recipe)
    return dataset, pair_stats, held_out, base_rewards


def base_pipeline(base: str = "benchmark") -> StableDiffusionPipeline:
    """The pipeline of the base ``base`` names in :data:`BASES`: the benchmark's stored weights
    (:func:`load_study_base`) or the shipped base."""
    if base == "benchmark":
        return load_study_base()[0]
    return load_base(BASES[base])[0]


def study_pipeline(base: str = "benchmark") -> StableDiffusionPipeline:
    """:func:`base_pipeline` with its progress bar off."""
    pipeline = base_pipeline(base)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def refused(recipe: DemoRecipe, method: Method) -> str | None:
    """Why the installed trainer refuses ``method``'s config (a field or value that has not landed), or ``None``."""
    reason = method_unavailable(method)
    if reason is not None:
        return reason
    with tempfile.TemporaryDirectory() as workdir:
        try:
            _training_args(recipe, method, 0, workdir, None)
        except (TypeError, ValueError) as error:
            return f"{type(error).__name__}: {error}"
    return None


def reference_errors(history: dict[str, list[float]]) -> dict[str, Any]:
    """A digest of the reference's winner and loser errors at every logged step. The reference is frozen, so these
    depend only on the batches, timesteps and noise: equal digests across methods for a seed show the runs are
    paired (and differing ones that they are not)."""
    values = np.asarray([history["mse/ref_winner"], history["mse/ref_loser"]], dtype=np.float32)
    return {
        "sha256": hashlib.sha256(values.tobytes()).hexdigest(),
        "first_steps": values[:, :3].tolist(),
        # the whole trace too: the parameter and update spaces compute the reference's errors on each branch's half
        # batch, which rounds differently in float32 (same batches, digests differ by a last bit)
        "trace": [_rounded(row) for row in values.tolist()],
    }


def _rounded(values: list[float]) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


def _write(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", default="6.7e-6,2e-5,6.7e-5,2e-4", help="Learning rates at the demo's beta.")
    parser.add_argument("--betas", default="500,5000,50000", help="Betas at the demo's learning rate.")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--eval-steps", default="50,100,200", help="Optimizer steps at which to evaluate.")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="dpo,sdpo-output-mu0.5,sdpo-output")
    parser.add_argument("--batch-size", type=int, default=2, help="Preference pairs per optimizer step.")
    parser.add_argument("--eval-seeds-per-prompt", type=int, default=8, help="Held-out samples per prompt.")
    parser.add_argument("--base", choices=tuple(BASES), default="benchmark", help="Which base to tune.")
    parser.add_argument("--json", required=True, help="Results file; finished runs in it are skipped on a rerun.")
    args = parser.parse_args(argv)
    for method in EXTRA_METHODS:  # the demo's own list stays as it is
        METHODS.setdefault(method.key, method)
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    eval_steps = sorted(int(s) for s in args.eval_steps.split(","))
    if eval_steps[-1] != args.max_steps:
        raise ValueError(f"the last --eval-steps ({eval_steps[-1]}) must be --max-steps ({args.max_steps})")
    # Seeds, methods and cells may grow between invocations (runs are keyed by them); every other setting must match.
    grown = ("seeds", "methods", "lrs", "betas")
    grid = {k: v for k, v in vars(args).items() if k != "json" and k not in grown}
    path = Path(args.json)
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    stored = {"base": "benchmark", **report.get("grid", {})}  # files without the key ran on the benchmark's base
    if report and {k: v for k, v in stored.items() if k not in grown} != grid:
        raise ValueError(f"{path} holds another grid ({report['grid']}); pass another --json")
    report.setdefault("grid", grid)
    for name, new in (("seeds", args.seeds), ("methods", args.methods), ("lrs", args.lrs), ("betas", args.betas)):
        report["grid"][name] = list(
            dict.fromkeys([*_listed(report["grid"].get(name)), *(v for v in new.split(",") if v)])
        )
    report.setdefault("runs", {})
    report.setdefault("invocations", [])
    torch.set_num_threads(1)
    invocation = {
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "machine": machine(),
    }
    report["invocations"].append(invocation)
    path.parent.mkdir(parents=True, exist_ok=True)
    began_cpu, began = time.process_time(), time.perf_counter()
    probe = DemoRecipe(batch_size=args.batch_size, max_steps=args.max_steps)
    skipped = {key: reason for key in methods if (reason := refused(probe, METHODS[key])) is not None}
    report["skipped"] = skipped
    for key, reason in skipped.items():
        print(f"skipped {key}: {reason}", flush=True)
    methods = [key for key in methods if key not in skipped]
    todo = [
        (seed, lr, beta, method)
        for seed in seeds
        for lr, beta in cells(_floats(args.lrs), _floats(args.betas))
        for method in methods
        if _run_key(seed, lr, beta, method) not in report["runs"]
    ]
    print(f"{len(todo)} runs to do, {len(report['runs'])} already in {path}", flush=True)
    if not todo:  # nothing to train: the file stays as it is, and the base is not loaded for nothing
        return 0
    with tempfile.TemporaryDirectory(prefix="stability-latents-") as latent_cache_dir:
        base_recipe = DemoRecipe(
            pretrain=BASES[args.base],
            batch_size=args.batch_size,
            max_steps=args.max_steps,
            eval_seeds_per_prompt=args.eval_seeds_per_prompt,
        )
        base = base_pipeline(args.base)
        dataset, pair_stats, held_out, base_rewards = study_pairs(base, base_recipe)
        report["base"] = {
            "reward": float(base_rewards.mean()),
            "recipe_hash": recipe_hash(base_recipe.pretrain),
            "pairs": pair_stats.num_kept,
            "held_out_samples": int(base_rewards.size),
        }
        report["recipe"] = {k: v for k, v in base_recipe.to_dict().items() if k != "pretrain"}
        for seed, lr, beta, key in todo:
            recipe = DemoRecipe(
                **{**report["recipe"], "learning_rate": lr, "beta": beta, "seeds": (seed,), "methods": (key,)}
            )
            evaluator = (EVALUATOR or EvaluateAt)(eval_steps, held_out, recipe)
            tick = time.perf_counter()
            _, history = train_preference(base, dataset, recipe, METHODS[key], seed, latent_cache_dir, [evaluator])
            seconds = time.perf_counter() - tick
            stopped = getattr(evaluator, "stopped_at", None)  # the run stopped itself (a rewind's stop): whole
            if history["step"][-1] != args.max_steps and stopped is None:  # preempted (SIGTERM): only whole runs
                raise RuntimeError(f"run stopped at step {history['step'][-1]} of {args.max_steps}")
            run = {
                "seed": seed,
                "learning_rate": lr,
                "beta": beta,
                "method": key,
                "reward_change": {str(s): r - report["base"]["reward"] for s, r in evaluator.rewards.items()},
                "window": {str(s): window(history, s) for s in eval_steps},
                "history": {k: _rounded(history[k]) for k in HISTORY_KEYS if k in history},
                "reference_errors": reference_errors(history),
                "seconds": round(seconds, 1),
                "eval_seconds": round(evaluator.seconds, 1),
                **evaluator.extras(),
                "machine": invocation["machine"],
            }
            report["runs"][_run_key(seed, lr, beta, key)] = run
            invocation["wall_seconds"] = round(time.perf_counter() - began, 1)
            invocation["process_cpu_seconds"] = round(time.process_time() - began_cpu, 1)
            invocation["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
            _write(path, report)
            change = run["reward_change"][str(args.max_steps)]
            print(f"{_run_key(seed, lr, beta, key)}: reward change {change:+.4f} ({seconds:.0f} s)", flush=True)
    invocation["wall_seconds"] = round(time.perf_counter() - began, 1)
    invocation["process_cpu_seconds"] = round(time.process_time() - began_cpu, 1)
    invocation["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    _write(path, report)
    return 0


if __name__ == "__main__":
    quiet_command_line(own_report=True)  # the script's own process: its report only
    sys.exit(main())
