"""Stability of each guard against collapse on the toy demo: does it keep the held-out measures where
Diffusion-DPO's fall, and what does it cost where Diffusion-DPO is healthy?

Not part of the test suite. The runs are :mod:`stability_map`'s (the demo's shipped base, its 123 pairs, its held-out
prompts, batches of 2 pairs; resumable, one run appended at a time), with the guards added as methods beside
Diffusion-DPO and the package's default safeguard (output space, ``mu=0.5``):

- ``guard-max-margin``: Diffusion-DPO with ``max_margin`` (``--max-margin``, default 5);
- ``guard-sft``: Diffusion-DPO with ``sft_weight`` (``--sft-weight``, default 1);
- ``guard-auto-beta``: Diffusion-DPO with ``auto_beta`` (target 0.2);
- ``guard-auto-mu``: the output-space safeguard with ``safeguard_mu="auto"``;
- ``guard-update-auto-mu``: the update-space safeguard with ``safeguard_mu="auto"``;
- ``dormant-safeguard``: Diffusion-DPO with ``on_pathology="safeguard"``: the output-space safeguard (``mu=0.5``)
  switched on, from the next step, when the pathology alarm fires; each run records the step of the first alarm and
  of the switch (``alarm``).

``ema_decay`` is not among them: the EMA changes no training step and the runs are judged on the trained weights.

Every evaluation step measures, on the held-out prompts' samples (the same noise for every model), the colour reward
(``reward_change``, as :mod:`stability_map`) and measures the training never sees (``online_measures.py``): the shape
IoU, the sample diversity, and the denoising error on clean drawings of the held-out captions; step ``0`` is the
base. For seed 0 the first sample of every held-out prompt is kept (``samples``, a base64 PNG strip) for the figure.

The study is a list of regimes (:data:`REGIMES`), each a :mod:`stability_map` grid in its own part file under
``--parts`` (so the grids may differ in length); they run in the order listed, a regime may appear twice with more
seeds or cells. ``run`` trains what is missing (``--reuse FILE`` first writes the regimes of an earlier results file
into the parts it lacks, so that only the new runs train, paired with the stored ones at the same seeds: the runs
are deterministic on one machine); ``assemble`` writes the one results file: every regime's runs, per cell, method
and evaluation step the 95% paired t intervals (:func:`trl_diffusion_sdpo.demo.stats.paired_difference`) of each
measure against the base, against Diffusion-DPO and (``dormant-safeguard``) against the best fixed setting, and the
two-part goal per setting (:func:`goal`, :func:`goal_all_measures`).

    OMP_NUM_THREADS=1 nice -n 5 nohup python benchmarks/studies/stability_guards.py run \
        --reuse benchmarks/results/stability/cpu-stability-guards-demo.json &
    python benchmarks/studies/stability_guards.py assemble \
        --json benchmarks/results/stability/cpu-stability-guards-demo.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import stability_map  # noqa: E402
import torch  # noqa: E402
from online_measures import diversity, drawings, held_out_denoising_error, shape_scores, shape_templates  # noqa: E402
from PIL import Image  # noqa: E402

from trl_diffusion_sdpo.demo.methods import Method  # noqa: E402
from trl_diffusion_sdpo.demo.stats import paired_difference, summarise  # noqa: E402

GUARD_DEFAULTS = {"max_margin": 5.0, "sft_weight": 1.0}
DORMANT = "dormant-safeguard"  # Diffusion-DPO until the alarm fires, then the safeguard (on_pathology="safeguard")
REWIND = "rewind"  # Diffusion-DPO with the held-out probe, rewound when its alarm fires (on_pathology="rewind")
ACTING = (DORMANT, REWIND)  # the settings that act on an alarm, judged against the best fixed one
DEFAULT_METHOD = "sdpo-output-mu0.5"  # the package's default safeguard when the study ran
MAIN_METHODS = f"dpo,{DEFAULT_METHOD},guard-auto-mu"
DRAWINGS_PER_PROMPT, DRAWING_SEED = 4, 777
#: (regime, stability_map arguments), in this order: the paired grid (10 seeds, 50 steps, Diffusion-DPO, the default
#: safeguard and auto mu: lr 2e-4, where Diffusion-DPO broke in the stability map, then the demo's 2e-5, where it is
#: healthy); the search (Diffusion-DPO alone, 2 seeds, 100 steps: learning rates up to 1e-3, betas down to 5); the
#: margin cap on the grid; the top of the search (1e-3) with every setting; long runs (1000 steps, 2 seeds, at 6.7e-5,
#: where Diffusion-DPO dipped then recovered by 200 steps in the stability map); the other guards at 2e-4, then at
#: 2e-5 (what they cost where Diffusion-DPO is healthy); the long runs to 10 seeds; the dormant safeguard in the
#: three offline cells, then in the long runs; the search's smallest beta (5, at 2e-5, 100 steps) with 10 seeds:
#: Diffusion-DPO and the dormant safeguard, then the default safeguard and the margin cap. Sized to a shared
#: two-core machine (benchmarks/research/stability.md says what was not run).
SEARCH = {"--lrs": "5e-4,1e-3", "--betas": "50,5", "--max-steps": "100", "--eval-steps": "25,50,100"}
GRID = {"--max-steps": "50", "--eval-steps": "25,50", "--betas": "", "--eval-seeds-per-prompt": "4"}
LONG = {"--max-steps": "1000", "--eval-steps": "250,500,1000", "--betas": "", "--eval-seeds-per-prompt": "4"}
SMALL_BETA = SEARCH | {"--lrs": "", "--betas": "5", "--eval-seeds-per-prompt": "4"}
TEN = ",".join(map(str, range(10)))
OTHER_GUARDS = "guard-sft,guard-auto-beta,guard-update-auto-mu"
REGIMES: tuple[tuple[str, dict[str, str]], ...] = (
    ("offline", GRID | {"--lrs": "2e-4", "--seeds": TEN, "--methods": MAIN_METHODS}),
    ("offline", GRID | {"--lrs": "2e-5", "--seeds": TEN, "--methods": MAIN_METHODS}),
    ("search", SEARCH | {"--seeds": "0,1", "--methods": "dpo"}),
    ("offline", GRID | {"--lrs": "2e-4,2e-5", "--seeds": TEN, "--methods": "guard-max-margin"}),
    ("offline", GRID | {"--lrs": "1e-3", "--seeds": TEN, "--methods": f"{MAIN_METHODS},guard-max-margin"}),
    ("long", LONG | {"--lrs": "6.7e-5", "--seeds": "0,1", "--methods": MAIN_METHODS}),
    ("offline", GRID | {"--lrs": "2e-4", "--seeds": TEN, "--methods": OTHER_GUARDS}),
    ("offline", GRID | {"--lrs": "2e-5", "--seeds": TEN, "--methods": OTHER_GUARDS}),
    ("long", LONG | {"--lrs": "6.7e-5", "--seeds": TEN, "--methods": MAIN_METHODS}),
    ("offline", GRID | {"--lrs": "2e-4,2e-5,1e-3", "--seeds": TEN, "--methods": DORMANT}),
    ("long", LONG | {"--lrs": "6.7e-5", "--seeds": TEN, "--methods": DORMANT}),
    ("small-beta", SMALL_BETA | {"--seeds": TEN, "--methods": f"dpo,{DORMANT}"}),
    ("small-beta", SMALL_BETA | {"--seeds": TEN, "--methods": f"{DEFAULT_METHOD},guard-max-margin"}),
)
MEASURES = ("reward", "shape_iou", "diversity", "denoising_error")  # held-out; denoising error: lower is better


def guard_methods(max_margin: float, sft_weight: float) -> tuple[Method, ...]:
    """Each guard as a demo method: one ``Method`` line per guard."""
    return (
        Method("guard-max-margin", f"DPO max_margin={max_margin:g}", False, config=(("max_margin", max_margin),)),
        Method("guard-sft", f"DPO sft_weight={sft_weight:g}", False, config=(("sft_weight", sft_weight),)),
        Method("guard-auto-beta", "DPO auto_beta", False, config=(("auto_beta", True),)),
        Method("guard-auto-mu", "SDPO output mu=auto", True, "auto"),
        Method("guard-update-auto-mu", "SDPO update mu=auto", True, "auto", "update"),
        Method(DORMANT, "DPO on_pathology=safeguard", False, config=(("on_pathology", "safeguard"),)),
    )


def alarm_steps(logs: list[dict[str, Any]]) -> dict[str, int | None]:
    """The step of the first training log with the pathology alarm on, and (``on_pathology="safeguard"``) of the
    first with the dormant safeguard on (``None``: never), from logs such as a trainer's ``state.log_history``."""
    out: dict[str, int | None] = {"fired_at": None, "switched_at": None}
    for entry in logs:
        for key, name in (("health/winner_pathology", "fired_at"), ("health/safeguard_on", "switched_at")):
            if entry.get(key) == 1.0 and out[name] is None:
                out[name] = int(entry["step"])
    return out


