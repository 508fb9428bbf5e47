"""Which change ``estimate-memory`` advises, against an enumeration of its own: on the tiny shipped UNet, for cards
from just above the smallest reachable peak to the run's own, the advice is the cheapest fitting combination of the
changes the run admits (one of a group, a quantized base with LoRA), each estimated on its own; the batch change
keeps the pairs per step; and estimates that share the advice's activation counts equal fresh ones."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest

from trl_diffusion_sdpo.cli.memory import run_estimate_memory
from trl_diffusion_sdpo.engines.memory import USABLE_SHARE, RunShape, estimate_memory, model_sizes, planning_error
from trl_diffusion_sdpo.engines.memory.advice import changes_for, fit_advice

ROOT = Path(__file__).resolve().parents[2]
TINY = "trl-diffusion-sdpo:tiny"
# full tuning in float32, 4 pairs at 64 px, no checkpointing, AdamW: every group of changes but the resolution's
SHAPE = RunShape(pairs=4, resolution=64, dtype_bytes=4, lora_rank=None, lora_r=8, accumulation=3)


@pytest.fixture(scope="module")
def sizes():
    return model_sizes(TINY)


def valid(combo) -> bool:
    groups = [c.group for c in combo]
    return len(set(groups)) == len(groups) and all(c.needs is None or c.needs in groups for c in combo)


def flags_of(combo) -> tuple[tuple[str, ...], ...]:
    return tuple(c.flags for c in combo)


# the activation counts of the tiny UNet's meta forwards, shared by every estimate here (their sharing is checked
# against fresh estimates below)
MEMO: dict = {}


def planned_bytes(sizes, combo) -> tuple[int, RunShape]:
    shape = SHAPE
    for change in combo:
        shape = change.apply(shape)
    return estimate_memory(sizes, shape, MEMO).total_bytes, shape


def test_the_advice_is_the_cheapest_fitting_combination(sizes) -> None:
    changes = changes_for(SHAPE)
    assert {c.group for c in changes} == {"frozen", "checkpointing", "batch", "optimizer", "base", "tuning"}
    combos = [
        combo for n in range(1, len(changes) + 1) for combo in itertools.combinations(changes, n) if valid(combo)
    ]
    estimated = {flags_of(combo): planned_bytes(sizes, combo) for combo in combos}
    family = sizes.family

    def planned(total: int, shape: RunShape) -> float:  # the bytes the verdict plans with
        bnb = shape.base_quantization.startswith("bnb")
        return total * planning_error(family, shape.lora_rank is not None, bnb).ratio

    least = min(planned(*value) for value in estimated.values())
    run = planned(estimate_memory(sizes, SHAPE, MEMO).total_bytes, SHAPE)
    # cards (GB) from just above the least reachable planned peak to just below the run's own
    cards = [(least * 1.001 + (run - least) * i / 8) / USABLE_SHARE / 1e9 for i in range(8)]
    seen = set()
    for gpu in cards:
        fitting = [combo for combo in combos if planned(*estimated[flags_of(combo)]) <= USABLE_SHARE * gpu * 1e9]
        best = min(fitting, key=lambda combo: (sum(c.cost for c in combo), len(combo)))
        advice = fit_advice(sizes, SHAPE, gpu, activations_memo=MEMO)
        assert advice.fits, gpu
        assert (sum(c.cost for c in advice.changes), len(advice.changes)) == (
            sum(c.cost for c in best),
            len(best),
        ), (gpu, advice.flags, [c.flags for c in best])
        assert valid(advice.changes)
        assert advice.estimate.total_bytes == estimated[flags_of(advice.changes)][0]
        seen.add(tuple(c.group for c in advice.changes))
    assert len(seen) >= 3, seen  # the cards reach several different answers
    below = least * 0.99 / USABLE_SHARE / 1e9
    nothing = fit_advice(sizes, SHAPE, below, activations_memo=MEMO)
    assert not nothing.fits and nothing.flags == [] and not nothing.verdict.fits


def test_fewer_pairs_per_micro_batch_keep_the_pairs_per_step() -> None:
    batch = [c for c in changes_for(SHAPE) if c.group == "batch"]
    assert len(batch) == 2  # 2 and 1 pairs
    for change in batch:
        options = dict(zip(change.flags[::2], change.flags[1::2]))
        pairs = int(options["--per_device_train_batch_size"])
        steps = int(options["--gradient_accumulation_steps"])
        assert pairs < SHAPE.pairs and pairs * steps == SHAPE.pairs * SHAPE.accumulation
        changed = change.apply(SHAPE)
        assert (changed.pairs, changed.accumulation) == (pairs, steps)


@pytest.fixture(scope="module")
def shape_counts(sizes) -> dict:
    """The activations memo after an estimate of ``SHAPE`` alone, made once; a test shares a copy of it."""
    memo: dict = {}
    estimate_memory(sizes, SHAPE, memo)
    return memo


@pytest.mark.parametrize(
    "field, value",
    [("activation_checkpointing", True), ("pairs", 2), ("resolution", 32), ("dtype_bytes", 2), ("prompt_tokens", 20)],
)
def test_estimates_sharing_activation_counts_equal_fresh_ones(sizes, shape_counts, field: str, value) -> None:
    shared = dict(shape_counts)  # SHAPE's counts only
    assert len(shared) == 1
    other = replace(SHAPE, **{field: value})
    assert estimate_memory(sizes, other, shared).components == estimate_memory(sizes, other).components


def test_a_change_the_parser_refuses_for_the_config_is_not_advised(capsys) -> None:
    """With ``random_crop`` a latent cache is refused by ``train``'s rules: FLUX.1 LoRA on 24 GB then gets the frozen
    parts offloaded instead, flags the parser takes and that fit."""
    run = ["--config", str(ROOT / "examples/configs/flux_lora.yaml"), "--random_crop", "true", "--gpu", "24"]
    assert run_estimate_memory([*run, "--json"]) == 0
    advice = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["advice"]
    assert "--cache_latents" not in advice["flags"] and "--offload_frozen_modules" in advice["flags"]
    assert run_estimate_memory([*run, *advice["flags"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fits"] is True
