"""The demo as a guest and as a command: called from Python it leaves the caller's libraries as they were; as a
command it quiets its own process; and it refuses to replace an earlier demo's (or rebuild's) files unless told."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import fresh_forks
from tests.helpers.common import worker_environment
from trl_diffusion_sdpo.cli import demo as demo_cli
from trl_diffusion_sdpo.config.messages import OutputExistsError
from trl_diffusion_sdpo.demo import pretrain as pretrain_module
from trl_diffusion_sdpo.demo import run as run_module
from trl_diffusion_sdpo.demo.pretrain import PretrainRecipe
from trl_diffusion_sdpo.demo.recipe import DemoRecipe

ROOT = Path(__file__).resolve().parents[2]

# In a fresh process (the libraries' shared imports made first: tests.helpers.fresh_forks): the libraries imported
# as a user's script would, their settings read, the demo's Python entry run (one method, one seed, a few steps), and
# the settings read again.
PYTHON_CALL = """
import json, sys
import accelerate, datasets, diffusers, huggingface_hub, matplotlib, peft, torch, transformers
from tests.helpers.host_settings import changed_settings, library_settings
from trl_diffusion_sdpo.cli import demo

def backend():  # as set, without resolving an automatic choice (which would import pyplot)
    return dict.__getitem__(matplotlib.rcParams, "backend")

before, backend_before = library_settings(), backend()
options = ["--quick", "--methods", "dpo", "--seeds", "0", "--no_breaking_regime"]
status = demo.main([*options, "--output_dir", sys.argv[1]])
changed = changed_settings(before, library_settings())
if backend() != backend_before or "matplotlib.pyplot" in sys.modules:
    changed.append(f"matplotlib backend {backend_before!r} -> {backend()!r}, pyplot imported")
print(json.dumps({"status": status, "changed": changed}))
"""

# In a fresh process (the same): the demo's two command entries, with the demo itself replaced by a recorder of the
# libraries' switches at the moment it would start.
COMMAND_CALLS = """
import json, sys
from tests.helpers.host_settings import library_settings
from trl_diffusion_sdpo.cli import demo, main
from trl_diffusion_sdpo.demo import run

seen = []
run.run_demo = lambda *args, **kwargs: seen.append(library_settings()["switches"])
if sys.argv[1] == "trl-diffusion-sdpo":
    status = main.main(["demo", "--quick", "--output_dir", sys.argv[2]])
else:
    status = demo.command(["--quick", "--output_dir", sys.argv[2]])
