"""Every text that states a default or safety advice agrees with the one table (trl_diffusion_sdpo/config/defaults.py):
the shipped YAML configs' comments, the commands' help, the docs and the config's field helps.

Each shipped config is parsed by its command, its model's family resolved by class (no weights loaded), and the
values its comments state (``beta N``, ``mu N``, "No safeguard", a default named on a ``key: value  # ...`` line)
compared with what the run resolves to."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from trl_diffusion_sdpo.config.defaults import (
    default_table,
    resolve_default,
    resolve_defaults,
    safeguard_default_sentence,
)
from trl_diffusion_sdpo.families.registry import registered_families
from trl_diffusion_sdpo.online.defaults import online_table
from trl_diffusion_sdpo.online.defaults import safeguard_default_sentence as online_safeguard_sentence

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
# The family each shipped model is (its pipeline class, as family_for_pipeline classifies it once loaded).
MODEL_FAMILIES = {
    "trl-diffusion-sdpo:tiny": "stable-diffusion",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "stable-diffusion",
    "stabilityai/stable-diffusion-xl-base-1.0": "stable-diffusion-xl",
    "stabilityai/stable-diffusion-3.5-medium": "stable-diffusion-3",
    "black-forest-labs/FLUX.1-dev": "flux",
    "black-forest-labs/FLUX.1-Kontext-dev": "flux-kontext",
    "black-forest-labs/FLUX.2-dev": "flux2",
    "black-forest-labs/FLUX.2-klein-base-4B": "flux2-klein",
    "Qwen/Qwen-Image": "qwen-image",
    "Qwen/Qwen-Image-2.1": "qwen-image-2.1",
    "Qwen/Qwen-Image-Edit": "qwen-image-edit",
    "Qwen/Qwen-Image-Edit-2509": "qwen-image-edit-plus",
    "Tongyi-MAI/Z-Image-Turbo": "z-image",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan",
    "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v": "hunyuan-video-1.5",
}
MU = re.compile(r"(?<![\w.])(?:mu|safeguard_mu)[ =:]+([01]\.\d+)")
BETA = re.compile(r"(?<![\w.])beta[ =:]+(\d+(?:\.\d+)?)\b")


def _parse(path: Path, tmp_path: Path):
    """The config the command builds from ``path`` (CPU, float32: the tests' machine)."""
    flags = ["--config", str(path), "--output_dir", str(tmp_path / "out"), "--use_cpu", "--bf16", "false"]
    if path.stem.startswith("online"):
        from trl_diffusion_sdpo.cli import online

        return online.parse_args(flags)[1]
    from trl_diffusion_sdpo.cli import train

    return train.parse_args(flags)[1]


def stated(text: str) -> list[tuple[str, object, str]]:
    """The defaults a YAML file's comments state: ``(field, value, comment)``. A ``key: value  # ... default ...``
    line states that ``value`` is the table's default for ``key``."""
    claims: list[tuple[str, object, str]] = []
    for line in text.splitlines():
        code, _, comment = line.partition("#")
        if not comment:
            continue
        claims += [("beta", float(m), comment) for m in BETA.findall(comment)]
        claims += [("safeguard_mu", float(m), comment) for m in MU.findall(comment)]
        if re.search(r"\bno safeguard\b", comment, re.IGNORECASE):
            claims.append(("safeguard_space", "none", comment))
        if "output space" in comment:
            claims.append(("safeguard_space", "output", comment))
        key, _, value = code.partition(":")
        if "default" in comment and key.strip() in ("beta", "safeguard_mu", "safeguard_space") and value.strip():
            claims.append((f"table:{key.strip()}", yaml.safe_load(value), comment))
    return claims


def check_config_file(path: Path, text: str, tmp_path: Path) -> None:
    config = _parse(path, tmp_path)
    model = yaml.safe_load(text)["model_name_or_path"]
    family = next(f for f in registered_families() if f.name == MODEL_FAMILIES[model])
    resolved = {name: r.value for name, r in resolve_defaults(config, family, model).items()}
    claims = stated(text)
    for field, value, comment in claims:
        if field.startswith("table:"):
            field = field.removeprefix("table:")
            table = config.default_for(field, family, model).value
            assert table == value, f"{path.name}: {field}: {value} is called a default, the table says {table}"
        else:
            assert resolved[field] == value, f"{path.name}: '#{comment}' states {field} {value}, it runs {resolved}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_each_shipped_config_states_the_defaults_it_resolves(path, tmp_path):
    assert yaml.safe_load(path.read_text())["model_name_or_path"] in MODEL_FAMILIES
    check_config_file(path, path.read_text(), tmp_path)


def test_the_tiny_configs_state_what_they_run():
    """The two CPU configs leave the safeguard to the table and say what it resolves to."""
    tiny = stated((ROOT / "examples/configs/tiny_cpu.yaml").read_text())
    assert ("safeguard_mu", 0.5) in [(f, v) for f, v, _ in tiny] and "safeguard_mu:" not in _code("tiny_cpu")
    online = stated((ROOT / "examples/configs/online_tiny_cpu.yaml").read_text())
    assert ("safeguard_space", "none") in [(f, v) for f, v, _ in online]
    assert "safeguard_space:" not in _code("online_tiny_cpu")


def _code(stem: str) -> str:
    lines = (ROOT / "examples/configs" / f"{stem}.yaml").read_text().splitlines()
    return "\n".join(line.partition("#")[0] for line in lines)


@pytest.mark.parametrize(
    ("stem", "planted"),
    [
        ("tiny_cpu", ("mu 0.5", "mu 0.9")),  # the comment says another mu than the run resolves
        ("online_tiny_cpu", ("No safeguard", "The safeguard in the output space")),
        ("flux_lora", ("beta 100", "beta 5000")),
        ("sd15_lora", ("safeguard_mu: 0.9  #", "safeguard_mu: 0.5  #")),  # 0.5 called "the family's default"
    ],
)
def test_a_comment_stating_another_value_fails_the_check(stem, planted, tmp_path):
    path = ROOT / "examples/configs" / f"{stem}.yaml"
    text = path.read_text()
    assert planted[0] in text
    check_config_file(path, text, tmp_path / "clean")  # the shipped text passes
    with pytest.raises(AssertionError):  # the file as parsed, its comments as planted
        check_config_file(path, text.replace(planted[0], planted[1], 1), tmp_path / "planted")


# -- the help, the docs and the field helps -------------------------------------------------------------------------


def test_the_commands_help_states_the_safeguard_default_of_its_mode():
    """``trl-diffusion-sdpo --help`` and ``online --help`` say what the table resolves (online: no safeguard)."""
    from trl_diffusion_sdpo.cli.help_topics import stored_help
    from trl_diffusion_sdpo.cli.main import build_parser

    assert _online_space() == "none"
    top = " ".join(build_parser().format_help().split())
    assert " ".join(online_safeguard_sentence().split()) in top
    assert " ".join(safeguard_default_sentence().split()) in top
    online = " ".join(stored_help("online").split())
    assert " ".join(online_safeguard_sentence().split()) in online
    for text in (top, online):
        assert "trained on with the safeguard" not in text


@pytest.mark.parametrize("online", [False, True])
def test_the_safeguard_sentence_says_what_the_table_resolves(online):
    sentence = online_safeguard_sentence() if online else safeguard_default_sentence()
    space = _online_space() if online else resolve_default("safeguard_space").value
    assert ("without the safeguard" in sentence) == (space == "none")
    if space != "none":
        assert f"safeguard_space {space}" in sentence
        assert f"else {resolve_default('safeguard_mu').value:g}" in sentence


def _online_space() -> str:
    return resolve_default("safeguard_space", table=online_table(default_table())).value


def _package_mu() -> str:
    return f"{resolve_default('safeguard_mu').value:g}"


def _flow_factor() -> str:
    from trl_diffusion_sdpo.families import FluxFamily, StableDiffusionFamily

    return f"{resolve_default('beta', StableDiffusionFamily).value / resolve_default('beta', FluxFamily).value:g}"


DOC_CLAIMS = [
    # (file, pattern whose group is the stated value, the table's value)
    ("docs/online.md", r"Online, `safeguard_space` unset is `(\w+)`", _online_space),
    ("docs/safeguard.md", r"elsewhere Diffusion-SDPO in the output space at `mu=([\d.]+)`", _package_mu),
    ("README.md", r"elsewhere Diffusion-SDPO in the output space at `mu=([\d.]+)`", _package_mu),
    ("docs/families.md", r"by a factor of (\d+) between the UNet and the flow families", _flow_factor),
]


@pytest.mark.parametrize(("doc", "pattern", "table"), DOC_CLAIMS, ids=[c[0] for c in DOC_CLAIMS])
def test_the_docs_state_the_tables_defaults(doc, pattern, table):
    match = re.search(pattern, " ".join((ROOT / doc).read_text().split()))
    assert match, f"{doc} no longer states it: update DOC_CLAIMS with the text"
    assert match[1] == table()


def test_field_helps_cite_docs_that_ship_and_no_result_file():
    from trl_diffusion_sdpo import DiffusionSDPOConfig
    from trl_diffusion_sdpo.online import OnlineDiffusionSDPOConfig

    for cls in (DiffusionSDPOConfig, OnlineDiffusionSDPOConfig):
        for spec in dataclasses.fields(cls):
            text = spec.metadata.get("help", "")
            assert "benchmarks/" not in text, spec.name
            for page in re.findall(r"docs/[\w/.-]+\.md", text):
                assert (ROOT / page).is_file(), (spec.name, page)
