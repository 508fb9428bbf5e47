"""What each wheel holds, from setuptools' own reading of each pyproject.toml (the discovery a wheel build runs): the
core's wheel is the trainer, without the reward-model ports, which ship in the ``trl-diffusion-sdpo-rewards`` wheel
built from ``rewards/``."""

from __future__ import annotations

import warnings
from pathlib import Path

from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

from trl_diffusion_sdpo.rewards import scorers

ROOT = Path(__file__).resolve().parents[2]


def distribution(project: Path) -> Distribution:
    """setuptools' distribution of ``project`` (a folder with a pyproject.toml), as a wheel build configures it."""
    with warnings.catch_warnings():  # setuptools' notices about the license field's form
        warnings.simplefilter("ignore")
        return apply_configuration(Distribution(), project / "pyproject.toml")


def wheel_modules(project: Path) -> set[str]:
    """The dotted names of the modules a wheel built from ``project`` holds."""
    dist = distribution(project)
    modules = set()
    for package in dist.packages:
        folder = project.joinpath(*package.split("."))
        modules |= {f"{package}.{path.stem}" for path in folder.glob("*.py") if path.stem != "__init__"}
        modules.add(package)
    return modules


def test_the_core_wheel_holds_no_reward_model_port_and_the_rewards_wheel_holds_them_all():
    core, ports = wheel_modules(ROOT), wheel_modules(ROOT / "rewards")
    assert "trl_diffusion_sdpo.trainer" in core and "trl_diffusion_sdpo.rewards.scorers.registry" in core
    assert {m.split(".")[0] for m in core} == {"trl_diffusion_sdpo"}
    assert {m.split(".")[0] for m in ports} == {"trl_diffusion_sdpo_rewards"}
    # No port, under any name of the core's: no core module shares a port module's file name.
    port_files = {m.rsplit(".", 1)[-1] for m in ports if "." in m}
    assert {m for m in core if m.rsplit(".", 1)[-1] in port_files} == set()
    # Every built-in scorer name resolves in one of the two wheels: the core's three, the ports in theirs.
    for name, factory in scorers._BUILTIN_SCORERS.items():
        module = factory.partition(":")[0]
        wheel = ports if module.startswith(f"{scorers.registry.REWARD_PORTS}.") else core
        assert module in wheel, (name, module)
    assert {n for n, f in scorers._BUILTIN_SCORERS.items() if f.partition(":")[0] in core} == {
        "pickscore",
        "clip",
        "clip-cosine",
    }


def test_the_rewards_distribution_pins_the_core_release_it_was_built_with():
    """The ports import the core's scorer interface and CLIP plumbing, so a port release requires its own core."""
    core, rewards = distribution(ROOT), distribution(ROOT / "rewards")
    assert rewards.install_requires == [f"{core.get_name()}=={core.get_version()}"]
    assert rewards.get_version() == core.get_version()
    assert core.extras_require["rewards"] == [rewards.get_name()]
