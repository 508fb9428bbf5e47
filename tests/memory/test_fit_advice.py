"""``estimate-memory``'s advice: a run that does not fit names flags that, given to the command's own parser and
estimated again, fit; no smaller part of them does; a run that fits gets none; and the sentence of a family with no GPU
measurement names the measured row it plans with, without contradicting itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trl_diffusion_sdpo.cli.memory import run_estimate_memory
from trl_diffusion_sdpo.engines.memory import MEASURED_ERRORS, planning_error
from trl_diffusion_sdpo.engines.memory.advice import CHANGES
from trl_diffusion_sdpo.engines.memory.measured import MEASUREMENTS_FILE

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"


def estimate_json(capsys, *argv: str) -> dict:
    assert run_estimate_memory([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def listed_options(capsys) -> set[str]:
    """The words of the command's ``--help_all``, which lists every option (a plain ``--help`` lists a first run's)."""
    with pytest.raises(SystemExit) as done:
        run_estimate_memory(["--help_all"])
    assert done.value.code == 0
    return set(capsys.readouterr().out.split())


def changes_of(flags: list[str]) -> list[tuple[str, ...]]:
    """The advised flags cut into changes: an option with its value (the batch's two options together)."""
    pairs = [tuple(flags[i : i + 2]) for i in range(0, len(flags), 2)]
    changes: list[tuple[str, ...]] = []
    for pair in pairs:
        if (
            pair[0] == "--gradient_accumulation_steps"
            and changes
            and changes[-1][0] == "--per_device_train_batch_size"
        ):
            changes[-1] = (*changes[-1], *pair)
        else:
            changes.append(pair)
    return changes


def check_advice_fits_and_is_minimal(capsys, run: tuple[str, ...]) -> list[str]:
    """The advice of ``run`` (which does not fit): its flags fit when the command parses and estimates them again,
    and leaving out any one of its changes does not fit."""
    result = estimate_json(capsys, *run)
    assert result["fits"] is False
    advice = result["advice"]
    assert advice is not None and advice["flags"], advice
    options = listed_options(capsys)
    assert all(flag in options for flag in advice["flags"] if flag.startswith("--")), advice["flags"]
    again = estimate_json(capsys, *run, *advice["flags"])
    assert again["fits"] is True and again["gpu_gb"] == result["gpu_gb"] and again["advice"] is None
    assert again["total_gib"] == pytest.approx(advice["total_gib"], abs=1e-3)
    assert again["planned_gib"] == pytest.approx(advice["planned_gib"], abs=1e-3)
    changes = changes_of(advice["flags"])
    for left_out in range(len(changes)):
        rest = [word for i, change in enumerate(changes) if i != left_out for word in change]
        assert estimate_json(capsys, *run, *rest)["fits"] is False, (changes[left_out], "is not needed")
    return advice["flags"]


def test_flux_lora_on_24_gb_names_a_latent_cache_and_an_8_bit_base(capsys) -> None:
    """FLUX.1 LoRA plans 42.5 GiB against 24 GB; a latent cache alone (30.7 GiB planned) and an 8-bit base alone do
    not fit, the two together do (12.8 GiB, 16.4 planned), before any 4-bit base or a change of the model trained."""
    run = ("--config", str(CONFIGS / "flux_lora.yaml"), "--gpu", "24")
    flags = check_advice_fits_and_is_minimal(capsys, run)
    assert sorted(changes_of(flags)) == [("--base_quantization", "quanto-int8"), ("--cache_latents", "true")]
    # the human verdict is still one line, the advice its second sentence
    assert run_estimate_memory(list(run)) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("Does not fit a 24 GB GPU: ")
    assert f"The least change that fits a 24 GB GPU: {' '.join(flags)} (" in line


def test_sd3_full_tuning_on_80_gb_takes_a_latent_cache_before_an_8_bit_optimizer(capsys) -> None:
    """SD3.5 Medium full tuning plans 67.9 GiB against 67.1 usable: either change fits, the latent cache changes no
    number."""
    run = ("--config", str(CONFIGS / "sd3_full.yaml"), "--gpu", "80")
    assert estimate_json(capsys, *run, "--optim", "adamw_torch_8bit")["fits"] is True  # a change that also fits
    flags = check_advice_fits_and_is_minimal(capsys, run)
    assert changes_of(flags) == [("--cache_latents", "true")]


@pytest.mark.slow
def test_sd15_full_tuning_on_24_gb_fits_with_changes_that_only_slow_a_step(capsys) -> None:
    """SD1.5 full tuning plans 21.8 GiB against 20.1 usable: a change that keeps the same numbers (a latent cache,
    checkpointing, fewer pairs per micro-batch) comes before an 8-bit optimizer."""
    flags = check_advice_fits_and_is_minimal(capsys, ("--config", str(CONFIGS / "sd15_full.yaml"), "--gpu", "24"))
    assert {change[0] for change in changes_of(flags)} <= {
        "--cache_latents",
        "--activation_checkpointing",
        "--per_device_train_batch_size",
    }


def test_a_run_that_fits_gets_no_advice(capsys) -> None:
    run = ("--config", str(CONFIGS / "qwen_image_lora.yaml"), "--base_quantization", "quanto-int4")
    result = estimate_json(capsys, *run, "--cache_latents", "true", "--gpu", "24")
    assert result["fits"] is True and result["advice"] is None
    assert run_estimate_memory([*run, "--cache_latents", "true", "--gpu", "24"]) == 0
    assert "least change" not in capsys.readouterr().out
    # without --gpu, the smallest card that fits is named: no advice either
    assert estimate_json(capsys, *run)["advice"] is None


def test_a_run_no_change_fits_says_so(capsys) -> None:
    """FLUX.2 [dev] full tuning (650 GiB) fits 24 GB with no combination of the changes."""
    run = ("--config", str(CONFIGS / "flux2_lora.yaml"), "--use_peft", "false", "--gpu", "24")
    result = estimate_json(capsys, *run)
    assert result["fits"] is False and result["advice"]["flags"] is None
    assert result["advice"]["margin_gib"] < 0
    assert run_estimate_memory(list(run)) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"No combination of {', '.join(CHANGES)} makes it fit a 24 GB GPU." in line
    options = listed_options(capsys)
    assert set(CHANGES) <= options


def test_the_sentence_of_a_family_with_a_gpu_measurement_cites_its_runs() -> None:
    for row in MEASURED_ERRORS:
        error = planning_error(row.family, row.lora, row.bitsandbytes)
        text = error.describe(row.family, row.lora)
        assert error.ratio == row.ratio and row.runs in text and f"{row.family} {row.tuning}" in text
        assert MEASUREMENTS_FILE in text
        assert "not been measured" not in text and "largest" not in text


@pytest.mark.parametrize("bitsandbytes", [False, True])
def test_the_sentence_of_a_family_without_one_names_the_measured_row_it_plans_with(bitsandbytes: bool) -> None:
    """The largest ratio of the same kind of base, and the family and tuning it was measured on; the family asked
    about is said to have no measurement, and nowhere to have one."""
    largest = max((row for row in MEASURED_ERRORS if row.bitsandbytes == bitsandbytes), key=lambda row: row.ratio)
    error = planning_error("flux", True, bitsandbytes)
    text = error.describe("flux", True)
    assert error.ratio == largest.ratio
    assert f"the largest error measured on a GPU, borrowed from {largest.family} {largest.tuning}" in text
    assert f"({largest.runs}; {MEASUREMENTS_FILE})" in text  # the measurement it is borrowed from, and its file
    assert text.endswith("flux LoRA has not been measured on a GPU")
    assert text.count("flux LoRA") == 1  # the family asked about is not named as the measured one
    assert ("bitsandbytes" in text) is bitsandbytes
