"""Where no combination of ``estimate-memory``'s changes fits a card, the advice names the closest one (the lowest
planned peak among every combination, with its figures as the command itself estimates them) and the fewest GPUs that
fit the run under ZeRO-3 or FSDP2: that count fits, one fewer does not, on either engine, with any change that keeps
the training; and where no count up to the stated maximum fits, it says so."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from trl_diffusion_sdpo.cli.memory import run_estimate_memory
from trl_diffusion_sdpo.engines.memory.advice import MAX_SHARDED_GPUS, SHARDED_ENGINES, _fewest_gpus
from trl_diffusion_sdpo.engines.memory.estimate import RunShape

ROOT = Path(__file__).resolve().parents[2]
FLUX2_LORA = ("--config", str(ROOT / "examples" / "configs" / "flux2_lora.yaml"), "--gpu", "24")
# What flux2_lora.yaml (LoRA, one pair, 1024 px, activation checkpointing on) can still change, each lever's
# settings: the frozen parts, the optimizer, the base, the resolution
LEVERS = (
    ((), ("--cache_latents", "true"), ("--offload_frozen_modules", "true")),
    ((), ("--optim", "adamw_torch_8bit")),
    ((), ("--base_quantization", "quanto-int8"), ("--base_quantization", "quanto-int4")),
    ((), ("--resolution", "512")),
)
# the changes that keep the training (the frozen parts' placement; checkpointing is on and the batch one pair already)
SAME_TRAINING = ((), ("--cache_latents", "true"), ("--offload_frozen_modules", "true"))


def estimate_json(capsys, *argv: str) -> dict:
    assert run_estimate_memory([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def printed_line(capsys, *argv: str) -> str:
    assert run_estimate_memory(list(argv)) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def flux2_advice() -> dict:
    """The advice for FLUX.2 [dev] LoRA on 24 GB, read once for the module (capsys is per test)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_estimate_memory([*FLUX2_LORA, "--json"]) == 0
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    assert result["fits"] is False and result["advice"]["flags"] is None  # no combination fits 24 GB
    return result["advice"]


def test_flux2_dev_lora_on_24_gb_names_the_closest_combination_with_the_estimators_figures(capsys, flux2_advice):
    closest = flux2_advice["closest"]
    assert closest
    # the command estimating the run with those flags gives the figures the advice quotes
    again = estimate_json(capsys, *FLUX2_LORA, *closest)
    assert again["fits"] is False
    for key in ("total_gib", "planned_gib", "margin_gib"):
        assert again[key] == pytest.approx(flux2_advice[key], abs=1e-3), key
    assert flux2_advice["margin_gib"] < 0
    # every setting of the levers, estimated by the command: none fits, and none plans lower than the closest
    planned = {}
    for setting in itertools.product(*LEVERS):
        flags = [word for change in setting for word in change]
        result = estimate_json(capsys, *FLUX2_LORA, *flags)
        assert result["fits"] is False, flags
        planned[tuple(flags)] = result["planned_gib"]
    lowest = min(planned.values())
    assert flux2_advice["planned_gib"] == pytest.approx(lowest, abs=1e-3)
    assert planned[tuple(closest)] == pytest.approx(lowest, abs=1e-3)
    line = printed_line(capsys, *FLUX2_LORA)
    assert (
        f"The closest: {' '.join(closest)} (the estimate {again['total_gib']:.2f} GiB, planned "
        f"{again['planned_gib']:.2f} GiB, {-again['margin_gib']:.2f} GiB over)." in line
    )


