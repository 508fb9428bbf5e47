"""Importing the package and asking the command line for help load nothing heavy and print nothing on stderr.

Each check runs a fresh interpreter (this one has long imported torch) and reads back which modules it loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import trl_diffusion_sdpo

REPO = Path(__file__).resolve().parents[2]

# Loaded by diffusers' FLUX pipeline and transformers' image processors, they printed torchvision warnings; the
# scorers load CLIP and BLIP models; the demo and evaluation are separate layers the package does not need.
HEAVY_FOR_HELP = (
    "diffusers.pipelines",
    "transformers.models.clip.image_processing",
    "transformers.models.siglip",
    # evaluate --help lists the scorer names and prompt presets (torch-free modules), nothing more of evaluation
    "trl_diffusion_sdpo.rewards.scorers.base",
    "trl_diffusion_sdpo.evaluation.generation",
    "trl_diffusion_sdpo.evaluation.run",
    "trl_diffusion_sdpo.callbacks.validation",
    "trl_diffusion_sdpo.families",
    "trl_diffusion_sdpo.trainer",
)
# The package itself and the parsers that do not read the training config need no deep-learning library at all.
LIBRARIES = ("torch", "transformers", "diffusers", "peft", "accelerate", "datasets", "trl")


def run_fresh(code: str) -> tuple[list[str], str]:
    """Run ``code`` in a new interpreter on this checkout; the modules it left loaded and its stderr."""
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def loaded(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in modules if m.startswith(prefixes)]


def top_level(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in names]


def test_import_loads_no_library_and_prints_nothing():
    modules, stderr = run_fresh("import trl_diffusion_sdpo")
    assert stderr == ""
    assert "trl_diffusion_sdpo" in modules
    assert top_level(modules, LIBRARIES) == []
    # the bottom layer's light modules only: the lazy attributes live in the config package, whose rules import
    # nothing heavy (the check above)
    assert sorted(m for m in modules if m.startswith("trl_diffusion_sdpo.")) == [
        "trl_diffusion_sdpo.config",
        "trl_diffusion_sdpo.config._lazy",
        "trl_diffusion_sdpo.config.checks",
        "trl_diffusion_sdpo.config.rules",
    ]


def test_top_level_help_and_light_subcommands_load_no_library_and_print_nothing():
    code = """
        import contextlib, io
        from trl_diffusion_sdpo.cli.main import main
        for argv in (["--help"], ["demo", "--help"], ["evaluate", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
                main(argv)
            assert "usage:" in out.getvalue(), argv
    """
    modules, stderr = run_fresh(code)
    assert stderr == ""
    assert top_level(modules, LIBRARIES) == []
    assert loaded(modules, HEAVY_FOR_HELP + ("trl_diffusion_sdpo.demo.run", "trl_diffusion_sdpo.demo.pretrain")) == []


def test_train_and_cache_help_load_no_pipeline_family_or_scorer_and_print_nothing():
    # Their parsers read the training config, a transformers TrainingArguments: transformers is loaded, its
    # pipelines and image processors are not.
    code = """
        import contextlib, io
        from trl_diffusion_sdpo.cli.main import main
        for argv in (["train", "--help"], ["cache", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
                main(argv)
            assert "--safeguard_mu" in out.getvalue() and "--learning_rate" in out.getvalue(), argv
    """
    modules, stderr = run_fresh(code)
    assert stderr == ""
    assert "transformers.training_args" in modules
    assert loaded(modules, HEAVY_FOR_HELP + ("trl_diffusion_sdpo.demo", "trl_diffusion_sdpo.data")) == []
    # TRL's get_peft_config (trl.trainer.utils) is imported when training starts: it loads pandas, datasets and rich
    assert "trl.trainer.utils" not in modules
    assert top_level(modules, ("pandas", "datasets", "rich", "matplotlib")) == []


# The reward-model ports (a distribution of their own), the core's CLIP scorers and the figures: evaluation's, never
# the trainer's.
PORTS = ("trl_diffusion_sdpo_rewards",) + tuple(
    f"trl_diffusion_sdpo.rewards.scorers.{name}" for name in ("_clip", "pickscore", "clip_score")
)


@pytest.mark.slow  # a fresh interpreter; the help commands' import check above stays in the default suite
def test_the_trainer_and_the_train_command_load_no_reward_model_port_and_no_matplotlib():
    code = """
        import trl_diffusion_sdpo
        trl_diffusion_sdpo.DiffusionSDPOTrainer, trl_diffusion_sdpo.OnlineDiffusionSDPOTrainer
        from trl_diffusion_sdpo.cli import train, online  # noqa: F401
    """
    modules, _ = run_fresh(code)
    assert "trl_diffusion_sdpo.trainer" in modules and "trl_diffusion_sdpo.cli.train" in modules
    assert loaded(modules, PORTS) == [] and top_level(modules, ("matplotlib",)) == []


@pytest.mark.slow  # a fresh interpreter; the default suite checks the demo and plots stay out of the trainer's imports
def test_without_matplotlib_the_demo_fails_before_training_naming_the_plots_extra(tmp_path):
    # matplotlib is the `plots` extra's, not a core dependency: None in sys.modules is how a missing one imports.
    code = f"""
        import sys
        sys.modules["matplotlib"] = None
        from trl_diffusion_sdpo.demo import run_demo
        for attempt in (lambda: run_demo({str(tmp_path)!r}), lambda: __import__("trl_diffusion_sdpo.demo.plots")):
            try:
                attempt()
            except ImportError as error:
                assert 'pip install "trl-diffusion-sdpo[plots]"' in str(error), error
                assert "The demo's figures: matplotlib is not installed" in str(error), error
            else:
                raise AssertionError("no ImportError")
    """
    run_fresh(code)
    assert list(tmp_path.iterdir()) == []  # failed before the base model or any run


def test_scorer_names_are_listed_without_loading_their_models():
    code = """
        from trl_diffusion_sdpo.rewards.scorers import available_scorers
        names = available_scorers()
        ports = {"hpsv2", "hpsv2.1", "hpsv3", "imagereward", "aesthetic", "editreward"}
        assert {"pickscore", "clip", "clip-cosine"} | ports <= set(names)
        assert "colour" not in names  # the demo registers it, evaluation never imports the demo
    """
    modules, stderr = run_fresh(code)
    assert stderr == ""
    assert top_level(modules, LIBRARIES + ("trl_diffusion_sdpo_rewards",)) == []  # torch-free, no port imported
    assert loaded(modules, ("trl_diffusion_sdpo.demo", "trl_diffusion_sdpo.rewards.scorers.")) == [
        "trl_diffusion_sdpo.rewards.scorers.registry"
    ]


def test_importing_the_ports_package_loads_no_model_code():
    modules, stderr = run_fresh("import trl_diffusion_sdpo_rewards")
    assert stderr == "" and top_level(modules, LIBRARIES) == []
    assert loaded(modules, ("trl_diffusion_sdpo",)) == ["trl_diffusion_sdpo_rewards"]


def test_every_public_name_resolves_to_its_defining_object():
    from trl_diffusion_sdpo.config import DiffusionSDPOConfig
    from trl_diffusion_sdpo.rewards.scorers.base import register_scorer
    from trl_diffusion_sdpo.safeguards.output import winner_preserving_lambda

    for name in trl_diffusion_sdpo.__all__:
        assert getattr(trl_diffusion_sdpo, name) is not None, name
    assert set(trl_diffusion_sdpo.__all__) <= set(dir(trl_diffusion_sdpo))
    assert trl_diffusion_sdpo.DiffusionSDPOConfig is DiffusionSDPOConfig
    assert trl_diffusion_sdpo.winner_preserving_lambda is winner_preserving_lambda
    assert trl_diffusion_sdpo.register_scorer is register_scorer
    with pytest.raises(AttributeError, match="no attribute 'DiffusionSDPOTrainerr'"):
        trl_diffusion_sdpo.DiffusionSDPOTrainerr  # noqa: B018


@pytest.mark.parametrize(
    "package", ["trl_diffusion_sdpo.demo", "trl_diffusion_sdpo.evaluation", "trl_diffusion_sdpo_rewards"]
)
def test_lazy_subpackages_export_every_listed_name(package):
    module = __import__(package, fromlist=["__all__"])
    for name in module.__all__:
        value = getattr(module, name)
        assert getattr(value, "__name__", name) == name or not callable(value), (package, name)


def test_built_in_scorers_resolve_to_their_classes_and_the_demo_registers_colour():
    from trl_diffusion_sdpo.demo.scorer import ColourRewardScorer
    from trl_diffusion_sdpo.rewards.scorers import build_scorer, scorer_factory
    from trl_diffusion_sdpo.rewards.scorers.base import register_scorer
    from trl_diffusion_sdpo.rewards.scorers.pickscore import PickScoreScorer
    from trl_diffusion_sdpo_rewards.hps import HPSv2Scorer, hps_v21_scorer

    assert scorer_factory("pickscore") is PickScoreScorer
    assert scorer_factory("hpsv2") is HPSv2Scorer and scorer_factory("hpsv2.1") is hps_v21_scorer
    assert scorer_factory("colour") is ColourRewardScorer
    assert isinstance(build_scorer("colour"), ColourRewardScorer)
    with pytest.raises(ValueError, match="package.module:attribute"):
        register_scorer("test-bad-name", "no_colon_here")
