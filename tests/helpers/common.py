"""Preference data made in the test, fast configs, LoRA settings and small run tools shared by the suite."""

from __future__ import annotations

import gc
import io
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from peft import LoraConfig
from PIL import Image
from transformers import TrainerCallback

from trl_diffusion_sdpo import DiffusionSDPOTrainer

CHECKOUT = Path(__file__).resolve().parents[2]


def freeze_survivors() -> None:
    """Collect garbage, then freeze what survives out of the collector's later scans (``gc.freeze``): accelerate
    collects garbage at every ``train()``, and a full collection over torch's, transformers' and diffusers' module
    objects takes half a second to a second and a half on two cores, more than most tests and than a tiny model's
    training. Nothing dropped before the call is kept; frozen objects are freed by reference counting as before, and
    ``gc.get_objects`` no longer lists them (a census asks for the ``gc_unfrozen`` fixture)."""
    gc.collect()
    gc.freeze()


def worker_environment() -> dict[str, str]:
    """This process's environment for a subprocess that runs the package: the checkout under test first on
    ``PYTHONPATH`` (a worker imports the code the test imports, whatever is installed or not), one intra-op thread
    per process (the cores are shared) and no tokenizer threads."""
    path = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def cpu_launch_fields(accelerate_config: str | Path) -> dict[str, object]:
    """The config fields a multi-process launch with ``accelerate_config`` needs on a machine without CUDA, where the
    config refuses the launch without them (``trl_diffusion_sdpo.config.fields.cpu_launch_problem``): under DeepSpeed
    its process group over gloo, else accelerate's CPU mode; none where CUDA is."""
    if torch.cuda.is_available():
        return {}
    deepspeed = yaml.safe_load(Path(accelerate_config).read_text(encoding="utf-8"))["distributed_type"] == "DEEPSPEED"
    return {"ddp_backend": "gloo"} if deepspeed else {"use_cpu": True}


def cpu_launch_flags(accelerate_config: str | Path) -> list[str]:
    """:func:`cpu_launch_fields` as command-line options."""
    return [f"--{name}={str(value).lower()}" for name, value in cpu_launch_fields(accelerate_config).items()]


# Distinct, saturated colours: a decoded, resized and cropped image keeps its colour exactly (PNG) or nearly (JPEG),
# so tests can tell which image of a pair ended up where.
COLOURS = [(220, 20, 20), (20, 20, 220), (20, 200, 20), (230, 230, 20), (200, 20, 200), (20, 200, 200)]

SIZES = [(40, 32), (32, 48), (64, 64), (48, 40), (36, 36), (32, 72)]

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# torch's thread count before a command sets it (the torch_threads fixture): neither the package's CPU default (1) nor
# the 2 the thread tests ask for.
THREADS_BEFORE = 3


def encode_image(colour: tuple[int, int, int], size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def pickapic_rows(n: int = 6, labels: Sequence[float] | None = None) -> list[dict]:
    """Pick-a-Pic-like rows: image 0 takes colour ``2i``, image 1 colour ``2i+1`` (mod 6), different sizes, PNG and
    JPEG alternating. ``label_0`` alternates 1, 0 unless given."""
    labels = list(labels) if labels is not None else [float((i + 1) % 2) for i in range(n)]
    rows = []
    for i in range(n):
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        rows.append(
            {
                "caption": f"a picture number {i}",
                "jpg_0": encode_image(COLOURS[(2 * i) % 6], SIZES[i % 6], fmt),
                "jpg_1": encode_image(COLOURS[(2 * i + 1) % 6], SIZES[(i + 3) % 6], fmt),
                "label_0": labels[i],
                "label_1": 1.0 - labels[i],
                "model_0": "m0",
                "model_1": "m1",
            }
        )
    return rows


def edit_rows(n: int = 4, sources: int | None = None) -> list[dict]:
    """Editing rows in TRL form: an instruction, a chosen and a rejected edit of the same size, and a source image of
    that size (``source_image``), or, with ``sources``, a list of that many of varied sizes (``source_images``)."""
    rows = []
    for i in range(n):
        size = SIZES[i % 6]
        row = {
            "prompt": f"make picture {i} brighter",
            "chosen": encode_image(COLOURS[(2 * i) % 6], size),
            "rejected": encode_image(COLOURS[(2 * i + 1) % 6], size, "JPEG"),
        }
        if sources is None:
            row["source_image"] = encode_image(COLOURS[(i + 2) % 6], size)
        else:
            row["source_images"] = [encode_image(COLOURS[(i + k) % 6], SIZES[(i + k) % 6]) for k in range(sources)]
        rows.append(row)
    return rows


def fast_config_values(output_dir: str) -> dict:
    """A fast CPU run's config fields: resolution 32, batch 2, 3 steps, lr 1e-3 unscaled, no warmup, no saving."""
    return dict(
        output_dir=output_dir,
        resolution=32,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        scale_lr=False,
        warmup_steps=0,
        logging_steps=1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )


def lora_config(r: int = 4, alpha: int = 8) -> LoraConfig:
    """LoRA on the attention projections; ``alpha != r`` so a lost scaling factor would show."""
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights=True)


class StopAt(TrainerCallback):
    """Ends training after optimizer step ``step``, as an interruption would: a resume from that step's checkpoint
    then continues the run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def first_batch_gradients(trainer: DiffusionSDPOTrainer) -> torch.Tensor:
    """The denoiser's gradients of the loss on the trainer's first training micro-batch, flattened in parameter order
    (the parameters that receive one)."""
    model = trainer.family.denoiser
    model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.compute_loss(model, trainer._prepare_inputs(batch)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of every parameter and buffer."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


class RecordingDataset(torch.utils.data.Dataset):
    """``dataset`` as the trainer's dataloader reads it, appending each fetched batch's row indices to ``batches``
    (one process's batches in the order its dataloader fetched them)."""

    def __init__(self, dataset, batches: list[list[int]]) -> None:
        self.dataset, self.batches = dataset, batches

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        self.batches.append([int(index)])
        return self.dataset[index]

    def __getitems__(self, indices: list[int]):
        self.batches.append([int(i) for i in indices])
        return [self.dataset[int(i)] for i in indices]


def global_sample_order(per_process: list[list[list[int]]], micro_batches: int) -> list[int]:
    """The row indices of the first ``micro_batches`` global micro-batches, in the global order: micro-batch ``k`` is
    process 0's ``k``-th batch, then process 1's, ... (accelerate hands process ``i`` every ``P``-th batch)."""
    return [i for k in range(micro_batches) for batches in per_process for i in batches[k]]


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's static and FLUX's resolution time shift ``shift * s / (1 + (shift - 1) * s)``, written out as the papers
    state it: the tests' independent reference for the noisers' shifted levels."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)
