"""The suite's fixtures and per-test hook: tiny real Stable Diffusion pipelines, preference datasets made in the test,
configs. Loaded as a plugin by every process that runs tests (``tests/conftest.py``).

Everything runs on CPU at resolution 32 with a handful of steps; nothing is downloaded.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable, Iterator, Sequence

import datasets
import pytest
import torch
from datasets import Dataset
from PIL import Image

from tests.helpers.common import (
    COLOURS,
    SIZES,
    THREADS_BEFORE,
    fast_config_values,
    freeze_survivors,
    lora_config,
    pickapic_rows,
)
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

# The models are tiny and the machine's cores are shared: more than one intra-op thread only adds contention.
torch.set_num_threads(1)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """What earlier tests and the imports left alive is frozen out of the collector's scans
    (:func:`~tests.helpers.common.freeze_survivors`); a test that counts live objects through ``gc.get_objects`` asks
    for :func:`gc_unfrozen`."""
    freeze_survivors()


@pytest.fixture
def gc_unfrozen() -> None:
    """Every live object back under the collector (``gc.get_objects`` lists no frozen one), for a census."""
    gc.unfreeze()


@pytest.fixture(autouse=True)
def datasets_progress_bars_restored() -> Iterator[None]:
    """A command run in this process off a terminal turns ``datasets``' bars off for the rest of the process, as it
    should in a real run: put the setting back after each test, so the next one starts from the library's default."""
    enabled = datasets.is_progress_bar_enabled()
    yield
    datasets.enable_progress_bars() if enabled else datasets.disable_progress_bars()


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """torch's thread count set to :data:`~tests.helpers.common.THREADS_BEFORE` for the test, and put back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS_BEFORE)
    yield
    torch.set_num_threads(before)


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


# (seed, prediction_type) -> this process's build of that tiny SD pipeline and the generator state its build left
_BUILT: dict[tuple[int, str], tuple[object, torch.Tensor]] = {}


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> object:
    """A fresh ``build_tiny_sd_pipeline(seed=seed, prediction_type=prediction_type)``: a copy of this process's first
    build of it, with torch's global generator left as a build leaves it. Copying costs about half of building the
    modules, which the suite does for most of its trainers."""
    key = (seed, prediction_type)
    if key not in _BUILT:
        pipeline = build_tiny_sd_pipeline(seed=seed, prediction_type=prediction_type)
        _BUILT[key] = pipeline, torch.get_rng_state()
    pipeline, generator_state = _BUILT[key]
    torch.set_rng_state(generator_state)
    return copy.deepcopy(pipeline)


@pytest.fixture
def make_pipeline() -> Callable[..., object]:
    """``make_pipeline(seed=0, prediction_type="epsilon")``: a fresh tiny SD pipeline (:func:`tiny_sd_pipeline`);
    equal seeds, equal weights."""
    return tiny_sd_pipeline


@pytest.fixture
def make_config(tmp_path) -> Callable[..., DiffusionSDPOConfig]:
    """``make_config(**overrides)``: a fast CPU config (:func:`fast_config_values`)."""

    def make(**overrides) -> DiffusionSDPOConfig:
        return DiffusionSDPOConfig(**{**fast_config_values(str(tmp_path / "out")), **overrides})

    return make


@pytest.fixture
def make_trainer(make_pipeline, make_config, pickapic_dataset) -> Callable[..., DiffusionSDPOTrainer]:
    """``make_trainer(lora=True, pipeline=None, train_dataset=None, eval_dataset=None, callbacks=None,
    **config_overrides)``."""

    def make(
        lora: bool = True,
        pipeline=None,
        train_dataset=None,
        eval_dataset=None,
        ref_model=None,
        callbacks=None,
        **overrides,
    ) -> DiffusionSDPOTrainer:
        return DiffusionSDPOTrainer(
            pipeline if pipeline is not None else make_pipeline(),
            ref_model=ref_model,
            args=make_config(**overrides),
            train_dataset=train_dataset if train_dataset is not None else pickapic_dataset,
            eval_dataset=eval_dataset,
            peft_config=lora_config() if lora else None,
            callbacks=callbacks,
        )

    return make
