"""The rewind judged by the held-out reward a run ends with: Diffusion-DPO with ``on_pathology="rewind"`` against
plain Diffusion-DPO and against the package's default safeguard on from step 0, per regime and training seed.

Not part of the test suite. Every run trains the demo's architecture for :data:`MAX_STEPS` steps (the longer cells:
their own ``steps``) of 2 pairs with the
held-out probe on (``probe_steps`` :data:`PROBE_STEPS`, the config's ``probe_pairs``, ``probe_noise_draws`` and
alarm: the CUSUM of ``probe/winner_rise_z`` at allowance 13 and limit 1, the config's rule when they ran), in three
settings that share, per seed, the pairs the probe holds back, the batches, timesteps and noise:

* ``dpo``: Diffusion-DPO, the probe logged (``on_pathology`` at its default, ``warn``);
* ``rewind``: Diffusion-DPO with ``on_pathology="rewind"``;
* ``safeguard``: the package's default safeguard (``safeguard_space="output"``, ``safeguard_mu`` at the config's
  default) from step 0, the probe logged.

Regimes (:data:`CELLS`): the pair dataset sorted by prompt (as the demo writes it) or shuffled; the probe holding
rows back from the training data or reading an eval split; learning rates 1e-4, 1e-3 and 1e-2; full tuning and LoRA;
two models and two datasets; 100 steps where Diffusion-DPO held for 50. The alarm's constants were chosen
(``probe_alarm_sequential.py``) on the benchmark's base (:data:`stability_map.STUDY_BASE`) with the demo's pairs at
data seed 0; its held-out model was the UNet 1.5 times as wide at 64 px (``probe_z_runs.wide_recipe``), which is the
held-out model here. The held-out dataset is the demo's
data at data seed 1 (other held-out prompts, other training prompts and pairs), never read by any alarm study.

Online (:data:`ONLINE_CELLS`, ``run --online``): the stability benchmark's three online regimes, each trained by its
own study's ``run_one`` (LoRA on the demo's base, samples scored online; the brightness reward at lr 1e-2, where
Diffusion-DPO breaks, and at 1e-3, 60 steps; the colour reward at lr 2e-4, 120 steps), the probe reading the regime's
held-out captions, in the same three settings at seeds :data:`ONLINE_SEEDS` (the alarm's constants were chosen on the
hacking regimes' seeds 0 and 1, never on these). A rewinding online run stops at its first alarm with the restored
weights (online the rewind has no safeguard to switch to). The held-out reward is the colour reward of the regime's
held-out measures (the brightness regimes' reward is not the one judged).

Measures (:func:`analyse`), all on the held-out prompts' colour reward (the demo's evaluation: the same prompts and
noise for every run and the base):

* the final held-out reward of each setting (after training, from the weights the run ends with: a rewind that
  stopped itself ends with its restored weights) and the base's;
* Diffusion-DPO's reward at :data:`DPO_EVAL_STEPS`, which gives the **start of the fall**: the first evaluation step
  from which every evaluation to the end finds Diffusion-DPO's reward more than :data:`TOLERANCE` (0.02, beyond the
  noise floor of -0.012 that lr-2e-5 runs reach: ``cpu-probe-alarm-sequential.json``'s ``noise_floor``) below the
  base's (``probe_alarm_sequential.fall_start``); the **detection delay** is the rewind's first alarm step minus
  that start, in steps (negative: the alarm came before the evaluations saw the fall; resolution 10 steps);
* the rewind's alarm steps, restored steps, and whether each restored step was a restore point, checked from the
  run's own probe readings (``probe/winner_rise_z`` at that step at most 1.645, or step 0);
* where the rewind's alarm never fired, whether it equals Diffusion-DPO of the same seed bit for bit: the SHA-256 of
  the final trainable weights, the train loss at every step and the final reward to all digits.

Targets (:func:`targets`), per regime, with 95 % t intervals over seeds (paired by seed):

* a regime **breaks** where Diffusion-DPO's final reward lies below the safeguard-from-step-0's beyond the interval
  (the paired interval of ``dpo - safeguard`` lies below 0); there the rewind should recover at least 3/4 of the gap
  on the mean (``(rewind - dpo) / (safeguard - dpo)``) and end below Diffusion-DPO in no seed by more than
  :data:`TOLERANCE`;
* a Diffusion-DPO run is **healthy** where no evaluation found its reward more than :data:`TOLERANCE` below the
  base's (``probe_alarm_sequential.run_class``); over the rewind runs whose Diffusion-DPO twin is healthy, at least
  95 % should raise no alarm.

    OMP_NUM_THREADS=1 nice -n 5 nohup python benchmarks/studies/rewind_outcome.py run --worker 0/2 &
    OMP_NUM_THREADS=1 nice -n 5 nohup python benchmarks/studies/rewind_outcome.py run --worker 1/2 &
    python benchmarks/studies/rewind_outcome.py assemble      # benchmarks/results/probe/cpu-rewind-outcome.json
    python benchmarks/studies/rewind_outcome.py table --page  # docs/safeguard.md's marked block
"""

