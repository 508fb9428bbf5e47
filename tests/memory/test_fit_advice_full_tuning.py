"""A full-tuning run whose least change is LoRA also hears the full-tuning setting that fits (the sharding engine,
the micro-batch and the accumulation), before LoRA; and the margin the verdict plans with says where it was measured,
beside the verdict, in its words and in ``--json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trl_diffusion_sdpo.cli.memory import run_estimate_memory
from trl_diffusion_sdpo.engines.memory import MEASURED_ERRORS
from trl_diffusion_sdpo.engines.memory.advice import SHARDED_ENGINES
from trl_diffusion_sdpo.engines.memory.measured import MEASUREMENTS_FILE

ROOT = Path(__file__).resolve().parents[2]
SDXL_FULL = ("--config", str(ROOT / "examples" / "configs" / "sdxl_full.yaml"), "--gpu", "24")
# every change that keeps SDXL full tuning's training, at once (it checkpoints already; 8 pairs x 32 accumulated)
SAME_TRAINING = (
    "--cache_latents",
    "true",
    "--per_device_train_batch_size",
    "1",
    "--gradient_accumulation_steps",
    "256",
)


def estimate_json(capsys, *argv: str) -> dict:
    assert run_estimate_memory([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def verdict_line(capsys, *argv: str) -> str:
    assert run_estimate_memory(list(argv)) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_sdxl_full_tuning_on_four_24_gb_gpus_names_the_sharded_full_tuning_before_lora(capsys) -> None:
    """No --engine: the run as asked (DDP over 4) does not fit; the verdict names the sharding engines, 2 pairs per
    micro-batch and 128 accumulated (the same 1024 pairs a step on each process), which the command, given them,
    estimates to fit on either engine, before the least change, which trains LoRA."""
    run = (*SDXL_FULL, "--num_processes", "4")
    result = estimate_json(capsys, *run)
    advice = result["advice"]
    assert result["fits"] is False and "--use_peft" in advice["flags"]
    full = advice["full_tuning"]
    assert full is not None and full["num_processes"] == 4 and full["engine"] in SHARDED_ENGINES
    batch = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "128"]
    assert full["flags"] == ["--engine", full["engine"], "--num_processes", "4", *batch]
    assert sorted([full["engine"], *full["also_engines"]]) == sorted(SHARDED_ENGINES)
    for engine in SHARDED_ENGINES:  # the consumer: the command itself, given the named flags
        again = estimate_json(capsys, *run, "--engine", engine, *batch)
        assert again["fits"] is True and again["advice"] is None and "--use_peft" not in str(again), engine
    assert estimate_json(capsys, *run, "--engine", full["engine"], *batch)["planned_gib"] == pytest.approx(
        full["planned_gib"], abs=1e-3
    )
    # sharding alone, or with a cheaper change than the batch's, does not fit: the batch change is needed
    for engine in SHARDED_ENGINES:
        assert estimate_json(capsys, *run, "--engine", engine)["fits"] is False
        assert estimate_json(capsys, *run, "--engine", engine, "--cache_latents", "true")["fits"] is False
    line = verdict_line(capsys, *run)
    named = f"Full tuning, as asked, fits on its 4 GPUs of 24 GB: {' '.join(full['flags'])} (or --engine "
    assert named in line
    assert line.index(named) < line.index("The least change that fits") < line.index("--use_peft true")


def test_on_one_gpu_full_tuning_names_the_fewest_gpus_that_fit_it(capsys) -> None:
    """SDXL full tuning on one 24 GB GPU: LoRA is the least change; full tuning is named over the fewest GPUs that fit
    it sharded (one fewer fits on neither engine, with every change that keeps the training at once)."""
    result = estimate_json(capsys, *SDXL_FULL)
    full = result["advice"]["full_tuning"]
    assert full is not None and full["num_processes"] >= 2
    assert estimate_json(capsys, *SDXL_FULL, *full["flags"])["fits"] is True
    if full["num_processes"] > 2:
        for engine in SHARDED_ENGINES:
            fewer = ["--engine", engine, "--num_processes", str(full["num_processes"] - 1), *SAME_TRAINING]
            assert estimate_json(capsys, *SDXL_FULL, *fewer)["fits"] is False, engine
    assert f"Full tuning, as asked, fits over {full['num_processes']} GPUs of 24 GB: " in verdict_line(
        capsys, *SDXL_FULL
    )


def test_no_full_tuning_setting_where_the_least_change_keeps_full_tuning_or_lora_was_asked(capsys) -> None:
    sd15_full = ("--config", str(ROOT / "examples" / "configs" / "sd15_full.yaml"), "--gpu", "24")
    advice = estimate_json(capsys, *sd15_full)["advice"]
    assert "--use_peft" not in advice["flags"] and advice["full_tuning"] is None
    flux = ("--config", str(ROOT / "examples" / "configs" / "flux_lora.yaml"), "--gpu", "24")
    assert estimate_json(capsys, *flux)["advice"]["full_tuning"] is None
    assert "Full tuning" not in verdict_line(capsys, *flux)


def test_a_borrowed_margin_names_its_measurement_beside_the_verdict(capsys) -> None:
    """SDXL full tuning was never measured on a GPU: its verdict plans with the largest error measured, FLUX.2 [klein]
    LoRA's, and says so in the verdict's own sentence (the runs and the result file of that row), before any advice;
    ``--json`` carries the same source."""
    row = max((row for row in MEASURED_ERRORS if not row.bitsandbytes), key=lambda row: row.ratio)
    line = verdict_line(capsys, *SDXL_FULL)
    verdict = line.split(" Full tuning, as asked,")[0]
    assert verdict.startswith("Does not fit a 24 GB GPU: ")
    assert f"plus {(row.ratio - 1) * 100:.0f} %" in verdict
    assert f"borrowed from {row.family} {row.tuning} ({row.runs}; {MEASUREMENTS_FILE})" in verdict
    assert "stable-diffusion-xl full tuning has not been measured on a GPU" in verdict
    source = estimate_json(capsys, *SDXL_FULL)["margin_source"]
    assert source == {
        "percent": round((row.ratio - 1) * 100, 1),
        "borrowed": True,
        "family": row.family,
        "tuning": row.tuning,
        "bitsandbytes_base": False,
        "runs": row.runs,
        "file": MEASUREMENTS_FILE,
    }
    # a family measured on a GPU plans with its own row: not borrowed
    sd15 = ("--config", str(ROOT / "examples" / "configs" / "sd15_full.yaml"), "--gpu", "24")
    own = estimate_json(capsys, *sd15)["margin_source"]
    assert own["borrowed"] is False and (own["family"], own["tuning"]) == ("stable-diffusion", "full tuning")


def test_the_docs_quote_the_sdxl_full_tuning_line_as_printed(capsys) -> None:
    """docs/memory.md's example of the full-tuning setting is the command's line for SDXL full tuning on four 24 GB
    GPUs (the parts it quotes between its ellipses), and the margin it says SDXL full tuning borrows is the one
    planned with."""
    section = (ROOT / "docs" / "memory.md").read_text().split("## When a run does not fit", 1)[1]
    example = next(block for block in section.split("```text")[1:] if "Full tuning, as asked" in block)
    largest = max((row for row in MEASURED_ERRORS if not row.bitsandbytes), key=lambda row: row.ratio)
    assert f"SDXL full tuning plans with FLUX.2 [klein] LoRA's +{(largest.ratio - 1) * 100:.0f} %" in " ".join(
        (ROOT / "docs" / "memory.md").read_text().split()
    )
    assert largest.family == "flux2-klein" and largest.lora
    quoted = " ".join(example.split("```", 1)[0].split())
    printed = verdict_line(capsys, *SDXL_FULL, "--num_processes", "4")
    for part in quoted.split("..."):
        assert part.strip() in printed, part