def _png(images: np.ndarray) -> str:
    """``[N, H, W, 3]`` floats in [0, 1] as one base64 PNG strip."""
    strip = np.concatenate(list((np.clip(images, 0, 1) * 255).round().astype(np.uint8)), axis=1)
    buffer = io.BytesIO()
    Image.fromarray(strip).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class HeldOutMeasures(stability_map.EvaluateAt):
    """:class:`stability_map.EvaluateAt` plus the held-out measures the training never sees, at step 0 (the base,
    computed once per process) and at every evaluation step."""

    bases: dict[int, dict[str, Any]] = {}  # per samples per prompt: the base's measures and samples
    templates: dict[str, np.ndarray] | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.measures: dict[str, dict[str, float]] = {}
        self.samples: dict[str, str] = {}
        self.keep_samples = self.recipe.seeds == (0,)
        self.pixels = drawings(self.held_out, DRAWINGS_PER_PROMPT, DRAWING_SEED)
        self.alarm: dict[str, int | None] = {"fired_at": None, "switched_at": None}

    def on_log(self, args, state, control, logs=None, **kwargs):
        """:func:`alarm_steps` as the logs come: the trainer annotates each log before the callbacks see it."""
        seen = alarm_steps([{**(logs or {}), "step": state.global_step}])
        self.alarm = {name: self.alarm[name] if self.alarm[name] is not None else step for name, step in seen.items()}

    def on_train_begin(self, args, state, control, **kwargs):
        key = self.recipe.eval_seeds_per_prompt
        if key not in HeldOutMeasures.bases:  # the tuned UNet starts as the base's copy
            self.steps.add(0)
            self.on_step_end(args, state, control)
            self.steps.discard(0)
            HeldOutMeasures.bases[key] = {"measures": self.measures.pop("0"), "samples": self.samples.pop("0", None)}
            self.rewards.pop(0)
        base = HeldOutMeasures.bases[key]
        self.measures["0"] = base["measures"]
        if self.keep_samples and base["samples"]:
            self.samples["0"] = base["samples"]

    def measure(self, step, pipeline, images) -> None:
        if HeldOutMeasures.templates is None:
            HeldOutMeasures.templates = shape_templates(images.shape[-2])
        captions = [c for c in self.held_out for _ in range(images.shape[1])]
        iou, _ = shape_scores(images.reshape(-1, *images.shape[2:]), captions, HeldOutMeasures.templates)
        with torch.no_grad():
            error = held_out_denoising_error(pipeline, self.pixels, self.held_out, DRAWINGS_PER_PROMPT)
        self.measures[str(step)] = {
            "reward": self.rewards[step],
            "shape_iou": float(iou.mean()),
            "diversity": float(diversity(images).mean()),
            "denoising_error": error,
        }
        if self.keep_samples:
            self.samples[str(step)] = _png(images[:, 0])

    def extras(self) -> dict[str, Any]:
        return {"measures": self.measures, "alarm": self.alarm, **({"samples": self.samples} if self.samples else {})}


