"""Reference training runs of the step: what ``lambda``, ``.grad``, the logged metrics and the trained weights were,
stored in ``tests/data/step_reference.json`` and compared by ``tests/safeguard/test_step_reference.py``.

Each run trains a family's tiny pipeline for three optimizer steps on a fixed dataset with one safeguard setting,
and records at every optimizer step (before the optimizer reads ``.grad``) eight fixed random projections of the
flattened trainable gradient and its norm, every logged metric, and at the end the same projections of the trainable
weights. Projections keep the file small while any change of a gradient's value moves them.

    python tests/step_reference.py --record          # rewrite the stored runs from the current code

The runs are float32 on the CPU with deterministic kernels, one thread: the same code gives the same bits, so a
restructuring that computes the same values in the same order reproduces them; the test's tolerance (a relative
1e-5) leaves room only for a reordered float32 sum.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import edit_rows, fast_config_values, pickapic_rows  # noqa: E402

STORED = os.path.join(ROOT, "tests", "data", "step_reference.json")
PROJECTIONS = 8
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class Family:
    builder: str  # a trl_diffusion_sdpo.tiny_models builder
    tokens: int
    lora_targets: tuple[str, ...]
    editing: bool = False
    config: dict[str, Any] = field(default_factory=dict)


FAMILIES = {
    "sd": Family("build_tiny_sd_pipeline", 77, ATTENTION),
    "sdxl": Family("build_tiny_sdxl_pipeline", 77, ATTENTION),
    "sd3": Family("build_tiny_sd3_pipeline", 16, ATTENTION),
    "flux": Family("build_tiny_flux_pipeline", 16, (*ATTENTION, "add_q_proj", "to_add_out")),
    "flux2": Family("build_tiny_flux2_pipeline", 48, (*ATTENTION, "to_qkv_mlp_proj")),
    "qwen-image": Family("build_tiny_qwen_image_pipeline", 24, (*ATTENTION, "add_k_proj", "to_add_out")),
    "z-image": Family("build_tiny_z_image_pipeline", 32, ATTENTION),
    "flux-kontext": Family(
        "build_tiny_flux_kontext_pipeline", 16, (*ATTENTION, "add_q_proj", "to_add_out"), editing=True
    ),
    "qwen-image-edit": Family(
        "build_tiny_qwen_image_edit_pipeline",
        24,
        (*ATTENTION, "add_k_proj", "to_add_out"),
        editing=True,
        config={"random_flip": False, "proportion_empty_prompts": 0.0},
    ),
}

# The safeguard settings run on SD; every family runs the exact rule in its default form.
SETTINGS = {
    "dpo": {"safeguard": False},
    "output": {"safeguard_space": "output", "safeguard_mu": 0.5},
    "output-accumulating": {"safeguard_space": "output", "safeguard_mu": 0.5, "gradient_accumulation_steps": 2},
    "parameter": {"safeguard_space": "parameter", "safeguard_mu": 0.5},
    "parameter-accumulating": {"safeguard_space": "parameter", "safeguard_mu": 0.5, "gradient_accumulation_steps": 2},
    "parameter-two-passes": {"safeguard_space": "parameter", "safeguard_mu": 0.5, "safeguard_passes": "two"},
    "pair": {"safeguard_space": "parameter", "safeguard_scope": "pair", "safeguard_mu": 0.5},
    "update": {"safeguard_space": "update", "safeguard_mu": 0.5},
    "update-two-passes": {"safeguard_space": "update", "safeguard_mu": 0.5, "safeguard_passes": "two"},
}
DDP_SETTINGS = ("dpo", "output", "output-global", "parameter", "parameter-global", "update")
SETTINGS["output-global"] = {"safeguard_space": "output", "safeguard_mu": 0.5, "safeguard_scope": "global"}
SETTINGS["parameter-global"] = {"safeguard_space": "parameter", "safeguard_mu": 0.5, "safeguard_scope": "global"}


def runs() -> list[tuple[str, str, bool, int]]:
    """Every stored run: ``(family, setting, lora, processes)``."""
    out = [(name, "parameter", lora, 1) for name in FAMILIES for lora in (True, False)]
    out += [("sd", s, lora, 1) for s in SETTINGS if s != "parameter" for lora in (True, False)]
    out += [("sd", s, True, 2) for s in DDP_SETTINGS]
    return out


def key(name: str, setting: str, lora: bool, processes: int) -> str:
    return f"{name}/{setting}/{'lora' if lora else 'full'}/{processes}p"


def _projections(tensors: list[torch.Tensor], seed: int = 1234) -> list[float]:
    flat = torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn((PROJECTIONS, flat.numel()), generator=gen, dtype=torch.float64)
    return [*(directions @ flat).tolist(), float(flat.norm())]


class _Recorder(TrainerCallback):
    """``.grad`` at each optimizer step, before the optimizer reads it (after any reduction over processes)."""

    def __init__(self, trainer_ref: Callable[[], Any]) -> None:
        self.trainer_ref = trainer_ref
        self.grads: list[list[float]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = [
            p for p in self.trainer_ref().accelerator.unwrap_model(kwargs["model"]).parameters() if p.requires_grad
        ]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self.grads.append(_projections(grads))


def _dataset(family: Family) -> Dataset:
    return Dataset.from_list(edit_rows(6) if family.editing else pickapic_rows(6))


def train_once(name: str, setting: str, lora: bool, work_dir: str) -> dict[str, Any]:
    """One run in this process (under DDP: one of its processes); the result as stored."""
    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer, tiny_models

    torch.use_deterministic_algorithms(True)
    family = FAMILIES[name]
    pipe = getattr(tiny_models, family.builder)(
        seed=0, tokenizer_dir=os.path.join(work_dir, "tokenizer"), max_length=family.tokens
    )
    values = {
        **fast_config_values(os.path.join(work_dir, "out")),
        "beta": 100.0,
        "max_sequence_length": family.tokens,
        "safeguard_log_output_lambda": True,  # the stored exact-rule runs record the authors' lambda beside theirs
        **family.config,
        **SETTINGS[setting],
    }
    peft = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(family.lora_targets))
    holder: list[Any] = []
    recorder = _Recorder(lambda: holder[0])
    trainer = DiffusionSDPOTrainer(
        pipe,
        args=DiffusionSDPOConfig(**values),
        train_dataset=_dataset(family),
        peft_config=peft if lora else None,
        callbacks=[recorder],
    )
    holder.append(trainer)
    trainer.train()
    logs = [
        {k: v for k, v in entry.items() if isinstance(v, (int, float)) and k not in {"epoch", "total_flos"}}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    for entry in logs:  # timings are not behaviour
        for k in [k for k in entry if "runtime" in k or "per_second" in k]:
            del entry[k]
    weights = [p for p in trainer.accelerator.unwrap_model(trainer.model).parameters() if p.requires_grad]
    return {"grads": recorder.grads, "logs": logs, "weights": _projections(weights)}


def _ddp_worker(rank: int, port: int, name: str, setting: str, lora: bool, work_dir: str, queue) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
        | {"MASTER_PORT": str(port), "LOCAL_WORLD_SIZE": "2"}
    )
    torch.set_num_threads(1)
    try:
        result = train_once(name, setting, lora, os.path.join(work_dir, str(rank)))
        queue.put((rank, result))
    except BaseException as err:  # reported to the parent, which fails the run
        queue.put((rank, repr(err)))
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, setting: str, lora: bool, processes: int) -> dict[str, Any]:
    """The run's result (the main process's under DDP, after checking both processes logged the same)."""
    with tempfile.TemporaryDirectory() as work_dir:
        if processes == 1:
            return train_once(name, setting, lora, work_dir)
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = _free_port()
        procs = [
            ctx.Process(target=_ddp_worker, args=(r, port, name, setting, lora, work_dir, queue))
            for r in range(processes)
        ]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        for rank, result in results.items():
            if isinstance(result, str):
                raise RuntimeError(f"process {rank} failed: {result}")
        return results[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="rewrite tests/data/step_reference.json")
    parser.add_argument("--only", default=None, help="a substring of the runs' keys to record")
    args = parser.parse_args()
    stored = {}
    if os.path.exists(STORED):
        with open(STORED, encoding="utf-8") as f:
            stored = json.load(f)
    for spec in runs():
        k = key(*spec)
        if args.only and args.only not in k:
            continue
        print(k, flush=True)
        stored[k] = run(*spec)
    if args.record:
        os.makedirs(os.path.dirname(STORED), exist_ok=True)
        with open(STORED, "w", encoding="utf-8") as f:
            json.dump(stored, f, indent=0, sort_keys=True)


if __name__ == "__main__":
    main()
