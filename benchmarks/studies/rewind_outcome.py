"""The rewind judged by the held-out reward a run ends with, against what a user would do by hand: Diffusion-DPO, the
package's default safeguard from step 0, Diffusion-DPO with ``on_pathology="rewind"`` (the config's alarm and ladder),
and Diffusion-DPO from step 0 at the learning rate the rewind's ladder ended on, per regime and training seed.

Not part of the test suite. Every run trains the demo's architecture for the cell's steps (:data:`MAX_STEPS`; the
pair folders 60) of 2 pairs with the held-out probe on (``probe_steps`` :data:`PROBE_STEPS`, the config's
``probe_pairs`` held back from the training data and ``probe_noise_draws``) and reads the config's alarm: a probe is
unhealthy where the held-out winner error's rise over the reference's is more than ``probe_alarm_rise`` of the
reference's error (``probe/delta_winner / probe/mse_ref_winner``) and ``probe/winner_rise_z`` is above
``probe_alarm_z``. Four arms share, per seed, the pairs the probe holds back, the batches, timesteps and noise:

* ``dpo``: Diffusion-DPO, the probe logged (``on_pathology`` at its default, ``warn``);
* ``safeguard``: the package's default safeguard (``safeguard_space="output"``, ``safeguard_mu`` at the config's
  default) from step 0, the probe logged;
* ``rewind``: Diffusion-DPO with ``on_pathology="rewind"`` and the config's ladder (``rewind_max_times``,
  ``rewind_lr_factor``): at an alarm it restores the last restore point and trains on with the safeguard and a lower
  learning rate; the alarm once the ladder is spent restores once more and stops the run;
* ``dpo_lower``: Diffusion-DPO from step 0 at the learning rate the same seed's rewind ended on (the cell's rate times
  the last ``health/lr_factor`` the rewind logged). Where the rewind never lowered it, that rate is the cell's and the
  run is the ``dpo`` run itself: its record says so (``reused_dpo``) and nothing is trained again. So per seed the
  rewind runs before it.

Regimes (:data:`CELLS`), seeds :data:`SEEDS`: the users' runs in kind (``probe_alarm_carry.py``'s user folder: 40
pairs drawn from the study's pairs, sorted by prompt or shuffled, LoRA at lr 5e-3, 1e-2 and 2e-2 and at 2e-4 where it
holds, 60 steps, the probe's 4 pairs held back) on the calibration data (data seed 0) and the held-out dataset (data
seed 1); full tuning on the study's whole pair set at lr 1e-4 (healthy) and 1e-3 (breaking) on the calibration data;
the held-out model (the UNet 1.5 times as wide at 64 px, ``probe_z_runs.wide_recipe``) with full tuning at 1e-4 and
1e-2 and a LoRA folder at 2e-4 and 1e-2. The alarm's constants were chosen (``probe_alarm_carry.py``) on the
benchmark's base (:data:`stability_map.STUDY_BASE`) with data seed 0; the held-out dataset and model were read by no
choice, and each is reported on its own.

Measures (:func:`analyse_cell`), on the held-out prompts' colour reward (the demo's evaluation: the same prompts and
noise for every run and the base):

* the final held-out reward of each arm (from the weights the run ends with: a rewind that stopped ends with its
  restored weights) and the base's; Diffusion-DPO's reward every 10 steps too;
* the rewind's alarm steps, restored steps (each checked from the run's own probe readings: ``probe/winner_rise_z``
  at that step at most :data:`RESTORE_Z`, or step 0), the learning-rate factor it ended on, and whether it ended on
  its starting weights (``health/ended_at_start``);
* where the rewind's alarm never fired, whether it equals Diffusion-DPO of the same seed bit for bit: the SHA-256 of
  the final trainable weights, the train loss at every step and the final reward to all digits.

Definitions, kept from the study's earlier rounds: a Diffusion-DPO run is **healthy** where none of its evaluations
found its reward more than :data:`TOLERANCE` below the base's (``probe_alarm_sequential.run_class``); a regime
**breaks** where Diffusion-DPO's final reward lies below the safeguard-from-step-0's beyond the paired 95 % t
interval over seeds. Targets (:func:`targets`), per group (calibration, held-out dataset, held-out model) and tuning
(LoRA, full):

* (a) quiet: the rewind raises no alarm and equals Diffusion-DPO bit for bit on at least :data:`QUIET_TARGET` of the
  healthy runs;
* (b) where Diffusion-DPO breaks, the alarm fires in at least :data:`FIRING_TARGET` of the rewind runs, and in each
  breaking regime the rewind's mean final reward is at most :data:`TOLERANCE` below the better of the safeguard from
  step 0's and ``dpo_lower``'s means (or above);
* (c) of the breaking regimes' runs where ``dpo_lower`` ends above the base, the rewind ends on its starting weights
  in at most :data:`START_TARGET`.

    OMP_NUM_THREADS=1 nice -n 5 nohup python benchmarks/studies/rewind_outcome.py pretrain &  # the held-out model
    OMP_NUM_THREADS=1 nice -n 5 nohup python benchmarks/studies/rewind_outcome.py run --worker 0/2 &
    OMP_NUM_THREADS=1 nice -n 5 nohup python benchmarks/studies/rewind_outcome.py run --worker 1/2 &
    python benchmarks/studies/rewind_outcome.py assemble      # benchmarks/results/probe/cpu-rewind-outcome.json
    python benchmarks/studies/rewind_outcome.py table --page  # docs/safeguard.md's marked block
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

OUTPUT = ROOT / "benchmarks" / "results" / "probe" / "cpu-rewind-outcome.json"
DOCS = ROOT / "docs" / "safeguard.md"
START, END = "<!-- rewind-outcome:begin -->", "<!-- rewind-outcome:end -->"
PARTS = Path("/tmp/rewind-outcome-parts")
PROBE_STEPS = 5
MAX_STEPS = 50
EVAL_EVERY = 10  # Diffusion-DPO's evaluations: every 10 steps to the end
SEEDS = (0, 1, 2)
TOLERANCE = 0.02  # alarm_calibration.TOLERANCE: the classes' and the outcome's margin
RESTORE_Z = 1.645  # callbacks.rewind.RESTORE_Z, restated: the check reads the probe's logs, not the package's verdict
QUIET_TARGET, FIRING_TARGET, START_TARGET = 0.95, 0.90, 0.10
SETTINGS = ("dpo", "safeguard", "rewind", "dpo_lower")  # per seed in this order: dpo_lower reads the rewind's rate
LABELS = {
    "dpo": "Diffusion-DPO",
    "safeguard": "safeguard from step 0",
    "rewind": "rewind",
    "dpo_lower": "Diffusion-DPO at the rewind's last rate",
}
CALIBRATION_MODEL, CALIBRATION_DATA = "benchmark", 0
GROUPS = ("calibration", "held-out dataset", "held-out model")


@dataclass(frozen=True)
class Cell:
    """One regime: the model (``benchmark``: the benchmark's base; ``wide``: the held-out model), the data seed
    (0: the demo's data the alarm was chosen on; 1: the held-out dataset), the learning rate, the tuning, the pairs
    (``0``: the study's whole pair set; else a user folder of that many pairs, ``probe_alarm_carry.folder``), their
    order, where the probe's pairs come from (``holdback``: rows held back from the training data; ``eval-split``: an
    eval split of its own) and the steps."""

    model: str = CALIBRATION_MODEL
    data: int = CALIBRATION_DATA
    lr: float = 1e-3
    tuning: str = "full"
    order: str = "sorted"
    probe: str = "holdback"
    steps: int = MAX_STEPS
    pairs: int = 0

    @property
    def name(self) -> str:
        longer = f"-{self.steps}steps" if self.steps != MAX_STEPS else ""
        folder = f"-folder{self.pairs}" if self.pairs else ""
        return f"{self.model}-data{self.data}-lr{self.lr:g}-{self.tuning}{folder}-{self.order}-{self.probe}{longer}"

    @property
    def eval_steps(self) -> tuple[int, ...]:
        """Diffusion-DPO's evaluation steps: every :data:`EVAL_EVERY` to the end (the end always)."""
        return tuple(sorted({*range(EVAL_EVERY, self.steps + 1, EVAL_EVERY), self.steps}))

    @property
    def held_out(self) -> str:
        """Which held-out axis the cell stands on: ``calibration``, ``held-out dataset`` or ``held-out model``."""
        if self.model != CALIBRATION_MODEL:
            return "held-out model"
        return "held-out dataset" if self.data != CALIBRATION_DATA else "calibration"


def _folder(lr: float, order: str = "sorted", **fields: Any) -> Cell:
    """A user folder as ``probe_alarm_carry.py`` trains it: 40 pairs, LoRA, 60 steps."""
    return Cell(lr=lr, tuning="lora", pairs=40, order=order, steps=60, **fields)


#: the regimes, 13 cells x 3 seeds x 4 arms less the ``dpo_lower`` runs that are the ``dpo`` run itself: about 140
#: runs. Calibration: the user folder at a healthy rate and at the three users' rates (both orders), full tuning at
#: a healthy and a breaking rate; the held-out dataset: its folder at a healthy and two breaking rates; the held-out
#: model: full tuning and a LoRA folder, each at a healthy and a breaking rate (the wide model's full tuning held at
#: 1e-3 with sorted pairs in the earlier round, so 1e-2)
CELLS: tuple[Cell, ...] = (
    _folder(2e-4),
    _folder(5e-3),
    _folder(1e-2),
    _folder(2e-2, "shuffled"),
    Cell(lr=1e-4),
    Cell(lr=1e-3),
    _folder(2e-4, "shuffled", data=1),
    _folder(1e-2, data=1),
    _folder(5e-3, "shuffled", data=1),
    Cell(model="wide", lr=1e-4),
    Cell(model="wide", lr=1e-2),
    _folder(2e-4, model="wide"),
    _folder(1e-2, model="wide"),
)


def cell_of(fields: dict[str, Any]) -> Cell:
    """The cell a run's record names."""
    return Cell(**fields)


def run_key(cell: Cell, setting: str, seed: int) -> str:
    return f"{cell.name}__{setting}__seed{seed}"


# ------------------------------------------------------------------------------------------------------ training


def _methods() -> dict[str, Any]:
    """The arms' methods (``dpo_lower`` is ``dpo``'s at another rate)."""
    from trl_diffusion_sdpo.demo.methods import METHODS, Method

    probe = (("probe_steps", PROBE_STEPS),)
    methods = {
        "dpo": Method("ro-dpo", "Diffusion-DPO, probe logged", False, config=probe),
        "safeguard": Method("ro-safeguard", "default safeguard from step 0", True, config=probe),
        "rewind": Method(
            "ro-rewind", "Diffusion-DPO, on_pathology=rewind", False, config=(*probe, ("on_pathology", "rewind"))
        ),
    }
    methods["dpo_lower"] = methods["dpo"]
    for method in methods.values():
        METHODS.setdefault(method.key, method)
    return methods


class Recorder:
    """The per-step train loss, the probe's readings, the rewinds and the ladder as the trainer logs them."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def __init__(self) -> None:
                self.loss: dict[int, float] = {}
                self.probe: list[dict[str, float]] = []
                self.rewinds: list[list[int]] = []
                self.lr_factor: float | None = None
                self.ended_at_start = False

            def on_log(self, args, state, control, logs=None, **kwargs):
                logs, step = logs or {}, state.global_step
                if "loss" in logs:
                    self.loss[step] = float(logs["loss"])
                if "probe/winner_rise_z" in logs:
                    self.probe.append(
                        {
                            "step": step,
                            **{
                                key: float(logs.get(f"probe/{key}", float("nan")))
                                for key in ("winner_rise_z", "delta_winner", "mse_ref_winner")
                            },
                        }
                    )

            def on_train_end(self, args, state, control, **kwargs):
                # the alarm's flags from the run's log history, where the alarm writes them whichever callback
                # logs first (the last log's health/ended_at_start included: train() ends after it)
                history = state.log_history
                self.rewinds = [
                    [int(e["step"]), int(e["health/rewind_to"])] for e in history if "health/rewind_to" in e
                ]
                factors = [float(e["health/lr_factor"]) for e in history if "health/lr_factor" in e]
                self.lr_factor = factors[-1] if factors else None
                self.ended_at_start = any(e.get("health/ended_at_start") == 1.0 for e in history)

        return _Recorder()


def weights_digest(unet: Any) -> str:
    """SHA-256 over every tensor of ``unet``'s state dict, in key order (the trained weights, bit for bit)."""
    digest = hashlib.sha256()
    for key, value in sorted(unet.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Data:
    """Per model and data seed: the base pipeline, the training pairs, the held-out prompts and the base's rewards
    (``stability_map.study_pairs``), the eval split's pairs, built once per process."""

    cache: dict[tuple[str, int], dict[str, Any]] = {}

    @classmethod
    def get(cls, model: str, data: int) -> dict[str, Any]:
        if (model, data) in cls.cache:
            return cls.cache[(model, data)]
        import stability_map
        from probe_z_runs import wide_recipe

        from trl_diffusion_sdpo.demo.pairs import make_preference_pairs
        from trl_diffusion_sdpo.demo.recipe import DemoRecipe
        from trl_diffusion_sdpo.demo.run import _probe_pairs_seed
        from trl_diffusion_sdpo.demo.shapes import split_captions

        stability_map.BASES["wide"] = wide_recipe()
        if model != "benchmark":
            _wait_for_pretraining(stability_map.BASES[model])
        base = stability_map.study_pipeline(model)
        recipe = DemoRecipe(
            pretrain=stability_map.BASES[model], seed=data, batch_size=2, max_steps=MAX_STEPS, eval_seeds_per_prompt=4
        )
        dataset, stats, held_out, base_rewards = stability_map.study_pairs(base, recipe)
        pair_captions, _ = split_captions(recipe.num_held_out_prompts, recipe.seed)
        # the eval split: one pair for each of 8 training captions drawn at random, with other noise than the
        # training pairs' (the demo's probe seed); the probe reads its first probe_pairs
        chosen = random.Random(data).sample(pair_captions, 8)
        eval_split, _ = make_preference_pairs(
            base,
            chosen,
            1,
            recipe.min_reward_margin,
            recipe.num_inference_steps,
            recipe.guidance_scale,
            seed=_probe_pairs_seed(recipe),
        )
        cls.cache[(model, data)] = {
            "base": base,
            "recipe": recipe,
            "dataset": dataset,
            "shuffled": dataset.shuffle(seed=1234).flatten_indices(),
            "eval_split": eval_split,
            "held_out": held_out,
            "base_reward": float(base_rewards.mean()),
            "pairs": stats.num_kept,
            "eval_split_pairs": len(eval_split),
        }
        return cls.cache[(model, data)]


def _wait_for_pretraining(recipe: Any, pid_file: Path = PARTS / "pretraining.pid", poll: float = 15.0) -> None:
    """While the process named in ``pid_file`` (one pretraining ``recipe`` into the demo's cache) runs, wait: two
    processes pretraining the same recipe would write one cache folder at once."""
    from trl_diffusion_sdpo.demo.pretrain import default_cache_root, recipe_hash

    folder = default_cache_root() / recipe_hash(recipe)
    while pid_file.exists() and not (folder / "model_index.json").is_file():
        pid = int(pid_file.read_text())
        if not Path(f"/proc/{pid}").exists():
            return
        print(f"waiting for the pretraining of {folder.name} (process {pid})", flush=True)
        time.sleep(poll)


def pretrain(pid_file: Path = PARTS / "pretraining.pid") -> int:
    """Pretrain the held-out model's base into the demo's cache before the workers need it, its process id in
    ``pid_file`` meanwhile, so a worker that reaches a held-out model's cell waits (:func:`_wait_for_pretraining`)
    rather than pretrain the same folder at once."""
    import stability_map
    from probe_z_runs import wide_recipe

    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))
    try:
        stability_map.BASES["wide"] = wide_recipe()
        stability_map.study_pipeline("wide")
    finally:
        pid_file.unlink(missing_ok=True)
    return 0


def train_one(cell: Cell, setting: str, seed: int, lr: float | None = None) -> dict[str, Any]:
    """One run: ``setting`` in ``cell`` at training seed ``seed`` (at learning rate ``lr``: the cell's where
    ``None``), its final held-out reward, its weights' digest, its loss, probe readings, rewinds and ladder
    (Diffusion-DPO: its held-out reward every :data:`EVAL_EVERY` steps too)."""
    import stability_map
    import torch
    from probe_alarm_carry import folder

    from trl_diffusion_sdpo.demo.run import _evaluate, _training_args, train_preference

    torch.set_num_threads(1)
    method = _methods()[setting]
    data = Data.get(cell.model, cell.data)
    rate = cell.lr if lr is None else lr
    recipe = dataclasses.replace(
        data["recipe"], learning_rate=rate, tuning=cell.tuning, seeds=(seed,), methods=(method.key,),
        max_steps=cell.steps,
    )  # fmt: skip
    dataset = data["shuffled"] if cell.order == "shuffled" else data["dataset"]
    if cell.pairs:  # a user folder: the carry study's draw from the study's pairs (it orders them itself)
        dataset = folder(data["dataset"], cell)
    probe_pairs = data["eval_split"] if cell.probe == "eval-split" else None
    recorder = Recorder()
    callbacks = [recorder]
    evaluator = None
    if setting == "dpo":
        evaluator = stability_map.EvaluateAt([s for s in cell.eval_steps if s < cell.steps], data["held_out"], recipe)
        callbacks.append(evaluator)
    with tempfile.TemporaryDirectory() as workdir:
        config = _training_args(recipe, method, seed, workdir, None)
    tick = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rewind-outcome-latents-") as latents:
        pipeline, history = train_preference(
            data["base"], dataset, recipe, method, seed, latents, callbacks, probe_pairs
        )
    seconds = time.perf_counter() - tick
    pipeline.unet.eval()
    _, rewards = _evaluate(pipeline, data["held_out"], recipe)
    final = float(rewards.mean())
    run = {
        "cell": asdict(cell),
        "setting": setting,
        "seed": seed,
        "learning_rate": rate,
        "final_reward": final,
        "base_reward": data["base_reward"],
        "max_steps": cell.steps,
        "last_step": history["step"][-1],
        "weights_sha256": weights_digest(pipeline.unet),
        "loss": [recorder.loss[s] for s in sorted(recorder.loss)],
        "probe": recorder.probe,
        "rewinds": recorder.rewinds,
        "lr_factor": recorder.lr_factor,
        "ended_at_start": recorder.ended_at_start,
        "safeguard_space": config.safeguard_space,
        "safeguard_mu": config.safeguard_mu,
        "on_pathology": config.on_pathology,
        "probe_alarm": {k: getattr(config, k) for k in ("probe_pairs", "probe_noise_draws", "probe_alarm_rise",
                                                         "probe_alarm_z", "rewind_max_times", "rewind_lr_factor")},
        "seconds": round(seconds, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }  # fmt: skip
    if evaluator is not None:
        run["reward_at"] = {str(s): r for s, r in sorted(evaluator.rewards.items())}
        run["reward_at"][str(cell.steps)] = final
    return run


def lower_rate(rewind: dict[str, Any]) -> float | None:
    """The learning rate a rewind run ended on (its rate times the last ``health/lr_factor`` it logged), or ``None``
    where it never lowered it."""
    factor = rewind.get("lr_factor")
    return None if factor is None or factor == 1.0 else rewind["learning_rate"] * factor


def dpo_lower(parts: Path, cell: Cell, seed: int) -> dict[str, Any]:
    """The ``dpo_lower`` run of ``cell`` at ``seed``: Diffusion-DPO at the rate the same seed's rewind ended on, or,
    where the rewind never lowered it, the ``dpo`` run itself, recorded as such (``reused_dpo``)."""
    rewind = json.loads((parts / f"{run_key(cell, 'rewind', seed)}.json").read_text())
    rate = lower_rate(rewind)
    if rate is None:
        dpo = json.loads((parts / f"{run_key(cell, 'dpo', seed)}.json").read_text())
        return {**dpo, "setting": "dpo_lower", "reused_dpo": True, "seconds": 0.0}
    return {**train_one(cell, "dpo_lower", seed, rate), "reused_dpo": False}


def _write_run(parts: Path, cell: Cell, setting: str, seed: int, result: dict[str, Any]) -> None:
    stopped_by_rewind = bool(result["rewinds"]) and result["rewinds"][-1][0] == result["last_step"]
    if result["last_step"] < result.get("max_steps", MAX_STEPS) and not stopped_by_rewind:  # preempted (SIGTERM)
        raise RuntimeError(f"{run_key(cell, setting, seed)} stopped at step {result['last_step']}")
    path = parts / f"{run_key(cell, setting, seed)}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    print(
        f"{path.stem}: final {result['final_reward']:.4f} (base {result['base_reward']:.4f}), rewinds "
        f"{result['rewinds']}, {result['seconds']:.0f} s",
        flush=True,
    )


def _missing(parts: Path, cells: list[Cell], seeds: tuple[int, ...] = SEEDS) -> list[tuple[Cell, str, int]]:
    """The runs of ``cells`` that ``parts`` lacks, seed by seed across the cells (a study cut short holds whole seeds),
    setting by setting in :data:`SETTINGS`' order."""
    return [
        (c, s, seed)
        for seed in seeds
        for c in cells
        for s in SETTINGS
        if not (parts / f"{run_key(c, s, seed)}.json").exists()
    ]


def run(
    parts: Path,
    worker: int,
    workers: int,
    cells: list[str] | None,
    steps: int | None = None,
    seeds: tuple[int, ...] = SEEDS,
) -> int:
    """Train what ``parts`` lacks, seed by seed, each run written to its own file at once; worker ``worker`` of
    ``workers`` takes the cells at its positions (cells keep their process: each builds its models' data once).
    ``steps``: every cell cut to that many steps (a smoke run; the cells' names say so); ``seeds``: only these."""
    parts.mkdir(parents=True, exist_ok=True)
    chosen = [c for i, c in enumerate(CELLS) if i % workers == worker and (cells is None or c.name in cells)]
    if steps is not None:
        chosen = [dataclasses.replace(c, steps=steps) for c in chosen]
    # the held-out model's cells after the others' within a seed (its base may still be pretraining)
    todo = sorted(_missing(parts, chosen, seeds), key=lambda t: (t[2], t[0].model != CALIBRATION_MODEL))
    print(f"{len(todo)} runs to do (dpo_lower: the dpo run itself where the rewind kept the rate)", flush=True)
    for cell, setting, seed in todo:
        if setting == "dpo_lower":
            result = dpo_lower(parts, cell, seed)
        else:
            result = train_one(cell, setting, seed)
        _write_run(parts, cell, setting, seed, result)  # preempted (SIGTERM): whole runs only
        data = Data.cache[(cell.model, cell.data)]
        base = parts / f"base__{cell.model}__data{cell.data}.json"
        if not base.exists():
            base.write_text(json.dumps({k: data[k] for k in ("base_reward", "pairs", "eval_split_pairs")}))
    return 0


# ------------------------------------------------------------------------------------------------------ analysis


def _t(values: list[float]) -> dict[str, Any]:
    from trl_diffusion_sdpo.demo.stats import summarise

    out = summarise(values)
    return {"mean": out["mean"], "ci95": out["ci95"], "n": out["n"]}


def fall_start(run: dict[str, Any]) -> int | None:
    """``probe_alarm_sequential.fall_start`` on Diffusion-DPO's evaluations: the first evaluation step from which
    every evaluation to the end found the reward more than :data:`TOLERANCE` below the base's."""
    from probe_alarm_sequential import fall_start as start

    changes = {int(s): r - run["base_reward"] for s, r in run["reward_at"].items()}
    return start({"reward_change": changes}, TOLERANCE)


def dpo_class(run: dict[str, Any]) -> str:
    """``probe_alarm_sequential.run_class`` of a Diffusion-DPO run: breaking, healthy or dipped."""
    from probe_alarm_sequential import run_class

    changes = {int(s): r - run["base_reward"] for s, r in run["reward_at"].items()}
    return run_class({"reward_change": changes}, TOLERANCE)


def rewind_record(rewind: dict[str, Any], dpo: dict[str, Any]) -> dict[str, Any]:
    """The rewind run's alarms, restored steps, whether each restored step was a restore point (its own probe's
    ``winner_rise_z`` at that step at most :data:`RESTORE_Z`, or the start), the delay from Diffusion-DPO's fall, the
    learning-rate factor it ended on, whether it ended on its starting weights, and, where no alarm fired, whether it
    equals Diffusion-DPO bit for bit."""
    z_at = {int(p["step"]): p["winner_rise_z"] for p in rewind["probe"]}
    restored = []
    for fired, step in rewind["rewinds"]:
        z = z_at.get(step)
        restored.append(
            {
                "fired_at": fired,
                "restored": step,
                "restored_z": z,
                "restore_point": step == 0 or (z is not None and z <= RESTORE_Z),
            }
        )
    start = fall_start(dpo)
    first = rewind["rewinds"][0][0] if rewind["rewinds"] else None
    out: dict[str, Any] = {
        "alarm_steps": [r[0] for r in rewind["rewinds"]],
        "restored": restored,
        "stopped_at": rewind["last_step"] if rewind["last_step"] < rewind.get("max_steps", MAX_STEPS) else None,
        "lr_factor": rewind.get("lr_factor"),
        "ended_at_start": bool(rewind.get("ended_at_start", False)),
        "dpo_class": dpo_class(dpo),
        "fall_start": start,
        "delay_steps": None if start is None or first is None else first - start,
    }
    if not rewind["rewinds"]:
        out["equals_dpo"] = {
            "weights_sha256": rewind["weights_sha256"] == dpo["weights_sha256"],
            "loss": rewind["loss"] == dpo["loss"],
            "final_reward": rewind["final_reward"] == dpo["final_reward"],
        }
    return out


def quiet(record: dict[str, Any]) -> bool:
    """Target (a)'s quiet: no alarm, and bit for bit Diffusion-DPO (weights, loss, reward)."""
    return not record["alarm_steps"] and all(record.get("equals_dpo", {"": False}).values())


def analyse_cell(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per cell: each arm's final reward (mean and t interval over seeds), the paired differences, the rewind per seed
    and what the targets read: the healthy runs and how many were quiet; where the regime breaks, the runs the alarm
    fired in, the rewind's mean against the better by hand, and the runs that ended on their starting weights where
    ``dpo_lower`` ends above the base."""
    from trl_diffusion_sdpo.demo.stats import paired_difference

    seeds = sorted(set.intersection(*(set(runs.get(s, {})) for s in SETTINGS)))
    if len(seeds) < 2:
        return {"seeds": seeds, "judged": False}
    final = {s: [runs[s][k]["final_reward"] for k in seeds] for s in SETTINGS}
    base = runs["dpo"][seeds[0]]["base_reward"]

    def paired(a: str, b: str) -> dict[str, Any]:
        d = paired_difference(final[a], final[b])
        return {"mean": d["mean"], "ci95": d["ci95"], "n": d["n"]}

    per_seed = {}
    for i, k in enumerate(seeds):
        record = rewind_record(runs["rewind"][k], runs["dpo"][k])
        lower = runs["dpo_lower"][k]
        per_seed[str(k)] = {
            **{s: final[s][i] for s in SETTINGS},
            **record,
            "quiet": quiet(record),
            "dpo_lower_lr": lower["learning_rate"],
            "dpo_lower_reused_dpo": bool(lower.get("reused_dpo", False)),
        }
    vs = paired("dpo", "safeguard")
    breaks = vs["ci95"] is not None and vs["ci95"][1] < 0
    means = {s: sum(v) / len(v) for s, v in final.items()}
    out: dict[str, Any] = {
        "seeds": seeds,
        "judged": True,
        "base_reward": base,
        "final_reward": {s: _t(final[s]) for s in SETTINGS},
        "dpo_minus_safeguard": vs,
        "rewind_minus_dpo": paired("rewind", "dpo"),
        "dpo_breaks": breaks,
        "per_seed": per_seed,
    }
    healthy = [str(k) for k in seeds if per_seed[str(k)]["dpo_class"] == "healthy"]
    out["healthy"] = {"runs": len(healthy), "quiet": sum(per_seed[k]["quiet"] for k in healthy), "seeds": healthy}
    if breaks:
        by_hand = max(means["safeguard"], means["dpo_lower"])
        above = [str(k) for k in seeds if per_seed[str(k)]["dpo_lower"] > base]
        out["breaking"] = {
            "runs": len(seeds),
            "fired": sum(bool(per_seed[str(k)]["alarm_steps"]) for k in seeds),
            "by_hand": "safeguard" if means["safeguard"] >= means["dpo_lower"] else "dpo_lower",
            "rewind_minus_by_hand": means["rewind"] - by_hand,
            "outcome_met": means["rewind"] - by_hand >= -TOLERANCE,
            "lower_above_base": len(above),
            "ended_at_start": sum(per_seed[k]["ended_at_start"] for k in above),
        }
    return out


def tuning_label(tuning: str) -> str:
    return "LoRA" if tuning == "lora" else "full"


def targets(cells: dict[str, Any]) -> dict[str, Any]:
    """The three targets per group and tuning (``"calibration, LoRA"``, ...), each met or not and by how much:
    (a) the share of healthy runs quiet, against :data:`QUIET_TARGET`; (b) the share of breaking regimes' rewind runs
    the alarm fired in, against :data:`FIRING_TARGET`, and the breaking regimes whose rewind mean is within
    :data:`TOLERANCE` of the better by hand (the shortfall: the lowest ``rewind - by hand`` plus the tolerance);
    (c) the share of runs ending on their starting weights where ``dpo_lower`` ends above the base, against
    :data:`START_TARGET`. ``None`` where a group has no run to read."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in cells.values():
        if entry["analysis"]["judged"]:
            groups.setdefault(f"{entry['held_out']}, {tuning_label(entry['tuning'])}", []).append(entry["analysis"])
    order = [f"{g}, {t}" for g in GROUPS for t in ("LoRA", "full")]
    out = {}
    for group in sorted(groups, key=lambda g: order.index(g) if g in order else len(order)):
        mine = groups[group]
        breaking = [a["breaking"] for a in mine if a["dpo_breaks"]]
        healthy = sum(a["healthy"]["runs"] for a in mine)
        quiet_runs = sum(a["healthy"]["quiet"] for a in mine)
        runs = sum(b["runs"] for b in breaking)
        fired = sum(b["fired"] for b in breaking)
        above = sum(b["lower_above_base"] for b in breaking)
        at_start = sum(b["ended_at_start"] for b in breaking)
        worst = min((b["rewind_minus_by_hand"] for b in breaking), default=None)
        out[group] = {
            "quiet": _share(quiet_runs, healthy, QUIET_TARGET, at_least=True),
            "firing": _share(fired, runs, FIRING_TARGET, at_least=True),
            "outcome": {
                "cells": len(breaking),
                "met_in": sum(b["outcome_met"] for b in breaking),
                "met": None if not breaking else all(b["outcome_met"] for b in breaking),
                "lowest_rewind_minus_by_hand": worst,
                "short_by": None if worst is None else max(0.0, -TOLERANCE - worst),
            },
            "start_weights": _share(at_start, above, START_TARGET, at_least=False),
        }
    return out


def _share(count: int, runs: int, target: float, at_least: bool) -> dict[str, Any]:
    """``count`` of ``runs`` against ``target`` (a share to reach, or with ``at_least`` false not to exceed)."""
    if not runs:
        return {"count": count, "runs": runs, "share": None, "met": None, "short_by": None}
    share = count / runs
    short = target - share if at_least else share - target
    return {"count": count, "runs": runs, "share": share, "met": short <= 0, "short_by": max(0.0, short)}


def assemble(parts: Path, path: Path = OUTPUT) -> int:
    """The parts into the result file: every run, per cell the analysis, and the targets per group and tuning. The
    cells are :data:`CELLS` and, after them, any other cell the parts hold (a smoke run's cut-down cells)."""
    from stability_map import machine

    runs = [json.loads(p.read_text()) for p in sorted(parts.glob("*__seed*.json"))]
    by_cell: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for r in runs:
        by_cell.setdefault(cell_of(r["cell"]).name, {}).setdefault(r["setting"], {})[r["seed"]] = r
    extra = {cell_of(r["cell"]).name: cell_of(r["cell"]) for r in runs}
    every = list(CELLS) + [c for name, c in extra.items() if name not in {c.name for c in CELLS}]
    cells = {}
    for cell in every:
        mine = by_cell.get(cell.name, {})
        cells[cell.name] = {**asdict(cell), "held_out": cell.held_out, "analysis": analyse_cell(mine)}
    bases = {p.stem.removeprefix("base__"): json.loads(p.read_text()) for p in sorted(parts.glob("base__*.json"))}
    planned_keys = [run_key(c, s, k) for c in every for k in SEEDS for s in SETTINGS]
    done = {run_key(cell_of(r["cell"]), r["setting"], r["seed"]) for r in runs}
    missing = [key for key in planned_keys if key not in done]
    sample = next((r for r in runs if r["setting"] == "rewind"), None)
    safeguard = next((r for r in runs if r["setting"] == "safeguard"), None)
    report = {
        "description": __doc__.split("\n\n")[0].replace("\n", " "),
        "command": "OMP_NUM_THREADS=1 nice -n 5 python benchmarks/studies/rewind_outcome.py run --worker i/2 "
        "(i = 0, 1), then python benchmarks/studies/rewind_outcome.py assemble",
        "machine": machine(),
        "load": "a 2-core CPU shared with other work throughout (each run records its load average)",
        "protocol": {
            "arms": {s: LABELS[s] for s in SETTINGS},
            "max_steps": MAX_STEPS,
            "batch_size": 2,
            "probe_steps": PROBE_STEPS,
            "eval_every": EVAL_EVERY,
            "seeds": list(SEEDS),
            "eval_seeds_per_prompt": 4,
            # the config's alarm and ladder as the runs read them (each run records its own)
            "probe_alarm": sample and sample["probe_alarm"],
            "safeguard_from_step_0": {
                "safeguard_space": safeguard and safeguard["safeguard_space"],
                "safeguard_mu": safeguard and safeguard["safeguard_mu"],
            },
            "tolerance": TOLERANCE,
            "restore_z": RESTORE_Z,
            "targets": {"quiet": QUIET_TARGET, "firing": FIRING_TARGET, "start_weights": START_TARGET},
        },
        "definitions": {
            "final_reward": "the mean colour reward on the held-out prompts of the weights the run ends with",
            "healthy_run": f"no evaluation of Diffusion-DPO (every {EVAL_EVERY} steps and at the end) found its "
            f"reward more than {TOLERANCE} below the base's",
            "breaks": "the paired 95% t interval of Diffusion-DPO's final reward minus the safeguard-from-step-0's, "
            "over seeds, lies below 0",
            "quiet": "the rewind raised no alarm and equals Diffusion-DPO of the same seed bit for bit: the final "
            "weights' SHA-256, the train loss at every step and the final reward",
            "dpo_lower": "Diffusion-DPO from step 0 at the cell's learning rate times the last health/lr_factor the "
            "same seed's rewind logged; where it logged none, the dpo run itself (reused_dpo)",
            "target_a": f"quiet on at least {QUIET_TARGET:.0%} of the healthy runs",
            "target_b": f"in breaking regimes the alarm fires in at least {FIRING_TARGET:.0%} of the rewind runs, and "
            f"per regime the rewind's mean final reward is at most {TOLERANCE} below max(safeguard from step 0, "
            "dpo_lower) on the means over seeds",
            "target_c": "of the breaking regimes' runs where dpo_lower's final reward is above the base's, the rewind "
            f"ends on its starting weights (health/ended_at_start) in at most {START_TARGET:.0%}",
            "restore_point": f"the restored step's own probe reading winner_rise_z <= {RESTORE_Z}, or step 0",
            "intervals": "95% t intervals over seeds (paired by seed for differences)",
        },
        "held_out": {
            "model": "wide: the demo's architecture at 64 px with a UNet 1.5 times as wide "
            "(probe_z_runs.wide_recipe), read by no choice of the alarm",
            "dataset": "the demo's data at data seed 1: other held-out prompts, training prompts and pairs; read by "
            "no choice of the alarm",
        },
        "bases": bases,
        "cells": cells,
        "targets": targets(cells),
        "runs_planned": len(planned_keys),
        "runs_done": len(runs),
        "runs_trained": sum(not r.get("reused_dpo", False) for r in runs),
        "not_run": missing,
        "not_measured": [
            "online: not measured under the present rule",
            "offline runs longer than 60 steps, and eval splits",
            *(["the runs not_run lists: the CPU's time did not allow them"] if missing else []),
        ],
        "runs": {run_key(cell_of(r["cell"]), r["setting"], r["seed"]): r for r in runs},
    }
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}: {len(runs)} of {len(planned_keys)} planned runs")
    return 0


# --------------------------------------------------------------------------------------------------------- table


def _ci(item: dict[str, Any], signed: bool = False) -> str:
    sign = "+" if signed else ""
    if item.get("ci95") is None:
        return f"{item['mean']:{sign}.3f}"
    low, high = item["ci95"]
    return f"{item['mean']:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def _rewinds(entry: dict[str, Any]) -> str:
    """Per seed: each alarm's step -> the step restored, the rate's factor at the end, a stop, the start weights."""
    parts = []
    for seed, rec in entry["per_seed"].items():
        if not rec["restored"]:
            parts.append(f"s{seed}: none")
            continue
        steps = "; ".join(
            f"{r['fired_at']}->{r['restored']}{'' if r['restore_point'] else ' (not a restore point)'}"
            for r in rec["restored"]
        )
        factor = f", x{rec['lr_factor']:g}" if rec["lr_factor"] is not None else ""
        stop = f", stopped at {rec['stopped_at']}" if rec["stopped_at"] is not None else ""
        start = ", start weights" if rec["ended_at_start"] else ""
        parts.append(f"s{seed}: {steps}{factor}{stop}{start}")
    return ", ".join(parts)


def _lower(entry: dict[str, Any]) -> str:
    """``dpo_lower``'s mean and interval, and per seed its rate (``= DPO`` where it is the dpo run itself)."""
    rates = ", ".join(
        "= DPO" if rec["dpo_lower_reused_dpo"] else f"{rec['dpo_lower_lr']:.3g}" for rec in entry["per_seed"].values()
    )
    return f"{_ci(entry['final_reward']['dpo_lower'])} (lr {rates})"


def _quiet(entry: dict[str, Any]) -> str:
    h = entry["healthy"]
    return f"{h['quiet']} of {h['runs']}" if h["runs"] else "no healthy run"


def _breaking(entry: dict[str, Any]) -> str:
    """A regime's verdicts: whether it breaks; there, the alarm's runs, the rewind against the better by hand and the
    runs that ended on their starting weights where the lower rate trains above the base."""
    head = f"DPO - safeguard {_ci(entry['dpo_minus_safeguard'], True)}"
    if not entry["dpo_breaks"]:
        return f"{head}: does not break"
    b = entry["breaking"]
    by_hand = LABELS[b["by_hand"]]
    met = "met" if b["outcome_met"] else f"not met, short by {-TOLERANCE - b['rewind_minus_by_hand']:.3f}"
    return (
        f"{head}: breaks; alarm in {b['fired']} of {b['runs']}; rewind - {by_hand} "
        f"{b['rewind_minus_by_hand']:+.3f} ({met}); start weights in {b['ended_at_start']} of the "
        f"{b['lower_above_base']} where the lower rate ends above the base"
    )


def _cell_label(entry: dict[str, Any]) -> str:
    pairs = f"{entry['pairs']}-pair folder" if entry["pairs"] else "all pairs"
    source = "eval split" if entry["probe"] == "eval-split" else "4 held back"
    return (
        f"{entry['model']}, data {entry['data']}, lr {entry['lr']:g}, {tuning_label(entry['tuning'])}, {pairs} "
        f"{entry['order']}, probe {source}, {entry['steps']} steps"
    )


def _target(t: dict[str, Any], what: str) -> str:
    if t["share"] is None:
        return "n/a (no run)"
    verdict = "met" if t["met"] else f"not met, short by {t['short_by']:.0%}"
    return f"{t['count']} of {t['runs']} {what} ({t['share']:.0%}; {verdict})"


def table(result: dict[str, Any]) -> str:
    """The Markdown block of docs/safeguard.md: per group a table of its regimes (the base's and each arm's final
    held-out reward, mean [95% t interval] over seeds, the rewinds, the quiet runs and the breaking verdicts), then
    the targets per group and tuning."""
    lines: list[str] = []
    what = {
        "calibration": "the benchmark's base, data seed 0",
        "held-out dataset": "the benchmark's base, data seed 1",
        "held-out model": "the wide UNet at 64 px, data seed 0",
    }
    for group in GROUPS:
        mine = [e for e in result["cells"].values() if e["held_out"] == group and e["analysis"]["judged"]]
        if not mine:
            continue
        lines += [
            f"**{group}** ({what[group]}):",
            "",
            "| regime | seeds | base | Diffusion-DPO | safeguard from step 0 | rewind | Diffusion-DPO at the rewind's "
            "last rate | alarm -> restored step, per seed | healthy runs quiet (= DPO bit for bit) "
            "| where it breaks |",
            "|---|---:|---:|---|---|---|---|---|---|---|",
        ]
        for e in mine:
            a = e["analysis"]
            f = a["final_reward"]
            lines.append(
                f"| {_cell_label(e)} | {len(a['seeds'])} | {a['base_reward']:.3f} | {_ci(f['dpo'])} | "
                f"{_ci(f['safeguard'])} | {_ci(f['rewind'])} | {_lower(a)} | {_rewinds(a)} | {_quiet(a)} "
                f"| {_breaking(a)} |"
            )
        lines.append("")
    lines += [
        "| group | (a) quiet on healthy runs (95 %) | (b) alarm where DPO breaks (90 %) | (b) rewind within "
        "0.02 of the better by hand | (c) start weights where the lower rate trains above the base (at most 10 %) |",
        "|---|---|---|---|---|",
    ]
    for group, t in result["targets"].items():
        o = t["outcome"]
        if not o["cells"]:
            outcome = "n/a (no breaking regime)"
        else:
            verdict = "met" if o["met"] else f"not met, short by {o['short_by']:.3f}"
            outcome = f"{o['met_in']} of {o['cells']} regimes ({verdict})"
        lines.append(
            f"| {group} | {_target(t['quiet'], 'quiet')} | {_target(t['firing'], 'fired')} | {outcome} "
            f"| {_target(t['start_weights'], 'at start')} |"
        )
    lines += [
        "",
        f"Final rewards are absolute (the base's in its column); {result['runs_done']} of "
        f"{result['runs_planned']} planned runs ({result['runs_trained']} trained, the rest Diffusion-DPO's own run "
        f"where the rewind kept the rate). Not measured: {'; '.join(result['not_measured'])}.",
    ]
    return "\n".join(lines)


def write_block(text: str, page: Path = DOCS) -> None:
    body = page.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{page} has no {START} ... {END} block")
    head, rest = body.split(START, 1)
    page.write_text(f"{head}{START}\n\n{text}\n\n{END}{rest.split(END, 1)[1]}")


def docs_block(page: Path = DOCS) -> str:
    """What ``page`` holds between the markers, without the blank lines around it."""
    body = page.read_text()
    return body.split(START, 1)[1].split(END, 1)[0].strip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("pretrain", "run", "assemble", "table"))
    parser.add_argument("--parts", default=PARTS, type=Path)
    parser.add_argument("--worker", default="0/1", help="run: this worker of how many (e.g. 0/2).")
    parser.add_argument("--cells", default=None, help="run: only these cells (names, comma-separated).")
    parser.add_argument(
        "--steps", default=None, type=int, help="run: cut every cell to this many steps (a smoke run; not the study)."
    )
    parser.add_argument("--seeds", default=None, help="run: only these seeds (comma-separated; a smoke run).")
    parser.add_argument("--json", default=OUTPUT, type=Path)
    parser.add_argument("--page", action="store_true", help="table: write it into docs/safeguard.md.")
    args = parser.parse_args(argv)
    if args.command == "run":
        worker, workers = (int(v) for v in args.worker.split("/"))
        seeds = tuple(int(v) for v in args.seeds.split(",")) if args.seeds else SEEDS
        return run(args.parts, worker, workers, args.cells.split(",") if args.cells else None, args.steps, seeds)
    if args.command == "pretrain":
        return pretrain()
    if args.command == "assemble":
        return assemble(args.parts, args.json)
    text = table(json.loads(args.json.read_text()))
    if args.page:
        write_block(text)
        print(f"wrote the block {START} into {DOCS}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
