"""The README as a new user reads it: its quick commands run as written, its links resolve, its "which setting"
block is the text generated from the paired comparison, and the defaults, the shipped configs and the examples agree
with that text."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.log_checks import assert_plain

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def _commands(block: str) -> list[str]:
    """A shell block's commands: comments dropped, continuation lines joined."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split("  #", 1)[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _env() -> dict[str, str]:
    # subprocesses import this checkout, not another installed copy
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


# -- the first lines: the two commands --------------------------------------------------------------------------------


def test_the_readme_opens_with_the_demo_and_the_test_command_and_ci_runs_the_latter() -> None:
    """The first block holds the install-and-demo command and the install-and-test command; ``.ci/run`` runs the
    latter's steps in order (``python -m pip`` for ``pip``, quietly)."""
    demo, tests = _commands(_blocks(README, "bash")[0])
    install = 'pip install torch==2.13.0 && pip install -e ".[plots]"'
    assert demo == f"{install} && trl-diffusion-sdpo demo --output-dir demo-output"
    # dev includes the rewards extra, whose distribution pip takes from rewards/ when it is named beside
    install = 'pip install torch==2.13.0 && pip install -e ".[dev]" -e ./rewards'
    assert tests == f"{install} && python -m pytest -q -n 2 --dist worksteal"
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.startswith(("python", "pip")) and not line.startswith("python -c")
    ]
    normalise = [re.sub(r"^python -m pip install --quiet ", "pip install ", line) for line in ci]
    assert normalise == [step.strip() for step in tests.split("&&")]