from __future__ import annotations

import argparse
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
DPO_EVAL_STEPS = (10, 20, 30, 40, 50)
SEEDS = (0, 1, 2, 3, 4)  # seed by seed: a grid cut short holds every cell's first seeds
TOLERANCE = 0.02  # alarm_calibration.TOLERANCE: the classes' and the fall's margin below the base's reward
RESTORE_Z = 1.645  # callbacks.rewind.RESTORE_Z, restated: the check reads the probe's logs, not the package's verdict
RECOVERY_TARGET, QUIET_TARGET = 0.75, 0.95
SETTINGS = ("dpo", "rewind", "safeguard")
LABELS = {"dpo": "Diffusion-DPO", "rewind": "rewind", "safeguard": "safeguard from step 0"}
CALIBRATION_MODEL, CALIBRATION_DATA = "benchmark", 0


@dataclass(frozen=True)
class Cell:
    """One regime: the model (``benchmark``: the benchmark's base; ``wide``: the held-out model), the data seed
    (0: the demo's data the alarm was chosen on; 1: the held-out dataset), the learning rate, the tuning, the order
    of the pair dataset and where the probe's pairs come from (``holdback``: rows held back from the training data;
    ``eval-split``: an eval split of its own)."""

    model: str = CALIBRATION_MODEL
    data: int = CALIBRATION_DATA
    lr: float = 1e-3
    tuning: str = "full"
    order: str = "sorted"
    probe: str = "holdback"
    steps: int = MAX_STEPS

    @property
    def name(self) -> str:
        longer = f"-{self.steps}steps" if self.steps != MAX_STEPS else ""
        return f"{self.model}-data{self.data}-lr{self.lr:g}-{self.tuning}-{self.order}-{self.probe}{longer}"

    @property
    def eval_steps(self) -> tuple[int, ...]:
        """Diffusion-DPO's evaluation steps: every 10 (:data:`DPO_EVAL_STEPS` in a run of :data:`MAX_STEPS`)."""
        return tuple(range(DPO_EVAL_STEPS[0], self.steps + 1, DPO_EVAL_STEPS[0]))

    @property
    def held_out(self) -> str:
        """Which held-out axis the cell stands on: ``calibration``, ``held-out dataset`` or ``held-out model``."""
        if self.model != CALIBRATION_MODEL:
            return "held-out model"
        return "held-out dataset" if self.data != CALIBRATION_DATA else "calibration"


#: the regimes, in the order of their priority. First (:data:`FIRST` of them): on the calibration pair the three
#: learning rates with full tuning and with LoRA (sorted pairs, rows held back), the pairs shuffled and an eval split
#: at 1e-3 with full tuning; on the held-out dataset and the held-out model full tuning at 1e-4 and 1e-3 and LoRA at
#: 1e-4. Then the rest, for as long as the CPU allows.
CELLS: tuple[Cell, ...] = (
    Cell(lr=1e-4),
    Cell(lr=1e-3),
    Cell(lr=1e-2),
    Cell(tuning="lora", lr=1e-4),
    Cell(tuning="lora"),
    Cell(tuning="lora", lr=1e-2),
    Cell(order="shuffled"),
    Cell(probe="eval-split"),
    Cell(data=1, lr=1e-4),
    Cell(data=1, lr=1e-3),
    Cell(data=1, tuning="lora", lr=1e-4),
    Cell(model="wide", lr=1e-4),
    Cell(model="wide", lr=1e-3),
    Cell(model="wide", tuning="lora", lr=1e-4),
    # the rest
    Cell(data=1, lr=1e-2),
    Cell(model="wide", lr=1e-2),
    Cell(data=1, order="shuffled"),
    Cell(data=1, probe="eval-split"),
    Cell(tuning="lora", lr=1e-4, order="shuffled"),
    Cell(tuning="lora", lr=1e-4, probe="eval-split"),
    Cell(data=1, tuning="lora"),
    Cell(model="wide", tuning="lora"),
    Cell(model="wide", order="shuffled"),
    Cell(model="wide", probe="eval-split"),
    # longer runs: where Diffusion-DPO held for 50 steps (and the held-out model's false alarms), for 100
    Cell(lr=1e-4, steps=100),
    Cell(tuning="lora", steps=100),
    Cell(model="wide", lr=1e-4, steps=100),
    # the pair order and the eval split moved together
    Cell(order="shuffled", probe="eval-split"),
    Cell(model="wide", order="shuffled", probe="eval-split"),
)
FIRST, FIRST_SEEDS = 14, 3  # the first cells' first seeds run first, then their later seeds, then the rest
#: the cells whose Diffusion-DPO runs the alarm's choice read (``probe_alarm_sequential.outcome_runs``); the cells
#: after them, and the online cells, were added after the choice and check the chosen rule
CHOICE_CELLS = 22


