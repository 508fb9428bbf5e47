"""The first-mistakes walk's own checks, without running its commands: it has a misspelt option for every command the
parser lists (each a real option's misspelling, read from the command's ``--help``), its broken config is not valid
YAML where it says, its large base cannot be read, and it judges an ending as the commands end."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "smoke"))

import first_mistakes_walk as walk  # noqa: E402

from trl_diffusion_sdpo.cli.main import main  # noqa: E402


def test_every_listed_command_has_a_misspelt_option_case(tmp_path):
    assert set(walk.typos(tmp_path)) == set(walk.listed_commands())
    cases = [what for _, what, _ in walk.walk(tmp_path)]
    assert all(f"an option misspelt ({command})" in cases for command in walk.listed_commands())


def help_options(capsys, command: str) -> set[str]:
    try:
        main([command, "--help"])
    except SystemExit as exited:
        assert exited.code == 0
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*", capsys.readouterr().out))


@pytest.mark.parametrize("command", walk.listed_commands())
def test_each_typo_is_one_unknown_option_a_letter_away_from_a_real_one(capsys, tmp_path, command):
    _, arguments = walk.typos(tmp_path)[command]
    assert arguments[0] == command
    options = help_options(capsys, command)
    unknown = [word for word in arguments[1:] if word.startswith("--") and word not in options]
    assert len(unknown) == 1, (command, unknown)
    (typo,) = unknown
    # a letter missing, extra, changed or two swapped: a real option one edit away
    assert any(one_edit(typo, option) for option in options), (command, typo)


def one_edit(typo: str, option: str) -> bool:
    """Whether ``typo`` is ``option`` with one letter dropped, added or changed, or two neighbours swapped."""
    if len(typo) > len(option):
        typo, option = option, typo
    if len(option) - len(typo) == 1:
        return any(option[:i] + option[i + 1 :] == typo for i in range(len(option)))
    if len(option) != len(typo):
        return False
    differ = [i for i, (a, b) in enumerate(zip(typo, option, strict=True)) if a != b]
    swapped = len(differ) == 2 and differ[1] == differ[0] + 1 and typo[differ[0]] == option[differ[1]]
    return len(differ) == 1 or (swapped and typo[differ[1]] == option[differ[0]])


def test_the_broken_config_is_invalid_yaml_at_the_indented_key_and_otherwise_the_shipped_one(tmp_path):
    path = walk.indented_key_config(tmp_path / "x.yaml")
    text = path.read_text()
    with pytest.raises(yaml.MarkedYAMLError) as raised:
        yaml.safe_load(text)
    indented = next(n for n, line in enumerate(text.splitlines()) if line == "  resolution: 32")
    assert raised.value.problem_mark.line == indented
    assert yaml.safe_load(text.replace("  resolution: 32", "resolution: 32")) == yaml.safe_load(
        (ROOT / walk.TINY_CPU).read_text()
    )


def test_the_large_base_reads_as_the_tiny_base_but_its_weights_cannot_be_read(tmp_path):
    base = walk.large_base(tmp_path / "a-large-base")
    shipped = ROOT / "trl_diffusion_sdpo" / "demo" / "base"
    assert (base / "model_index.json").read_text() == (shipped / "model_index.json").read_text()
    weights = sorted(p.relative_to(base) for p in base.rglob("*.safetensors"))
    assert weights == sorted(p.relative_to(shipped) for p in shipped.rglob("*.safetensors")) and weights
    assert all(stat.S_ISFIFO((base / w).stat().st_mode) for w in weights)
    # a reader of a weight file waits: it is still waiting when stopped
    reader = subprocess.Popen([sys.executable, "-c", f"open({str(base / weights[0])!r}, 'rb').read(8)"])
    with pytest.raises(subprocess.TimeoutExpired):
        reader.wait(timeout=2)
    reader.kill()
    reader.wait()


def ended(code: int | None, stderr: str) -> dict:
    return walk.judge(subprocess.CompletedProcess(["x"], code, "", stderr))


def test_the_walk_judges_one_line_usage_and_a_time_out():
    usage = "usage: trl-diffusion-sdpo export [-h] --lora LORA\n                [--merge]\n"
    error = "trl-diffusion-sdpo export: error: unknown option --formt (did you mean --format?)\n"
    judged = ended(2, usage + error)
    assert judged["one_line"] and judged["usage_of"] == "trl-diffusion-sdpo export" and not judged["timed_out"]
    assert ended(2, "trl-diffusion-sdpo: error: x\n")["usage_of"] is None
    assert not ended(1, "Traceback (most recent call last):\n  ...\nValueError: x: error: y\n")["one_line"]
    assert not ended(0, error)["one_line"]  # a success is no refusal
    stopped = ended(None, "INFO loading\n")
    assert stopped["timed_out"] and not stopped["one_line"]


def test_a_command_past_its_limit_is_stopped_and_recorded_as_timed_out():
    import os

    done, seconds = walk.run(["--help"], dict(os.environ), limit=0.01)
    assert done.returncode is None and walk.judge(done)["timed_out"]
    assert 0 <= seconds < 60