def test_flux2_dev_lora_on_24_gb_names_the_fewest_gpus_that_fit_it_sharded(capsys, flux2_advice):
    sharded = flux2_advice["sharded"]
    assert sharded is not None and flux2_advice["sharded_max_gpus"] == MAX_SHARDED_GPUS
    count, engine, flags = sharded["num_processes"], sharded["engine"], sharded["flags"]
    assert engine in ("zero3", "fsdp2") and 1 < count <= MAX_SHARDED_GPUS
    assert flags[:4] == ["--engine", engine, "--num_processes", str(count)]
    at_count = estimate_json(capsys, *FLUX2_LORA, *flags)
    assert at_count["fits"] is True
    assert at_count["planned_gib"] == pytest.approx(sharded["planned_gib"], abs=1e-3)
    # one GPU fewer fits on neither sharding engine, with no change that keeps the training
    for other, change in itertools.product(("zero3", "fsdp2"), SAME_TRAINING):
        fewer = estimate_json(capsys, *FLUX2_LORA, "--engine", other, "--num_processes", str(count - 1), *change)
        assert fewer["fits"] is False, (other, change)
    # the other engine named beside it fits at that count with the same changes
    for other in sharded["also_engines"]:
        assert other in ("zero3", "fsdp2") and other != engine
        assert estimate_json(capsys, *FLUX2_LORA, "--engine", other, *flags[2:])["fits"] is True, other
    also = "".join(f" (or --engine {other})" for other in sharded["also_engines"])
    line = printed_line(capsys, *FLUX2_LORA)
    assert f"Sharded over {count} GPUs of 24 GB, it fits: {' '.join(flags)}{also} (the estimate" in line


def test_a_run_no_count_of_gpus_fits_says_so_up_to_the_maximum(capsys):
    """FLUX.2 [dev] full tuning: even over the most GPUs tried, with a latent cache, ZeRO-3 and FSDP2 plan above
    24 GB."""
    run = (*FLUX2_LORA, "--use_peft", "false")
    advice = estimate_json(capsys, *run)["advice"]
    assert advice["flags"] is None and advice["closest"] and advice["sharded"] is None
    for engine in ("zero3", "fsdp2"):
        most = estimate_json(
            capsys, *run, "--engine", engine, "--num_processes", str(MAX_SHARDED_GPUS), "--cache_latents", "true"
        )
        assert most["fits"] is False, engine
    assert f"over up to {MAX_SHARDED_GPUS} GPUs (adding only changes that slow a step), it does not fit either." in (
        printed_line(capsys, *run)
    )


def test_the_memory_page_quotes_the_flux2_line_as_printed_and_states_the_most_gpus_tried(capsys):
    page = (ROOT / "docs" / "memory.md").read_text()
    section = page.split("## When a run does not fit", 1)[1].split("<!-- least change", 1)[0]
    example = next(block for block in section.split("```text")[1:] if "The closest:" in block).split("```", 1)[0]
    printed = printed_line(capsys, *FLUX2_LORA)
    for part in " ".join(example.split()).split("..."):
        assert part.strip(" .") in printed, part
    assert f"up to `MAX_SHARDED_GPUS` ({MAX_SHARDED_GPUS})" in " ".join(section.split())


@pytest.mark.parametrize("needed", [2, 3, MAX_SHARDED_GPUS])
def test_the_sharded_search_tries_every_count_from_two_to_the_maximum(needed):
    """With an estimator under which a run fits from ``needed`` processes on, the fewest found is ``needed``: the
    search's range holds both ends (2 and :data:`MAX_SHARDED_GPUS`); one more than the maximum finds none."""
    seen: set[int] = set()

    def verdict_of(combo, run, bounded=True):
        seen.add(run.num_processes)
        return SimpleNamespace(total_gib=1.0), SimpleNamespace(fits=run.num_processes >= needed)

    found = _fewest_gpus(RunShape(), [], verdict_of)
    assert found is not None and found.num_processes == needed and found.engine in SHARDED_ENGINES
    assert min(seen) == 2 and max(seen) == needed


def test_the_sharded_search_stops_at_the_maximum():
    """A run that needs more processes than :data:`MAX_SHARDED_GPUS` finds none, after trying every count up to it."""
    seen: set[int] = set()

    def verdict_of(combo, run, bounded=True):
        seen.add(run.num_processes)
        return SimpleNamespace(total_gib=1.0), SimpleNamespace(fits=run.num_processes > MAX_SHARDED_GPUS)

    assert _fewest_gpus(RunShape(), [], verdict_of) is None
    assert seen == set(range(2, MAX_SHARDED_GPUS + 1))
