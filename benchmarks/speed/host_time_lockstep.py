"""The exact safeguard's host time per whole optimizer step, lock-step against Diffusion-DPO, on a UNet with SD1.5's
block structure at small widths; one checkout at ``--before`` and one at ``--after``, each in its own process.

Not part of the test suite. CPU, one thread, bf16 mixed precision (CPU autocast, as a GPU run trains), cached latents,
4 pairs at 64 px (8x8 latents). The UNet has SD1.5's down and up block types, two layers per block and its
cross-attention, at widths (32, 64, 64, 64) with an 8-wide head and 32-wide prompts, so the Python and dispatch work
per layer (a GPU step at SD1.5's size is bound by it) weighs as it does there. Per tuning (full, LoRA r4) one trainer
run alternates, step by step, Diffusion-DPO, the one pass (``safeguard_space="parameter"``) and the update space
(:func:`benchmarks.speed.safeguard_op_counts.run`: only the running safeguard's taps on the model); the measure is
each safeguard's main-thread CPU time (``time.thread_time``) per whole step over the Diffusion-DPO step of its own
round, the median of ``--rounds`` rounds, with the profiled step's operation counts, host syncs and casts beside it.

    python benchmarks/speed/host_time_lockstep.py --before 5d519bc --after HEAD --rounds 15 \\
        --json benchmarks/results/one-pass/cpu-host-time-lockstep-sd15-structure.json

Each checkout is a git worktree made for the run and removed after it; the two processes run side by side, or,
with ``--turns N``, take turns: one runs N rounds while the other waits, so each block of rounds has the CPU's
cores without the other checkout on them (the load of other work still varies; only ratios paired within a process
mean anything). ``--model sd15`` puts SD1.5's real UNet config (random weights, 860 M parameters;
``benchmarks.harness.SD15_UNET``) in place of the narrow one, with 768-wide prompts, and ``--model sd15-narrow``
that config with its widths narrowed (:data:`SD15_NARROW`: its layers and trained tensors, tiny FLOPs; ``--fp32`` for
float32); ``--safeguards parameter`` times the one pass alone beside Diffusion-DPO; ``--pairs`` and
``--resolution`` set the batch:

    python benchmarks/speed/host_time_lockstep.py --model sd15 --tunings lora_r4 --safeguards parameter \
        --before 2ceb6e2 --after HEAD --pairs 1 --resolution 64 --rounds 63 --repeat 7 --turns 7 \
        --json benchmarks/results/one-pass/cpu-sd15-lora-one-pass-lockstep.json

A repeat is ``--repeat`` consecutive rounds: its reading is the median of its paired ratios; the summary gives the
median of the readings and their spread (minimum, maximum, quartiles), per checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SD15_STRUCTURE = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 64, 64),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
RESOLUTION = 64  # 8x8 latents: SD1.5's three downsamplings leave 1x1
# The limits on the ratio to Diffusion-DPO's host time per step, per tuning and safeguard
LIMITS = {"full": {"parameter": 1.05, "update": 1.10}, "lora_r4": {"parameter": 1.03, "update": 1.05}}


# SD1.5's real config narrowed: every other key (blocks, layers, heads, eps, the mid block's scale) is SD1.5's, so
# its tapped layers and trained tensors are SD1.5's (684 in full tuning, 686 at full width) while the FLOPs are tiny;
# the element count is not (2.4M against 860M): host work that grows with elements, not layers, does not show here
SD15_NARROW = {
    "block_out_channels": (32, 32, 64, 64),
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "sample_size": 8,
}


def unet_config(model: str) -> dict:
    """The UNet's config: :data:`SD15_STRUCTURE` (``"sd15-structure"``), SD1.5's real one (``"sd15"``) or SD1.5's
    real one narrowed by :data:`SD15_NARROW` (``"sd15-narrow"``)."""
    if model in ("sd15", "sd15-narrow"):
        sys.path.insert(0, str(ROOT))
        from benchmarks.harness import SD15_UNET

        return {**SD15_UNET, **(SD15_NARROW if model == "sd15-narrow" else {})}
    return dict(SD15_STRUCTURE)


def result_head(script: str, doc: str, paragraphs: int, argv: list[str] | None) -> dict:
    """A result file's head for a measure on this model: what it measures (the first ``paragraphs`` of ``doc``), the
    command that wrote it, the machine, the load, and the model's settings (the caller adds its own)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import harness

    return {
        "what": " ".join(doc.split("\n\n")[:paragraphs]).replace("\n", " "),
        "command": "python " + " ".join([str(Path(script).relative_to(ROOT)), *(argv or sys.argv[1:])]),
        "machine": harness.machine_description("cpu", 1),
        "load": f"load average {os.getloadavg()[0]:.1f} at the end (2 CPU cores shared with other work)",
        "settings": {
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in SD15_STRUCTURE.items()},
            "resolution": RESOLUTION,
            "precision": "bf16 mixed precision (CPU autocast)",
            "threads": 1,
        },
    }


