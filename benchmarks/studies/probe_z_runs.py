"""The probe study's runs again, logging the probe's statistic in its own units (``probe/winner_rise_z``): the runs the
one alarm rule (``probe_alarm_z``, ``probe_alarm_patience``) is calibrated on (``probe_alarm.py``'s ``analyse_z``),
and a second model the benchmark does not train, on which the rule is checked without recalibrating.

Not part of the test suite. A subset of the probe study (``stability_probe.py``), sized to a shared 2-core CPU:

* ``offline``: :mod:`stability_map`'s runs on the benchmark's base as ``stability_probe.py`` makes them (50 steps of 2
  pairs, the probe every 5 steps on 4 held-back pairs, ``probe_noise_draws`` at the config's default), Diffusion-DPO
  and the default safeguard (output space, ``mu=0.5``) at lr 2e-4, 1e-3 and 2e-5, seeds ``--seeds``;
* ``online``: ``stability_probe_online.py``'s online regimes with the probe logged (never acted on), online
  Diffusion-DPO and, where the regime has it, its safeguard (``sdpo-default``: output space, ``mu=0.9``) with the
  probe (``<setting>-probe``), seeds ``--seeds``;
* ``wide``: the second model (:func:`wide_recipe`: 64 px, a UNet 1.5 times as wide, pretrained here by the demo's
  recipe at that size), Diffusion-DPO at lr 1e-3 and 2e-5, seeds ``--seeds``.

Each part is a file of its own under ``--parts`` (resumable: a run already there is skipped);
``assemble`` gathers them into :data:`OUTPUT` with the command, the machine and the load::

    OMP_NUM_THREADS=1 nohup python benchmarks/studies/probe_z_runs.py offline --seeds 0,1 --name offline-a &
    OMP_NUM_THREADS=1 nohup python benchmarks/studies/probe_z_runs.py offline --seeds 2,3 --name offline-b &
    OMP_NUM_THREADS=1 nohup python benchmarks/studies/probe_z_runs.py online --seeds 0 --name online-a &
    OMP_NUM_THREADS=1 nohup python benchmarks/studies/probe_z_runs.py online --seeds 1 --name online-b &
    OMP_NUM_THREADS=1 nohup python benchmarks/studies/probe_z_runs.py wide --seeds 0-3 &
    python benchmarks/studies/probe_z_runs.py assemble

More seeds, one process at a time (``offline-c``: measured at steps 25 and 50; ``wide-more``)::

    OMP_NUM_THREADS=1 python benchmarks/studies/probe_z_runs.py offline --seeds 4-7 --name offline-c --eval-steps 25,50
    OMP_NUM_THREADS=1 python benchmarks/studies/probe_z_runs.py wide --seeds 2,3 --name wide-more
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

OUTPUT = ROOT / "benchmarks" / "results" / "probe" / "cpu-probe-z-runs.json"
PARTS = Path("/tmp/probe-z-parts")
OFFLINE_LRS = "2e-4,1e-3,2e-5"
OFFLINE_METHODS = "dpo,sdpo-output-mu0.5"
#: the online regimes and their settings with the probe: the learning rate of each regime as the online probe study
#: ran it (``cpu-stability-probe-online.json``)
ONLINE = {"online-hacking-fast": ("dpo", "sdpo-default"), "online-hacking": ("dpo", "sdpo-default")}
WIDE_LRS = "1e-3,2e-5"


def wide_recipe() -> Any:
    """The second model: the demo's architecture at 64 px with a UNet of twice the width, pretrained by the demo's
    recipe (fewer images per caption and pretraining steps than the 32-px base: what a shared 2-core CPU allowed)."""
    from trl_diffusion_sdpo.demo.pretrain import PretrainRecipe

    return PretrainRecipe(
        image_size=64, unet_channels=(48, 96), images_per_caption=8, vae_steps=150, unet_steps=300, unet_batch_size=32
    )


def _seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


def run_offline(parts: Path, seeds: list[int], base: str = "benchmark", lrs: str = OFFLINE_LRS,
                methods: str = OFFLINE_METHODS, name: str = "offline", eval_steps: str = "50") -> int:  # fmt: skip
    """:mod:`stability_map`'s runs with the probe logged (``stability_probe.install``) into ``parts/<name>.json``,
    the held-out measures at ``eval_steps`` only (the benchmark's runs: at the last step, which must equal the stored
    run's of the probe study, whose training these runs repeat bit for bit, for its curve to stand for theirs)."""
    import stability_map
    import stability_probe

    stability_probe.install()
    if base == "wide":
        stability_map.BASES["wide"] = wide_recipe()
    grid = stability_probe.GRID | {"--eval-steps": eval_steps}
    argv = [a for flag, value in grid.items() for a in (flag, value)]
    argv += ["--lrs", lrs, "--methods", methods, "--seeds", ",".join(map(str, seeds)), "--base", base]
    parts.mkdir(parents=True, exist_ok=True)
    return stability_map.main([*argv, "--json", str(parts / f"{name}.json")])


def run_online(parts: Path, seeds: list[int], name: str = "online") -> int:
    """The online regimes of :data:`ONLINE`, each setting with the probe logged, into ``parts/<name>.json``, seed by
    seed (every regime and setting of a seed, Diffusion-DPO first, then the next seed), so a part cut short still
    holds both regimes."""
    from stability_probe import PROBE_STEPS
    from stability_probe_online import _online_setup, _train

    from benchmarks.studies.online_comparison import _write

    path = parts / f"{name}.json"
    parts.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"regimes": {}}
    stored_online = json.loads((ROOT / "benchmarks/results/probe/cpu-stability-probe-online.json").read_text())
    order = [(seed, setting_index, regime) for seed in seeds for setting_index in (0, 1) for regime in ONLINE]
    for seed, setting_index, regime in order:
        module, stored, _, _ = _online_setup(regime)  # each regime's worker context, set up again for its runs
        lr = stored_online["regimes"][regime]["learning_rate"]
        entry = report["regimes"].setdefault(regime, {"runs": {}})
        entry.update(learning_rate=lr, stored_file=stored_online["regimes"][regime]["stored_file"],
                     base=stored["base"]["measures"]["colour_reward"])  # fmt: skip
        setting = ONLINE[regime][setting_index]
        key = f"{setting}-probe"
        module.METHODS[key] = {**module.METHODS[setting], "probe_steps": PROBE_STEPS}
        run_key = module.run_key(seed, lr, key)
        if run_key in entry["runs"]:
            continue
        started = time.perf_counter()
        run = _train(module, stored, seed, lr, key, "probe")
        run["load_average"] = [round(v, 2) for v in os.getloadavg()]
        entry["runs"][run_key] = run
        _write(path, report)
        print(f"{regime} {run_key}: {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def _more_commands(parts: Path) -> list[str]:
    """The commands of the parts added after the first ones (``offline-c``, ``wide-more``): per part, the seeds each of
    its learning rates ran (one process at a time, each invocation resuming the part)."""
    commands = []
    for name, command in (("offline-c", "offline --eval-steps 25,50"), ("wide-more", "wide")):
        path = parts / f"{name}.json"
        if not path.exists():
            continue
        runs = json.loads(path.read_text())["runs"].values()
        for lr in dict.fromkeys(f"{r['learning_rate']:g}" for r in runs):
            seeds = sorted({int(r["seed"]) for r in runs if f"{r['learning_rate']:g}" == lr})
            lrs = "" if command == "wide" else f" --lrs {lr}"
            commands.append(
                f"OMP_NUM_THREADS=1 python benchmarks/studies/probe_z_runs.py {command}{lrs} --name {name} "
                f"--seeds {','.join(map(str, seeds))}"
            )
    return list(dict.fromkeys(commands))


def assemble(parts: Path, path: Path = OUTPUT) -> int:
    """The parts into one result file, with how they were made."""
    from stability_map import machine

    from trl_diffusion_sdpo import DiffusionSDPOConfig

    report = {
        "description": __doc__.split("\n\n")[0].replace("\n", " "),
        "commands": [
            "OMP_NUM_THREADS=1 python benchmarks/studies/probe_z_runs.py offline --seeds 0,1 --name offline-a",
            "OMP_NUM_THREADS=1 python benchmarks/studies/probe_z_runs.py offline --seeds 2,3 --name offline-b",
            "OMP_NUM_THREADS=1 python benchmarks/studies/probe_z_runs.py online --seeds 0 --name online-a",
            "OMP_NUM_THREADS=1 python benchmarks/studies/probe_z_runs.py online --seeds 1 --name online-b",
            "the second model, one process per learning rate (1e-3, 2e-5), seeds 0 then 1: "
            "probe_z_runs.run_offline(PARTS, [seed], base='wide', lrs=lr, methods='dpo', name=f'wide-{lr}', "
            "eval_steps='25,50')",
            *_more_commands(parts),
            "python benchmarks/studies/probe_z_runs.py assemble",
        ],
        "machine": machine(),
        "load": "a 2-core CPU shared with other work throughout (each part's invocations record their load "
        "averages); the figures are the runs' readings and held-out measures, not times",
        "probe": {
            "probe_steps": 5,
            "probe_pairs": DiffusionSDPOConfig.__dataclass_fields__["probe_pairs"].default,
            "probe_noise_draws": DiffusionSDPOConfig.__dataclass_fields__["probe_noise_draws"].default,
        },
        "wide_model": wide_recipe().to_dict(),
        "parts": {p.stem: json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))},
    }
    path.write_text(json.dumps(report))
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("offline", "online", "wide", "assemble"))
    parser.add_argument("--seeds", default="0-3")
    parser.add_argument("--parts", default=PARTS, type=Path)
    parser.add_argument("--name", default=None, help="offline, wide: the part file's name (default: the command).")
    parser.add_argument("--lrs", default=OFFLINE_LRS, help="offline: the learning rates.")
    parser.add_argument("--eval-steps", default="50", help="offline: the held-out measures' steps.")
    args = parser.parse_args(argv)
    seeds = _seeds(args.seeds)
    if args.command == "offline":
        return run_offline(args.parts, seeds, lrs=args.lrs, name=args.name or "offline", eval_steps=args.eval_steps)
    if args.command == "wide":
        return run_offline(args.parts, seeds, base="wide", lrs=WIDE_LRS, methods="dpo", name=args.name or "wide",
                           eval_steps="25,50")  # fmt: skip
    if args.command == "online":
        return run_online(args.parts, seeds, name=args.name or "online")
    return assemble(args.parts)


if __name__ == "__main__":
    sys.exit(main())
