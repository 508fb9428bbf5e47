"""The trained weights of the tiny SD run, fingerprinted, for comparing two checkouts bit for bit.

    PYTHONPATH=<checkout> python benchmarks/tools/weights_identity.py --out a.json     # in each checkout
    python benchmarks/tools/weights_identity.py --compare a.json b.json --write result.json

Each case trains the tiny Stable Diffusion pipeline (``trl_diffusion_sdpo.testing``, built from its config with seed
0) for 3 optimizer steps of 2 pairs on six coloured pairs, with every default the comparison could depend on set
explicitly (beta, mu, learning rate, warmup), for Diffusion-DPO and each safeguard space, LoRA and full tuning (the
exact rule also with its per-branch passes and with an accumulation window of two micro-batches); the fingerprint
is the SHA-256 of every trainable tensor's bytes in name order, and the tensors' sum in float64.

Two options run the checkout with a part of another's, to find which part moves the weights:
``--clip-order optimizer`` clips the gradients in a trainer subclass over the optimizer's parameters in its groups'
order (the gradient norm's per-tensor norms summed in that order), where transformers' Trainer clips over
``model.parameters()``; ``--taps-from COMMIT`` runs the exact safeguard's one pass with the per-layer taps and store
of ``COMMIT`` (read with ``git show``, as ``benchmarks/speed/safeguard_op_counts.py --before`` does). ``--variant
OPTIONS FILE`` adds to the comparison the fingerprints ``FILE`` of the after checkout run with ``OPTIONS``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = {
    "dpo": {"safeguard_space": "none"},
    "output": {"safeguard_space": "output", "safeguard_mu": 0.5},
    "parameter": {"safeguard_space": "parameter", "safeguard_mu": 0.5},
    "update": {"safeguard_space": "update", "safeguard_mu": 0.5},
    # the exact rule's per-branch passes (one forward and backward per branch) and an accumulation window of two
    "parameter-two-passes": {"safeguard_space": "parameter", "safeguard_mu": 0.5, "safeguard_passes": "two"},
    "parameter-accumulated": {"safeguard_space": "parameter", "safeguard_mu": 0.5, "gradient_accumulation_steps": 2},
}
CLIP_ORDER_HELP = (
    "trainer: the package's trainer (transformers clips over model.parameters()); optimizer: a subclass that clips "
    "over the optimizer's parameters in its groups' order, as the trainer did at 0291633"
)
COLOURS = [(220, 20, 20), (20, 20, 220), (20, 200, 20), (230, 230, 20), (200, 20, 200), (20, 200, 200)]


def colour_pairs():
    """Six coloured pairs in Pick-a-Pic's label form, images of varied sizes: the tiny run's dataset."""
    from datasets import Dataset
    from PIL import Image

    def png(colour, size):
        buffer = io.BytesIO()
        Image.new("RGB", size, colour).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = [
        {
            "caption": f"a picture number {i}",
            "jpg_0": png(COLOURS[(2 * i) % 6], (32 + 8 * i, 32)),
            "jpg_1": png(COLOURS[(2 * i + 1) % 6], (32, 40)),
            "label_0": float((i + 1) % 2),
            "label_1": float(i % 2),
        }
        for i in range(6)
    ]
    return Dataset.from_list(rows)


def tiny_run_config(tmp: str, **fields):
    """The tiny run's config in the folder ``tmp``: 3 optimizer steps of 2 pairs at 32 px on the CPU, with every
    default the comparison could depend on (beta, learning rate, warmup) set, and ``fields`` (the case's) over
    them."""
    from trl_diffusion_sdpo import DiffusionSDPOConfig

    settings = {
        "resolution": 32,
        "per_device_train_batch_size": 2,
        "max_steps": 3,
        "learning_rate": 1e-3,
        "scale_lr": False,
        "warmup_steps": 0,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 0,
        "beta": 5000.0,
    }
    return DiffusionSDPOConfig(output_dir=str(Path(tmp) / "out"), **{**settings, **fields})


def tiny_run_lora():
    """The tiny run's LoRA adapters: rank 4 on the attention projections."""
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def _trainer_class(clip_order: str) -> type:
    """The trainer for ``clip_order``: ``"trainer"``, the package's (transformers' Trainer clips over
    ``model.parameters()``); ``"optimizer"``, a subclass clipping over the optimizer's parameters in its groups' order,
    as the package's trainer did at 0291633: the gradient norm's per-tensor norms are summed in that order."""
    import torch

    from trl_diffusion_sdpo import DiffusionSDPOTrainer

    if clip_order == "trainer":
        return DiffusionSDPOTrainer

    class OptimizerOrderClipping(DiffusionSDPOTrainer):
        # Here only: the package overrides no Trainer clipping method; this one exists to show what the order moves
        def _clip_grad_norm(self, model: torch.nn.Module) -> torch.Tensor:
            parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
            torch.nn.utils.clip_grads_with_norm_(parameters, self.args.max_grad_norm, norm)
            return norm

    return OptimizerOrderClipping


def _one_pass_store_class(commit: str) -> type:
    """The one pass's store class of ``commit``, its per-layer taps with it."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.speed.safeguard_op_counts import load_before

    return load_before(commit)["trl_diffusion_sdpo/safeguards/gradients/one_pass.py"].OnePassBranchGradients


def fingerprint(case: str, lora: bool, clip_order: str = "trainer", store_class: type | None = None) -> dict:
    """One case's fingerprint; ``store_class``: the one pass's store the exact safeguard runs (None: the package's)."""
    import torch

    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(Path(tmp) / "tok"))
        args = tiny_run_config(tmp, logging_steps=1, **CASES[case])
        peft = tiny_run_lora() if lora else None
        trainer = _trainer_class(clip_order)(pipe, args=args, train_dataset=colour_pairs(), peft_config=peft)
        collectives = getattr(getattr(trainer.safeguard, "backward_stage", None), "collectives", None)
        if store_class is not None and collectives is not None:
            collectives.one_pass_store_class = store_class
        trainer.train()
        digest, total = hashlib.sha256(), 0.0
        for name, parameter in sorted(trainer.family.denoiser.named_parameters()):
            if parameter.requires_grad:
                tensor = parameter.detach().cpu().contiguous()
                digest.update(name.encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes())
                total += float(tensor.double().sum())
    return {"sha256": digest.hexdigest(), "sum": total}


def _comparison(before: dict, after: dict) -> dict:
    return {
        key: {
            "identical": before[key]["sha256"] == after[key]["sha256"],
            "sum_difference": after[key]["sum"] - before[key]["sum"],
        }
        for key in before
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write this checkout's fingerprints here")
    parser.add_argument("--clip-order", choices=["trainer", "optimizer"], default="trainer", help=CLIP_ORDER_HELP)
    parser.add_argument("--taps-from", metavar="COMMIT", help="the one pass's per-layer taps and store of COMMIT")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--write", help="with --compare: the result file")
    parser.add_argument("--label", nargs=2, default=["before", "after"], help="with --compare: the two checkouts")
    parser.add_argument(
        "--variant",
        nargs=2,
        action="append",
        default=[],
        metavar=("OPTIONS", "FILE"),
        help="with --compare: FILE holds the after checkout's fingerprints run with OPTIONS (repeatable)",
    )
    parser.add_argument("--note", action="append", default=[], help="with --compare: a line the result file keeps")
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        cases = _comparison(before, after)
        sys.path.insert(0, str(ROOT))
        from benchmarks.harness import machine_description

        result = {
            "what": __doc__.strip(),
            "command": "python benchmarks/tools/weights_identity.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine_description("cpu", threads=1),
            "load_average_1_5_15_min_at_comparison": list(os.getloadavg()),
            "checkouts": args.label,
            "cases": cases,
            args.label[0]: before,
            args.label[1]: after,
        }
        variants = {options: json.loads(Path(path).read_text()) for options, path in args.variant}
        if variants:
            result["variants"] = {
                options: {
                    "command": f"python benchmarks/tools/weights_identity.py {options} --out FILE",
                    "cases": _comparison(before, fingerprints),
                    "fingerprints": fingerprints,
                }
                for options, fingerprints in variants.items()
            }
        if args.note:
            result["notes"] = args.note
        text = json.dumps(result, indent=2) + "\n"
        if args.write:
            Path(args.write).parent.mkdir(parents=True, exist_ok=True)
            Path(args.write).write_text(text)
        print(json.dumps({"cases": cases, **{o: v["cases"] for o, v in result.get("variants", {}).items()}}, indent=2))
        return 0 if all(c["identical"] for c in cases.values()) else 1
    store_class = _one_pass_store_class(args.taps_from) if args.taps_from else None
    results = {}
    for case in CASES:
        for lora in (True, False):
            key = f"{case}-{'lora' if lora else 'full'}"
            results[key] = fingerprint(case, lora, args.clip_order, store_class)
            print(key, results[key], file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2) + "\n"
    Path(args.out).write_text(text) if args.out else print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
