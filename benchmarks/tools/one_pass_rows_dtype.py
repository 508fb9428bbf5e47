"""The one pass's rows in their products' dtype and given back as the combination reads them, against the store of a
commit before that change (``--before``), on the tiny SD run: the trained weights compared bit for bit, and the
live tensors each leaves at a step's end beyond Diffusion-DPO's.

    python benchmarks/tools/one_pass_rows_dtype.py --before 5d519bc --write benchmarks/results/one-pass/x.json

Each case trains the tiny Stable Diffusion pipeline (``trl_diffusion_sdpo.testing``, seed 0) for 3 optimizer steps of
2 pairs, full tuning or LoRA, under bf16 autocast or in float32, with the exact safeguard's one pass run by today's
store and by ``--before``'s (its ``one_pass.py`` read with ``git show`` and imported beside today's, on today's
per-layer taps), in one process. The weights' comparison: whether every trainable tensor is bitwise equal, the
largest absolute difference, that relative to the largest weight, and the difference of the weights' float64 sums.
The census (:func:`~trl_diffusion_sdpo.engines.memory.measure.live_tensor_bytes`): the storages of every live tensor
at the last step's end (after the optimizer's step and ``zero_grad``) less those at the start of training, less
Diffusion-DPO's run's, as a share of the trainable weights' bytes; the update space's search workspace (kept across
steps by its rule) counted apart.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks.tools.weights_identity import colour_pairs, tiny_run_config, tiny_run_lora  # noqa: E402

SPACES = ("parameter", "update")
STEPS = 3


def store_before(commit: str) -> type:
    """``commit``'s one pass store class, imported beside today's (today's per-layer taps under it)."""
    source = subprocess.run(
        ["git", "show", f"{commit}:trl_diffusion_sdpo/safeguards/gradients/one_pass.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    name = "trl_diffusion_sdpo.safeguards.gradients.one_pass_before"
    file = Path(tempfile.mkdtemp(prefix="one-pass-before-")) / "one_pass_before.py"
    file.write_bytes(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.OnePassBranchGradients


def train(space: str, lora: bool, bf16: bool, store_class: type | None) -> dict:
    """One run: its trainable weights, live bytes at the last step's end beyond the start, and the update space's
    workspace among them."""
    from transformers import TrainerCallback

    from trl_diffusion_sdpo import DiffusionSDPOTrainer
    from trl_diffusion_sdpo.engines.memory.measure import live_tensor_bytes
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    holder: list = []

    class Census(TrainerCallback):
        start = end = workspace = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = live_tensor_bytes()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < state.max_steps:
                return
            self.end = live_tensor_bytes() - self.start
            rule = getattr(holder[0].safeguard, "rule", None)
            if rule is not None and hasattr(rule, "workspace"):
                rule.workspace = type(rule.workspace)()
                self.workspace = self.end - (live_tensor_bytes() - self.start)

    census = Census()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(Path(tmp) / "tok"))
        args = tiny_run_config(
            tmp, max_steps=STEPS, logging_steps=1000, bf16=bf16, safeguard_space=space, safeguard_mu=0.5
        )
        peft = tiny_run_lora() if lora else None
        trainer = DiffusionSDPOTrainer(
            pipe, args=args, train_dataset=colour_pairs(), peft_config=peft, callbacks=[census]
        )
        holder.append(trainer)
        collectives = getattr(getattr(trainer.safeguard, "backward_stage", None), "collectives", None)
        if store_class is not None and collectives is not None:
            collectives.one_pass_store_class = store_class
        trainer.train()
        stage = getattr(trainer.safeguard, "backward_stage", None)
        store = getattr(stage, "one_pass", None)
        weights = {
            name: p.detach().clone() for name, p in trainer.family.denoiser.named_parameters() if p.requires_grad
        }
        rows = sorted({str(piece.dtype) for piece in store.pieces}) if store is not None else []
        del trainer, holder[:]
    return {"weights": weights, "held": census.end, "workspace": census.workspace, "rows": rows}


def compare(before: dict, after: dict) -> dict:
    scale = max(float(t.abs().max()) for t in before.values())
    largest = max(float((after[n].double() - before[n].double()).abs().max()) for n in before)
    return {
        "identical": all(torch.equal(before[n], after[n]) for n in before),
        "max_abs_difference": largest,
        "max_difference_over_largest_weight": largest / scale,
        "sum_difference": float(sum(after[n].double().sum() - before[n].double().sum() for n in before)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit whose one pass store is compared")
    parser.add_argument("--write", required=True, help="the result file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    old = store_before(args.before)
    load = os.getloadavg()
    weights, census = {}, {}
    for bf16 in (True, False):
        precision = "bf16" if bf16 else "fp32"
        dpo = train("none", lora=False, bf16=bf16, store_class=None)
        trainable = sum(t.numel() * t.element_size() for t in dpo["weights"].values())
        for space in SPACES:
            for lora in (False, True) if bf16 else (False,):
                case = f"{space}-{'lora' if lora else 'full'}-{precision}"
                runs = {"before": train(space, lora, bf16, old), "after": train(space, lora, bf16, None)}
                weights[case] = compare(runs["before"]["weights"], runs["after"]["weights"])
                weights[case]["rows_dtypes"] = {label: run["rows"] for label, run in runs.items()}
                if not lora:
                    census[f"{space}-full-{precision}"] = {
                        "trainable_bytes": trainable,
                        **{
                            label: {
                                "beyond_dpo_share": (run["held"] - run["workspace"] - dpo["held"]) / trainable,
                                "update_workspace_share": run["workspace"] / trainable,
                            }
                            for label, run in runs.items()
                        },
                    }
                print(case, weights[case], census.get(f"{space}-full-{precision}"), flush=True)
    result = {
        "what": __doc__.strip(),
        "command": "python benchmarks/tools/one_pass_rows_dtype.py " + " ".join(argv or sys.argv[1:]),
        "before": args.before,
        "machine": harness.machine_description("cpu", threads=1),
        "load": {"loadavg_1_5_15_at_start": list(load), "loadavg_at_end": list(os.getloadavg())},
        "weights": weights,
        "held_at_step_end": census,
    }
    Path(args.write).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