def _install(max_margin: float, sft_weight: float) -> None:
    stability_map.EXTRA_METHODS = (*stability_map.EXTRA_METHODS, *guard_methods(max_margin, sft_weight))
    stability_map.HISTORY_KEYS = (*stability_map.HISTORY_KEYS, "beta", "safeguard/mu", "margin")
    stability_map.EVALUATOR = HeldOutMeasures


def reuse(results: Path, parts: Path) -> list[Path]:
    """Write each regime of the results file ``results`` (as ``assemble`` wrote it) into the part file ``parts``
    lacks, so that ``run`` trains only the runs it does not hold; return the parts written."""
    written = []
    for name, report in json.loads(results.read_text())["regimes"].items():
        part = parts / f"{name}.json"
        if not part.exists():
            part.write_text(json.dumps(report))
            written.append(part)
    return written


def run(
    parts: Path,
    max_margin: float,
    sft_weight: float,
    only: str | None,
    results: Path | None = None,
    base: str = "benchmark",
) -> int:
    _install(max_margin, sft_weight)
    parts.mkdir(parents=True, exist_ok=True)
    if results is not None:
        for part in reuse(results, parts):
            print(f"wrote {part} from {results}", flush=True)
    for name, grid in REGIMES:
        if only is not None and name != only:
            continue
        argv = [a for flag, value in grid.items() for a in (flag, value)]
        argv += ["--json", str(parts / f"{name}.json"), "--base", base]  # one base's parts go to their own --parts
        print(f"regime {name}: {' '.join(argv)}", flush=True)
        stability_map.main(argv)
    return 0


