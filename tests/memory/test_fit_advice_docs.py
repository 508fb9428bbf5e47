"""docs/memory.md's table of the least change that fits a 24 GB GPU is what ``estimate-memory --gpu 24 --json``
advises for each shipped config: a row edited by hand, or left stale when the estimator or the advice changes, fails
here. ``python tests/memory/test_fit_advice_docs.py`` rewrites the table."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "memory.md"
GPU = 24
BEGIN = f"<!-- least change that fits {GPU} GB: python tests/memory/test_fit_advice_docs.py -->"
END = "<!-- end of least change table -->"


CONFIGS = ROOT / "examples" / "configs"


def shipped_configs() -> list[str]:
    """The shipped training configs: each family's LoRA config, then each full-tuning config."""
    return [p.name for suffix in ("_lora.yaml", "_full.yaml") for p in sorted(CONFIGS.glob(f"*{suffix}"))]


def estimate(config: str) -> dict:
    from trl_diffusion_sdpo.cli.memory import run_estimate_memory

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            run_estimate_memory(["--config", str(ROOT / "examples" / "configs" / config), "--gpu", str(GPU), "--json"])
            == 0
        )
    return json.loads(out.getvalue().strip().splitlines()[-1])


def row(config: str) -> str:
    """One row: the config, its planned peak, and the least change that fits with the peak it plans."""
    result = estimate(config)
    advice = result["advice"]
    if advice is None:
        change = "fits as shipped"
    elif advice["flags"] is None:
        closest = f"`{' '.join(advice['closest'])}`" if advice["closest"] else "the run as it is"
        change = f"none fits; the closest, {closest}: {advice['planned_gib']:.1f} GiB planned"
        sharded = advice["sharded"]
        if sharded is None:
            change += f"; sharded, no count of GPUs up to {advice['sharded_max_gpus']} fits"
        else:
            change += f"; sharded, `{' '.join(sharded['flags'])}`: {sharded['planned_gib']:.1f} GiB planned"
    else:
        change = f"`{' '.join(advice['flags'])}`: {advice['planned_gib']:.1f} GiB planned"
        full = advice["full_tuning"]
        if full is not None:  # full tuning asked, LoRA advised: the full-tuning setting that fits, sharded
            change += f"; full tuning, `{' '.join(full['flags'])}`: {full['planned_gib']:.1f} GiB planned"
    return f"| `{config}` | {result['planned_gib']:.1f} GiB | {change} |"


def table_markdown(configs: list[str] | None = None) -> str:
    header = f"| config | planned peak | the least change that fits {GPU} GB |\n|---|---:|---|"
    return "\n".join([header, *(row(config) for config in configs or shipped_configs())])


def docs_rows() -> list[str]:
    text = DOC.read_text()
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip().splitlines()


STALE = f"docs/memory.md is stale: python {Path(__file__).relative_to(ROOT)}"


@pytest.mark.parametrize("config", ["flux_lora.yaml", "qwen_image_lora.yaml"])
def test_docs_row_is_the_advice_of_a_lora_config(config: str) -> None:
    generated = table_markdown([config]).splitlines()
    assert generated[:2] == docs_rows()[:2]
    assert generated[2] in docs_rows(), STALE


def test_docs_row_is_the_advice_of_a_full_config() -> None:
    """SD3.5 Medium full tuning: LoRA is the least change, and the full-tuning setting that fits is beside it."""
    generated = table_markdown(["sd3_full.yaml"]).splitlines()
    assert "; full tuning, `--engine " in generated[2]
    assert generated[2] in docs_rows(), STALE


def test_docs_name_every_change_and_quote_the_flux_verdict_as_printed(capsys) -> None:
    """The section lists each option the advice may change (engines/memory/advice.py's CHANGES), and its example
    line is FLUX.1 LoRA's verdict on 24 GB as the command prints it (the parts it quotes)."""
    from trl_diffusion_sdpo.cli.memory import run_estimate_memory
    from trl_diffusion_sdpo.engines.memory.advice import CHANGES

    section = DOC.read_text().split("## When a run does not fit", 1)[1].split(BEGIN, 1)[0]
    assert all(f"`{option}" in section for option in CHANGES), [c for c in CHANGES if f"`{c}" not in section]
    example = " ".join(section.split("```text", 1)[1].split("```", 1)[0].split())
    assert run_estimate_memory(["--config", str(ROOT / "examples/configs/flux_lora.yaml"), "--gpu", str(GPU)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    for part in example.split("..."):
        assert part.strip(" .") in printed, part


@pytest.mark.slow
def test_docs_table_is_the_advice_of_every_shipped_config() -> None:
    assert table_markdown().splitlines() == docs_rows(), STALE
    assert len(docs_rows()) == 2 + len(shipped_configs())


def write() -> None:
    text = DOC.read_text()
    block = f"{BEGIN}\n{table_markdown()}\n{END}"
    new, count = re.subn(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    if count != 1:
        raise SystemExit(f"{DOC}: no table markers ({BEGIN} ... {END})")
    DOC.write_text(new)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    write()
    print("wrote", DOC)