def build_pipeline(tokenizer_dir: str, model: str = "sd15-structure"):
    """The tiny SD pipeline (tokenizer, text encoder, VAE, scheduler) around a UNet of :func:`unet_config`'s
    ``model`` (random weights), its text encoder as wide as the UNet's cross-attention."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    unet = unet_config(model)
    tiny = build_tiny_sd_pipeline(seed=0, tokenizer_dir=tokenizer_dir, cross_attention_dim=unet["cross_attention_dim"])
    torch.manual_seed(0)
    return StableDiffusionPipeline(**{**tiny.components, "unet": UNet2DConditionModel(**unet)})


class Turns:
    """Processes taking turns through a folder: the file ``turn`` names the label whose turn it is; a process that
    reaches a block's start hands the turn to the next label (if it held it) and waits for its own, or for every other
    process to have finished (a file ``finished-<label>``), or ``patience`` seconds."""

    def __init__(self, folder: str, label: str, labels: list[str], every: int, patience: float = 1800.0) -> None:
        self.folder, self.label, self.labels, self.every, self.patience = Path(folder), label, labels, every, patience
        self.held = False

    def _hand_on(self) -> None:
        if self.held:
            following = self.labels[(self.labels.index(self.label) + 1) % len(self.labels)]
            (self.folder / "turn.tmp").write_text(following)
            (self.folder / "turn.tmp").replace(self.folder / "turn")
            self.held = False

    def __call__(self, round_: int) -> None:
        """Before round ``round_``: a block starts at the warmup round (0) and every ``every`` rounds after it."""
        if round_ != 0 and (round_ - 1) % self.every:
            return
        self._hand_on()
        others = [label for label in self.labels if label != self.label]
        start = time.monotonic()
        while time.monotonic() - start < self.patience:
            turn = self.folder / "turn"
            if turn.exists() and turn.read_text() == self.label:
                break
            if all((self.folder / f"finished-{label}").exists() for label in others):
                break
            time.sleep(0.05)
        self.held = True

    def finish(self) -> None:
        (self.folder / f"finished-{self.label}").write_text("")
        self._hand_on()


def measure(
    checkout: str,
    rounds: int,
    tunings: list[str],
    model: str = "sd15-structure",
    safeguards: tuple[str, ...] = ("parameter", "update"),
    pairs: int = 4,
    resolution: int = RESOLUTION,
    turns: Turns | None = None,
    bf16: bool = True,
) -> dict:
    """This process's run of ``checkout``'s package: per tuning, the rows of
    :func:`~benchmarks.speed.safeguard_op_counts.run`."""
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.speed import safeguard_op_counts  # this checkout's benchmark code

    # the package and the tests' helpers of ``checkout``, imported from here on (nothing of them is imported yet)
    assert "trl_diffusion_sdpo" not in sys.modules
    sys.path[:0] = [checkout, str(Path(checkout) / "tests")]
    torch.set_num_threads(1)
    config = {"resolution": resolution, "cache_latents": True}
    try:
        with tempfile.TemporaryDirectory(prefix="lockstep-") as workdir:
            rows = {
                tuning: safeguard_op_counts.run(
                    tuning == "lora_r4",
                    {},
                    rounds,
                    workdir,
                    bf16=bf16,
                    build_pipeline=lambda tokenizer_dir: build_pipeline(tokenizer_dir, model),
                    config=config,
                    safeguards=safeguards,
                    pairs=pairs,
                    between_rounds=turns,
                )
                for tuning in tunings
            }
    finally:
        if turns is not None:
            turns.finish()
    import trl_diffusion_sdpo

    for result in rows.values():
        result["package"] = str(Path(trl_diffusion_sdpo.__file__).parent)  # the checkout's, not the installed one
    return rows


def _in_worktrees(commits: dict[str, str], rounds: int, tunings: list[str], options: list[str]) -> dict[str, dict]:
    """:func:`measure` of each of ``commits`` (label -> commit), each in a fresh process on a git worktree of it, the
    processes side by side or taking turns (``--turns`` among ``options``; each ratio is paired within its own
    process)."""
    with tempfile.TemporaryDirectory(prefix="lockstep-checkout-") as folder:
        trees, processes = {}, {}
        (Path(folder) / "turn").write_text(next(iter(commits)))
        try:
            for label, commit in commits.items():
                tree = trees[label] = str(Path(folder) / label)
                subprocess.run(["git", "worktree", "add", "--detach", "-q", tree, commit], cwd=ROOT, check=True)
                command = [sys.executable, __file__, "--measure", tree, "--rounds", str(rounds), *options]
                command += ["--turn-folder", folder, "--label", label, "--labels", ",".join(commits), "--tunings"]
                out = str(Path(folder) / f"{label}.json")
                processes[label] = subprocess.Popen([*command, ",".join(tunings), "--json", out], env={**os.environ})
            for label, process in processes.items():
                if process.wait():
                    raise RuntimeError(f"the {label} checkout's run failed")
            return {label: json.loads((Path(folder) / f"{label}.json").read_text()) for label in commits}
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, check=True)


def repeats(mine: list[float], dpo: list[float], size: int) -> dict:
    """The readings of repeats of ``size`` consecutive rounds (each the median of its paired ratios ``mine / dpo``),
    their median and spread."""
    ratios = [a / b for a, b in zip(mine, dpo)]
    readings = [statistics.median(ratios[i : i + size]) for i in range(0, len(ratios) - size + 1, size)]
    quartiles = statistics.quantiles(readings, n=4) if len(readings) > 1 else readings * 3
    return {
        "repeat_rounds": size,
        "readings": [round(r, 4) for r in readings],
        "median": round(statistics.median(readings), 4),
        "min": round(min(readings), 4),
        "max": round(max(readings), 4),
        "quartiles": [round(q, 4) for q in quartiles],
        "median_of_all_rounds": round(statistics.median(ratios), 4),
    }


def summary(rows: dict, repeat: int = 0) -> dict:
    """Per tuning and safeguard: the paired host-time ratio to Diffusion-DPO, the operation ratio, and the limit;
    with ``repeat``, the readings of repeats of that many rounds (:func:`repeats`)."""
    table = {}
    for tuning, result in rows.items():
        for name in ("parameter", "update"):
            if name not in result["rows"]:
                continue
            row = result["rows"][name]
            ratio = row["median_paired_thread_cpu_ratio_to_dpo"]
            table[f"{tuning}/{name}"] = {
                "host_time_ratio_to_dpo": round(ratio, 4),
                "operations_ratio_to_dpo": round(row["operations_ratio_to_dpo"], 4),
                "limit": LIMITS[tuning][name],
                "within_limit": ratio <= LIMITS[tuning][name],
            }
            if repeat:
                dpo = result["rows"]["dpo"]["step_thread_cpu_s"]
                table[f"{tuning}/{name}"]["repeats"] = repeats(row["step_thread_cpu_s"], dpo, repeat)
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=None, help="the commit measured as 'before' (none: no before rows)")
    parser.add_argument("--after", default="HEAD", help="the commit measured as 'after'")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per tuning")
    parser.add_argument("--tunings", default="full,lora_r4", help="of full, lora_r4")
    models = ["sd15-structure", "sd15", "sd15-narrow"]
    parser.add_argument("--model", default="sd15-structure", choices=models, help="the UNet")
    parser.add_argument("--safeguards", default="parameter,update", help="the rows beside Diffusion-DPO's")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step")
    parser.add_argument("--resolution", type=int, default=RESOLUTION, help="pixels (the VAE's latents are 1/8)")
    parser.add_argument("--fp32", action="store_true", help="float32 instead of bf16 mixed precision")
    parser.add_argument("--repeat", type=int, default=0, help="rounds per repeat in the summary (0: none)")
    parser.add_argument("--turns", type=int, default=0, help="the checkouts take turns, this many rounds each")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one checkout, in this process
    parser.add_argument("--turn-folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--label", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--labels", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    opts = parser.parse_args(argv)
    tunings = opts.tunings.split(",")
    safeguards = tuple(opts.safeguards.split(","))
    if opts.measure:
        turns = None
        if opts.turns and opts.turn_folder:
            turns = Turns(opts.turn_folder, opts.label, opts.labels.split(","), opts.turns)
        model, bf16 = opts.model, not opts.fp32
        rows = measure(opts.measure, opts.rounds, tunings, model, safeguards, opts.pairs, opts.resolution, turns, bf16)
        if opts.json:
            Path(opts.json).write_text(json.dumps(rows) + "\n")
        return rows

    def commit(ref: str) -> str:
        return subprocess.run(["git", "rev-parse", ref], cwd=ROOT, check=True, capture_output=True, text=True).stdout

    refs = {"after": opts.after, **({"before": opts.before} if opts.before else {})}
    commits = {label: commit(ref).strip() for label, ref in refs.items()}
    options = ["--model", opts.model, "--safeguards", opts.safeguards, "--pairs", str(opts.pairs)]
    options += ["--resolution", str(opts.resolution), "--turns", str(opts.turns), *(["--fp32"] if opts.fp32 else [])]
    load_start = os.getloadavg()
    runs = {}
    for label, rows in _in_worktrees(commits, opts.rounds, tunings, options).items():
        runs[label] = {"commit": commits[label], "summary": summary(rows, opts.repeat), "rows": rows}
        for key, line in runs[label]["summary"].items():
            print(f"{label:6s} {key:18s} {line}")
    result = result_head(__file__, __doc__, 2, argv)
    result["load"] = f"load average {load_start[0]:.1f} at the start; " + result["load"]
    result["settings"].update(
        unet={k: list(v) if isinstance(v, tuple) else v for k, v in unet_config(opts.model).items()},
        model=opts.model,
        precision="float32" if opts.fp32 else "bf16 mixed precision (CPU autocast)",
        resolution=opts.resolution,
        pairs=opts.pairs,
        safeguards=list(safeguards),
        latents="cached (cache_latents=True)",
        rounds=opts.rounds,
        repeat=opts.repeat,
        turns=opts.turns,
        limits=LIMITS,
    )
    result["runs"] = runs
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