# ------------------------------------------------------------------------------------------------------ analysis


def _cell(run: dict[str, Any]) -> str:
    return f"lr{run['learning_rate']:g}-beta{run['beta']:g}"


def _change(run: dict[str, Any], measure: str, step: str) -> float:
    return run["measures"][step][measure] - run["measures"]["0"][measure]


def analyse(regimes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per regime, cell, method and evaluation step: each measure's change against the base (t interval over
    seeds; the base's samples share prompts and noise) and its paired difference against Diffusion-DPO (same seeds:
    same batches, timesteps and noise). Then the goal per cell and method at the last step (:func:`goal`)."""
    out: dict[str, Any] = {}
    for regime, report in regimes.items():
        runs = list(report["runs"].values())
        cells: dict[str, Any] = {}
        for cell in dict.fromkeys(_cell(r) for r in runs):
            in_cell = [r for r in runs if _cell(r) == cell]
            by_method = {
                m: {r["seed"]: r for r in in_cell if r["method"] == m} for m in {r["method"] for r in in_cell}
            }
            steps = sorted({s for r in in_cell for s in r["measures"] if s != "0"}, key=int)
            entry: dict[str, Any] = {"learning_rate": in_cell[0]["learning_rate"], "beta": in_cell[0]["beta"]}
            for method, seeded in sorted(by_method.items()):
                rows: dict[str, Any] = {}
                for step in steps:
                    row: dict[str, Any] = {}
                    for measure in MEASURES:
                        changes = {s: _change(r, measure, step) for s, r in seeded.items()}
                        item: dict[str, Any] = {"vs_base": summarise(list(changes.values()))}
                        dpo = by_method.get("dpo", {})
                        shared = sorted(set(changes) & set(dpo))
                        if method != "dpo" and len(shared) >= 2:
                            mine = [changes[s] for s in shared]
                            theirs = [_change(dpo[s], measure, step) for s in shared]
                            item["vs_dpo"] = _brief(paired_difference(mine, theirs))
                        row[measure] = item
                    rows[step] = row
                entry[method] = {"seeds": sorted(seeded), "steps": rows}
            for acting in (m for m in ACTING if m in by_method):
                _against_best_fixed(entry, by_method, steps, acting)
            cells[cell] = entry
        out[regime] = cells
    return out


def _against_best_fixed(
    entry: dict[str, Any], by_method: dict[str, dict[int, Any]], steps: list[str], acting: str = DORMANT
) -> None:
    """The paired differences of ``acting`` (a setting that acts on an alarm: :data:`ACTING`) from the best fixed
    setting of its cell (every setting but Diffusion-DPO and the acting ones; the best: the highest mean reward change
    against the base at the last step), as ``vs_best_fixed`` beside ``vs_dpo``, and the setting's key as
    ``best_fixed``."""
    last = steps[-1]
    fixed = [m for m in by_method if m != "dpo" and m not in ACTING and len(entry[m]["seeds"]) >= 2]
    if not fixed:
        return
    best = max(fixed, key=lambda m: entry[m]["steps"][last]["reward"]["vs_base"]["mean"])
    mine, theirs = by_method[acting], by_method[best]
    shared = sorted(set(mine) & set(theirs))
    if len(shared) < 2:
        return
    entry[acting]["best_fixed"] = best
    for step in steps:
        for measure in MEASURES:
            entry[acting]["steps"][step][measure]["vs_best_fixed"] = _brief(
                paired_difference(
                    [_change(mine[s], measure, step) for s in shared],
                    [_change(theirs[s], measure, step) for s in shared],
                )
            )


def _brief(paired: dict[str, Any]) -> dict[str, Any]:
    return {k: paired[k] for k in ("mean", "sd", "n", "ci95", "excludes_zero", "mde80")}


def goal(analysis: dict[str, Any], measure: str = "reward") -> dict[str, Any]:
    """The issue's two halves for every setting, at each cell's last evaluation step on ``measure``:

    - a cell *breaks* when Diffusion-DPO's change against the base has its 95% interval below 0 at the last step;
      there a setting *holds* when its interval against the base includes or exceeds 0 and overlaps the best
      guard's (the setting with the highest mean change);
    - a cell is *healthy* otherwise; there a setting *costs nothing* when its paired interval against
      Diffusion-DPO includes 0 (or lies above it).
    """
    out: dict[str, Any] = {}
    for regime, cells in analysis.items():
        for cell, entry in cells.items():
            methods = {m: v for m, v in entry.items() if isinstance(v, dict) and "steps" in v}
            if "dpo" not in methods or len(methods["dpo"]["seeds"]) < 2 or len(methods) < 2:
                continue  # the search's cells: Diffusion-DPO alone
            last = max(methods["dpo"]["steps"], key=int)
            at = {m: v["steps"][last][measure] for m, v in methods.items() if last in v["steps"]}
            dpo_ci = at["dpo"]["vs_base"]["ci95"]
            breaks = dpo_ci is not None and dpo_ci[1] < 0
            best = max(at, key=lambda m: at[m]["vs_base"]["mean"])
            best_ci = at[best]["vs_base"]["ci95"]
            verdicts = {}
            for method, item in at.items():
                if method == "dpo":
                    continue
                ci = item["vs_base"]["ci95"]
                if breaks:
                    holds = ci is not None and ci[1] >= 0 and best_ci is not None and ci[1] >= best_ci[0]
                    verdicts[method] = {"half": "holds where Diffusion-DPO breaks", "met": bool(holds)}
                else:
                    vs = item.get("vs_dpo", {}).get("ci95")
                    verdicts[method] = {
                        "half": "costs nothing where Diffusion-DPO is healthy",
                        "met": vs is not None and vs[1] >= 0,
                    }
            out[f"{regime}/{cell}"] = {
                "step": int(last),
                "dpo_change": at["dpo"]["vs_base"],
                "diffusion_dpo_breaks": breaks,
                "best": best,
                "settings": verdicts,
            }
    return out


def assemble(parts: Path, path: Path) -> int:
    from stability_dormant import both_halves, goal_all_measures

    regimes = {p.stem: json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))}
    for report in regimes.values():  # the dormant safeguard's runs have their own file (stability_dormant)
        report["runs"] = {k: r for k, r in report["runs"].items() if r["method"] != DORMANT}
    analysis = analyse(regimes)
    report = {
        "description": __doc__.split("\n\n")[0].replace("\n", " "),
        "measures": {
            "reward": "the demo's colour reward on the held-out prompts (the training's reward, unseen prompts)",
            "shape_iou": "the shape IoU of the held-out samples (online_measures.shape_scores); never trained on",
            "diversity": "mean pairwise RMS pixel distance between a prompt's samples; never trained on",
            "denoising_error": "the UNet's denoising MSE on clean drawings of the held-out captions; lower is better",
        },
        "regimes": regimes,
        "analysis": analysis,
        "goal": {measure: goal(analysis, measure) for measure in ("reward", "shape_iou")},
        "goal_all_measures": (verdicts := goal_all_measures(analysis)),
        "both_halves": both_halves(verdicts),
        "not_run": not_run(regimes),
    }
    path.write_text(json.dumps(report))
    print(f"wrote {path}")
    return 0


NOT_RUN = [
    "the online regime is its own study and file: online_hacking.py, "
    "benchmarks/results/online/cpu-online-hacking-demo.json",
    "ema_decay offline: the EMA changes no training step, and these runs are judged on the trained weights",
    "a small beta at a large learning rate: the search moves one of the two at a time",
]


def not_run(regimes: dict[str, dict[str, Any]]) -> list[str]:
    """:data:`NOT_RUN`, and the long runs' seeds where fewer than the grid's 10 finished."""
    runs = regimes.get("long", {}).get("runs", {}).values()
    seeds = {m: {r["seed"] for r in runs if r["method"] == m} for m in MAIN_METHODS.split(",")}
    short = {m: len(s) for m, s in seeds.items() if len(s) < 10}
    extra = [f"long runs: {', '.join(f'{LABELS[m]} {n}' for m, n in short.items())} of 10 seeds"] if short else []
    return [*NOT_RUN, *extra]


LABELS = {
    "dpo": "Diffusion-DPO",
    DEFAULT_METHOD: "output space, mu=0.5",
    "guard-auto-mu": "output space, mu=auto",
    "guard-max-margin": "Diffusion-DPO, max_margin=5",
    "guard-sft": "Diffusion-DPO, sft_weight=1",
    "guard-auto-beta": "Diffusion-DPO, auto_beta",
    "guard-update-auto-mu": "update space, mu=auto",
    DORMANT: "Diffusion-DPO, on_pathology=safeguard",
    REWIND: "Diffusion-DPO, on_pathology=rewind",
}


def _strip(png: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(png)))


def figure(path: Path, out: Path, cell: str, seed: int = 0, scale: int = 3) -> int:
    """Held-out samples along the run (one column per evaluation step, step 0 the base), Diffusion-DPO's row beside
    each guard's, for ``seed`` in ``cell`` (``regime/lr..-beta..``): the first sample of every held-out prompt, the
    same noise in every row. Pixels enlarged ``scale`` times without smoothing."""
    report = json.loads(path.read_text())
    regime, name = cell.split("/")
    every = report["regimes"][regime]["runs"].values()
    runs = [r for r in every if _cell(r) == name and r["seed"] == seed and "samples" in r]
    runs.sort(key=lambda r: list(LABELS).index(r["method"]) if r["method"] in LABELS else len(LABELS))
    # the base's samples (step 0) are kept by the first seed-0 run of each process: shared by every run of the regime
    base = next(r["samples"]["0"] for r in every if "0" in r.get("samples", {}))
    steps = ["0", *sorted({s for r in runs for s in r["samples"] if s != "0"}, key=int)]
    strips = [[_strip(r["samples"].get(s, base if s == "0" else None)) for s in steps] for r in runs]
    labels = []
    for run in runs:
        change = run["reward_change"][steps[-1]]
        labels.append((LABELS.get(run["method"], run["method"]), f"reward change {change:+.3f}"))
    return sample_grid(strips, steps, labels, out, scale, left=230)


def sample_grid(
    strips: list[list[Image.Image]], steps: list[str], labels: list[tuple[str, str]], out: Path, scale: int, left: int
) -> int:
    """One row of sample strips per run (one column per evaluation step, ``"0"`` the base) with its two label lines
    on the left, pixels enlarged ``scale`` times without smoothing, saved to ``out``."""
    from PIL import ImageDraw

    width, height = strips[0][0].size
    width, height, gap, top = width * scale, height * scale, 12, 30
    canvas = Image.new("RGB", (left + len(steps) * (width + gap), top + len(strips) * (height + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, step in enumerate(steps):
        draw.text((left + j * (width + gap), 8), "base" if step == "0" else f"step {step}", fill="black")
    for i, (row, (name, measure)) in enumerate(zip(strips, labels)):
        y = top + i * (height + gap)
        draw.text((8, y + height // 2 - 12), name, fill="black")
        draw.text((8, y + height // 2 + 2), measure, fill="black")
        for j, strip in enumerate(row):
            canvas.paste(strip.resize((width, height), Image.Resampling.NEAREST), (left + j * (width + gap), y))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    print(f"wrote {out}")
    return 0


def _ci(item: dict[str, Any] | None) -> str:
    if item is None or item.get("ci95") is None:
        return "n/a"
    low, high = item["ci95"]
    return f"{item['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"


TABLES_START, TABLES_END = "<!-- stability-tables:start -->", "<!-- stability-tables:end -->"


def tables(path: Path) -> str:
    """The Markdown tables benchmarks/research/stability.md quotes: per cell and setting at the last evaluation step,
    each held-out measure's change against the base and its paired difference from Diffusion-DPO (95% t intervals), and
    the goal's verdicts."""
    report = json.loads(path.read_text())
    lines = []
    for regime, cells in report["analysis"].items():
        for entry in cells.values():
            methods = {m: v for m, v in entry.items() if isinstance(v, dict) and "steps" in v}
            last = max(next(iter(methods.values()))["steps"], key=int)
            lines += [
                f"{regime}, lr {entry['learning_rate']:g}, beta {entry['beta']:g}, step {last}:",
                "",
                "| setting | seeds | reward vs base | reward vs Diffusion-DPO | shape IoU vs base "
                "| shape IoU vs Diffusion-DPO | denoising error vs base |",
                "|---|---:|---|---|---|---|---|",
            ]
            for method, value in methods.items():
                row = value["steps"][last]
                lines.append(
                    f"| {LABELS.get(method, method)} | {len(value['seeds'])} | {_ci(row['reward']['vs_base'])} | "
                    f"{_ci(row['reward'].get('vs_dpo'))} | {_ci(row['shape_iou']['vs_base'])} | "
                    f"{_ci(row['shape_iou'].get('vs_dpo'))} | {_ci(row['denoising_error']['vs_base'])} |"
                )
            lines.append("")
    for measure, cells in report["goal"].items():
        for cell, verdict in cells.items():
            met = ", ".join(
                f"{LABELS.get(m, m)}: {'meets' if v['met'] else 'misses'}" for m, v in verdict["settings"].items()
            )
            state = "breaks" if verdict["diffusion_dpo_breaks"] else "healthy"
            lines.append(f"- {measure}, {cell}: Diffusion-DPO {state} ({_ci(verdict['dpo_change'])}); {met}")
    return "\n".join(lines)