@dataclass(frozen=True)
class OnlineCell:
    """An online regime of the stability benchmark (``stability_probe_online.ONLINE_REGIMES``: its base, prompts,
    reward and held-out measures, LoRA, a batch of online samples a step, its own steps and evaluation steps) at a
    learning rate; the probe reads the regime's held-out captions as the online trainer's eval prompts."""

    regime: str
    lr: float

    @property
    def name(self) -> str:
        return f"{self.regime}-lr{self.lr:g}"

    @property
    def held_out(self) -> str:
        return "online"


#: the online regimes, each at the learning rate the online probe study ran it (``cpu-stability-probe-online.json``):
#: the brightness reward at lr 1e-2, where Diffusion-DPO breaks, and at 1e-3; the colour reward at 2e-4
ONLINE_CELLS: tuple[OnlineCell, ...] = (
    OnlineCell("online-hacking-fast", 1e-2),
    OnlineCell("online-hacking", 1e-3),
    OnlineCell("online-healthy", 2e-4),
)
#: outside seeds 0 and 1, whose online probe-logged runs the alarm's constants were chosen on
#: (``probe_alarm_sequential.py``: ``online-a/b``)
ONLINE_SEEDS = (2, 3, 4, 5, 6)


def cell_of(fields: dict[str, Any]) -> Cell | OnlineCell:
    """The cell a run's record names."""
    return OnlineCell(**fields) if "regime" in fields else Cell(**fields)


def seeds_of(cell: Cell | OnlineCell) -> tuple[int, ...]:
    return ONLINE_SEEDS if isinstance(cell, OnlineCell) else SEEDS


def run_key(cell: Cell | OnlineCell, setting: str, seed: int) -> str:
    return f"{cell.name}__{setting}__seed{seed}"


# ------------------------------------------------------------------------------------------------------ training


def _methods() -> dict[str, Any]:
    from trl_diffusion_sdpo.demo.methods import METHODS, Method

    probe = (("probe_steps", PROBE_STEPS),)
    methods = {
        "dpo": Method("ro-dpo", "Diffusion-DPO, probe logged", False, config=probe),
        "rewind": Method(
            "ro-rewind", "Diffusion-DPO, on_pathology=rewind", False, config=(*probe, ("on_pathology", "rewind"))
        ),
        "safeguard": Method("ro-safeguard", "default safeguard from step 0", True, config=probe),
    }
    for method in methods.values():
        METHODS.setdefault(method.key, method)
    return methods