def test_plain_pytest_needs_no_xdist_and_the_test_command_names_its_workers() -> None:
    """``pyproject.toml``'s addopts hold no pytest-xdist option (``pytest`` runs where xdist is not installed); the
    README's test command, CI's, asks for the two workers itself."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    addopts = shlex.split(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    )
    xdist_options = {"-n", "--numprocesses", "--dist", "-d", "--tx", "--maxprocesses"}
    assert not [a for a in addopts if a.split("=")[0] in xdist_options or re.fullmatch(r"-n\d+", a)], addopts
    tests = _commands(_blocks(README, "bash")[0])[1]
    assert tests.endswith("python -m pytest -q -n 2 --dist worksteal")


def test_the_demo_command_installs_the_extra_its_figures_need_and_dev_installs_every_extra() -> None:
    """matplotlib is the ``plots`` extra's, not a core dependency; the README's demo line installs that extra, and
    ``dev`` (the test command's) holds every extra's requirements, so the suite exercises each optional part."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda requirements: {re.split(r"[<>=\[ ]", r, maxsplit=1)[0] for r in requirements}  # noqa: E731
    assert "matplotlib" not in names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert "matplotlib" in names(extras["plots"])
    demo = _commands(_blocks(README, "bash")[0])[0]
    assert '".[plots]"' in demo
    for extra, requirements in extras.items():
        assert names(requirements) <= names(extras["dev"]), extra


# -- the quick commands, run as written -------------------------------------------------------------------------------


# Slow (about 100 s on 2 loaded cores): the API trains in many default tests, and the README's train and export
# commands run as written in the default suite below.
@pytest.mark.slow
def test_the_python_example_runs_as_written_and_its_lora_reloads(tmp_path: Path) -> None:
    """The README's Python block, unchanged, in an empty folder: it trains the shipped tiny base for the steps its
    own text sets, saves the LoRA, reloads it and samples an image."""
    (example,) = _blocks(README, "python")
    assert re.search(r"max_steps=(\d+)", example) and int(re.search(r"max_steps=(\d+)", example)[1]) <= 20
    script = tmp_path / "example.py"
    script.write_text(example)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Its output goes to a pipe, not a terminal: the trainer prints each training log as a line of its own, no bar
    # redrawn around it (diffusers' loading and sampling bars are the script's: the package leaves them as they are).
    logs = [line for line in proc.stdout.split("\n") if "'loss':" in line]
    assert logs and all(line.startswith("{") and "\r" not in line for line in logs), proc.stdout[-3000:]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "tiny-sdpo-python" / "pytorch_lora_weights.safetensors")
    assert weights and all("lora" in key for key in weights)
    from PIL import Image

    with Image.open(tmp_path / "red.png") as image:
        assert image.size == (32, 32)


def test_the_train_help_command_runs_as_written() -> None:
    line = next(
        c for b in _blocks(README, "bash") for c in _commands(b) if c.startswith("trl-diffusion-sdpo train --help")
    )
    argv = shlex.split(line)
    proc = subprocess.run(
        [sys.executable, "-m", "trl_diffusion_sdpo", *argv[1:]],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: trl-diffusion-sdpo train" in proc.stdout and "--safeguard_mu" in proc.stdout


def _pair_folder(root: Path, pairs: int = 4) -> None:
    """The README's pair-folder layout: NNNN/chosen.png, NNNN/rejected.png, NNNN/prompt.txt."""
    from PIL import Image

    colours = ("red", "blue", "green", "yellow")
    for i in range(pairs):
        folder = root / f"{i + 1:04d}"
        folder.mkdir(parents=True)
        asked, other = colours[i % 4], colours[(i + 1) % 4]
        Image.new("RGB", (32, 32), asked).save(folder / "chosen.png")
        Image.new("RGB", (32, 32), other).save(folder / "rejected.png")
        (folder / "prompt.txt").write_text(f"a {asked} square")


def _run_as_written(line: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a README ``trl-diffusion-sdpo ...`` command line as written, in ``cwd``, and require it to succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", "trl_diffusion_sdpo", *shlex.split(line)[1:]],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{line}\n{proc.stderr[-4000:]}"
    assert_plain(proc.stdout + proc.stderr, line)  # captured, not a terminal: no progress bars
    return proc


# Three fresh interpreters: slow tier. By default the same commands' code runs in test_examples.py (train, and the
# resume flag's value), test_checkpoints.py (a resume with resume_from_checkpoint=True), test_export.py (export)
# and test_log_files.py (train and export as commands, their output plain).
@pytest.mark.slow
def test_the_offline_commands_run_as_written_on_a_pair_folder(tmp_path: Path) -> None:
    """The tiny-base train command (on a pair folder laid out as the README shows) and the export command, as
    written, from the repository root's relative paths."""
    commands = [c for b in _blocks(README, "bash") for c in _commands(b)]
    train = next(c for c in commands if "tiny_cpu.yaml" in c)
    resume = next(c for c in commands if "tiny_cpu.yaml" in c and "--resume_from_checkpoint" in c)
    export = next(c for c in commands if c.startswith("trl-diffusion-sdpo export"))
    _pair_folder(tmp_path / "my-pairs")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "trl_diffusion_sdpo").symlink_to(ROOT / "trl_diffusion_sdpo")
    runs = [_run_as_written(line, tmp_path) for line in (train, resume, export)]
    assert (tmp_path / "tiny-sdpo" / "pytorch_lora_weights.safetensors").is_file()
    # the resume line went on from the first run's newest checkpoint (step 20) to its own max_steps
    assert "checkpoint-20" in runs[1].stdout + runs[1].stderr
    state = json.loads((tmp_path / "tiny-sdpo" / "checkpoint-30" / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    assert (tmp_path / "tiny.safetensors").stat().st_size > 0


def test_the_readmes_runs_write_separate_folders() -> None:
    """Followed in order in one folder, the Python example and the train command each start a new run: one into the
    other's output folder would be refused (it would replace that run's weights)."""
    (example,) = _blocks(README, "python")
    python_dir = re.search(r'output_dir="([^"]+)"', example)[1]
    commands = [c for b in _blocks(README, "bash") for c in _commands(b)]
    train = shlex.split(next(c for c in commands if "tiny_cpu.yaml" in c))
    assert python_dir != train[train.index("--output_dir") + 1]


# the shipped config trains online by default in test_online_cli.py; here the command as written runs in a fresh
# interpreter (slow tier)
@pytest.mark.slow
@pytest.mark.parametrize(
    "override",
    [
        # the command and its config's paths, as written, for 2 of the config's 30 steps (a flag overrides the config,
        # as the README says), and all 30
        " --max_steps 2",
        "",
    ],
    ids=["2-steps", "as-written"],
)
def test_the_online_command_runs_as_written(tmp_path: Path, override: str) -> None:
    """The online command on the shipped config, as written, from the repository root's relative paths."""
    commands = [c for b in _blocks(README, "bash") for c in _commands(b)]
    online = next(c for c in commands if c.startswith("trl-diffusion-sdpo online"))
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    _run_as_written(online + override, tmp_path)
    assert (tmp_path / "tiny-cpu-online-sdpo" / "pytorch_lora_weights.safetensors").is_file()
    assert "reward_funcs" in (tmp_path / "tiny-cpu-online-sdpo" / "README.md").read_text()


# -- links ------------------------------------------------------------------------------------------------------------


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    headings = re.findall(r"^#+ (.*)$", text, flags=re.MULTILINE)
    explicit = {m for h in headings for m in re.findall(r"\{#([\w-]+)\}", h)}
    return explicit | {
        re.sub(r"[^\w\- ]", "", re.sub(r"\{#.*\}", "", h).strip().lower()).replace(" ", "-") for h in headings
    }


def test_every_relative_link_of_the_readme_resolves() -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", README, flags=re.DOTALL))
    assert len(links) >= 10
    broken = []
    for link in links:
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        if not target.exists():
            broken.append(link)
        elif anchor and anchor not in _anchors(target):
            broken.append(link)
    assert not broken, broken


def test_the_supported_models_table_lists_each_family_once_with_an_existing_config_and_page() -> None:
    table = README.split("## Supported models", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| family")]
    families = [row.split("|")[1].strip() for row in rows]
    pages = [re.search(r"\]\((docs/[\w.]+)\)", row)[1] for row in rows]
    assert len(set(families)) == len(families) and len(set(pages)) == len(pages), (families, pages)
    configs = [name for row in rows for name in re.findall(r"`([\w.]+\.yaml)`", row)]
    assert len(set(configs)) == len(configs)
    missing = [name for name in configs if not (ROOT / "examples" / "configs" / name).is_file()]
    assert not missing, missing
    # every shipped model config is in the table (the tiny CPU ones are the command-line section's)
    shipped = {p.name for p in (ROOT / "examples" / "configs").glob("*.yaml")} - {
        "tiny_cpu.yaml",
        "online_tiny_cpu.yaml",
    }
    assert shipped == set(configs)


# -- "which setting should I use": one generated text -----------------------------------------------------------------


# The shipped file's text, rendered from its rows by benchmarks/studies/recommendation.py (whose own tests are beside
# it); these read the file and the pages as they are. docs/safeguard.md's block: tests/docs/test_docs.py.
SHIPPED = ROOT / "trl_diffusion_sdpo" / "demo" / "safeguard_recommendation.json"
START, END = "<!-- recommendation:start -->", "<!-- recommendation:end -->"


def _shipped() -> dict:
    return json.loads(SHIPPED.read_text())


def _recommended() -> tuple[str, float]:
    """The default the shipped text names: its first line's ``safeguard_space`` and ``safeguard_mu``."""
    first = _shipped()["text"].splitlines()[0]
    return re.search(r'safeguard_space="(\w+)"', first)[1], float(re.search(r"safeguard_mu=([\d.]+)", first)[1])


def _authors_mu() -> set[float]:
    """The authors' values the shipped text lists (its line "- The authors' values: ...")."""
    line = next(line for line in _shipped()["text"].splitlines() if line.startswith("- The authors' values"))
    return {float(mu) for mu in re.findall(r"([\d.]+) for ", line)}


def test_the_readme_block_is_the_shipped_text_with_its_evidence_as_a_link() -> None:
    block = README.split(START, 1)[1].split(END, 1)[0].strip("\n").splitlines()
    text = _shipped()["text"].splitlines()
    assert block[:-1] == text[:-1], "README's block differs: run python benchmarks/studies/recommendation.py"
    assert block[-1].startswith("- Evidence:") and "[the safeguard](docs/safeguard.md)" in block[-1]


def _comparison() -> dict:
    return json.loads((ROOT / _shipped()["source"]).read_text())


def _independent_choice() -> tuple[str, dict, dict]:
    """From the comparison's result file itself (not the shipped rows): the safeguards whose 10-seed paired reward
    difference from Diffusion-DPO at lr 2e-4, 200 steps has an interval above 0, and of those the one whose mean
    difference at lr 2e-5, 200 steps is highest; its two differences."""
    settings = {(s["learning_rate"], s["steps"]): s for s in _comparison()["settings"].values()}
    sick, healthy = settings[(2e-4, 200)]["methods"], settings[(2e-5, 200)]["methods"]
    pays = [
        key
        for key, entry in sick.items()
        if key != "dpo" and entry["reward_minus_dpo_by_step"]["200"]["ci95"][0] > 0 and key in healthy
    ]
    best = max(pays, key=lambda k: healthy[k]["reward_minus_dpo_by_step"]["200"]["mean"])
    return best, sick[best]["reward_minus_dpo_by_step"]["200"], healthy[best]["reward_minus_dpo_by_step"]["200"]


def _cell(found: dict) -> str:
    return "{:+.3f} [{:+.3f}, {:+.3f}]".format(found["mean"], *found["ci95"])


def test_the_default_it_names_is_the_cheapest_insurance_in_the_comparison() -> None:
    key, sick, healthy = _independent_choice()
    first = _shipped()["text"].splitlines()[0]
    assert _cell(sick) in first and _cell(healthy) in first
    label = _comparison()["settings"]["lr0.0002-beta5000-200steps"]["methods"][key]["label"]
    space, mu = re.match(r"(\w+) space, mu=([\d.]+)$", label).groups()
    assert f'safeguard_space="{space}"' in first and f"safeguard_mu={float(mu):g}" in first


def test_the_update_space_line_quotes_the_comparison() -> None:
    settings = {(s["learning_rate"], s["steps"]): s for s in _comparison()["settings"].values()}
    line = _shipped()["text"].splitlines()[2]
    for lr in (2e-4, 1e-4):
        found = settings[(lr, 200)]["methods"]["sdpo-update-mu0.5"]["reward_minus_dpo_by_step"]["200"]
        assert _cell(found) in line, (lr, line)


def test_the_config_default_is_the_recommended_default() -> None:
    """``DiffusionSDPOConfig()``'s safeguard is the one the comparison recommends as the default: its space, and an
    unset mu that is the recommended one on a family the authors did not measure and theirs on the ones they did."""
    from trl_diffusion_sdpo import DiffusionSDPOConfig
    from trl_diffusion_sdpo.config.defaults import TINY_BASE, resolve_default
    from trl_diffusion_sdpo.families.flux import FluxFamily
    from trl_diffusion_sdpo.families.sd import StableDiffusionFamily
    from trl_diffusion_sdpo.families.sdxl import StableDiffusionXLFamily

    def default_mu(family, loss_type, base=None):
        return resolve_default("safeguard_mu", family, loss_type, base=base).value

    config = DiffusionSDPOConfig(output_dir="unused")
    space, mu = _recommended()
    assert (config.safeguarded, config.safeguard_space, config.safeguard_mu) == (True, space, None)
    assert default_mu(FluxFamily, "dpo") == mu
    assert default_mu(StableDiffusionFamily, "dpo", TINY_BASE) == mu  # the toy the recommendation was measured on
    assert {default_mu(StableDiffusionFamily, "dpo"), default_mu(StableDiffusionXLFamily, "dpo")} <= _authors_mu()


ONLINE_FILES = (
    "benchmarks/results/online/cpu-online-comparison-tiny.json",
    "benchmarks/results/online/cpu-online-hacking-demo.json",
)


def _online_line() -> str:
    return next(line for line in _shipped()["text"].splitlines() if line.startswith("- Online"))


def test_the_online_line_quotes_both_online_files_and_names_the_online_default() -> None:
    """The "Online" line's numbers are the files' own: the output space's shape IoU cost where online Diffusion-DPO
    is healthy, and the family mu's colour-reward difference where it hacks a brightness reward; the default it
    names is ``OnlineDiffusionSDPOConfig``'s, and the offline default is untouched."""
    from trl_diffusion_sdpo import DiffusionSDPOConfig
    from trl_diffusion_sdpo.online import OnlineDiffusionSDPOConfig

    healthy, hacking = (json.loads((ROOT / name).read_text())["analysis"] for name in ONLINE_FILES)
    costs = [
        entry["minus_online_dpo"]["shape_iou"]
        for method, entry in healthy["lr0.0002"]["methods"].items()
        if method.startswith("online-sdpo") and "decoded" not in method and "minus_online_dpo" in entry
    ]
    assert len(costs) >= 3 and all(cost["ci95"][1] < 0 for cost in costs)  # every online safeguard costs
    means = [cost["mean"] for cost in costs]
    assert f"({max(means):+.4f} to {min(means):+.4f} against it)" in _online_line()
    family = hacking["settings"]["sdpo-default"]["by_step"][str(hacking["steps"])]["colour_reward"]["vs_dpo"]
    assert _cell(family) in _online_line()
    assert "`safeguard_space` unset is `none`" in _online_line()
    assert OnlineDiffusionSDPOConfig(output_dir="unused", use_cpu=True).safeguard_space == "none"
    assert DiffusionSDPOConfig(output_dir="unused", use_cpu=True).safeguard_space == "output"


def test_the_demo_trains_the_authors_settings_explicitly() -> None:
    """The demo's table keeps the authors' values for comparison: each safeguarded method sets its own mu, so a change
    of the config's default does not change the demo."""
    from trl_diffusion_sdpo.demo.methods import METHODS

    authors = _authors_mu()
    for method in METHODS.values():
        if method.safeguard:
            assert method.config_kwargs().get("safeguard_mu") in authors, method.key


# -- shipped configs and examples agree with the defaults -------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_config_sets_another_mu_only_as_the_authors_value_on_purpose(path: Path) -> None:
    """A shipped config that sets ``safeguard_mu`` other than the recommended default says, on that line, that it is
    the authors' value for its model."""
    values = yaml.safe_load(path.read_text()) or {}
    if "safeguard_mu" not in values or values["safeguard_mu"] == _recommended()[1]:
        return
    line = next(line for line in path.read_text().splitlines() if line.startswith("safeguard_mu:"))
    comment = line.partition("#")[2]
    assert "authors'" in comment and "on purpose" in comment, f"{path.name}: {line}"
    assert values["safeguard_mu"] in _authors_mu()


def test_the_example_scripts_leave_mu_to_the_default_or_say_why() -> None:
    for path in sorted((ROOT / "examples").glob("*.py")):
        for line in path.read_text().splitlines():
            found = re.search(r"safeguard_mu(?:=|\s+)([\d.]+)", line)
            if found and float(found[1]) != _recommended()[1]:
                assert "authors'" in line and "on purpose" in line, f"{path.name}: {line.strip()}"
