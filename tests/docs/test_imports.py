"""Importing the package and asking the command line for help load nothing heavy and print nothing on stderr.

Each check runs a fresh interpreter (this one has long imported torch) and reads back which modules it loaded; the
plain runs' checks, each in a process forked from one interpreter once a user's script has made its imports (that
interpreter itself a child of one that imported the libraries only: ``tests.helpers.fresh_forks``).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import trl_diffusion_sdpo
from tests.helpers import fresh_forks

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


LAZY_PACKAGES = [
    "trl_diffusion_sdpo.demo",
    "trl_diffusion_sdpo.evaluation",
    "trl_diffusion_sdpo_rewards",
    "trl_diffusion_sdpo.callbacks",
    "trl_diffusion_sdpo.data",
    "trl_diffusion_sdpo.engines",
    "trl_diffusion_sdpo.engines.memory",
    "trl_diffusion_sdpo.families",
    "trl_diffusion_sdpo.objectives",
    "trl_diffusion_sdpo.rewards",
    "trl_diffusion_sdpo.safeguards.gradients",
]


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_subpackages_export_every_listed_name(package):
    module = __import__(package, fromlist=["__all__"])
    for name in module.__all__:
        value = getattr(module, name)  # a type alias (data.RewardFn) or a constant resolves as it is named
        assert not (isinstance(value, type) or inspect.isfunction(value)) or value.__name__ == name, (package, name)


def test_the_memory_package_lists_the_estimates_and_the_measured_errors_names():
    from trl_diffusion_sdpo.engines import memory
    from trl_diffusion_sdpo.engines.memory import estimate, measured

    assert sorted(memory.__all__) == sorted([*estimate.__all__, *measured.__all__])


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


# A plain run, as a user's script makes one: the tiny SD pipeline loaded from disk (the test pipelines' builders are
# not imported by the run), LoRA, two optimizer steps, the weights saved; then the package's modules left loaded.
# The script's imports (PLAIN_RUN_IMPORTS) come first, then the run (PLAIN_RUN).
PLAIN_RUN_IMPORTS = """
    import sys
    from datasets import Dataset
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from PIL import Image
    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
"""
PLAIN_RUN = """
    pipeline_dir, output_dir = sys.argv[1], sys.argv[2]
    colours = [(220, 20, 20), (20, 20, 220), (20, 200, 20), (230, 230, 20)]
    rows = [
        {"prompt": f"prompt {i}", "chosen": Image.new("RGB", (32, 32), colours[i]),
         "rejected": Image.new("RGB", (32, 32), colours[3 - i])}
        for i in range(4)
    ]
    args = DiffusionSDPOConfig(
        output_dir=output_dir, resolution=32, per_device_train_batch_size=2, max_steps=2, logging_steps=1,
        use_cpu=True, report_to="none", save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
        safeguard_space=SAFEGUARD_SPACE,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dir)
    trainer = DiffusionSDPOTrainer(pipeline, args=args, train_dataset=Dataset.from_list(rows), peft_config=lora)
    trainer.train()
    trainer.save_model()
"""
# A run's process, as a fresh interpreter is once the script's imports are done: one interpreter imports them, then
# forks one process per job (a job's code run after them), each writing the modules it left loaded. The import costs
# its seconds once for all the jobs; each job's process is the one a fresh interpreter running the imports and then
# that job would be. That interpreter is a child of tests.helpers.fresh_forks's, which imported the libraries the
# script's imports load first (torch, transformers, diffusers, datasets, accelerate, huggingface_hub), printing and
# loading nothing of the package: the modules a job leaves loaded are those of the script's imports and its own.
FORKED_JOBS = """
    import json, os, sys
    IMPORTS
    for code, argv, report in json.loads(sys.argv[1]):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                sys.argv[1:] = argv
                exec(code, globals())
                with open(report, "w") as file:
                    json.dump(sorted(sys.modules), file)
                status = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            sys.exit(f"the job writing {report} failed (wait status {status})")