class Recorder:
    """The per-step train loss, the probe's readings and the rewinds as the trainer logs them."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def __init__(self) -> None:
                self.loss: dict[int, float] = {}
                self.probe: list[dict[str, float]] = []
                self.rewinds: list[list[int]] = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                logs, step = logs or {}, state.global_step
                if "loss" in logs:
                    self.loss[step] = float(logs["loss"])
                if "probe/winner_rise_z" in logs:
                    self.probe.append(
                        {
                            "step": step,
                            "winner_rise_z": float(logs["probe/winner_rise_z"]),
                            "delta_winner": float(logs.get("probe/delta_winner", float("nan"))),
                        }
                    )
                if "health/rewind_to" in logs:
                    self.rewinds.append([step, int(logs["health/rewind_to"])])

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


def train_one(cell: Cell, setting: str, seed: int) -> dict[str, Any]:
    """One run: ``setting`` in ``cell`` at training seed ``seed``, its final held-out reward, its weights' digest,
    its loss, probe readings and rewinds (Diffusion-DPO: its held-out reward at :data:`DPO_EVAL_STEPS` too)."""
    import dataclasses

    import stability_map
    import torch

    from trl_diffusion_sdpo.demo.run import _evaluate, _training_args, train_preference

    torch.set_num_threads(1)
    method = _methods()[setting]
    data = Data.get(cell.model, cell.data)
    recipe = dataclasses.replace(
        data["recipe"],
        learning_rate=cell.lr,
        tuning=cell.tuning,
        seeds=(seed,),
        methods=(method.key,),
        max_steps=cell.steps,
    )
    dataset = data["shuffled"] if cell.order == "shuffled" else data["dataset"]
    probe_pairs = data["eval_split"] if cell.probe == "eval-split" else None
    recorder = Recorder()
    callbacks = [recorder]
    evaluator = None
    if setting == "dpo":
        evaluator = stability_map.EvaluateAt(list(cell.eval_steps), data["held_out"], recipe)
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
        "final_reward": final,
        "base_reward": data["base_reward"],
        "max_steps": cell.steps,
        "last_step": history["step"][-1],
        "weights_sha256": weights_digest(pipeline.unet),
        "loss": [recorder.loss[s] for s in sorted(recorder.loss)],
        "probe": recorder.probe,
        "rewinds": recorder.rewinds,
        "safeguard_space": config.safeguard_space,
        "safeguard_mu": config.safeguard_mu,
        "on_pathology": config.on_pathology,
        "seconds": round(seconds, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    if evaluator is not None:
        run["reward_at"] = {str(s): r for s, r in sorted(evaluator.rewards.items())}
    return run


class OnlineSetup:
    """The online regime this process trains (``stability_probe_online._online_setup``: its study module with the
    probe-logged and rewinding settings, its stored report, its Diffusion-DPO setting) and its base's held-out colour
    reward measured here; one regime at a time (the regimes' modules share their evaluation context)."""

    current: dict[str, Any] = {}

    @classmethod
    def get(cls, regime: str) -> dict[str, Any]:
        if cls.current.get("regime") == regime:
            return cls.current
        from stability_probe_online import _online_setup

        module, stored, _, dpo = _online_setup(regime)
        context = module._CONTEXT
        fields = {k: v for k, v in module.METHODS[dpo].items() if k != "safeguard_mu"}
        module.METHODS[f"{dpo}-safeguard"] = {**fields, "safeguard_space": "output", "probe_steps": PROBE_STEPS}
        methods = {"dpo": f"{dpo}-probe", "rewind": f"{dpo}-rewind", "safeguard": f"{dpo}-safeguard"}
        cls.current = {
            "regime": regime,
            "module": module,
            "methods": methods,
            "max_steps": stored["config"]["max_steps"],
            "eval_steps": list(stored["eval_steps"]),
            "base_reward": float(context.evaluate(context.base)["colour_reward"]),
            "stored_base_reward": stored["base"]["measures"]["colour_reward"],
        }
        return cls.current


def train_one_online(cell: OnlineCell, setting: str, seed: int) -> dict[str, Any]:
    """One online run: ``setting`` in the online regime ``cell`` at training seed ``seed`` (the regime's own
    ``run_one``), with the record :func:`train_one` writes offline. The held-out measures at every evaluation step
    stand in for the weights' digest (``run_one`` keeps no weights): a digest of all of them to all digits."""
    from online_probe_runs import probe_record

    setup = OnlineSetup.get(cell.regime)
    method = setup["methods"][setting]
    fields = setup["module"].METHODS[method]
    tick = time.perf_counter()
    result = setup["module"].run_one((seed, cell.lr, method))
    seconds = time.perf_counter() - tick
    record = probe_record(result["history"], setup["max_steps"])
    curve = result["curve"]
    last = str(setup["max_steps"])
    run = {
        "cell": asdict(cell),
        "setting": setting,
        "seed": seed,
        "final_reward": float(curve[last]["colour_reward"]),
        "base_reward": setup["base_reward"],
        "stored_base_reward": setup["stored_base_reward"],
        "max_steps": setup["max_steps"],
        "last_step": record["stopped_at"] or setup["max_steps"],
        "measures_sha256": hashlib.sha256(json.dumps(curve, sort_keys=True).encode()).hexdigest(),
        "curve": curve,
        "loss": [float(v) for v in result["history"]["loss"]],
        "probe": [
            {"step": p["step"], "winner_rise_z": p["winner_rise_z"], "delta_winner": p["delta_winner"]}
            for p in record["probe"]
        ],
        "rewinds": [[r["fired_at"], r["restored"]] for r in record["rewinds"]],
        "safeguard_space": fields["safeguard_space"],
        "safeguard_mu": result["safeguard_mu"],  # as the trainer resolved it
        "on_pathology": fields.get("on_pathology", "warn"),
        "seconds": round(seconds, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    if setting == "dpo":
        run["reward_at"] = {str(s): float(curve[str(s)]["colour_reward"]) for s in setup["eval_steps"]}
    return run


def _write_run(parts: Path, cell: Cell | OnlineCell, setting: str, seed: int, result: dict[str, Any]) -> None:
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


def _missing(parts: Path, cells: list[Any]) -> list[tuple[Any, str, int]]:
    """The runs of ``cells`` that ``parts`` lacks, cell by cell, seed by seed, setting by setting."""
    return [
        (c, s, seed)
        for c in cells
        for seed in seeds_of(c)
        for s in SETTINGS
        if not (parts / f"{run_key(c, s, seed)}.json").exists()
    ]


def run_online(parts: Path, worker: int, workers: int) -> int:
    """Train what ``parts`` lacks of the online cells this worker takes (at its positions in
    :data:`ONLINE_CELLS`), cell by cell (a cell's regime is set up once), seed by seed."""
    parts.mkdir(parents=True, exist_ok=True)
    todo = _missing(parts, [c for i, c in enumerate(ONLINE_CELLS) if i % workers == worker])
    print(f"{len(todo)} online runs to do", flush=True)
    for cell, setting, seed in todo:
        result = train_one_online(cell, setting, seed)
        _write_run(parts, cell, setting, seed, result)
        base = parts / f"base__{cell.regime}.json"
        if not base.exists():
            setup = OnlineSetup.current
            base.write_text(json.dumps({k: setup[k] for k in ("base_reward", "stored_base_reward", "eval_steps")}))
    return 0


def run(parts: Path, worker: int, workers: int, cells: list[str] | None) -> int:
    """Train what ``parts`` lacks, seed by seed, each run written to its own file at once; worker ``worker`` of
    ``workers`` takes the cells at its positions (cells keep their process: each builds its models' data once)."""
    parts.mkdir(parents=True, exist_ok=True)
    todo = _missing(
        parts, [c for i, c in enumerate(CELLS) if i % workers == worker and (cells is None or c.name in cells)]
    )
    # a seed whose other settings are done first (it completes a comparison); then the first cells' first seeds,
    # their later seeds, the rest's; the held-out model's cells after the others' (its base may still be
    # pretraining), then seed by seed
    rank = {c: i for i, c in enumerate(CELLS)}

    def done(cell: Cell, seed: int) -> int:
        return sum((parts / f"{run_key(cell, s, seed)}.json").exists() for s in SETTINGS)

    todo.sort(key=lambda t: (-done(t[0], t[2]), rank[t[0]] >= FIRST, t[2] >= FIRST_SEEDS,
                             t[0].model != CALIBRATION_MODEL, t[2]))  # fmt: skip
    print(f"{len(todo)} runs to do", flush=True)
    for cell, setting, seed in todo:
        result = train_one(cell, setting, seed)
        _write_run(parts, cell, setting, seed, result)  # preempted (SIGTERM): whole runs only
        data = Data.cache[(cell.model, cell.data)]
        base = parts / f"base__{cell.model}__data{cell.data}.json"
        if not base.exists():
            base.write_text(json.dumps({k: data[k] for k in ("base_reward", "pairs", "eval_split_pairs")}))
    return 0


# ------------------------------------------------------------------------------------------------------ analysis


def _default(name: str) -> float:
    """The config's default of ``name``: what every run of the study read."""
    from trl_diffusion_sdpo import DiffusionSDPOConfig

    return DiffusionSDPOConfig.__dataclass_fields__[name].default


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
    ``winner_rise_z`` at that step at most :data:`RESTORE_Z`, or the start), the delay from Diffusion-DPO's fall,
    and, where no alarm fired, whether it equals Diffusion-DPO bit for bit."""
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
        "dpo_class": dpo_class(dpo),
        "fall_start": start,
        "delay_steps": None if start is None or first is None else first - start,
    }
    if not rewind["rewinds"]:
        digest = "weights_sha256" if "weights_sha256" in rewind else "measures_sha256"  # online: the measures'
        out["equals_dpo"] = {
            digest: rewind[digest] == dpo[digest],
            "loss": rewind["loss"] == dpo["loss"],
            "final_reward": rewind["final_reward"] == dpo["final_reward"],
        }
    return out


def analyse_cell(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per cell: the final rewards (absolute and against the base) with t intervals, the paired differences, the
    rewinds per seed and the targets' verdicts."""
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
    for k in seeds:
        record = rewind_record(runs["rewind"][k], runs["dpo"][k])
        per_seed[str(k)] = {**{s: final[s][seeds.index(k)] for s in SETTINGS}, **record}
    vs = paired("dpo", "safeguard")
    breaks = vs["ci95"] is not None and vs["ci95"][1] < 0
    out: dict[str, Any] = {
        "seeds": seeds,
        "judged": True,
        "base_reward": base,
        "final_reward": {s: _t(final[s]) for s in SETTINGS},
        "dpo_minus_safeguard": vs,
        "rewind_minus_dpo": paired("rewind", "dpo"),
        "rewind_minus_safeguard": paired("rewind", "safeguard"),
        "dpo_breaks": breaks,
        "per_seed": per_seed,
    }
    if breaks:
        gap = out["final_reward"]["safeguard"]["mean"] - out["final_reward"]["dpo"]["mean"]
        recovered = (out["final_reward"]["rewind"]["mean"] - out["final_reward"]["dpo"]["mean"]) / gap
        worse = [k for k in seeds if final["rewind"][seeds.index(k)] - final["dpo"][seeds.index(k)] < -TOLERANCE]
        out["recovery"] = {
            "gap": gap,
            "recovered_fraction": recovered,
            "fraction_met": recovered >= RECOVERY_TARGET,
            "seeds_below_dpo_beyond_noise": worse,
            "met": recovered >= RECOVERY_TARGET and not worse,
        }
    healthy = [k for k in seeds if per_seed[str(k)]["dpo_class"] == "healthy"]
    quiet = [k for k in healthy if not per_seed[str(k)]["alarm_steps"]]
    # what a false alarm costs the user: the rewind's final reward minus Diffusion-DPO's, where Diffusion-DPO held
    cost = [final["rewind"][seeds.index(k)] - final["dpo"][seeds.index(k)] for k in healthy if k not in quiet]
    out["healthy"] = {"runs": len(healthy), "quiet": len(quiet), "seeds": healthy, "false_alarm_cost": cost}
    return out


def targets(cells: dict[str, Any]) -> dict[str, Any]:
    """The two targets over each group of cells (calibration, held-out dataset, held-out model, all): the breaking
    cells' recovery met in how many, and the quiet share over the healthy Diffusion-DPO runs' rewind twins."""
    groups: dict[str, list[str]] = {"all": list(cells)}
    for name, entry in cells.items():
        groups.setdefault(entry["held_out"], []).append(name)
    out = {}
    for group, names in groups.items():
        judged = [cells[n] for n in names if cells[n]["analysis"]["judged"]]
        breaking = [c for c in judged if c["analysis"]["dpo_breaks"]]
        healthy = sum(c["analysis"]["healthy"]["runs"] for c in judged)
        quiet = sum(c["analysis"]["healthy"]["quiet"] for c in judged)
        cost = [d for c in judged for d in c["analysis"]["healthy"]["false_alarm_cost"]]
        out[group] = {
            "cells_judged": len(judged),
            "breaking_cells": len(breaking),
            "recovery_met": sum(c["analysis"]["recovery"]["met"] for c in breaking),
            "healthy_runs": healthy,
            "quiet_on_healthy": quiet,
            "quiet_share": quiet / healthy if healthy else None,
            "quiet_met": (quiet / healthy >= QUIET_TARGET) if healthy else None,
            "false_alarm_cost": {"runs": cost, **(_t(cost) if len(cost) > 1 else {})},
        }
    return out


def readings(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per group and Diffusion-DPO class (healthy, or fell: any other :func:`dpo_class`), the range over runs of each
    Diffusion-DPO run's largest probe reading: ``winner_rise_z`` (what the alarm reads) and ``delta_winner`` (the rise
    itself, in the denoising loss's units). Whether the rise's size separates the classes where ``z`` does not is a
    question for the next rule; these figures do not test a rule."""
    figures = ("winner_rise_z", "delta_winner")
    largest: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in runs:
        if r["setting"] != "dpo" or not r["probe"]:
            continue
        group = cell_of(r["cell"]).held_out
        label = "healthy" if dpo_class(r) == "healthy" else "fell"
        entry = largest.setdefault(group, {}).setdefault(label, {f: [] for f in figures})
        for f in figures:
            entry[f].append(max(p[f] for p in r["probe"]))
    return {
        group: {
            label: {
                "runs": len(entry[figures[0]]),
                **{
                    f"largest_{f}": {"min": min(v), "median": sorted(v)[len(v) // 2], "max": max(v)}
                    for f, v in entry.items()
                },
            }
            for label, entry in classes.items()
        }
        for group, classes in largest.items()
    }


def assemble(parts: Path, path: Path = OUTPUT) -> int:
    """The parts into the result file: every run, per cell the analysis, and the targets per group."""
    from stability_map import machine

    runs = [json.loads(p.read_text()) for p in sorted(parts.glob("*__seed*.json"))]
    by_cell: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for r in runs:
        r["cell"] = asdict(cell_of(r["cell"]))  # the fields of runs made before a field was added, at its default
        by_cell.setdefault(cell_of(r["cell"]).name, {}).setdefault(r["setting"], {})[r["seed"]] = r
    cells = {}
    for cell in (*CELLS, *ONLINE_CELLS):
        mine = by_cell.get(cell.name, {})
        cells[cell.name] = {**asdict(cell), "held_out": cell.held_out, "analysis": analyse_cell(mine)}
    bases = {p.stem.removeprefix("base__"): json.loads(p.read_text()) for p in sorted(parts.glob("base__*.json"))}
    planned_keys = [run_key(c, s, k) for c in (*CELLS, *ONLINE_CELLS) for k in seeds_of(c) for s in SETTINGS]
    done = {run_key(cell_of(r["cell"]), r["setting"], r["seed"]) for r in runs}
    planned, missing = len(planned_keys), [key for key in planned_keys if key not in done]
    sample = next((r for r in runs if r["setting"] == "safeguard" and "regime" not in r["cell"]), None)
    online_sample = next((r for r in runs if r["setting"] == "safeguard" and "regime" in r["cell"]), None)
    report = {
        "description": __doc__.split("\n\n")[0].replace("\n", " "),
        "command": "OMP_NUM_THREADS=1 nice -n 5 python benchmarks/studies/rewind_outcome.py run --worker i/2 "
        "(i = 0, 1), then python benchmarks/studies/rewind_outcome.py assemble",
        "machine": machine(),
        "load": "a 2-core CPU shared with other work throughout (each run records its load average)",
        "protocol": {
            "max_steps": MAX_STEPS,
            "batch_size": 2,
            "probe_steps": PROBE_STEPS,
            # the alarm these runs read: the config's CUSUM when they were made (the config's rule is now the
            # relative rise, probe_alarm_carry.py)
            "probe": "the config's probe_pairs, probe_noise_draws, probe_alarm_z (13) and probe_alarm_limit (1)",
            "dpo_eval_steps": list(DPO_EVAL_STEPS),
            "seeds": list(SEEDS),
            "eval_seeds_per_prompt": 4,
            "safeguard_from_step_0": {
                "safeguard_space": sample and sample["safeguard_space"],
                "safeguard_mu": sample and sample["safeguard_mu"],
            },
            "tolerance": TOLERANCE,
            "restore_z": RESTORE_Z,
            "online": {
                "cells": [c.name for c in ONLINE_CELLS],
                "seeds": list(ONLINE_SEEDS),
                "steps_and_eval_steps": "the regime's stored config: 60 steps evaluated at 20, 40, 60 (brightness "
                "regimes); 120 steps at 24, 48, 72, 96, 120 (colour regime)",
                "safeguard_from_step_0": {
                    "safeguard_space": online_sample and online_sample["safeguard_space"],
                    "safeguard_mu": online_sample and online_sample["safeguard_mu"],
                },
            },
        },
        "definitions": {
            "final_reward": "the mean colour reward on the held-out prompts of the weights the run ends with",
            "breaks": "the paired 95% t interval of Diffusion-DPO's final reward minus the safeguard-from-step-0's, "
            "over seeds, lies below 0",
            "recovery": f"(rewind - dpo) / (safeguard - dpo) on the means, met at {RECOVERY_TARGET} or more with no "
            f"seed where the rewind ends more than {TOLERANCE} below Diffusion-DPO",
            "healthy_run": f"no evaluation of Diffusion-DPO (offline {', '.join(map(str, DPO_EVAL_STEPS))}; online "
            f"the regime's evaluation steps) found its reward "
            f"more than {TOLERANCE} below the base's; target: the rewind twin raises no alarm in at least "
            f"{QUIET_TARGET:.0%} of them",
            "fall_start": f"the first Diffusion-DPO evaluation step from which every evaluation to the end found the "
            f"reward more than {TOLERANCE} below the base's",
            "delay_steps": "the rewind's first alarm step minus the fall's start (negative: earlier than the "
            "evaluations saw the fall; resolution: the evaluations' 10 steps offline, 20 or 24 online)",
            "restore_point": f"the restored step's own probe reading winner_rise_z <= {RESTORE_Z}, or step 0",
            "false_alarm_cost": "over the healthy Diffusion-DPO runs whose rewind twin raised an alarm: the rewind's "
            "final reward minus Diffusion-DPO's, per run (mean and 95% t interval over those runs)",
            "equals_dpo": "where the rewind's alarm never fired: the final weights' SHA-256 (online: the SHA-256 of "
            "every held-out measure at every evaluation step, to all digits), the train loss at every step and the "
            "final reward equal Diffusion-DPO's of the same seed",
            "intervals": "95% t intervals over seeds (paired by seed for differences)",
        },
        "held_out": {
            "model": "wide: the demo's architecture at 64 px with a UNet 1.5 times as wide "
            "(probe_z_runs.wide_recipe), the model probe_alarm_sequential.py held out; pretrained again here by "
            "its recipe",
            "dataset": "the demo's data at data seed 1: other held-out prompts, training prompts and pairs; no alarm "
            "study read it",
        },
        "bases": bases,
        "cells": cells,
        "targets": targets(cells),
        "dpo_probe_readings": readings(runs),
        "runs_planned": planned,
        "runs_done": len(runs),
        "not_run": missing,
        "not_measured": [
            "offline runs longer than 100 steps (online: 60 and 120)",
            "online: the held-out dataset and model, full tuning, and online runs of the pair-folder axes",
            *(["the runs not_run lists: the CPU's time did not allow them"] if missing else []),
        ],
        "runs": {run_key(cell_of(r["cell"]), r["setting"], r["seed"]): r for r in runs},
    }
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}: {len(runs)} of {planned} runs")
    return 0


# --------------------------------------------------------------------------------------------------------- table


def _ci(item: dict[str, Any], signed: bool = False) -> str:
    sign = "+" if signed else ""
    if item.get("ci95") is None:
        return f"{item['mean']:{sign}.3f}"
    low, high = item["ci95"]
    return f"{item['mean']:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def _alarms(entry: dict[str, Any]) -> str:
    parts = []
    for seed, rec in entry["per_seed"].items():
        if not rec["restored"]:
            parts.append(f"s{seed}: none")
            continue
        steps = "; ".join(
            f"{r['fired_at']}->{r['restored']}{'' if r['restore_point'] else ' (not a restore point)'}"
            for r in rec["restored"]
        )
        stop = f", stopped at {rec['stopped_at']}" if rec["stopped_at"] is not None else ""
        parts.append(f"s{seed}: {steps}{stop}")
    return ", ".join(parts)


def _delays(entry: dict[str, Any]) -> str:
    values = [rec["delay_steps"] for rec in entry["per_seed"].values() if rec["delay_steps"] is not None]
    return ", ".join(f"{v:+d}" for v in values) if values else "n/a"


def _identity(entry: dict[str, Any]) -> str:
    quiet = [rec["equals_dpo"] for rec in entry["per_seed"].values() if "equals_dpo" in rec]
    if not quiet:
        return "no quiet run"
    equal = sum(all(q.values()) for q in quiet)
    return f"{equal} of {len(quiet)}"


def _verdict(entry: dict[str, Any]) -> str:
    """The targets' verdicts of a regime, with the paired differences they read (Diffusion-DPO minus the safeguard
    from step 0, the rewind minus Diffusion-DPO)."""
    a = entry["analysis"]
    healthy = a["healthy"]
    quiet = f"quiet on {healthy['quiet']} of {healthy['runs']} healthy" if healthy["runs"] else "no healthy run"
    head = f"DPO - safeguard {_ci(a['dpo_minus_safeguard'], True)}, rewind - DPO {_ci(a['rewind_minus_dpo'], True)}"
    if not a["dpo_breaks"]:
        return f"{head}: does not break; {quiet}"
    r = a["recovery"]
    worse = r["seeds_below_dpo_beyond_noise"]
    text = f"{head}: breaks; recovers {r['recovered_fraction']:.0%} of the gap"
    if r["met"]:
        return f"{text} (met); {quiet}"
    misses = []
    if not r["fraction_met"]:
        misses.append(f"short of 75% by {RECOVERY_TARGET - r['recovered_fraction']:.0%}")
    if worse:
        misses.append(f"below Diffusion-DPO beyond noise in seed {', '.join(map(str, worse))}")
    return f"{text} (not met: {'; '.join(misses)}); {quiet}"


def _cost(cost: dict[str, Any]) -> str:
    """The false alarms' cost: the mean [95% t interval] over the runs, or the one run's, or none."""
    runs = cost["runs"]
    if not runs:
        return "no false alarm"
    if len(runs) == 1:
        return f"{runs[0]:+.3f} (1 run)"
    return f"{_ci(cost, True)} ({len(runs)} runs)"


def _cell_label(entry: dict[str, Any]) -> str:
    if "regime" in entry:
        return f"{entry['regime']}, lr {entry['lr']:g}, LoRA"
    longer = f", {entry['steps']} steps" if entry["steps"] != MAX_STEPS else ""
    return (
        f"{entry['model']}, data {entry['data']}, lr {entry['lr']:g}, {entry['tuning']}, {entry['order']}, "
        f"{'eval split' if entry['probe'] == 'eval-split' else 'rows held back'}{longer}"
    )


def table(result: dict[str, Any]) -> str:
    """The Markdown block of docs/safeguard.md: per regime (the held-out dataset and model in their own tables) the
    base's and each setting's final held-out reward (mean [95% t interval] over seeds), the rewinds, the delays, the
    bit-for-bit check and the targets' verdicts; then the targets per group."""
    lines: list[str] = []
    groups = ("calibration", "held-out dataset", "held-out model", "online")
    for group in groups:
        mine = [e for e in result["cells"].values() if e["held_out"] == group and e["analysis"]["judged"]]
        if not mine:
            continue
        what = {
            "calibration": "the benchmark's base, data seed 0",
            "held-out dataset": "data seed 1",
            "held-out model": "the wide UNet at 64 px",
            "online": "the stability benchmark's online regimes; a rewind stops the run at its first alarm",
        }[group]
        lines += [
            f"**{group}** ({what}):",
            "",
            "| regime | seeds | base | Diffusion-DPO | rewind | safeguard from step 0 "
            "| alarm -> restored step, per seed | delay (steps) | quiet rewind = DPO bit for bit | targets |",
            "|---|---:|---:|---|---|---|---|---|---|---|",
        ]
        for e in mine:
            a = e["analysis"]
            f = a["final_reward"]
            lines.append(
                f"| {_cell_label(e)} | {len(a['seeds'])} | {a['base_reward']:.3f} | {_ci(f['dpo'])} | "
                f"{_ci(f['rewind'])} | {_ci(f['safeguard'])} | {_alarms(a)} | {_delays(a)} | {_identity(a)} "
                f"| {_verdict(e)} |"
            )
        lines.append("")
    lines += [
        "| runs | breaking regimes | recovery met | healthy Diffusion-DPO runs | rewind quiet | quiet target (95 %) "
        "| false alarms: rewind - DPO |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for group, t in result["targets"].items():
        share = "n/a" if t["quiet_share"] is None else f"{t['quiet_share']:.0%}"
        met = "n/a" if t["quiet_met"] is None else ("met" if t["quiet_met"] else "not met")
        lines.append(
            f"| {group} | {t['breaking_cells']} | {t['recovery_met']} of {t['breaking_cells']} "
            f"| {t['healthy_runs']} | {t['quiet_on_healthy']} ({share}) | {met} | {_cost(t['false_alarm_cost'])} |"
        )
    lines += [
        "",
        f"Final rewards are absolute (the base's in its column); {result['runs_done']} of "
        f"{result['runs_planned']} planned runs. Not measured: {'; '.join(result['not_measured'])}.",
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
    parser.add_argument("command", choices=("run", "assemble", "table"))
    parser.add_argument("--parts", default=PARTS, type=Path)
    parser.add_argument("--worker", default="0/1", help="run: this worker of how many (e.g. 0/2).")
    parser.add_argument("--cells", default=None, help="run: only these cells (names, comma-separated).")
    parser.add_argument("--online", action="store_true", help="run: the online cells (ONLINE_CELLS) instead.")
    parser.add_argument("--json", default=OUTPUT, type=Path)
    parser.add_argument("--page", action="store_true", help="table: write it into docs/safeguard.md.")
    args = parser.parse_args(argv)
    if args.command == "run":
        worker, workers = (int(v) for v in args.worker.split("/"))
        if args.online:
            return run_online(args.parts, worker, workers)
        return run(args.parts, worker, workers, args.cells.split(",") if args.cells else None)
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
