"""Shared fixtures: tiny real Stable Diffusion pipelines, preference datasets made in the test, configs.

Everything runs on CPU at resolution 32 with a handful of steps; nothing is downloaded.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import datasets
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image
from transformers import TrainerCallback

from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

# Distinct, saturated colours: a decoded, resized and cropped image keeps its colour exactly (PNG) or nearly (JPEG),
# so tests can tell which image of a pair ended up where.
COLOURS = [(220, 20, 20), (20, 20, 220), (20, 200, 20), (230, 230, 20), (200, 20, 200), (20, 200, 200)]
SIZES = [(40, 32), (32, 48), (64, 64), (48, 40), (36, 36), (32, 72)]

# Test modules import shared helpers from each other across the area folders (tests/<area>/test_*.py): every area is
# importable by module name, whichever tests a run selects.
for _area in sorted(Path(__file__).parent.iterdir()):
    if _area.is_dir() and any(_area.glob("test_*.py")) and str(_area) not in sys.path:
        sys.path.append(str(_area))

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# The models are tiny and the machine's cores are shared: more than one intra-op thread only adds contention.
torch.set_num_threads(1)


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


@pytest.fixture(autouse=True)
def datasets_progress_bars_restored() -> Iterator[None]:
    """A command run in this process off a terminal turns ``datasets``' bars off for the rest of the process, as it
    should in a real run: put the setting back after each test, so the next one starts from the library's default."""
    enabled = datasets.is_progress_bar_enabled()
    yield
    datasets.enable_progress_bars() if enabled else datasets.disable_progress_bars()


@pytest.fixture
def objective_registry(monkeypatch) -> None:
    """Objectives registered in the test stay in the test: the registry is a copy, put back afterwards."""
    from trl_diffusion_sdpo.objectives import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


@pytest.fixture
def make_pickapic() -> Callable[..., Dataset]:
    """``make_pickapic(n=6, labels=None, rows=None)``: a ``datasets.Dataset`` in Pick-a-Pic v2 form."""

    def make(n: int = 6, labels: Sequence[float] | None = None, rows: list[dict] | None = None) -> Dataset:
        return Dataset.from_list(rows if rows is not None else pickapic_rows(n, labels))

    return make


@pytest.fixture
def pickapic_dataset(make_pickapic) -> Dataset:
    return make_pickapic()


@pytest.fixture
def trl_dataset() -> Dataset:
    """TRL preference form with PIL images (``datasets`` stores them with an ``Image()`` feature)."""
    n = 4
    return Dataset.from_dict(
        {
            "prompt": [f"prompt {i}" for i in range(n)],
            "chosen": [Image.new("RGB", SIZES[i], COLOURS[i]) for i in range(n)],
            "rejected": [Image.new("RGB", SIZES[i + 1], COLOURS[i + 2]) for i in range(n)],
        }
    )


@pytest.fixture
def make_pipeline(tmp_path) -> Callable[..., object]:
    """``make_pipeline(seed=0, prediction_type="epsilon")``: a fresh tiny SD pipeline; equal seeds, equal weights."""
    counter = iter(range(1_000))

    def make(seed: int = 0, prediction_type: str = "epsilon"):
        return build_tiny_sd_pipeline(
            seed=seed, prediction_type=prediction_type, tokenizer_dir=str(tmp_path / f"tokenizer-{next(counter)}")
        )

    return make


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


@pytest.fixture
def make_config(tmp_path) -> Callable[..., DiffusionSDPOConfig]:
    """``make_config(**overrides)``: a fast CPU config (:func:`fast_config_values`)."""

    def make(**overrides) -> DiffusionSDPOConfig:
        return DiffusionSDPOConfig(**{**fast_config_values(str(tmp_path / "out")), **overrides})

    return make


def lora_config(r: int = 4, alpha: int = 8) -> LoraConfig:
    """LoRA on the attention projections; ``alpha != r`` so a lost scaling factor would show."""
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights=True)


@pytest.fixture
def make_trainer(make_pipeline, make_config, pickapic_dataset) -> Callable[..., DiffusionSDPOTrainer]:
    """``make_trainer(lora=True, pipeline=None, train_dataset=None, eval_dataset=None, **config_overrides)``."""

    def make(
        lora: bool = True,
        pipeline=None,
        train_dataset=None,
        eval_dataset=None,
        ref_model=None,
        **overrides,
    ) -> DiffusionSDPOTrainer:
        return DiffusionSDPOTrainer(
            pipeline if pipeline is not None else make_pipeline(),
            ref_model=ref_model,
            args=make_config(**overrides),
            train_dataset=train_dataset if train_dataset is not None else pickapic_dataset,
            eval_dataset=eval_dataset,
            peft_config=lora_config() if lora else None,
        )

    return make


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
