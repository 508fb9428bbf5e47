"""``estimate-memory`` answers from its stored option table and model counts with the output the real parser and the
model built on the meta device give (the full text, and the JSON), imports neither transformers nor diffusers doing
so, and leaves what the stored tables do not hold (a local folder, a refusal, a resolution not stored) to the slow
path, which says the same as before."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trl_diffusion_sdpo.cli import memory

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"


def outputs(capsys, argv: list[str]) -> tuple[str, str]:
    """What the command prints from the stored tables, and from the real parser and the meta-device model."""
    assert memory._stored_answer(argv) is not None, "the stored path must answer this run"
    texts = []
    for stored in (True, False):
        assert memory.run_estimate_memory(argv, stored=stored) == 0
        texts.append(capsys.readouterr().out)
    return texts[0], texts[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", str(CONFIGS / "sd15_lora.yaml")],  # a UNet that fits
        pytest.param(  # a UNet's advice: meta forwards per change on the slow path
            ["--config", str(CONFIGS / "sdxl_full.yaml"), "--gpu", "24"], marks=pytest.mark.slow
        ),
        ["--config", str(CONFIGS / "flux_lora.yaml"), "--gpu", "24", "--json"],  # a transformer's advice
        ["--config", str(CONFIGS / "wan_lora.yaml"), "--engine", "zero3", "--num_processes", "4"],  # video frames
    ],
)
def test_stored_answer_is_the_meta_devices(capsys, argv):
    stored, slow = outputs(capsys, argv)
    assert stored == slow and "total" in stored


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("online")))
@pytest.mark.parametrize("flags", [["--gpu", "24"], ["--gpu", "48", "--optim", "adafactor"], ["--json"]])
def test_every_shipped_config_answers_the_same_from_the_stored_tables(capsys, config, flags):
    argv = ["--config", str(CONFIGS / f"{config}.yaml"), *flags]
    if memory._stored_answer(argv) is None:
        pytest.skip(f"{config}: not a known Hub pipeline (read from its folder)")
    stored, slow = outputs(capsys, argv)
    assert stored == slow


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", str(CONFIGS / "tiny_cpu.yaml")],  # a shipped local model: read from its folder
        ["--config", str(CONFIGS / "sd15_lora.yaml"), "--resolution", "520"],  # a UNet resolution not stored
        ["--config", str(CONFIGS / "sd15_lora.yaml"), "--lora_target_modules", "to_q", "to_v"],  # other targets
        ["--config", str(CONFIGS / "flux_lora.yaml"), "--gpu", "0"],  # refused
    ],
)
def test_what_the_stored_tables_do_not_hold_goes_the_slow_way(argv):
    assert memory._stored_answer(argv) is None


def test_a_refusal_reads_the_same_as_before(capsys):
    """A typo leaves the stored path: the real parser refuses it, with the closest option, as it did."""
    argv = ["--config", str(CONFIGS / "flux_lora.yaml"), "--gpuu", "24"]
    errors = []
    for stored in (True, False):
        with pytest.raises(SystemExit) as exit_info:
            memory.run_estimate_memory(argv, stored=stored)
        assert exit_info.value.code == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and "--gpu" in errors[0]


def test_stored_answer_imports_no_transformers_or_diffusers():
    code = (
        "import sys\n"
        "from trl_diffusion_sdpo.cli.main import main\n"
        f"status = main(['estimate-memory', '--config', {str(CONFIGS / 'sdxl_lora.yaml')!r}, '--gpu', '24'])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'diffusers', 'trl', 'peft'})\n"
        "print('IMPORTED', heavy, status)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "IMPORTED [] 0" in done.stdout, done.stdout + done.stderr
    assert "Fits a 24 GB GPU" in done.stdout or "Does not fit a 24 GB GPU" in done.stdout


def test_the_stored_tables_ship_in_the_wheel():
    """The package data setuptools reads from pyproject.toml holds both stored files: an installed command answers
    from them too."""
    import fnmatch
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    from trl_diffusion_sdpo.cli.option_table import OPTION_FILE
    from trl_diffusion_sdpo.engines.memory.stored import STORED_FILE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = apply_configuration(Distribution(), ROOT / "pyproject.toml").package_data
    for path in (OPTION_FILE, STORED_FILE):
        package = ".".join(path.parent.relative_to(ROOT).parts)
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in data.get(package, ())), (package, path.name)


def test_a_compiled_run_of_the_exact_rule_is_planned_with_the_per_branch_passes_buffer(capsys):
    """Under ``torch_compile`` the exact rule runs its per-branch passes (the one pass's taps break the graph), so
    the estimate's safeguard term is theirs: one gradient-sized float32 buffer, as with ``safeguard_passes="two"``."""
    import json

    def total(*extra: str) -> float:
        argv = ["--config", str(CONFIGS / "sd15_full.yaml"), "--safeguard_space", "parameter", "--json", *extra]
        assert memory.run_estimate_memory(argv) == 0
        return json.loads(capsys.readouterr().out)["total_gib"]

    one_pass, per_branch, compiled = total(), total("--safeguard_passes", "two"), total("--torch_compile", "true")
    assert compiled == per_branch != one_pass


def test_a_compiled_update_space_under_deepspeed_is_planned_with_the_one_pass(capsys):
    """The update space under DeepSpeed keeps the tapped one pass compiled (its per-branch passes would leave the
    winner's gradient inside the engine), so its estimate is the one pass's; under DDP compiled, the per-branch
    passes'."""
    import json

    def total(engine: str, *extra: str) -> float:
        argv = ["--config", str(CONFIGS / "sd15_full.yaml"), "--safeguard_space", "update", "--engine", engine]
        # pairs enough that the activations' peak, where the one pass and the per-branch passes differ, sets the
        # estimate (after the backward the search's float32 copies of the gradients are the same for both)
        argv += ["--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "32"]
        assert memory.run_estimate_memory([*argv, "--num_processes", "2", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["total_gib"]

    for engine in ("zero1", "zero2", "zero3"):
        assert total(engine, "--torch_compile", "true") == total(engine) != total(engine, "--safeguard_passes", "two")
    assert total("ddp", "--torch_compile", "true") == total("ddp", "--safeguard_passes", "two") != total("ddp")


def test_the_estimates_compiled_update_space_follows_each_engines_collectives():
    """``estimate-memory`` restates which engines keep the update space's one pass when compiled; the collectives
    decide it (``two_pass_update_space``): each engine it names plans as its collectives run."""
    from types import SimpleNamespace

    from trl_diffusion_sdpo.cli.memory_report import _safeguard
    from trl_diffusion_sdpo.config._lazy import import_target
    from trl_diffusion_sdpo.engines.memory import ENGINES
    from trl_diffusion_sdpo.safeguards.gradients.collectives import COLLECTIVES

    variant = {"ddp": "ddp", "zero1": "deepspeed", "zero2": "deepspeed", "zero3": "deepspeed-zero3", "fsdp2": "fsdp2"}
    assert set(variant) == set(ENGINES)
    args = SimpleNamespace(safeguard_space="update", safeguard_passes="one", torch_compile=True)
    for engine, name in variant.items():
        per_branch = import_target(COLLECTIVES[name]).two_pass_update_space
        assert _safeguard(args, engine) == ("two_pass" if per_branch else "one_pass"), engine
