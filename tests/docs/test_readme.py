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

from trl_diffusion_sdpo.demo.recommendation import (
    AUTHORS_MU,
    PAGES,
    SHIPPED,
    START,
    choose,
    load_rows,
    marked_block,
    render,
)

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
    assert README.splitlines().index("```bash") <= 2, "the commands are not on top"
    demo, tests = _commands(_blocks(README, "bash")[0])
    assert demo == "pip install torch==2.13.0 && pip install -e . && trl-diffusion-sdpo demo --output-dir demo-output"
    assert tests == 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q'
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.startswith(("python", "pip")) and not line.startswith("python -c")
    ]
    normalise = [re.sub(r"^python -m pip install --quiet ", "pip install ", line) for line in ci]
    assert normalise == [step.strip() for step in tests.split("&&")]


def test_python_comes_within_the_first_40_lines_and_the_readme_stays_short() -> None:
    lines = README.splitlines()
    assert "```python" in lines[:40]
    assert len(lines) <= 160


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
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "tiny-sdpo" / "pytorch_lora_weights.safetensors")
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


def _run_as_written(line: str, cwd: Path) -> None:
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


def test_the_offline_commands_run_as_written_on_a_pair_folder(tmp_path: Path) -> None:
    """The tiny-base train command (on a pair folder laid out as the README shows) and the export command, as
    written, from the repository root's relative paths."""
    commands = [c for b in _blocks(README, "bash") for c in _commands(b)]
    train = next(c for c in commands if "tiny_cpu.yaml" in c)
    export = next(c for c in commands if c.startswith("trl-diffusion-sdpo export"))
    _pair_folder(tmp_path / "my-pairs")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "trl_diffusion_sdpo").symlink_to(ROOT / "trl_diffusion_sdpo")
    for line in (train, export):
        _run_as_written(line, tmp_path)
    assert (tmp_path / "tiny-sdpo" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "tiny.safetensors").stat().st_size > 0


@pytest.mark.parametrize(
    "override",
    [
        # the command and its config's paths, as written, for 2 of the config's 30 steps (a flag overrides the config,
        # as the README says); all 30 in the slow test
        " --max_steps 2",
        pytest.param("", marks=pytest.mark.slow),
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


@pytest.mark.parametrize("page", PAGES)
def test_each_marked_block_is_the_generated_text(page: str) -> None:
    text = (ROOT / page).read_text()
    assert START in text, f"{page} has no generated recommendation block"
    assert marked_block(text) == render(load_rows(), page), (
        f"{page}'s block differs: run python -m trl_diffusion_sdpo.demo.recommendation"
    )


def test_the_shipped_text_the_demo_quotes_is_the_generated_text() -> None:
    from trl_diffusion_sdpo.demo.report import safeguard_recommendation

    assert load_rows()["text"] == render(load_rows())
    assert safeguard_recommendation()["text"] == render(load_rows())


def _comparison() -> dict:
    return json.loads((ROOT / load_rows()["source"]).read_text())


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
    picked = choose(load_rows())
    assert picked["default"]["method"] == key
    first = render(load_rows()).splitlines()[0]
    assert _cell(sick) in first and _cell(healthy) in first
    label = _comparison()["settings"]["lr0.0002-beta5000-200steps"]["methods"][key]["label"]
    space, mu = re.match(r"(\w+) space, mu=([\d.]+)$", label).groups()
    assert f'safeguard_space="{space}"' in first and f"safeguard_mu={float(mu):g}" in first


def test_the_update_space_line_quotes_the_comparison() -> None:
    settings = {(s["learning_rate"], s["steps"]): s for s in _comparison()["settings"].values()}
    line = render(load_rows()).splitlines()[2]
    for lr in (2e-4, 1e-4):
        found = settings[(lr, 200)]["methods"]["sdpo-update-mu0.5"]["reward_minus_dpo_by_step"]["200"]
        assert _cell(found) in line, (lr, line)


def test_the_config_default_is_the_recommended_default() -> None:
    """``DiffusionSDPOConfig()``'s safeguard is the one the comparison recommends as the default."""
    from trl_diffusion_sdpo import DiffusionSDPOConfig

    picked = choose(load_rows())
    config = DiffusionSDPOConfig(output_dir="unused")
    assert (config.safeguard, config.safeguard_space, config.safeguard_mu) == (True, picked["space"], picked["mu"])


def test_the_demo_trains_the_authors_settings_explicitly() -> None:
    """The demo's table keeps the authors' values for comparison: each safeguarded method sets its own mu, so a change
    of the config's default does not change the demo."""
    from trl_diffusion_sdpo.demo.methods import METHODS

    authors = {mu for _, mu, _ in AUTHORS_MU}
    for method in METHODS.values():
        if method.safeguard:
            assert method.config_kwargs().get("safeguard_mu") in authors, method.key


# -- shipped configs and examples agree with the defaults -------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_config_sets_another_mu_only_as_the_authors_value_on_purpose(path: Path) -> None:
    """A shipped config that sets ``safeguard_mu`` other than the recommended default says, on that line, that it is
    the authors' value for its model."""
    picked = choose(load_rows())
    values = yaml.safe_load(path.read_text()) or {}
    if "safeguard_mu" not in values or values["safeguard_mu"] == picked["mu"]:
        return
    line = next(line for line in path.read_text().splitlines() if line.startswith("safeguard_mu:"))
    comment = line.partition("#")[2]
    assert "authors'" in comment and "on purpose" in comment, f"{path.name}: {line}"
    assert values["safeguard_mu"] in {mu for _, mu, _ in AUTHORS_MU}


def test_the_example_scripts_leave_mu_to_the_default_or_say_why() -> None:
    picked = choose(load_rows())
    for path in sorted((ROOT / "examples").glob("*.py")):
        for line in path.read_text().splitlines():
            found = re.search(r"safeguard_mu(?:=|\s+)([\d.]+)", line)
            if found and float(found[1]) != picked["mu"]:
                assert "authors'" in line and "on purpose" in line, f"{path.name}: {line.strip()}"


def test_the_generator_rewrites_a_stale_block(tmp_path: Path) -> None:
    """``python -m trl_diffusion_sdpo.demo.recommendation --root DIR`` puts the generated text back into each page's
    block and ``--check`` then finds nothing to do."""
    for page in PAGES:
        target = tmp_path / page
        target.parent.mkdir(parents=True, exist_ok=True)
        stale = (ROOT / page).read_text().replace(marked_block((ROOT / page).read_text()), "- Old advice: mu=0.9.")
        target.write_text(stale)
    run = [sys.executable, "-m", "trl_diffusion_sdpo.demo.recommendation", "--root", str(tmp_path)]
    check = subprocess.run([*run, "--check"], env=_env(), capture_output=True, text=True, timeout=300)
    assert check.returncode == 1 and all(page in check.stdout for page in PAGES), check.stdout
    assert subprocess.run(run, env=_env(), capture_output=True, text=True, timeout=300).returncode == 0
    for page in PAGES:
        assert (tmp_path / page).read_text() == (ROOT / page).read_text()
    assert subprocess.run([*run, "--check"], env=_env(), capture_output=True, timeout=300).returncode == 0
    assert SHIPPED.is_file()