print(json.dumps({"status": status, "seen": seen}))
"""


def _run_python(code: str, *args: str) -> dict:
    done = fresh_forks.run(["-c", code, *args], timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # by default: test_host_settings.py's test_importing_every_module_and_training_...
def test_a_python_call_of_the_demo_leaves_the_libraries_settings_as_they_were(tmp_path):
    report = _run_python(PYTHON_CALL, str(tmp_path / "demo"))
    assert report["status"] == 0
    assert (tmp_path / "demo" / "losses.png").exists()  # the demo ran, its figures too
    assert report["changed"] == []


@pytest.mark.parametrize(  # one entry point by default: both reach the same quieting
    "entry", [pytest.param("trl-diffusion-sdpo", marks=pytest.mark.slow), "python -m trl_diffusion_sdpo.demo"]
)
def test_the_demo_command_quiets_its_own_process_before_the_demo_starts(tmp_path, entry):
    import logging

    report = _run_python(COMMAND_CALLS, entry, str(tmp_path / "demo"))
    assert report["status"] == 0 and len(report["seen"]) == 1
    switches = report["seen"][0]
    assert switches["diffusers verbosity"] == switches["transformers verbosity"] == logging.ERROR
    assert not switches["diffusers progress bars"] and not switches["transformers progress bars"]
    assert switches["huggingface_hub progress bars disabled"] and not switches["datasets progress bars"]


# ---------------------------------------------------------------------------------------------------- overwriting


def _no_base(*args, **kwargs):
    raise AssertionError("refused folders must be refused before the base loads")


class _Started(Exception):
    """Raised where the run would start its work: the refusal let it through."""


def _started(*args, **kwargs):
    raise _Started


@pytest.mark.parametrize("earlier", ["summary.json", "breaking_regime.png", "lambda.png"])
def test_the_demo_refuses_a_folder_holding_an_earlier_demos_files(tmp_path, monkeypatch, earlier):
    monkeypatch.setattr(run_module, "load_base", _no_base)
    out = tmp_path / "out"
    out.mkdir()
    (out / earlier).write_text("{}")
    (out / "notes.txt").write_text("mine")  # not the demo's: named in no refusal
    with pytest.raises(OutputExistsError) as refused:
        run_module.run_demo(out, DemoRecipe.quick())
    message = str(refused.value)
    assert message.startswith(f"{out} holds an earlier run's files ({earlier}), which the demo would replace.")
    assert "overwrite=True" in message and "notes.txt" not in message
    assert (out / earlier).read_text() == "{}"
    monkeypatch.setattr(run_module, "load_base", _started)
    with pytest.raises(_Started):
        run_module.run_demo(out, DemoRecipe.quick(), overwrite=True)


def test_the_demo_refuses_a_folder_holding_anything_and_writes_among_it_with_overwrite(tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "load_base", _no_base)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError) as refused:
        run_module.run_demo(tmp_path, DemoRecipe.quick())
    assert str(refused.value).startswith(f"{tmp_path} holds notes.txt, which the demo would replace.")
    assert "Pass overwrite=True to write among them" in str(refused.value)
    monkeypatch.setattr(run_module, "load_base", _started)
    with pytest.raises(_Started):
        run_module.run_demo(tmp_path, DemoRecipe.quick(), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "notes.txt").unlink()
    with pytest.raises(_Started):  # an empty folder holds nothing to replace
        run_module.run_demo(tmp_path, DemoRecipe.quick())


def test_the_base_rebuild_refuses_an_earlier_rebuilds_files(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_module, "pretrain_base", _no_base)
    (tmp_path / "base").mkdir()
    with pytest.raises(OutputExistsError, match=r"holds an earlier run's files \(base\), which the base's rebuild"):
        run_module.run_pretrain(tmp_path, PretrainRecipe.tiny())
    monkeypatch.setattr(pretrain_module, "pretrain_base", _started)
    with pytest.raises(_Started):
        run_module.run_pretrain(tmp_path, PretrainRecipe.tiny(), overwrite=True)


def test_the_overwrite_flag_reaches_the_demo_and_the_rebuild(tmp_path, monkeypatch):
    from trl_diffusion_sdpo.cli import demo_run

    seen: list[bool] = []
    monkeypatch.setattr(demo_run, "run_demo", lambda *args, overwrite=False, **kwargs: seen.append(overwrite))
    monkeypatch.setattr(
        demo_run, "run_pretrain", lambda *args, overwrite=False, **kwargs: seen.append(overwrite) or _strict_pass()
    )
    for extra in ([], ["--overwrite"], ["--pretrain"], ["--pretrain", "--overwrite"]):
        assert demo_cli.main(["--quick", "--output_dir", str(tmp_path), *extra]) == 0
    assert seen == [False, True, False, True]


def _strict_pass() -> dict:
    return {"strict": True, "check": {"passed": True}}


@pytest.mark.slow  # by default: test_output_refused_before_loading.py's test_the_demo_refuses_a_folder_holding_...
def test_the_demo_command_refuses_in_one_line_naming_the_flag(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    done = subprocess.run(
        [sys.executable, "-m", "trl_diffusion_sdpo", "demo", "--quick", "--output_dir", str(tmp_path)],
        cwd=ROOT,
        env=worker_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-4000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trl-diffusion-sdpo demo: error: "), done.stderr[-4000:]
    assert "Pass --overwrite to replace them" in lines[0] and "a new --output_dir" in lines[0]
