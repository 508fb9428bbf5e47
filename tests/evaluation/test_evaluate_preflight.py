"""``evaluate`` fails fast: every registered scorer is listed in its help, and a scorer that cannot score the prompts
or cannot load its model here is refused before any image is generated, naming the scorer, the prompt or model, and
how to point the scorer at a local copy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

import trl_diffusion_sdpo.demo.scorer  # noqa: F401  registers ``colour``
from trl_diffusion_sdpo.cli.main import OUTSIDE_SCORERS, main
from trl_diffusion_sdpo.config.extras import ExtraNotInstalled
from trl_diffusion_sdpo.evaluation import evaluate, run
from trl_diffusion_sdpo.rewards.scorers import preflight, registry, scores_edits
from trl_diffusion_sdpo.rewards.scorers.preflight import ScorerModelUnavailable, ScorerPromptError, check_models
from trl_diffusion_sdpo.rewards.scorers.registry import REWARD_PORTS, register_scorer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_generation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("images were generated before the scorers were checked")

    monkeypatch.setattr(run, "generate_images", refuse)


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(monkeypatch, empty_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return empty_cache


@pytest.fixture
def online_but_unreachable(monkeypatch, empty_cache):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def fail(address, timeout):
        attempts.append((address, timeout))
        raise OSError("network is unreachable")

    monkeypatch.setattr(preflight.socket, "create_connection", fail)
    return attempts


def test_evaluate_help_lists_the_demo_scorer_in_a_fresh_process():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "trl_diffusion_sdpo", "evaluate", "--help"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300).stdout
    packed = "".join(out.split())
    assert "colour" in packed and "pickscore" in packed, out
    assert set(OUTSIDE_SCORERS) == {"colour"}


def test_registering_a_scorer_by_name_then_by_its_class_is_one_registration():
    # what `evaluate` does: the name first (for --help), then importing the module registers the class
    from trl_diffusion_sdpo.demo.scorer import ColourRewardScorer

    register_scorer("colour", "trl_diffusion_sdpo.demo.scorer:ColourRewardScorer", overwrite=True)
    register_scorer("colour", ColourRewardScorer)
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("colour", "trl_diffusion_sdpo.demo.scorer:SomethingElse")


def test_prompts_the_colour_scorer_cannot_parse_are_refused_before_generation(tmp_path, no_generation):
    with pytest.raises(ScorerPromptError, match=r"prompt 1 is 'a photo of a cat'") as info:
        evaluate(
            "unused", prompts=["red circle on white", "a photo of a cat"], scorers=["colour"], output_dir=tmp_path
        )
    assert "'<colour> <shape> on <background>'" in str(info.value)
    # four words, but not the demo's: Caption.parse alone would accept it and colour_reward fail on the lookup
    with pytest.raises(ScorerPromptError, match="prompt 0 is 'pink circle on white'"):
        evaluate("unused", prompts=["pink circle on white"], scorers=["colour"], output_dir=tmp_path)


def test_offline_a_scorer_model_not_in_the_cache_is_refused_naming_scorer_model_and_fix(
    tmp_path, offline, no_generation
):
    with pytest.raises(ScorerModelUnavailable) as info:
        evaluate("unused", prompts=["a cat"], scorers=["pickscore"], output_dir=tmp_path)
    message = str(info.value)
    assert "Scorer 'pickscore'" in message and "'yuvalkirstain/PickScore_v1'" in message
    assert "HF_HUB_OFFLINE is set" in message and "--scorer_arg pickscore.model=" in message


def test_an_unreachable_hub_is_found_by_one_short_connection(online_but_unreachable, empty_cache):
    with pytest.raises(ScorerModelUnavailable, match="no connection to huggingface.co:443") as info:
        check_models(["clip", "pickscore"])
    assert "Scorer 'clip'" in str(info.value) and "openai/clip-vit-large-patch14" in str(info.value)
    assert online_but_unreachable == [(("huggingface.co", 443), preflight.CONNECT_TIMEOUT_S)]


def test_cached_and_local_models_need_no_network(online_but_unreachable, empty_cache, tmp_path):
    for repo in ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        (empty_cache / ("models--" + repo.replace("/", "--")) / "snapshots" / "0123").mkdir(parents=True)
    check_models(["pickscore"])
    local = tmp_path / "clip-local"
    local.mkdir()
    check_models(["clip"], {"clip": {"model": str(local)}})
    assert online_but_unreachable == []


def test_a_local_model_path_that_does_not_exist_is_named(empty_cache, tmp_path):
    missing = str(tmp_path / "no-such-clip")
    with pytest.raises(ScorerModelUnavailable, match=r"model=.*no-such-clip.*is not an existing file or folder"):
        check_models(["clip"], {"clip": {"model": missing}})


def test_a_file_downloaded_from_a_repository_points_at_the_argument_for_the_local_file(offline):
    with pytest.raises(ScorerModelUnavailable) as info:
        check_models(["hpsv2.1"], {"hpsv2.1": {"architecture": str(offline)}})  # the architecture is local
    assert "'xswu/HPSv2' (hub_repo)" in str(info.value) and "--scorer_arg hpsv2.1.checkpoint=" in str(info.value)


def test_the_cli_reports_a_refused_scorer_as_an_error_without_generating(tmp_path, capsys, no_generation):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle on white\nan astronaut riding a horse\n")
    out = tmp_path / "eval"
    code = main(
        ["evaluate", "--base", "unused", "--prompts", str(prompts), "--scorer", "colour", "--output-dir", str(out)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("trl-diffusion-sdpo evaluate: error: The colour scorer")
    assert "'an astronaut riding a horse'" in err and not out.exists()


class _NotInstalled:
    """A meta-path finder that answers for ``package`` as Python does for a package that is not installed."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, name, path=None, target=None):
        if name == self.package:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.fixture
def ports_not_installed(monkeypatch):
    """The reward-model ports' distribution as if not installed, and every built-in name registered by name again, as
    in a process that has built none."""
    from trl_diffusion_sdpo.rewards import scorers

    for module in [m for m in sys.modules if m == REWARD_PORTS or m.startswith(f"{REWARD_PORTS}.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled(REWARD_PORTS), *sys.meta_path])
    monkeypatch.setattr(registry, "_REGISTRY", {**registry._REGISTRY, **scorers._BUILTIN_SCORERS})


def test_a_port_whose_distribution_is_missing_is_refused_naming_the_install_command(
    ports_not_installed, tmp_path, capsys, no_generation
):
    install = 'pip install -e ".[rewards]" -e ./rewards'
    for name in ("hpsv2", "hpsv3", "imagereward", "aesthetic", "editreward"):
        with pytest.raises(ExtraNotInstalled, match=re.escape(install)) as info:
            scores_edits(name)
        assert str(info.value).startswith(f"Scorer {name!r} (a reward-model port): {REWARD_PORTS} is not installed")
    assert not scores_edits("pickscore")  # the core's scorers need no port
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    out = tmp_path / "eval"
    arguments = ["--base", "unused", "--prompts", str(prompts), "--scorer", "hpsv3", "--output-dir", str(out)]
    code = main(["evaluate", *arguments])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.startswith("trl-diffusion-sdpo evaluate: error: Scorer 'hpsv3' (a reward-model port)")
    assert install in err and len(err.strip().splitlines()) == 1