"""


def run_forked(imports: str, jobs: list[tuple[str, list[str]]], folder: Path) -> list[list[str]]:
    """Each of ``jobs`` (code, its ``sys.argv[1:]``) run in its own process forked from one interpreter that ran
    ``imports`` (a child of ``tests.helpers.fresh_forks``'s): the modules each left loaded, in ``jobs``' order."""
    reports = [str(folder / f"modules-{i}.json") for i in range(len(jobs))]
    listed = [(textwrap.dedent(code), argv, report) for (code, argv), report in zip(jobs, reports, strict=True)]
    script = textwrap.dedent(FORKED_JOBS).replace("IMPORTS\n", textwrap.dedent(imports).lstrip("\n"))
    done = fresh_forks.run(["-c", script, json.dumps(listed)], cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(Path(report).read_text()) for report in reports]


# The safeguard spaces whose runs the tests below make. The lines such a run loads are a figure, not a test's limit:
# benchmarks/tools/loaded_modules.py records them (benchmarks/results/structure/cpu-loaded-modules-tiny-sd.json).
RUN_SPACES = ("none", "parameter")


def module_lines(modules: list[str]) -> dict[str, int]:
    """The package's modules among ``modules``, each with its file's lines (newlines, as ``wc -l`` counts them)."""
    lines = {}
    for name in modules:
        if name.split(".")[0] != "trl_diffusion_sdpo":
            continue
        path = REPO.joinpath(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        lines[name] = path.read_bytes().count(b"\n")
    return lines


@pytest.fixture(scope="module")
def tiny_sd_pipeline_dir(tmp_path_factory) -> Path:
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(folder / "tokenizer")).save_pretrained(folder / "pipeline")
    return folder / "pipeline"


# After the plain runs, a user's family taking a built-in family's name, in a process of its own forked after the
# script's imports (which load no family's module but Stable Diffusion's: the plain run's test below).
TAKE_A_BUILT_IN_NAME = """
    import sys
    from trl_diffusion_sdpo.families import register_family
    from trl_diffusion_sdpo.families.sd import StableDiffusionFamily

    assert "trl_diffusion_sdpo.families.wan" not in sys.modules

    class MyWan(StableDiffusionFamily):
        pass

    try:
        register_family("wan", pipelines=("WanPipeline",))(MyWan)
    except ValueError as error:
        assert "'wan' is already registered" in str(error), error
    else:
        raise AssertionError("a user family took a built-in family's name")
    assert "trl_diffusion_sdpo.families.wan" not in sys.modules
"""


@pytest.fixture(scope="module")
def forked_runs(tiny_sd_pipeline_dir, tmp_path_factory) -> dict[str, list[str]]:
    """Every module left loaded by a plain SD LoRA run with each safeguard space of :data:`RUN_SPACES` (keyed by the
    space) and by the family check (``"family name"``), each job in its own process forked after the script's
    imports."""
    folder = tmp_path_factory.mktemp("runs")
    jobs = [
        (PLAIN_RUN.replace("SAFEGUARD_SPACE", repr(space)), [str(tiny_sd_pipeline_dir), str(folder / f"run-{space}")])
        for space in RUN_SPACES
    ]
    jobs.append((TAKE_A_BUILT_IN_NAME, []))
    found = run_forked(PLAIN_RUN_IMPORTS, jobs, folder)
    return dict(zip([*RUN_SPACES, "family name"], found, strict=True))


@pytest.fixture(scope="module")
def run_modules(forked_runs) -> Callable[..., Any]:
    """``run_modules(safeguard_space)``: the package's modules a plain SD LoRA run with that safeguard space leaves
    loaded, with their lines; ``run_modules(safeguard_space, every=True)``: every module it left loaded, the
    libraries' too (each run made once per module of tests)."""

    def modules_of(safeguard_space: str, every: bool = False) -> dict[str, int] | list[str]:
        modules = forked_runs[safeguard_space]
        return modules if every else module_lines(modules)

    return modules_of


@pytest.fixture(scope="module")
def plain_run_modules(run_modules) -> dict[str, int]:
    """The package's modules a plain Diffusion-DPO SD LoRA run leaves loaded, with their lines."""
    return run_modules("none")


def test_an_sd_run_loads_no_other_familys_objectives_or_engines_module(plain_run_modules):
    from trl_diffusion_sdpo.families.registry import BUILT_IN_FAMILIES
    from trl_diffusion_sdpo.objectives import BUILT_IN_OBJECTIVES

    sd_module = BUILT_IN_FAMILIES["stable-diffusion"][0].partition(":")[0]
    assert sd_module in plain_run_modules
    others = {target.partition(":")[0] for target, _ in BUILT_IN_FAMILIES.values()} - {sd_module}
    assert sorted(others & set(plain_run_modules)) == []
    assert "trl_diffusion_sdpo.families.flow" not in plain_run_modules  # the transformer families' base
    objectives = {target.partition(":")[0]: name for name, target in BUILT_IN_OBJECTIVES.items()}
    assert [name for module, name in objectives.items() if module in plain_run_modules] == ["dpo"]
    assert loaded(list(plain_run_modules), ("trl_diffusion_sdpo.engines.",)) == [
        "trl_diffusion_sdpo.engines.base",
        "trl_diffusion_sdpo.engines.plain",
    ]


def test_a_plain_run_loads_neither_the_notebook_bar_nor_ipython(run_modules):
    """transformers loads its notebook progress bar, and IPython with it, in a notebook only: nor does the trainer's
    own run elsewhere (the console's callbacks count the bar once its module is loaded, tests/io/test_trackers.py)."""
    modules = run_modules("none", every=True)
    assert "transformers.utils.notebook" not in modules and top_level(modules, ("IPython",)) == []


def test_the_exact_rules_passes_load_with_the_exact_rule_only(run_modules):
    """Plain Diffusion-DPO's step is transformers' step running ``compute_loss``: the passes that keep the branches'
    gradients apart load with the parameter space (it runs them) and never with a plain run."""
    passes = "trl_diffusion_sdpo.safeguards.passes"
    assert passes in run_modules("parameter")
    assert passes not in run_modules("none")


def test_a_plain_lora_run_loads_within_its_line_budget(plain_run_modules):
    from tests.helpers.core import LOADED_LINES_LIMITS

    assert sum(plain_run_modules.values()) <= LOADED_LINES_LIMITS["dpo"]


# What a plain SD run in TRL's preference form did not choose: the latent cache (cache_latents), reward functions and
# scoring (reward_funcs; the rewards' names too), the auto-beta (auto_beta), a quantized base, the inversion
# (noising="inversion"), video data and Pick-a-Pic's label form, the EMA weights (ema_decay), the Hub and model cards
# (push_to_hub), the output space's rule (safeguard_space="output", or the parameter space's log_output_lambda); full
# tuning's frozen-copy reference (the run tunes LoRA), editing data and the editing families' sources, loss masks
# (loss_mask), and checkpoint writing and the states a checkpoint holds (save_strategy="no"); the checkpoints' checks
# and recovery, the resume checks and the learning rate changed at resume (no resume_from_checkpoint, an output folder
# without checkpoints), the held-out probe's alarm signal (no probe_steps), the refusals of TRL's names (none given),
# the config's docstring writer (nothing reads the docstring), the command line's choices for the machine (a run
# from Python), full tuning's files (LoRA saved) and the hooks of a frozen module kept in another dtype (float32
# throughout); the random crop (random_crop), the checks of an image given by a path (the rows hold PIL images), a
# streamed dataset's preparation (a map-style one), the placeholder pair of a process whose micro-batch lost every row
# (every row is valid), the loss masks' weights at the latents and on the output space's residuals (no loss_mask),
# what on_pathology does beyond warning (on_pathology="warn") and full tuning's frozen reference copy placed like the
# policy (LoRA). The collectives of several processes: the plain run's engines, below.
UNCHOSEN = (
    "trl_diffusion_sdpo.callbacks.ema",
    "trl_diffusion_sdpo.io.hub",
    "trl_diffusion_sdpo.safeguards.output",
    "trl_diffusion_sdpo.data.latent_cache",
    "trl_diffusion_sdpo.rewards.functions",
    "trl_diffusion_sdpo.data.scoring",
    "trl_diffusion_sdpo.objectives.auto_beta",
    "trl_diffusion_sdpo.families.quantization",
    "trl_diffusion_sdpo.families.inversion",
    "trl_diffusion_sdpo.data.video",
    "trl_diffusion_sdpo.data.pickapic",
    "trl_diffusion_sdpo.data.formats",
    "trl_diffusion_sdpo.step.frozen_reference",
    "trl_diffusion_sdpo.data.editing",
    "trl_diffusion_sdpo.families.editing",
    "trl_diffusion_sdpo.data.masks",
    "trl_diffusion_sdpo.io.checkpoint_writing",
    "trl_diffusion_sdpo.io.resume_check",
    "trl_diffusion_sdpo.io.resume_world",
    "trl_diffusion_sdpo.config.trl_refusals",
    "trl_diffusion_sdpo.config.docs",
    "trl_diffusion_sdpo.callbacks.preemption",
    "trl_diffusion_sdpo.io.trackers",
    "trl_diffusion_sdpo.callbacks.early_stopping",
    "trl_diffusion_sdpo.rewards",
    "trl_diffusion_sdpo.callbacks.state_files",
    "trl_diffusion_sdpo.io.checkpoints",
    "trl_diffusion_sdpo.callbacks.learning_rate",
    "trl_diffusion_sdpo.callbacks.probe_signal",
    "trl_diffusion_sdpo.config.machine",
    "trl_diffusion_sdpo.io.full_tuning",
    "trl_diffusion_sdpo.families.own_dtype",
    "trl_diffusion_sdpo.data.random_crop",
    "trl_diffusion_sdpo.data.image_files",
    "trl_diffusion_sdpo.data.placeholder",
    "trl_diffusion_sdpo.callbacks.pathology_acts",
    "trl_diffusion_sdpo.families.reference_copy",
    "trl_diffusion_sdpo.data.streamed",
    "trl_diffusion_sdpo.families.masks",
    "trl_diffusion_sdpo.objectives.masks",
)


@pytest.mark.parametrize("safeguard_space", list(RUN_SPACES))
def test_a_plain_sd_run_loads_no_module_of_an_option_it_did_not_choose(run_modules, safeguard_space):
    modules = run_modules(safeguard_space)
    assert "trl_diffusion_sdpo.data.training_data" in modules and "trl_diffusion_sdpo.families.sd" in modules
    assert [name for name in UNCHOSEN if name in modules] == []
    assert loaded(list(modules), ("trl_diffusion_sdpo.cli",)) == []  # a run from Python sets up no command line


def test_a_one_process_exact_rule_run_loads_no_other_engines_collectives_or_gradient_store(run_modules):
    """The collectives and stores are chosen by the engine's variant: one process in one pass loads its own, not
    DeepSpeed's or FSDP's (nor their engines), nor the per-branch passes' store it did not fall back to."""
    from trl_diffusion_sdpo.engines import BUILT_IN_ENGINES
    from trl_diffusion_sdpo.safeguards.gradients.collectives import COLLECTIVES, PER_BRANCH_STORE

    modules = run_modules("parameter")
    own = COLLECTIVES["ddp"].partition(":")[0]
    assert own in modules and "trl_diffusion_sdpo.safeguards.gradients.one_pass" in modules
    others = {target.partition(":")[0] for target in COLLECTIVES.values() if isinstance(target, str)} - {own}
    others |= {target.partition(":")[0] for name, target in BUILT_IN_ENGINES.items() if name != "plain"}
    others |= {
        PER_BRANCH_STORE.partition(":")[0],
        "trl_diffusion_sdpo.safeguards.gradients.one_pass_sharded",
        "trl_diffusion_sdpo.safeguards.gradients.zero_partitions",
    }
    assert sorted(others & set(modules)) == []


def test_the_exact_rules_run_loads_the_memory_model_of_its_pieces_and_not_the_estimate(run_modules):
    modules = run_modules("parameter")
    assert "trl_diffusion_sdpo.engines.memory.pieces" in modules
    assert "trl_diffusion_sdpo.engines.memory.estimate" not in modules


@pytest.mark.slow  # a fresh interpreter; by default: test_a_built_in_familys_name_is_taken_before_...
def test_finding_a_flux_pipelines_family_imports_no_other_familys_module(tmp_path):
    from trl_diffusion_sdpo.families.registry import BUILT_IN_FAMILIES

    code = f"""
        from trl_diffusion_sdpo.families import family_for_pipeline
        from trl_diffusion_sdpo.testing import build_tiny_flux_pipeline
        pipeline = build_tiny_flux_pipeline(seed=0, tokenizer_dir={str(tmp_path)!r})
        assert family_for_pipeline(pipeline).name == "flux"
    """
    modules, _ = run_fresh(code)
    family_of_module = {target.partition(":")[0]: name for name, (target, _) in BUILT_IN_FAMILIES.items()}
    assert {family_of_module[m] for m in modules if m in family_of_module} == {"flux"}


def test_a_built_in_familys_name_is_taken_before_its_module_is_imported(forked_runs):
    """In a process that has imported the trainer but not the family's module (``TAKE_A_BUILT_IN_NAME``, its
    asserts), a user's family registered under a built-in family's name is refused, and the module stays unloaded."""
    assert "trl_diffusion_sdpo.families.sd" in forked_runs["family name"]
    assert "trl_diffusion_sdpo.families.wan" not in forked_runs["family name"]
