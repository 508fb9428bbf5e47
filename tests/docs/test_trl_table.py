"""docs/trl.md's table of TRL's settings, run row by row: what a row says a DPOConfig field or DPOTrainer argument does
here (same, alias, warned, refused) is what the config, the trainer and the command line do with it; and the table
covers every DPOConfig field and DPOTrainer argument of the installed TRL and every name the package refuses."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainingArguments
from trl import DPOConfig, DPOTrainer

from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.cli.command_parser import unknown_names_message
from trl_diffusion_sdpo.config.defaults import recommended_learning_rate, resolved_config
from trl_diffusion_sdpo.config.trl_refusals import TRL_CONFIG_NAMES, TRL_TRAINER_ARGUMENTS
from trl_diffusion_sdpo.families.registry import registered_families
from trl_diffusion_sdpo.families.sd import StableDiffusionFamily
from trl_diffusion_sdpo.io.run_summary import start_warnings

PAGE = Path(__file__).resolve().parents[2] / "docs" / "trl.md"
KINDS = ("same", "alias", "warned", "refused")


@dataclasses.dataclass(frozen=True)
class Row:
    where: str  # DPOConfig or DPOTrainer
    name: str
    value: ast.expr
    kind: str
    text: str  # what it does here, as a message would say it: backticks and links to other pages left out

    @property
    def id(self) -> str:
        return f"{self.where}-{self.name}-{ast.unparse(self.value)}"


def _plain(cell: str) -> str:
    cell = re.sub(r"\s*\(\[[^\]]*\]\([^)]*\)\)", "", cell)  # a link to another page, in parentheses
    return cell.replace("`", "")


def table_rows() -> list[Row]:
    lines = PAGE.read_text().split("| TRL | you type | here | what it does here |", 1)[1].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        where, typed, kind, text = (cell.strip() for cell in line.strip("|").split(" | "))
        keyword = ast.parse(f"f({typed.strip('`')})", mode="eval").body.keywords[0]
        rows.append(Row(where.strip("`"), keyword.arg, keyword.value, kind, text))
    return rows


ROWS = table_rows()


def _config(tmp_path, **fields: Any) -> DiffusionSDPOConfig:
    values = {"output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none", "learning_rate": 1e-5}
    return DiffusionSDPOConfig(**{**values, "max_steps": 10, "warmup_steps": 0, **fields})


def _warnings(config: DiffusionSDPOConfig) -> list[str]:
    effective, _ = resolved_config(config, StableDiffusionFamily)
    return start_warnings(config, effective, StableDiffusionFamily, True, 10)


def test_the_table_lists_every_trl_name_the_package_knows_and_every_installed_dpo_setting():
    names = {(row.where, row.name) for row in ROWS}
    assert {row.kind for row in ROWS} <= set(KINDS)
    assert {("DPOConfig", name) for name in TRL_CONFIG_NAMES} <= names
    assert {("DPOTrainer", name) for name in TRL_TRAINER_ARGUMENTS} <= names
    trl_fields = {f.name for f in dataclasses.fields(DPOConfig)} - {
        f.name for f in dataclasses.fields(TrainingArguments)
    }
    assert {("DPOConfig", name) for name in trl_fields} <= names, "a DPOConfig field of the installed TRL lacks a row"
    arguments = set(inspect.signature(DPOTrainer.__init__).parameters) - {"self"}
    assert {("DPOTrainer", name) for name in arguments} <= names, "a DPOTrainer argument lacks a row"


@pytest.mark.parametrize("row", [r for r in ROWS if r.where == "DPOConfig"], ids=lambda r: r.id)
def test_a_dpo_config_row_says_what_the_config_does(row, tmp_path):
    value = ast.literal_eval(row.value)
    text = _plain(row.text)
    if row.kind == "refused":
        with pytest.raises((TypeError, ValueError)) as refused:
            _config(tmp_path, **{row.name: value})
        assert text in str(refused.value)
        if row.name in TRL_CONFIG_NAMES:  # the command line's words: flag and YAML key
            for config_keys, flags in (([], [f"--{row.name}", "1"]), ([f"--{row.name}", "1"], [])):
                message = unknown_names_message(["max_sequence_length"], config_keys, flags)
                assert text in message and "did you mean" not in message
        return
    config = _config(tmp_path, **{row.name: value})
    if row.kind == "same":
        assert getattr(config, row.name) == value
        assert _warnings(config) == []
    elif row.kind == "alias":
        named = re.search(r"`(\w+=[^`]+)`", row.text).group(1)  # the first `field=value` the row names
        target = ast.parse(f"f({named})", mode="eval").body.keywords[0]
        assert target.arg == row.name and getattr(config, row.name) == ast.literal_eval(target.value) != value
    else:  # warned: at the start, and not without the setting
        warned = _warnings(config)
        assert len(warned) == 1 and _warnings(_config(tmp_path)) == []
        if row.name == "beta":  # the warning names the family's beta, and the row each family's
            assert f"{StableDiffusionFamily.default_beta:g}" in warned[0]
            assert all(f"{family.default_beta:g}" in text for family in registered_families())
        if row.name == "learning_rate":
            recommended = recommended_learning_rate(StableDiffusionFamily, lora=True)
            assert f"stable-diffusion LoRA: {recommended.low:.3g} to {recommended.high:.3g}" in text
            assert f"{recommended.low:.3g} to {recommended.high:.3g}" in warned[0]


@pytest.mark.parametrize("row", [r for r in ROWS if r.where == "DPOTrainer"], ids=lambda r: r.id)
def test_a_dpo_trainer_row_says_what_the_trainer_does(row, tmp_path):
    parameters = inspect.signature(DiffusionSDPOTrainer.__init__).parameters
    if row.kind == "same":
        assert row.name in parameters and parameters[row.name].kind is not inspect.Parameter.VAR_KEYWORD
        return
    assert row.kind == "refused"
    value = (
        DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False) if isinstance(row.value, ast.Call) else object()
    )
    with pytest.raises(TypeError) as refused:
        DiffusionSDPOTrainer("no-such-pipeline", **{row.name: value})
    assert _plain(row.text) in str(refused.value)


DOCS = Path(__file__).resolve().parents[2] / "docs"
# "(`field="value"`, ..., alias ...)": a config value a page calls an alias of another
STATED_ALIAS = re.compile(r"\(`(\w+)=(\"[^\"]+\"|'[^']+')`[^)]*\balias\b")


def test_every_config_alias_a_page_states_is_read_as_another_value(tmp_path):
    stated = [
        (page.name, *m.groups())
        for page in sorted(DOCS.rglob("*.md"))
        for m in STATED_ALIAS.finditer(page.read_text())
    ]
    for page, name, value in stated:
        given = ast.literal_eval(value)
        assert getattr(_config(tmp_path, **{name: given}), name) != given, f"{page}: {name}={value} is no alias"
    assert STATED_ALIAS.search('(`safeguard_space="none"`, the\nolder name, is its alias)')  # the pattern reads one


def test_the_usage_page_states_the_compile_backend_transformers_resolves(tmp_path):
    section = (DOCS / "usage.md").read_text().split("## Compiling the step", 1)[1].split("\n## ", 1)[0]
    backend = _config(tmp_path, torch_compile=True).torch_compile_backend
    assert f"(unset: `{backend}`)" in section