def write_block(page: Path, start: str, end: str, text: str) -> None:
    """Rewrite what ``page`` holds between the ``start`` and ``end`` marker lines with ``text``."""
    body = page.read_text()
    if start not in body or end not in body:
        raise SystemExit(f"{page} has no {start} ... {end} block")
    head, rest = body.split(start, 1)
    page.write_text(f"{head}{start}\n\n{text}\n\n{end}{rest.split(end, 1)[1]}")
    print(f"wrote the block {start} into {page}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("run", "assemble", "dormant", "figure", "tables", "dormant-tables"))
    parser.add_argument("--parts", default="/tmp/stability-guards-parts", type=Path)
    parser.add_argument(
        "--json",
        default=None,
        type=Path,
        help="Default: the --stored file; dormant: its result file (stability_dormant.DORMANT_OUTPUT).",
    )
    parser.add_argument("--regime", default=None, help="Run only this regime.")
    parser.add_argument("--base", choices=tuple(stability_map.BASES), default="benchmark", help="run: which base.")
    parser.add_argument(
        "--reuse", default=None, type=Path, help="run: first fill missing parts from this results file."
    )
    parser.add_argument(
        "--stored", default=Path("benchmarks/results/stability/cpu-stability-guards-demo.json"), type=Path
    )
    parser.add_argument("--rerun", default=None, type=Path, help="dormant: a part of stored runs trained again.")
    parser.add_argument(
        "--online",
        action="append",
        default=[],
        metavar="REGIME=FILE",
        help="dormant: an online study's file holding the regime's dormant runs (online-hacking, online-healthy).",
    )
    parser.add_argument("--cell", default="offline/lr0.0002-beta5000", help="figure: the cell (regime/lr..-beta..).")
    parser.add_argument("--page", default=None, type=Path, help="tables: rewrite this page's marked block.")
    parser.add_argument("--figure", default="docs/images/stability_guards_samples.png", type=Path)
    parser.add_argument("--max-margin", type=float, default=GUARD_DEFAULTS["max_margin"])
    parser.add_argument("--sft-weight", type=float, default=GUARD_DEFAULTS["sft_weight"])
    args = parser.parse_args(argv)
    from stability_dormant import DORMANT_END, DORMANT_OUTPUT, DORMANT_START, assemble_dormant, dormant_tables

    if args.command == "dormant":
        online = dict(item.split("=", 1) for item in args.online)
        output = args.json or DORMANT_OUTPUT
        return assemble_dormant(args.parts, args.stored, output, args.rerun, {k: Path(v) for k, v in online.items()})
    if args.command == "dormant-tables":
        args.json = args.json or DORMANT_OUTPUT
    args.json = args.json or args.stored
    if args.command == "run":
        return run(args.parts, args.max_margin, args.sft_weight, args.regime, args.reuse, args.base)
    if args.command in ("tables", "dormant-tables"):
        dormant = args.command == "dormant-tables"
        text = dormant_tables(args.json) if dormant else tables(args.json)
        if args.page is None:
            print(text)
            return 0
        write_block(args.page, *((DORMANT_START, DORMANT_END) if dormant else (TABLES_START, TABLES_END)), text)
        return 0
    if args.command == "figure":
        return figure(args.json, args.figure, args.cell)
    return assemble(args.parts, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
